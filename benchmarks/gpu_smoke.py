"""Every GPU path of the toolkit, once, in one command: the check a session lent a GPU runs.

    python3 benchmarks/gpu_smoke.py --out $OUT                               # on the GPU machine: sized for ~5 of its 10 minutes
    python3 benchmarks/gpu_smoke.py --out $OUT --data-dir .data/cifar10-sub  # the same, ImageFolder runs on a real tree
    python3 benchmarks/gpu_smoke.py --out /tmp/smoke --dry-run               # the same commands on the CPU, tiny (< 1 min)

It needs only what a device session has preinstalled (torch, torchvision, accelerate, timm,
safetensors, click, tqdm, scikit-learn, matplotlib, pillow) and no network:

1. **Install.** If `lspp_kd.cli` is not importable from this repository yet, it runs
   `python3 -m pip install -q --no-deps --no-build-isolation -e .` in the repository root; if that
   fails, it makes a temporary folder holding `lspp_kd/{cli,teachers,students}` as symlinks to the
   repository's folders and puts it and the repository root on PYTHONPATH for every command it
   starts. `kd` is then the `kd` next to `sys.executable` when there is one (and the project is
   installed), else `python3 -m lspp_kd.cli.main`.
2. **Data.** scikit-learn's built-in `digits` for most runs, and a generated 10-class ImageFolder
   tree of 32x32 PNGs (written into the work folder; classes differ in colour and stripe
   direction) for the ImageFolder runs, or `--data-dir DIR` (train/<class>/*, test/<class>/*).
3. **Checks**, each through the real `kd` command line in a subprocess with a timeout (command,
   exit code and seconds recorded, the key metrics read from metrics.json / config.json, every
   metric and every saved tensor checked finite, and the device checked to be the GPU):
   - `teacher_bf16`: LS++ with `--mixed-precision bf16` (timm's resnet18, random init, on the
     GPU; small_cnn in the dry run); `teacher_fp16`: the same in fp16 (on the CPU the expected
     outcome is kd's one-line refusal); `teacher_ols`: `--method ols`;
   - `student_proxy_mix`: `kd distill --proxy TEACHER/cmatrix.safetensors --augment
     crop,mixup,cutmix`; `student_kd`: `kd distill --teacher TEACHER`;
   - `imagefolder_randaugment`: `--augment crop,flip,randaugment` on the tree at `--image-size
     72`, which streams it through DataLoader workers; `compile`: `--compile`;
   - `resume_bitwise`: run A uninterrupted with `--checkpoint-every 1`; run B the same, SIGTERMed
     right after its first checkpoint appears, then the same command plus `--resume`; the two
     model.safetensors compared tensor by tensor, bitwise (on a GPU, if they differ, a second
     uninterrupted run A' measures the kernels' own run-to-run noise);
   - `teacher_epoch_benchmark`: benchmarks/gpu_teacher_epoch.py on the tree or `--data-dir`;
   - `reference_pipeline`: benchmarks/throughput.py's teacher part on the same data: training
     img/s of the paper's AlexNet and LeNet with LS++, ours against the paper's reference recipe;
   - `finetune_bf16`: `--pretrained-path` from 1,000-class RGB weights written from a random init,
     with `--layer-decay 0.7 --head-only-epochs 1`, on the tree (streamed), in bf16;
   - `sync_probe`: in-process, `torch.cuda.set_sync_debug_mode("warn")` around a few steps of
     `kd.training.loop.fit` for lspp, proxy with mixup/cutmix, kd and randaugment: synchronising
     operations counted per step, with where they come from (and the explicit
     `torch.cuda.synchronize` calls); on the CPU it only exercises the code, recorded as skipped.
4. **Results.** `OUT/gpu_smoke.json`: the environment (torch, CUDA, cuDNN, GPU, accelerate, ...),
   every check (status ok / failed / skipped / not_run, its commands with exit codes and seconds,
   metrics, errors) and an overall `ok`; it is rewritten after every check, so a run stopped from
   outside still leaves what it had. `OUT/gpu_smoke.log`: every command's output. A table is
   printed at the end. The exit code is 0 only if every check passed; a failing check never stops
   the others, and checks that would start after `--deadline` (540 s on a GPU) are recorded
   not_run, so the JSON is complete before a 10-minute limit.

`--dry-run` runs the same commands on the CPU with tiny sizes (two at a time); tests/test_gpu_smoke.py
runs it, so this script cannot rot. Without a GPU and without --dry-run it records why and exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
JSON_NAME, LOG_NAME = "gpu_smoke.json", "gpu_smoke.log"
CHECKS = (
    "install", "teacher_bf16", "teacher_fp16", "teacher_ols", "student_proxy_mix", "student_kd",
    "imagefolder_randaugment", "compile", "resume_bitwise", "teacher_epoch_benchmark", "reference_pipeline", "sync_probe",
    "finetune_bf16",
)
TEST_METRICS = ("test_top1", "test_nll", "test_ece", "test_mean_confidence")
KEPT_METRICS = (*TEST_METRICS, "steps", "epochs", "train_seconds", "images_per_second", "peak_memory_mb", "peak_memory_kind",
                "device", "mixed_precision", "teacher_forward_share", "resumed_from_step", "effective_batch_size")
KEPT_CONFIG = ("model", "method", "dataset_name", "image_size", "augment", "compile", "mixed_precision", "batch_size", "epochs", "max_steps")
TREE_CLASSES = 10


# ----------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    """How big each run is: `gpu()` fits the whole command in well under 10 minutes, `dry()` in under 2 on 2 CPU cores."""

    common: list[str]  # every digits run
    big_model: str
    teacher: list[str]
    student: list[str]
    tree_train: int  # generated ImageFolder tree: images per class
    tree_test: int
    tree_run: list[str]  # the ImageFolder check (crop,flip,randaugment, streamed)
    compile: list[str]
    resume: list[str]  # resume check: enough epochs that SIGTERM lands mid-run
    bench: list[str]  # gpu_teacher_epoch.py arguments besides --data-dir and --results-dir
    reference: list[str]  # throughput.py teacher arguments besides --data-dir and --results-dir
    probe_steps: int
    jobs: int  # checks run at once
    deadline: float  # seconds for everything; later checks are not run
    timeout: dict[str, float] = field(default_factory=dict)

    @classmethod
    def gpu(cls) -> Sizes:
        return cls(
            common=["--image-size", "32", "--batch-size", "128"], big_model="resnet18",
            teacher=["--epochs", "4"], student=["--epochs", "3"], tree_train=500, tree_test=50,
            tree_run=["--image-size", "72", "--epochs", "1", "--max-steps", "30", "--batch-size", "128"],
            compile=["--epochs", "2"], resume=["--image-size", "32", "--batch-size", "64", "--epochs", "10"],
            bench=[], reference=["--repeats", "3", "--steps", "50"], probe_steps=30, jobs=1, deadline=540.0,
            timeout={"default": 240.0, "compile": 360.0, "bench": 300.0, "probe": 300.0},
        )

    @classmethod
    def dry(cls) -> Sizes:
        return cls(
            # small_cnn, not resnet18: timm's resnet18 in bf16 on 8x8 digits turns NaN in about one CPU run in five
            # (the same seed, one thread; fp32, and 32x32 images, did not), which would make the dry run flaky.
            common=["--batch-size", "32", "--max-steps", "3"], big_model="small_cnn",
            teacher=["--epochs", "1"], student=["--epochs", "1"], tree_train=12, tree_test=4,
            tree_run=["--image-size", "72", "--epochs", "1", "--max-steps", "2", "--batch-size", "16"],
            compile=["--epochs", "1", "--max-steps", "2"], resume=["--batch-size", "64", "--epochs", "3"],
            bench=["--max-steps", "2", "--batch-size", "16"], reference=["--smoke"], probe_steps=2, jobs=2, deadline=300.0,
            timeout={"default": 150.0, "compile": 200.0, "bench": 200.0, "probe": 150.0},
        )


# ----------------------------------------------------------------------------- the session: paths, commands, results


class Session:
    """Work folder, how to run `kd`, the results so far (written to OUT/gpu_smoke.json after every check)."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args, self.sizes = args, sizes
        self.out: Path = args.out
        self.work = Path(tempfile.mkdtemp(prefix="gpu-smoke-", dir=args.work_dir))
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.checks: dict[str, dict[str, Any]] = {name: {"status": "not_run", "ok": False} for name in CHECKS}
        self.environment: dict[str, Any] = {}
        self.env = {**os.environ, "KD_CACHE_DIR": str(self.work / "cache"), "PYTHONUNBUFFERED": "1"}
        if args.dry_run:  # the CPU even where there is a GPU; two runs at once on two cores
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.kd: list[str] = [sys.executable, "-m", "lspp_kd.cli.main"]
        self.cuda = False
        self.log = open(self.out / LOG_NAME, "w", encoding="utf-8", errors="replace")

    # --- time

    def remaining(self) -> float:
        return self.sizes.deadline - (time.monotonic() - self.started)

    def timeout(self, kind: str = "default") -> float:
        return min(self.sizes.timeout.get(kind, self.sizes.timeout["default"]), self.remaining())

    # --- output

    def write_log(self, header: str, text: str) -> None:
        with self.lock:
            self.log.write(f"\n===== {header}\n{text[-200_000:]}\n")
            self.log.flush()

    def report(self) -> dict[str, Any]:
        ok = all(check["ok"] for check in self.checks.values())
        return {
            "ok": ok,
            "mode": "dry-run (CPU, tiny sizes)" if self.args.dry_run else "gpu",
            "command": shlex.join(["python3", "benchmarks/gpu_smoke.py", *sys.argv[1:]]),
            "seconds": round(time.monotonic() - self.started, 1),
            "failed": [name for name, check in self.checks.items() if not check["ok"]],
            "environment": self.environment,
            "checks": self.checks,
        }

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.report(), indent=2, default=str) + "\n"
            tmp = self.out / (JSON_NAME + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / JSON_NAME)

    def record(self, name: str, result: dict[str, Any]) -> None:
        with self.lock:
            self.checks[name] = result
        self.save()
        status = result["status"]
        print(f"[{time.monotonic() - self.started:6.1f}s] {name}: {status}"
              + (f" ({result.get('error')})" if status == "failed" and result.get("error") else ""), flush=True)

    # --- commands

    def show(self, command: list[str]) -> str:
        """A command as a person would type it: `kd ...`, paths inside the work folder as $WORK/..."""
        if command[: len(self.kd)] == self.kd:
            command = ["kd", *command[len(self.kd):]]
        return shlex.join(command).replace(str(self.work), "$WORK").replace(str(ROOT) + "/", "")

    def run(self, command: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run a command (a new process group, killed whole on timeout); its record: command, exit code, seconds, stderr's tail."""
        record: dict[str, Any] = {"command": self.show(command)}
        if timeout <= 1:
            record.update(returncode=None, seconds=0.0, stderr_tail="", error="not started: out of time")
            return record
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, errors="replace", start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stdout, stderr = process.communicate()
            record["error"] = f"timed out after {timeout:.0f} s"
        record.update(returncode=process.returncode, seconds=round(time.monotonic() - started, 2))
        record["stderr_tail"] = _tail(stderr)
        self.write_log(f"{record['command']}  -> exit {process.returncode} in {record['seconds']} s",
                       f"--- stdout\n{stdout}\n--- stderr\n{stderr}")
        return record


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def _tail(text: str, lines: int = 6, chars: int = 1500) -> str:
    """The last lines of a command's output, progress-bar redraws (\\r) reduced to their last state."""
    kept = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    kept = [line for line in kept if line and "%|" not in line]  # tqdm's bars say nothing a record needs
    return "\n".join(kept[-lines:])[-chars:]


# ----------------------------------------------------------------------------- install and environment


def make_importable(session: Session) -> dict[str, Any]:
    """`lspp_kd.cli` importable from this repository by the commands this script starts (see the docstring)."""
    probe = [sys.executable, "-c", "import lspp_kd.cli.main as m, kd; print(m.__file__); print(kd.__file__)"]
    result: dict[str, Any] = {"commands": []}

    def importable(env: dict[str, str]) -> bool:
        found = subprocess.run(probe, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=120)
        paths = found.stdout.split()
        return found.returncode == 0 and len(paths) == 2 and all(Path(p).resolve().is_relative_to(ROOT) for p in paths)

    if session.args.install == "auto" and importable(session.env):
        result.update(method="already installed")
    else:
        if session.args.install in ("auto", "pip"):
            record = session.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."], 300)
            result["commands"].append(record)
            if record["returncode"] == 0 and importable(session.env):
                result.update(method="pip install -e")
        if "method" not in result:
            shim = session.work / "importable"
            package = shim / "lspp_kd"
            package.mkdir(parents=True)
            for name in ("cli", "teachers", "students"):
                (package / name).symlink_to(ROOT / name, target_is_directory=True)
            session.env["PYTHONPATH"] = os.pathsep.join(
                [str(shim), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
            if not importable(session.env):
                raise RuntimeError("lspp_kd.cli is not importable, neither installed nor through the symlink folder")
            result.update(method="symlinks on PYTHONPATH", pythonpath=session.env["PYTHONPATH"].replace(str(session.work), "$WORK"))
    console = Path(sys.executable).with_name("kd")
    if result["method"] != "symlinks on PYTHONPATH" and console.is_file() and os.access(console, os.X_OK):
        session.kd = [str(console)]
    result["kd"] = shlex.join(session.kd)
    return result


def environment() -> dict[str, Any]:
    import importlib.metadata as metadata

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
    }
    for package in ("torchvision", "accelerate", "timm", "safetensors", "numpy", "click", "scikit-learn", "pillow"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    try:
        sys.path.insert(0, str(ROOT))
        import kd

        info["kd"] = kd.__version__
    except Exception as error:  # recorded, not fatal: the install check says more
        info["kd"] = f"not importable: {error}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), capability=list(torch.cuda.get_device_capability(0)),
            gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    for key, command in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
                         ("git_commit", ["git", "rev-parse", "HEAD"])):
        try:  # either may be missing on the machine, or the copied tree may have no .git
            found = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
            info[key] = found.stdout.strip() if found.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            info[key] = None
    return info


# ----------------------------------------------------------------------------- data


def write_tree(root: Path, train_per_class: int, test_per_class: int, side: int = 32) -> Path:
    """A 10-class ImageFolder tree of RGB PNGs: each class its own colour and stripe direction, plus noise and a random phase."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [128, 128, 128]], dtype=np.float64)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for k in range(TREE_CLASSES):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            angle = math.pi * k / TREE_CLASSES
            for i in range(count):
                stripes = 0.5 + 0.5 * np.sin(2 * math.pi * 3 * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
                image = stripes[..., None] * palette[k] + (1 - stripes[..., None]) * 40 + rng.normal(0, 20, (side, side, 3))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


# ----------------------------------------------------------------------------- reading a run


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_run(run_dir: Path, session: Session, *, precision: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """A finished run's key metrics and config, and what is wrong with it (non-finite values, wrong device, missing files)."""
    import torch
    from safetensors.torch import load_file

    problems: list[str] = []
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as error:
        return {}, [f"cannot read the run's metrics.json/config.json: {error}"]
    kept: dict[str, Any] = {key: metrics[key] for key in KEPT_METRICS if key in metrics}
    kept["config"] = {key: config[key] for key in KEPT_CONFIG if key in config}
    losses = metrics.get("epoch_train_loss") or []
    kept["last_train_loss"] = losses[-1] if losses else None
    for key in TEST_METRICS:
        if not _finite(metrics.get(key)):
            problems.append(f"{key} is {metrics.get(key)!r}, not a finite number")
    if not losses or not all(_finite(v) for v in losses):
        problems.append(f"epoch_train_loss {losses!r} is not all finite")
    for parts in (metrics.get("epoch_loss_parts") or {}).values():
        if not all(_finite(v) for v in parts):
            problems.append(f"epoch_loss_parts holds a non-finite value: {parts!r}")
            break
    if not _finite(metrics.get("images_per_second")) or metrics.get("images_per_second", 0) <= 0:
        problems.append(f"images_per_second is {metrics.get('images_per_second')!r}")
    expected_device = "cuda" if session.cuda else "cpu"
    if not str(metrics.get("device", "")).startswith(expected_device):
        problems.append(f"trained on {metrics.get('device')!r}, expected {expected_device}")
    if precision is not None and metrics.get("mixed_precision", config.get("mixed_precision")) != precision:
        problems.append(f"mixed_precision is {metrics.get('mixed_precision')!r}, asked for {precision}")
    for name in ("model.safetensors", "cmatrix.safetensors"):
        path = run_dir / name
        if not path.exists():
            if name == "model.safetensors":
                problems.append("no model.safetensors")
            continue
        bad = [key for key, tensor in load_file(str(path)).items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if bad:
            problems.append(f"{name}: non-finite values in {', '.join(bad[:5])}")
    return kept, problems


def kd_check(session: Session, args: list[str], *, out: Path, precision: str | None = None,
             timeout_kind: str = "default", expect: Callable[[dict[str, Any]], list[str]] | None = None) -> dict[str, Any]:
    """One `kd` run: it must exit 0 and leave a finite, finished run on the expected device."""
    record = session.run([*session.kd, *args, "--out", str(out)], session.timeout(timeout_kind))
    result: dict[str, Any] = {"commands": [record]}
    problems: list[str] = []
    if record["returncode"] != 0:
        last = (record["stderr_tail"].splitlines() or [""])[-1]
        problems.append(record.get("error") or f"exit code {record['returncode']}: {last}")
    else:
        result["metrics"], problems = read_run(out, session, precision=precision)
        if expect is not None and not problems:
            problems += expect(result["metrics"])
    return finish(result, problems)


def finish(result: dict[str, Any], problems: list[str], status: str | None = None) -> dict[str, Any]:
    result["status"] = status or ("failed" if problems else "ok")
    result["ok"] = result["status"] in ("ok", "skipped")
    if problems:
        result["error"] = "; ".join(str(p) for p in problems)[:1000]
    return result


# ----------------------------------------------------------------------------- the checks


def check_teachers(session: Session, data: dict[str, Path]) -> None:
    """teacher_bf16, then the two students that need it (its C-matrix, its network)."""
    s = session.sizes
    teacher = session.work / "teacher_bf16"
    session.record("teacher_bf16", kd_check(
        session, ["train-teacher", "--model", s.big_model, *s.common, *s.teacher, "--mixed-precision", "bf16"],
        out=teacher, precision="bf16",
        expect=lambda m: [] if (teacher / "cmatrix.safetensors").exists() else ["no cmatrix.safetensors"]))
    if not session.checks["teacher_bf16"]["ok"]:
        for name in ("student_proxy_mix", "student_kd"):
            session.record(name, finish({"commands": []}, ["not run: teacher_bf16 failed"]))
        return
    session.record("student_proxy_mix", kd_check(
        session, ["distill", "--proxy", str(teacher / "cmatrix.safetensors"), "--model", "tiny_cnn", *s.common, *s.student,
                  "--augment", "crop,mixup,cutmix", "--mixed-precision", "bf16"],
        out=session.work / "student_proxy", precision="bf16"))
    session.record("student_kd", kd_check(
        session, ["distill", "--teacher", str(teacher), "--model", "tiny_cnn", *s.common, *s.student, "--mixed-precision", "bf16"],
        out=session.work / "student_kd", precision="bf16",
        expect=lambda m: [] if _finite(m.get("teacher_forward_share")) else [f"teacher_forward_share is {m.get('teacher_forward_share')!r}"]))


def check_fp16(session: Session, data: dict[str, Path]) -> None:
    s = session.sizes
    args = ["train-teacher", "--model", s.big_model, *s.common, *s.teacher, "--mixed-precision", "fp16"]
    if session.cuda:
        session.record("teacher_fp16", kd_check(session, args, out=session.work / "teacher_fp16", precision="fp16"))
        return
    # On the CPU kd refuses fp16 in one line instead of silently training in float32: that is the expected outcome.
    record = session.run([*session.kd, *args, "--out", str(session.work / "teacher_fp16")], session.timeout())
    lines = [line for line in record["stderr_tail"].splitlines() if line.startswith("kd: ")]
    problems = []
    if record["returncode"] in (0, None):
        problems.append(f"expected kd to refuse fp16 on the CPU, got exit code {record['returncode']}")
    if len(lines) != 1 or "fp16" not in lines[0]:
        problems.append(f"expected one 'kd: error: ... fp16 ...' line, got {record['stderr_tail']!r}")
    result = {"commands": [record], "expected": "refused on the CPU: a one-line error and a non-zero exit code",
              "message": lines[-1] if lines else None}
    session.record("teacher_fp16", finish(result, problems))


def check_ols(session: Session, data: dict[str, Path]) -> None:
    s = session.sizes
    out = session.work / "teacher_ols"
    session.record("teacher_ols", kd_check(
        session, ["train-teacher", "--method", "ols", "--model", "small_cnn", *s.common, *s.teacher], out=out,
        expect=lambda m: [] if (out / "cmatrix.safetensors").exists() else ["no cmatrix.safetensors"]))


def check_imagefolder(session: Session, data: dict[str, Path]) -> None:
    s = session.sizes
    out = session.work / "imagefolder_randaugment"

    def streamed(metrics: dict[str, Any]) -> list[str]:
        options = json.loads((out / "config.json").read_text()).get("augment_options", {})
        metrics["augment_options"] = options
        if options.get("crop") != "random_resized":  # the crop the DataLoader workers make for streamed data
            return [f"the tree was not streamed (crop {options.get('crop')!r})"]
        return [] if "randaugment" in options.get("names", []) else [f"augmentations {options.get('names')!r}"]

    session.record("imagefolder_randaugment", kd_check(
        session, ["train-teacher", "--dataset", "imagefolder", "--data-dir", str(data["tree"]), "--model", "small_cnn", *s.tree_run,
                  "--augment", "crop,flip,randaugment", "--mixed-precision", "bf16"],
        out=out, precision="bf16", expect=streamed))


def check_finetune(session: Session, data: dict[str, Path]) -> None:
    """Fine-tuning from 1,000-class RGB weights (written here from a random init, as an ImageNet checkpoint)
    on the 10-class tree, streamed, with --layer-decay and --head-only-epochs, in bf16."""
    from safetensors.torch import save_file

    from kd.models.networks import build_model

    s = session.sizes
    weights = session.work / "imagenet_like.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(s.big_model, 1000, 3, 72).state_dict().items()}, str(weights))
    out = session.work / "finetune_bf16"

    def started_from_the_file(metrics: dict[str, Any]) -> list[str]:
        config = json.loads((out / "config.json").read_text())
        metrics["pretrained_sha256"] = config.get("pretrained_sha256")
        return [] if config.get("pretrained_sha256") and config.get("layer_decay") == 0.7 else ["config.json lacks the weights' source"]

    session.record("finetune_bf16", kd_check(
        session, ["train-teacher", "--dataset", "imagefolder", "--data-dir", str(data["tree"]), "--model", s.big_model,
                  "--pretrained-path", str(weights), "--layer-decay", "0.7", "--head-only-epochs", "1", *s.tree_run,
                  "--mixed-precision", "bf16"],
        out=out, precision="bf16", expect=started_from_the_file))


def check_compile(session: Session, data: dict[str, Path]) -> None:
    s = session.sizes
    session.record("compile", kd_check(
        session, ["train-teacher", "--model", "small_cnn", *s.common, *s.compile, "--compile", "--mixed-precision", "bf16"],
        out=session.work / "compile", precision="bf16", timeout_kind="compile",
        expect=lambda m: [] if m["config"].get("compile") is True else ["config.json does not record compile: true"]))


def _tensor_diff(a_path: Path, b_path: Path) -> dict[str, Any]:
    """Bitwise comparison of two safetensors files, tensor by tensor, and the largest absolute difference."""
    import torch
    from safetensors.torch import load_file

    def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        return x.contiguous().view(-1).view(torch.uint8).equal(y.contiguous().view(-1).view(torch.uint8))

    a, b = load_file(str(a_path)), load_file(str(b_path))

    different = sorted(key for key in a.keys() & b.keys() if not same_bits(a[key], b[key]))
    max_diff = 0.0
    for key in different:
        if a[key].shape == b[key].shape and a[key].is_floating_point():
            max_diff = max(max_diff, float((a[key].double() - b[key].double()).abs().max()))
    return {"tensors": len(a), "same_names": a.keys() == b.keys(), "bitwise_equal": not different and a.keys() == b.keys(),
            "tensors_differing": len(different), "first_differing": different[:5], "max_abs_diff": max_diff}


def check_resume(session: Session, data: dict[str, Path]) -> None:
    s = session.sizes
    env = {**session.env, "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # the same kernels in the same order
    base = [*session.kd, "train-teacher", "--model", "small_cnn", *s.resume, "--seed", "3", "--checkpoint-every", "1"]
    a, a2, b = session.work / "resume_a", session.work / "resume_a2", session.work / "resume_b"
    result: dict[str, Any] = {"commands": []}
    problems: list[str] = []

    record = session.run([*base, "--out", str(a)], session.timeout(), env=env)
    result["commands"].append(record)
    if record["returncode"] != 0:
        session.record("resume_bitwise", finish(result, [f"run A failed: {record.get('error') or record['stderr_tail'][-300:]}"]))
        return

    # Run B: the same command, SIGTERMed right after its first checkpoint appears.
    command = [*base, "--out", str(b)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + session.timeout()
    signalled_after = None
    while process.poll() is None and time.monotonic() < deadline:
        if any((b / "checkpoints").glob("step-*")):
            process.send_signal(signal.SIGTERM)
            signalled_after = [p.name for p in sorted((b / "checkpoints").glob("step-*"))]
            break
        time.sleep(0.01)
    try:
        process.wait(timeout=max(5.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.wait()
    reader.join(timeout=10)
    text = "".join(output)
    record = {"command": session.show(command) + "   # SIGTERM after the first checkpoint", "returncode": process.returncode,
              "seconds": round(time.monotonic() - started, 2), "stderr_tail": _tail(text)}
    session.write_log(record["command"] + f" -> exit {process.returncode}", text)
    result["commands"].append(record)
    result["checkpoint_seen_when_signalled"] = signalled_after
    result["checkpoints_after_stop"] = [p.name for p in sorted((b / "checkpoints").glob("step-*"))]
    if signalled_after is None:
        problems.append(f"run B ended (exit {process.returncode}) before its first checkpoint could be waited for")
    elif process.returncode == 0:
        problems.append("run B finished before SIGTERM reached it: nothing was resumed (make the run longer)")
    elif process.returncode != 128 + signal.SIGTERM:
        problems.append(f"run B exited {process.returncode} on SIGTERM, expected {128 + signal.SIGTERM}")

    if not problems:
        record = session.run([*base, "--out", str(b), "--resume"], session.timeout(), env=env)
        result["commands"].append(record)
        if record["returncode"] != 0:
            problems.append(f"the resumed run failed: {record.get('error') or record['stderr_tail'][-300:]}")
    if not problems:
        metrics_b, run_problems = read_run(b, session)
        metrics_a, _ = read_run(a, session)
        problems += run_problems
        result["resumed_from_step"] = metrics_b.get("resumed_from_step")
        result["steps"] = metrics_b.get("steps")
        if not metrics_b.get("resumed_from_step"):
            problems.append(f"metrics.json says resumed_from_step {metrics_b.get('resumed_from_step')!r}")
        result["a_vs_resumed"] = _tensor_diff(a / "model.safetensors", b / "model.safetensors")
        result["test_top1"] = {"a": metrics_a.get("test_top1"), "resumed": metrics_b.get("test_top1")}
        if result["a_vs_resumed"]["bitwise_equal"]:
            result["verdict"] = "bitwise identical"
        elif not session.cuda:
            problems.append(f"the resumed run differs from the uninterrupted one on the CPU: {result['a_vs_resumed']}")
        else:
            # On a GPU, kernels (cuDNN's choice, atomics) may differ from run to run: measure that with a second run A.
            record = session.run([*base, "--out", str(a2)], session.timeout(), env=env)
            result["commands"].append(record)
            if record["returncode"] != 0:
                problems.append("run A' (the noise baseline) failed")
            else:
                noise = _tensor_diff(a / "model.safetensors", a2 / "model.safetensors")
                result["a_vs_a_again"] = noise
                if noise["bitwise_equal"]:
                    problems.append("two uninterrupted runs are bitwise identical but the resumed one differs: resume is not exact")
                elif result["a_vs_resumed"]["max_abs_diff"] <= max(10 * noise["max_abs_diff"], 1e-6):
                    result["verdict"] = "not bitwise, but within the run-to-run noise of the GPU kernels (A vs A' differ too)"
                else:
                    problems.append("the resumed run differs from A by more than 10x the run-to-run noise")
    session.record("resume_bitwise", finish(result, problems))


def check_benchmark(session: Session, data: dict[str, Path]) -> None:
    results_dir = session.work / "bench"
    data_dir = data.get("real") or data["tree"]
    record = session.run([sys.executable, "benchmarks/gpu_teacher_epoch.py", "--data-dir", str(data_dir), "--results-dir", str(results_dir),
                          *session.sizes.bench], session.timeout("bench"))
    result: dict[str, Any] = {"commands": [record], "data": "--data-dir" if "real" in data else "generated tree"}
    problems: list[str] = []
    if record["returncode"] != 0:
        problems.append(record.get("error") or f"exit code {record['returncode']}: {record['stderr_tail'][-300:]}")
    else:
        try:
            report = json.loads((results_dir / "gpu_teacher_epoch.json").read_text())
        except (OSError, ValueError) as error:
            report = {}
            problems.append(f"no readable gpu_teacher_epoch.json: {error}")
        result["report"] = report
        if report:
            for key in ("images_per_second", "peak_memory_mb", "train_seconds"):
                if not _finite(report.get(key)) or report[key] <= 0:
                    problems.append(f"{key} is {report.get(key)!r}")
            if not str(report.get("device", "")).startswith("cuda" if session.cuda else "cpu"):
                problems.append(f"ran on {report.get('device')!r}")
    session.record("teacher_epoch_benchmark", finish(result, problems))


def check_reference(session: Session, data: dict[str, Path]) -> None:
    """Training img/s of the paper's AlexNet and LeNet with LS++: ours against the paper's reference recipe
    (throughput.py's teacher part: per-sample PIL transforms in a DataLoader, the whole K x K matrix every step)."""
    results_dir = session.work / "reference"
    data_dir = data.get("real") or data["tree"]
    record = session.run([sys.executable, "benchmarks/throughput.py", "teacher", "--data-dir", str(data_dir),
                          "--results-dir", str(results_dir), *session.sizes.reference], session.timeout("bench"))
    result: dict[str, Any] = {"commands": [record]}
    problems: list[str] = []
    if record["returncode"] != 0:
        problems.append(record.get("error") or f"exit code {record['returncode']}: {record['stderr_tail'][-300:]}")
    else:
        try:
            part = json.loads((results_dir / "throughput.json").read_text())["parts"]["teacher"]
        except (OSError, ValueError, KeyError) as error:
            part = {}
            problems.append(f"no readable teacher part in throughput.json: {error}")
        result["device"] = (part.get("machine") or {}).get("device")
        result["models"] = {
            model: {"ours_images_per_second": row["ours_images_per_second"]["median"],
                    "reference_images_per_second": row["baseline_images_per_second"]["median"],
                    "ratio_of_medians": row["ratio_ours_over_baseline"]["of_medians"]}
            for model, row in (part.get("results") or {}).items()
        }
        if part and not result["models"]:
            problems.append("throughput.json's teacher part holds no models")
        for model, row in result["models"].items():
            if not all(_finite(value) and value > 0 for value in row.values()):
                problems.append(f"{model}: {row}")
        if part and not str(result["device"]).startswith("cuda" if session.cuda else "cpu"):
            problems.append(f"ran on {result['device']!r}")
    session.record("reference_pipeline", finish(result, problems))


def check_probe(session: Session, data: dict[str, Path]) -> None:
    out = session.work / "probe.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--probe-worker", str(out), "--probe-steps", str(session.sizes.probe_steps)]
    record = session.run(command, session.timeout("probe"))
    result: dict[str, Any] = {"commands": [record]}
    problems: list[str] = []
    if record["returncode"] != 0:
        problems.append(record.get("error") or f"exit code {record['returncode']}: {record['stderr_tail'][-400:]}")
    else:
        result.update(json.loads(out.read_text()))
        problems += result.pop("problems", [])
    status = None if problems or session.cuda else "skipped"
    if status == "skipped":
        result["reason"] = "no CUDA device: no device syncs to count (the probe's code ran on the CPU for a few steps)"
    session.record("sync_probe", finish(result, problems, status))


# ----------------------------------------------------------------------------- the sync probe (a subprocess of this script)


def probe_worker(out: Path, steps: int) -> None:
    """Count synchronising CUDA operations per training step of `fit`, by configuration, with where they come from."""
    sys.path.insert(0, str(ROOT))
    import warnings

    import torch
    from accelerate.utils import set_seed

    from kd.cmatrix.artifact import CMatrix
    from kd.data.augment import AugmentOptions
    from kd.data.datasets import load_dataset
    from kd.methods import build_method
    from kd.models.networks import build_model
    from kd.training.loop import TrainModule, fit, make_accelerator
    from kd.training.settings import Settings

    cuda = torch.cuda.is_available()
    data = load_dataset("digits", image_size=32 if cuda else None)
    accelerator = make_accelerator("bf16" if cuda else "no")
    names = tuple(data.class_names)
    cmatrix = CMatrix.from_logits(torch.randn(data.num_classes, data.num_classes - 1, generator=torch.Generator().manual_seed(1)),
                                  names, alpha=0.1)
    set_seed(1)
    teacher = build_model("small_cnn", data.num_classes, data.channels, data.image_size).eval()
    configs = {  # name: (model, method, method arguments, augmentations)
        "lspp_plain": ("small_cnn", "lspp", {}, ()),
        "proxy_mixup_cutmix": ("tiny_cnn", "proxy", {"cmatrix": cmatrix}, ("crop", "mixup", "cutmix")),
        "kd": ("tiny_cnn", "kd", {"teacher": teacher}, ("crop", "flip")),
        "randaugment": ("small_cnn", "lspp", {}, ("crop", "flip", "randaugment")),
    }
    device_helpers = os.path.join("kd", "device.py")  # `synchronize` there: its caller is the interesting frame
    project = (str(ROOT / "kd") + os.sep, str(ROOT / "cli") + os.sep, str(ROOT / "teachers") + os.sep, str(ROOT / "students") + os.sep)
    report: dict[str, Any] = {"device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision, "steps": steps,
                              "configs": {}, "problems": []}

    def where(frame: traceback.FrameSummary) -> str:
        path = Path(frame.filename).resolve()
        return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else frame.filename}:{frame.lineno} in {frame.name}"

    for name, (model, method, given, augment) in configs.items():
        set_seed(0)
        module = TrainModule(build_model(model, data.num_classes, data.channels, data.image_size),
                             build_method(method, data.num_classes, names, **given))
        settings = Settings(epochs=1000, batch_size=64, lr=0.05, weight_decay=5e-4, seed=0, max_steps=steps)
        events: list[dict[str, Any]] = []  # implicit syncs (the sync-debug warnings)
        explicit: list[dict[str, Any]] = []  # torch.cuda.synchronize() calls (the loop's clock): not warned about

        def note(into: list[dict[str, Any]], location: str | None) -> None:
            """Where in `fit` we are (setup, the step count, end) and the innermost project frame."""
            stack = traceback.extract_stack()[:-2]
            own = [f for f in stack if str(Path(f.filename).resolve()).startswith(project) and not f.filename.endswith(device_helpers)]
            phase, step = "outside fit", None
            frame = sys._getframe(2)
            while frame is not None:
                if frame.f_code.co_name == "fit" and frame.f_code.co_filename.endswith(os.path.join("training", "loop.py")):
                    state = frame.f_locals.get("state")
                    phase = "setup" if state is None else "fit"
                    step = None if state is None else int(state.step)  # optimizer steps done: it belongs to step `step` (from 0)
                    break
                frame = frame.f_back
            project_frame = where(own[-1]) if own else None
            into.append({"phase": phase, "step": step, "location": location or project_frame, "project_frame": project_frame})

        def hook(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if "synchroniz" in str(message).lower():
                note(events, f"{filename}:{lineno}".replace(str(ROOT) + os.sep, ""))

        real_synchronize = torch.cuda.synchronize

        def counted_synchronize(*args: Any, **kwargs: Any) -> None:
            note(explicit, None)
            real_synchronize(*args, **kwargs)

        started = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = hook
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                    torch.cuda.synchronize = counted_synchronize
                try:
                    result = fit(module, data, settings, accelerator, augment=AugmentOptions(augment), evaluate=False, desc=name)
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
                        torch.cuda.synchronize = real_synchronize
        except Exception as error:  # one configuration failing must not hide the others
            report["problems"].append(f"{name}: {type(error).__name__}: {error}")
            report["configs"][name] = {"error": traceback.format_exc()[-2000:]}
            continue
        for event in (*events, *explicit):  # the last step's count is the number of steps: what follows it is the end
            if event["phase"] == "fit":
                event["phase"] = "step" if event["step"] < result.steps else "end"
        per_step = [sum(1 for e in events if e["phase"] == "step" and e["step"] == k) for k in range(result.steps)]
        later = per_step[1:] or per_step
        locations = Counter((e["location"], e["project_frame"]) for e in events)
        steps_at = {key: sorted({e["step"] for e in events if (e["location"], e["project_frame"]) == key and e["step"] is not None})
                    for key in locations}
        report["configs"][name] = {
            "model": model, "method": method, "augment": list(augment), "steps": result.steps,
            "seconds": round(time.monotonic() - started, 2), "syncs_total": len(events),
            "syncs_setup": sum(1 for e in events if e["phase"] == "setup"),
            "syncs_end": sum(1 for e in events if e["phase"] in ("end", "outside fit")),
            "syncs_per_step": per_step,
            "median_per_step_after_first": statistics.median(later) if later else 0,
            "max_per_step_after_first": max(later) if later else 0,
            "steps_without_sync": sum(1 for c in per_step if c == 0),
            "by_location": [{"location": loc, "project_frame": frame, "count": count,
                             "steps": steps_at[(loc, frame)][:12]}
                            for (loc, frame), count in locations.most_common(15)],
            "explicit_synchronize": {
                "total": len(explicit), "in_steps": sum(1 for e in explicit if e["phase"] == "step"),
                "by_location": [{"project_frame": frame, "count": count}
                                for frame, count in Counter(e["project_frame"] for e in explicit).most_common(8)],
            },
        }
        if not all(math.isfinite(v) for values in result.epoch_loss_parts.values() for v in values):
            report["problems"].append(f"{name}: non-finite training loss {result.epoch_loss_parts}")
    out.write_text(json.dumps(report, indent=2) + "\n")


# ----------------------------------------------------------------------------- main


def print_table(session: Session) -> None:
    rows = []
    for name, check in session.checks.items():
        metrics = check.get("metrics") or {}
        if name == "install":
            info = check.get("method", "")
        elif name == "teacher_fp16" and "expected" in check:
            info = f"refused as expected: {check.get('message')}"
        elif name == "resume_bitwise":
            info = check.get("verdict") or ""
            if check.get("resumed_from_step"):
                info += f" (resumed from step {check['resumed_from_step']} of {check.get('steps')})"
        elif name == "teacher_epoch_benchmark":
            report = check.get("report") or {}
            info = f"{report.get('images_per_second', 0):.0f} img/s, peak {report.get('peak_memory_mb', 0):.0f} MiB" if report else ""
        elif name == "reference_pipeline":
            models = check.get("models") or {}
            info = ", ".join(f"{m} {r['ours_images_per_second']:.0f} vs {r['reference_images_per_second']:.0f} img/s "
                             f"({r['ratio_of_medians']:.2f}x)" for m, r in models.items())
        elif name == "sync_probe":
            configs = check.get("configs") or {}
            info = check.get("reason", "") if check.get("status") == "skipped" else ", ".join(
                f"{k} {v.get('median_per_step_after_first', '?')}/step" for k, v in configs.items())
        elif metrics:
            info = f"top-1 {metrics.get('test_top1', float('nan')):.3f}, {metrics.get('images_per_second', 0):.0f} img/s, {metrics.get('device')}"
        else:
            info = ""
        if check.get("error"):
            info = (info + " | " if info else "") + check["error"]
        seconds = sum((c.get("seconds") or 0) for c in check.get("commands", []))
        rows.append((name, check["status"], f"{seconds:.1f}", info[:110]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  {'status':<8} {'s':>6}  details")
    for name, status, seconds, info in rows:
        print(f"{name:<{width}}  {status:<8} {seconds:>6}  {info}")
    report = session.report()
    print(f"\n{'OK' if report['ok'] else 'FAILED: ' + ', '.join(report['failed'])} in {report['seconds']:.0f} s -> {session.out / JSON_NAME}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="folder for gpu_smoke.json and gpu_smoke.log (default: $OUT)")
    parser.add_argument("--data-dir", type=Path,
                        help="a real ImageFolder tree (train/<class>/*, test/<class>/*) for the ImageFolder check and the benchmark")
    parser.add_argument("--dry-run", action="store_true", help="the same commands on the CPU, tiny sizes")
    parser.add_argument("--jobs", type=int, help="checks run at once (default: 1 on a GPU, 2 for --dry-run)")
    parser.add_argument("--deadline", type=float, help="seconds for everything (default 540 on a GPU, 300 dry); later checks are recorded not_run")
    parser.add_argument("--install", choices=("auto", "pip", "symlinks"), default="auto",
                        help="auto: use the installed project if it is this repository, else pip install -e, else symlinks")
    parser.add_argument("--work-dir", type=Path, help="where the runs go (a new folder inside it; default: the system's temp folder)")
    parser.add_argument("--keep-work", action="store_true", help="keep the runs' folder (its path is printed)")
    parser.add_argument("--probe-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=30, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_worker is not None:
        probe_worker(args.probe_worker, args.probe_steps)
        return 0
    if args.out is None:
        parser.error("--out is required (or set $OUT)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    sizes = Sizes.dry() if args.dry_run else Sizes.gpu()
    if args.jobs:
        sizes.jobs = args.jobs
    if args.deadline:
        sizes.deadline = args.deadline
    session = Session(args, sizes)
    session.cuda = torch.cuda.is_available() and not args.dry_run
    print(f"gpu_smoke: {'dry run on the CPU' if args.dry_run else 'GPU'}; runs in {session.work}", flush=True)
    try:
        try:
            session.environment = environment()
        except Exception as error:
            session.environment = {"error": f"{type(error).__name__}: {error}"}
        session.save()
        if not args.dry_run and not torch.cuda.is_available():
            for name in CHECKS:
                session.checks[name] = finish({"commands": []}, ["no CUDA device (pass --dry-run for the CPU sizes)"])
            session.save()
            print_table(session)
            return 1
        try:
            session.record("install", finish(make_importable(session), []))
        except Exception as error:
            session.record("install", finish({"commands": []}, [f"{type(error).__name__}: {error}"]))
            for name in CHECKS[1:]:
                session.checks[name] = finish({"commands": []}, ["not run: the project is not importable"])
            session.save()
            print_table(session)
            return 1

        # The ImageFolder check and the benchmark run on --data-dir when given, else on a generated tree.
        if args.data_dir is not None:
            data = {"tree": args.data_dir.resolve(), "real": args.data_dir.resolve()}
            tree = f"--data-dir {args.data_dir}"
        else:
            data = {"tree": write_tree(session.work / "tree", sizes.tree_train, sizes.tree_test)}
            tree = f"generated: {TREE_CLASSES} classes x {sizes.tree_train} train / {sizes.tree_test} test PNGs, 32x32"
        session.environment["data"] = {"digits": "scikit-learn's digits (built in)", "imagefolder": tree}

        # Longest first; teacher_bf16 and the two students that need it are one sequence.
        tasks: list[tuple[tuple[str, ...], Callable[[Session, dict[str, Path]], None]]] = [
            (("teacher_bf16", "student_proxy_mix", "student_kd"), check_teachers),
            (("compile",), check_compile),
            (("resume_bitwise",), check_resume),
            (("teacher_epoch_benchmark",), check_benchmark),
            (("reference_pipeline",), check_reference),
            (("imagefolder_randaugment",), check_imagefolder),
            (("teacher_ols",), check_ols),
            (("finetune_bf16",), check_finetune),
            (("teacher_fp16",), check_fp16),
            (("sync_probe",), check_probe),
        ]

        def guarded(names: tuple[str, ...], task: Callable[[Session, dict[str, Path]], None]) -> None:
            if session.remaining() < 5:
                for name in names:
                    session.record(name, finish({"commands": []}, ["not run: out of time (--deadline)"], "not_run"))
                return
            try:
                task(session, data)
            except Exception as error:  # a broken check is a failed check, never the end of the others
                for name in names:
                    if session.checks[name]["status"] == "not_run":
                        session.record(name, finish({"commands": [], "traceback": traceback.format_exc()[-3000:]},
                                                    [f"{type(error).__name__}: {error}"]))

        with ThreadPoolExecutor(max_workers=max(1, sizes.jobs)) as pool:
            for future in [pool.submit(guarded, names, task) for names, task in tasks]:
                future.result()
        session.save()
        print_table(session)
        return 0 if session.report()["ok"] else 1
    finally:
        session.save()
        session.log.close()
        if args.keep_work:
            print(f"runs kept in {session.work}")
        else:
            shutil.rmtree(session.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
