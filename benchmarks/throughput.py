"""Throughput: the toolkit against the paper's reference recipe, and its own costs, in one command.

    python benchmarks/throughput.py all            # every part (about 10 minutes on 2 quiet CPU cores)
    python benchmarks/throughput.py teacher loss   # some parts (or: --parts teacher,loss)
    python benchmarks/throughput.py all --smoke    # every part in about a minute, on a tiny data slice
    options: [--repeats 5] [--launches 3] [--memory-runs 3] [--batch-size 128] [--threads N]
             [--data-dir .data/cifar10-jpeg] [--results-dir benchmarks/results]
             [--steps N] [--loss-steps N] [--memory-steps N]

Parts (each repeat runs ours, then the baseline: interleaved, never all-A-then-all-B; warm-up
steps are never timed; min and median over the repeats, ratios of the medians and of the mins):

  teacher     training img/s of the paper's AlexNet and LeNet with LS++ on the CIFAR-10 JPEG copy,
              batch 128: ours (`kd.training.loop.fit`, method lspp, in-memory data, the default crop,flip
              augmentation, no evaluation) vs the paper's reference recipe (torchvision ImageFolder
              with per-sample PIL transforms, DataLoader(shuffle, num_workers=2), SGD Nesterov, and
              LS++ building and softmaxing the whole K x K matrix every step).
  loss        the loss alone on a linear head (512 -> K, random features, batch 128, forward +
              backward + SGD update) at K = 10, 100, 1000: CE vs our LS++ vs the reference LS++;
              and a whole training step of AlexNet (K-way head, random 32x32 images) at K = 100 and
              1000 with CE, our LS++ and the reference LS++ (goal: LS++ / CE <= 1.02).
  students    step time of LeNet students through the training loop on the same data: plain (1-hot),
              proxy (a random C-matrix) and KD (a random-init AlexNet teacher, several times the
              student's cost); ratios proxy / plain and KD / plain.
  memory      peak RSS (metrics.json's peak_memory_mb, ru_maxrss) of a short `kd train-teacher`
              AlexNet run on the CIFAR-10 copy, as a subprocess.
  startup     wall time of `kd --version`, `kd --help`, `kd train-teacher --help` and
              `python -c "import kd"`, as subprocesses.
  first-step  time from launching `kd train-teacher` (AlexNet, CIFAR-10 copy, --max-steps 1) until
              its first training step is done, and until the command exits: the first launch vs
              repeated launches. The data is copied into a fresh folder and XDG_CACHE_HOME points to
              a fresh folder first, so a decoded-dataset cache (kept next to the data or in the user
              cache) starts cold on the first launch; the OS file cache is warm (the copy just read it).

The CIFAR-10 copy is unpacked from the shared zip on first use (as the other benchmarks do).
--smoke needs no real CIFAR-10 copy: a slice of the shared zip (or, without it, a generated
10-class 32x32 ImageFolder), tiny step counts, one repeat, K = 10 only. Writes
<results-dir>/throughput.json and .md; parts measured in an earlier run and not re-run now are
kept from the existing JSON (each part records its machine and command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from student_modes import RESULTS, ROOT, ensure_cifar10  # noqa: E402

sys.path.insert(0, str(ROOT))  # `tests.conftest` (the smoke data slice) and `cli`

from accelerate.utils import set_seed  # noqa: E402

from kd.cmatrix.artifact import CMatrix  # noqa: E402
from kd.data.datasets import ImageDataset, load_dataset  # noqa: E402
from kd.device import synchronize  # noqa: E402
from kd.losses import DEFAULT_ALPHA, insert_diagonal, remove_diagonal  # noqa: E402
from kd.methods import StepContext, build_method  # noqa: E402
from kd.models.networks import build_model, count_parameters  # noqa: E402
from kd.training.loop import TrainModule, fit, make_accelerator  # noqa: E402
from kd.training.optim import MOMENTUM, build_optimizer  # noqa: E402
from kd.training.settings import Settings  # noqa: E402

PARTS = ("teacher", "loss", "students", "memory", "startup", "first-step")
NAME = "throughput"
KD = str(Path(sys.executable).with_name("kd"))
TEACHER_MODELS = ("alexnet", "lenet")
STUDENT_MODES = {"plain": "onehot", "proxy": "proxy", "kd": "kd"}
LOSS_VARIANTS = ("ce", "lspp", "reference")  # ours ("lspp") right after CE, then the reference
LOSS_NAMES = {"ce": "cross-entropy", "lspp": "LS++ (ours)", "reference": "LS++ (reference, whole K x K matrix)"}
FEATURES = 512
LR, WEIGHT_DECAY = 0.05, 5e-4  # and the loop's SGD momentum, MOMENTUM
# The reference recipe's normalisation (the usual CIFAR-10 channel statistics).
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Plan:
    """Step counts and repeats: a full run, or --smoke."""

    batch_size: int = 128
    repeats: int = 5
    launches: int = 3  # first-step: the first launch plus launches - 1 repeated ones
    teacher_warmup: int = 10
    teacher_steps: int = 50
    loss_ks: tuple[int, ...] = (10, 100, 1000)
    loss_warmup: int = 20
    loss_steps: int = 200
    step_ks: tuple[int, ...] = (100, 1000)
    step_warmup: int = 3
    step_steps: int = 20
    student_warmup: int = 5
    student_steps: int = 50
    memory_steps: int = 20
    memory_runs: int = 3
    startup_warmup: int = 1


SMOKE = Plan(batch_size=32, repeats=1, launches=2, teacher_warmup=1, teacher_steps=2, loss_ks=(10,), loss_warmup=2,
             loss_steps=5, step_ks=(10,), step_warmup=1, step_steps=2, student_warmup=1, student_steps=2,
             memory_steps=2, memory_runs=1, startup_warmup=0)


# ----------------------------------------------------------------------------- timing helpers


def summary(values: list[float]) -> dict[str, Any]:
    return {"min": min(values), "median": statistics.median(values), "all": values}


def ratios(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Ratio of the medians and ratio of the mins of two series of times (or rates)."""
    return {"of_medians": statistics.median(numerator) / statistics.median(denominator),
            "of_mins": min(numerator) / min(denominator)}


def rate_summary(seconds: list[float], images: list[int]) -> dict[str, Any]:
    """Images per second per repeat; `best` comes from the fastest repeat, `median` from the median one."""
    rates = [n / s for n, s in zip(images, seconds)]
    return {"best": max(rates), "median": statistics.median(rates), "all": rates}


@dataclass
class Launch:
    wall_seconds: float
    first_step_seconds: float | None
    max_rss_mb: float  # ru_maxrss of the launched process (and its children), from os.wait4
    stdout: str
    stderr: str


# Commands are started by this small stdlib-only launcher (python -S), not by the benchmark process
# itself: Linux carries a process's peak RSS across fork and exec (ru_maxrss, which metrics.json's
# peak_memory_mb is), so a command started straight from this process, which holds torch and the
# decoded data, would report at least this process's size. The launcher times the command (start
# to exit, and to its first training step when asked, through a pipe, see FIRST_STEP_HOOK), reaps
# it with os.wait4 for its own ru_maxrss, and writes the numbers as JSON to argv[1].
LAUNCHER = """
import json, os, subprocess, sys, time
report, want_first, argv = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
env, fds = dict(os.environ), ()
if want_first:
    read_fd, write_fd = os.pipe()
    env["KD_BENCH_FIRST_STEP_FD"], fds = str(write_fd), (write_fd,)
started = time.perf_counter()
process = subprocess.Popen(argv, env=env, pass_fds=fds)
first = None
if want_first:
    os.close(write_fd)
    if os.read(read_fd, 1):  # b"" when the command exits without writing
        first = time.perf_counter() - started
_, status, usage = os.wait4(process.pid, 0)
wall = time.perf_counter() - started
process.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
with open(report, "w") as out:
    json.dump({"wall_seconds": wall, "first_step_seconds": first, "max_rss_mb": usage.ru_maxrss / 1024, "returncode": code}, out)
"""


def launch(argv: list[str], env: dict[str, str] | None = None, first_step: bool = False) -> Launch:
    """Run a command to completion through LAUNCHER: its wall time, peak RSS and output."""
    with tempfile.TemporaryDirectory() as tmp:
        report, out, err = Path(tmp) / "launch.json", Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out.open("w") as stdout, err.open("w") as stderr:
            subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), "1" if first_step else "0", *argv],
                           stdout=stdout, stderr=stderr, env=env, cwd=ROOT, check=False)
        numbers = json.loads(report.read_text()) if report.exists() else {"returncode": None}
        result = Launch(numbers.get("wall_seconds", 0.0), numbers.get("first_step_seconds"), numbers.get("max_rss_mb", 0.0),
                        out.read_text(), err.read_text())
    if numbers["returncode"] != 0:
        tail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit status {numbers['returncode']}"
        raise SystemExit(f"{shlex.join(argv)}: {tail}")
    return result


# ----------------------------------------------------------------------------- the reference LS++


class ReferenceLSPP(nn.Module):
    """LS++ the way the paper's reference code computes it, as the baseline.

    A K x K logit parameter; every step C = softmax(C logits with the diagonal masked to -inf,
    dim=1) over the whole matrix, targets t = (1 - a) onehot(y) + a C[y] in probability space,
    the network trained by the soft cross-entropy H(t.detach(), p) and C by the "detached" C loss
    H(p.detach(), t) = -sum p.detach() log t. The same two terms (and their sum) as
    `kd.losses.lspp_terms(..., c_loss="detached")`; `check_reference` verifies it.
    """

    def __init__(self, num_classes: int, alpha: float = DEFAULT_ALPHA) -> None:
        super().__init__()
        self.num_classes, self.alpha = num_classes, alpha
        self.c_logits = nn.Parameter(torch.zeros(num_classes, num_classes))
        self.register_buffer("diagonal", torch.eye(num_classes, dtype=torch.bool))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = F.softmax(self.c_logits.masked_fill(self.diagonal, float("-inf")), dim=1)
        targets = (1 - self.alpha) * F.one_hot(labels, self.num_classes).float() + self.alpha * c[labels]
        log_p = F.log_softmax(logits, dim=1)
        network = -(targets.detach() * log_p).sum(dim=1).mean()
        cmatrix = -(log_p.detach().exp() * torch.log(targets)).sum(dim=1).mean()
        return network + cmatrix


class ReferenceMethod(nn.Module):
    """`ReferenceLSPP` with the loop's method call signature, for `TrainModule`."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.loss = ReferenceLSPP(num_classes)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(logits, targets)}


def check_reference(num_classes: int) -> dict[str, float]:
    """Our LS++ and the reference compute the same loss and gradients (random C, logits, labels).

    Returns the largest absolute differences; raises if they are not float32 round-off.
    """
    generator = torch.Generator().manual_seed(num_classes)
    c_logits = torch.randn(num_classes, num_classes - 1, generator=generator)
    net_logits = torch.randn(64, num_classes, generator=generator) * 3
    labels = torch.randint(0, num_classes, (64,), generator=generator)
    ours = build_method("lspp", num_classes)
    reference = ReferenceLSPP(num_classes)
    with torch.no_grad():
        ours.logits.copy_(c_logits)
        reference.c_logits.copy_(insert_diagonal(c_logits, 0.0))
    ours_input, reference_input = net_logits.clone().requires_grad_(), net_logits.clone().requires_grad_()
    ours_loss = ours(ours_input, labels, StepContext(0, 0, 1, 1))["loss"]
    reference_loss = reference(reference_input, labels)
    ours_loss.backward()
    reference_loss.backward()
    diffs = {
        "loss": abs(ours_loss.item() - reference_loss.item()),
        "grad_logits": (ours_input.grad - reference_input.grad).abs().max().item(),
        "grad_c": (ours.logits.grad - remove_diagonal(reference.c_logits.grad)).abs().max().item(),
    }
    if not all(value < 1e-4 for value in diffs.values()):
        raise SystemExit(f"the reference LS++ does not compute what kd's lspp computes at K={num_classes}: {diffs}")
    return diffs


# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device, threads_given: bool) -> dict[str, Any]:
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_threads_from": "--threads" if threads_given else "torch's default",
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return info


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its reaped descendants).

    The difference of two readings is what other processes used meanwhile; None where /proc/stat is missing.
    """
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    machine_busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = os.times()
    return machine_busy, own.user + own.system + own.children_user + own.children_system


def others_share(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float) -> float | None:
    """The share of the machine's CPU capacity that other processes used during `wall` seconds."""
    if before is None or after is None or wall <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(others, 0.0) / (wall * (os.cpu_count() or 1))


BUSY_SHARE = 0.1  # other processes using more than this share of the CPUs make a part's timings suspect


def busy(part: dict[str, Any]) -> bool:
    share = part.get("other_processes_cpu_share")
    return share is not None and share > BUSY_SHARE


def describe_machine(info: dict[str, Any]) -> str:
    gpu = f" ({info['gpu']})" if info.get("gpu") else ""
    return (f"{info['cpu']}, {info['logical_cpus']} logical CPUs ({info['usable_cpus']} usable); torch {info['torch']} with "
            f"{info['torch_threads']} threads ({info.get('torch_threads_from', '')}); device {info['device']}{gpu}; Python {info['python']}")


# ----------------------------------------------------------------------------- shared state


@dataclass
class Bench:
    args: argparse.Namespace
    plan: Plan
    scratch: Path  # a temporary folder, removed at the end
    _accelerator: Any = None
    _data_dir: Path | None = None
    _data: ImageDataset | None = None

    @property
    def accelerator(self) -> Any:
        if self._accelerator is None:
            self._accelerator = make_accelerator()
        return self._accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def data_dir(self) -> Path:
        """The CIFAR-10 ImageFolder (train/ and test/): the real copy, or in smoke mode a small slice."""
        if self._data_dir is None:
            if self.args.data_dir is not None:
                self._data_dir = self.args.data_dir if self.args.smoke else ensure_cifar10(self.args.data_dir)
            elif self.args.smoke:
                self._data_dir = smoke_folder(self.scratch / "cifar10-slice")
            else:
                self._data_dir = ensure_cifar10(ROOT / ".data" / "cifar10-jpeg")
        return self._data_dir

    @property
    def data(self) -> ImageDataset:
        """The training data decoded once, in memory (what `kd train-teacher` trains on)."""
        if self._data is None:
            started = time.perf_counter()
            self._data = load_dataset("imagefolder", str(self.data_dir))
            print(f"{self._data.describe()} (decoded in {time.perf_counter() - started:.1f} s)", flush=True)
        return self._data

    def teacher_command(self, out: Path, steps: int, data_dir: Path | None = None) -> list[str]:
        return [KD, "train-teacher", "--dataset", "imagefolder", "--data-dir", str(data_dir or self.data_dir), "--model", "alexnet",
                "--batch-size", str(self.plan.batch_size), "--epochs", "1", "--max-steps", str(steps), "--out", str(out)]


def shown(command: list[str]) -> str:
    """A `kd ...` command as the report shows it: paths inside the project relative to it."""
    return shlex.join(["kd", *command[1:]]).replace(f"{ROOT}{os.sep}", "")


def smoke_folder(dest: Path) -> Path:
    """26 training and 3 test images per class of the shared CIFAR-10 zip (tests/conftest.py's own
    slice); without the zip, a generated 10-class 32x32 RGB ImageFolder of the same size."""
    from tests.helpers import CIFAR10_ZIP, extract_cifar10_subset, make_image_folder

    if CIFAR10_ZIP.exists():
        return extract_cifar10_subset(dest, train_per_class=26, test_per_class=3)
    make_image_folder(dest, classes=CIFAR_CLASSES, per_class=26, size=32, splits=("train",))
    return make_image_folder(dest, classes=CIFAR_CLASSES, per_class=3, size=32, splits=("test",))


def fit_steps(bench: Bench, module: TrainModule, steps: int, desc: str) -> Any:
    """`steps` optimizer steps through the training loop (no evaluation); the FitResult."""
    per_epoch = max(len(bench.data.train) // bench.plan.batch_size, 1)
    settings = Settings(epochs=math.ceil(steps / per_epoch), batch_size=bench.plan.batch_size, lr=LR, weight_decay=WEIGHT_DECAY,
                        seed=0, max_steps=steps)
    return fit(module, bench.data, settings, bench.accelerator, evaluate=False, desc=desc)


# ----------------------------------------------------------------------------- part 1: teacher


def ours_teacher(bench: Bench, model: str, steps: int) -> tuple[float, int]:
    """Seconds and images for `steps` LS++ steps through the training loop (its own training clock)."""
    data = bench.data
    set_seed(0)
    net = build_model(model, data.num_classes, data.channels, data.image_size)
    module = TrainModule(net, build_method("lspp", data.num_classes, tuple(data.class_names)))
    result = fit_steps(bench, module, steps, f"ours {model}")
    return result.train_seconds, result.steps * bench.plan.batch_size


def reference_loader(bench: Bench) -> Any:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])
    folder = datasets.ImageFolder(str(bench.data_dir / "train"), transform=transform)
    return torch.utils.data.DataLoader(folder, batch_size=bench.plan.batch_size, shuffle=True, num_workers=2)


def baseline_teacher(bench: Bench, loader: Any, model: str, warmup: int, steps: int) -> tuple[float, int]:
    """The reference recipe: a fresh DataLoader iterator (2 workers), `warmup` untimed steps, then `steps` timed ones."""
    device = bench.device
    num_classes = len(loader.dataset.classes)
    set_seed(0)
    net = build_model(model, num_classes, 3, 32).to(device).train()
    criterion = ReferenceLSPP(num_classes).to(device)
    optimizer = torch.optim.SGD([*net.parameters(), *criterion.parameters()], lr=LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    batches = iter(loader)
    images_seen, started = 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:  # a new epoch (only with tiny data): the reference recipe re-iterates too
            batches = iter(loader)
            images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = criterion(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            images_seen += int(labels.shape[0])
    synchronize(device)
    seconds = time.perf_counter() - started
    del batches  # shuts its workers down
    return seconds, images_seen


def part_teacher(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    loader = reference_loader(bench)
    data = bench.data
    times: dict[str, dict[str, list]] = {m: {"ours": [], "baseline": [], "ours_images": [], "baseline_images": []} for m in TEACHER_MODELS}
    for model in TEACHER_MODELS:  # warm-up of ours (the baseline warms up inside every repeat)
        ours_teacher(bench, model, plan.teacher_warmup)
    for repeat in range(plan.repeats):
        for model in TEACHER_MODELS:
            seconds, images = ours_teacher(bench, model, plan.teacher_steps)
            times[model]["ours"].append(seconds)
            times[model]["ours_images"].append(images)
            seconds, images = baseline_teacher(bench, loader, model, plan.teacher_warmup, plan.teacher_steps)
            times[model]["baseline"].append(seconds)
            times[model]["baseline_images"].append(images)
        print(f"teacher repeat {repeat + 1}: " + "  ".join(
            f"{m} ours {t['ours_images'][-1] / t['ours'][-1]:.0f} img/s, baseline {t['baseline_images'][-1] / t['baseline'][-1]:.0f} img/s"
            for m, t in times.items()), flush=True)
    results = {}
    for model, t in times.items():
        ours, baseline = rate_summary(t["ours"], t["ours_images"]), rate_summary(t["baseline"], t["baseline_images"])
        results[model] = {
            "parameters": count_parameters(build_model(model, data.num_classes, data.channels, data.image_size)),
            "ours_images_per_second": ours,
            "baseline_images_per_second": baseline,
            "ratio_ours_over_baseline": {"of_medians": ours["median"] / baseline["median"], "of_bests": ours["best"] / baseline["best"]},
        }
    return {
        "dataset": data.describe(), "augment": ",".join(data.default_augment), "batch_size": plan.batch_size,
        "warmup_steps": plan.teacher_warmup, "steps": plan.teacher_steps, "repeats": plan.repeats,
        "reference_check": {str(k): check_reference(k) for k in (10, 100)},
        "results": results,
    }


# ----------------------------------------------------------------------------- part 2: loss


def make_loss(variant: str, num_classes: int, device: torch.device) -> tuple[Callable, list[nn.Parameter]]:
    if variant == "ce":
        return F.cross_entropy, []
    if variant == "lspp":
        method = build_method("lspp", num_classes).to(device)
        context = StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1)
        return (lambda logits, labels: method(logits, labels, context)["loss"]), list(method.parameters())
    reference = ReferenceLSPP(num_classes).to(device)
    return reference, list(reference.parameters())


def loss_step_seconds(bench: Bench, variant: str, num_classes: int) -> float:
    """Seconds per step of a linear head (512 -> K) trained with the loss: forward, backward, SGD update."""
    plan, device = bench.plan, bench.device
    generator = torch.Generator().manual_seed(num_classes)
    features = torch.randn(4, plan.batch_size, FEATURES, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (4, plan.batch_size), generator=generator).to(device)
    torch.manual_seed(0)
    head = nn.Linear(FEATURES, num_classes).to(device)
    loss_fn, extra = make_loss(variant, num_classes, device)
    optimizer = torch.optim.SGD([*head.parameters(), *extra], lr=LR, momentum=MOMENTUM, nesterov=True)
    started = 0.0
    for step in range(plan.loss_warmup + plan.loss_steps):
        if step == plan.loss_warmup:
            synchronize(device)
            started = time.perf_counter()
        loss = loss_fn(head(features[step % 4]), labels[step % 4])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - started) / plan.loss_steps


def full_step_seconds(bench: Bench, variant: str, num_classes: int) -> float:
    """Seconds per training step of the paper's AlexNet (K-way head, random 32x32 RGB images), as the training loop steps."""
    plan, device = bench.plan, bench.device
    generator = torch.Generator().manual_seed(num_classes)
    images = torch.randn(4, plan.batch_size, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (4, plan.batch_size), generator=generator).to(device)
    torch.manual_seed(0)
    net = build_model("alexnet", num_classes, 3, 32)
    method = ReferenceMethod(num_classes) if variant == "reference" else build_method({"ce": "onehot", "lspp": "lspp"}[variant], num_classes)
    module = TrainModule(net, method).to(device).train()
    optimizer = build_optimizer(module, LR, WEIGHT_DECAY, MOMENTUM)
    started = 0.0
    for step in range(plan.step_warmup + plan.step_steps):
        if step == plan.step_warmup:
            synchronize(device)
            started = time.perf_counter()
        context = StepContext(epoch=0, step=step, total_steps=plan.step_warmup + plan.step_steps, steps_per_epoch=1)
        parts = module(images[step % 4], labels[step % 4], context)
        parts["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - started) / plan.step_steps


def part_loss(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    loss_times = {k: {v: [] for v in LOSS_VARIANTS} for k in plan.loss_ks}
    step_times = {k: {v: [] for v in LOSS_VARIANTS} for k in plan.step_ks}
    for repeat in range(plan.repeats):
        for k in plan.loss_ks:
            for variant in LOSS_VARIANTS:
                loss_times[k][variant].append(loss_step_seconds(bench, variant, k))
        for k in plan.step_ks:
            for variant in LOSS_VARIANTS:
                step_times[k][variant].append(full_step_seconds(bench, variant, k))
        print(f"loss repeat {repeat + 1}: " + "  ".join(
            f"K={k} " + "/".join(f"{t[v][-1] * 1e6:.0f}" for v in LOSS_VARIANTS) + " us" for k, t in loss_times.items())
            + " | AlexNet step " + "  ".join(
            f"K={k} " + "/".join(f"{t[v][-1] * 1e3:.1f}" for v in LOSS_VARIANTS) + " ms" for k, t in step_times.items())
            + " (ce/lspp/reference)", flush=True)

    def rows(times: dict[int, dict[str, list[float]]]) -> dict[str, Any]:
        return {str(k): {
            "step_seconds": {v: summary(t[v]) for v in LOSS_VARIANTS},
            "ratio_lspp_over_ce": ratios(t["lspp"], t["ce"]),
            "ratio_reference_over_ce": ratios(t["reference"], t["ce"]),
            "ratio_lspp_over_reference": ratios(t["lspp"], t["reference"]),
        } for k, t in times.items()}

    return {
        "batch_size": plan.batch_size, "features": FEATURES, "repeats": plan.repeats,
        "loss_warmup_steps": plan.loss_warmup, "loss_steps": plan.loss_steps,
        "step_warmup_steps": plan.step_warmup, "step_steps": plan.step_steps,
        "results": {"loss_only": rows(loss_times), "alexnet_step": rows(step_times)},
    }


# ----------------------------------------------------------------------------- part 3: students


def part_students(bench: Bench) -> dict[str, Any]:
    plan, data = bench.plan, bench.data
    names = tuple(data.class_names)
    set_seed(1)
    teacher = build_model("alexnet", data.num_classes, data.channels, data.image_size).eval()
    logits = torch.randn(data.num_classes, data.num_classes - 1, generator=torch.Generator().manual_seed(1))
    cmatrix = CMatrix.from_logits(logits, names, alpha=DEFAULT_ALPHA)  # a random row-stochastic C

    def seconds(mode: str, steps: int) -> tuple[float, float | None]:
        set_seed(0)  # the same initial student in every mode
        student = build_model("lenet", data.num_classes, data.channels, data.image_size)
        given = {"plain": {}, "proxy": {"cmatrix": cmatrix}, "kd": {"teacher": teacher}}[mode]
        result = fit_steps(bench, TrainModule(student, build_method(STUDENT_MODES[mode], data.num_classes, names, **given)), steps, mode)
        return result.train_seconds / result.steps, result.method_metrics.get("teacher_forward_share")

    for mode in STUDENT_MODES:  # warm-up round, not recorded
        seconds(mode, plan.student_warmup)
    times: dict[str, list[float]] = {mode: [] for mode in STUDENT_MODES}
    shares: list[float] = []
    for repeat in range(plan.repeats):
        for mode in STUDENT_MODES:
            step, share = seconds(mode, plan.student_steps)
            times[mode].append(step)
            if share is not None:
                shares.append(share)
        print(f"students repeat {repeat + 1}: " + "  ".join(f"{m} {t[-1] * 1e3:.1f} ms" for m, t in times.items()), flush=True)
    return {
        "dataset": data.describe(), "student": "lenet", "teacher": "alexnet (random init)",
        "student_parameters": count_parameters(build_model("lenet", data.num_classes, data.channels, data.image_size)),
        "teacher_parameters": count_parameters(teacher), "batch_size": plan.batch_size,
        "warmup_steps": plan.student_warmup, "steps": plan.student_steps, "repeats": plan.repeats,
        "results": {
            "step_seconds": {mode: summary(t) for mode, t in times.items()},
            "ratio_proxy_over_plain": ratios(times["proxy"], times["plain"]),
            "ratio_kd_over_plain": ratios(times["kd"], times["plain"]),
            **({"kd_teacher_forward_share": summary(shares)} if shares else {}),
        },
    }


# ----------------------------------------------------------------------------- part 4: memory


def part_memory(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    peak, rss, wall, train = [], [], [], []
    for index in range(plan.memory_runs):
        out = bench.scratch / f"memory-run-{index}"
        result = launch(bench.teacher_command(out, plan.memory_steps))
        metrics = json.loads((out / "metrics.json").read_text())
        peak.append(metrics["peak_memory_mb"])
        rss.append(result.max_rss_mb)
        wall.append(result.wall_seconds)
        train.append(metrics["train_seconds"])
        print(f"memory run {index + 1}: peak {peak[-1]:.0f} MB ({metrics['peak_memory_kind']}), {wall[-1]:.1f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return {
        "kd_command": shown(bench.teacher_command(Path("RUN_DIR"), plan.memory_steps)), "steps": plan.memory_steps, "runs": plan.memory_runs,
        "peak_memory_kind": metrics["peak_memory_kind"],
        "results": {"peak_memory_mb": summary(peak), "wait4_max_rss_mb": summary(rss),
                    "wall_seconds": summary(wall), "train_seconds": summary(train)},
    }


# ----------------------------------------------------------------------------- part 5: startup


def startup_commands() -> dict[str, list[str]]:
    return {
        "kd --version": [KD, "--version"],
        "kd --help": [KD, "--help"],
        "kd train-teacher --help": [KD, "train-teacher", "--help"],
        'python -c "import kd"': [sys.executable, "-c", "import kd"],
    }


def part_startup(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    commands = startup_commands()
    for _ in range(plan.startup_warmup):  # untimed: the OS file cache
        for argv in commands.values():
            launch(argv)
    wall: dict[str, list[float]] = {name: [] for name in commands}
    rss: dict[str, list[float]] = {name: [] for name in commands}
    for repeat in range(plan.repeats):
        for name, argv in commands.items():
            result = launch(argv)
            wall[name].append(result.wall_seconds)
            rss[name].append(result.max_rss_mb)
        print(f"startup repeat {repeat + 1}: " + "  ".join(f"{n} {w[-1]:.2f} s" for n, w in wall.items()), flush=True)
    true = shutil.which("true")
    floor = launch([true]).max_rss_mb if true else None  # the smallest peak RSS a launched command can report
    return {
        "repeats": plan.repeats, "warmup_runs": plan.startup_warmup, "rss_floor_mb": floor,
        "results": {name: {"wall_seconds": summary(wall[name]), "max_rss_mb": summary(rss[name])} for name in commands},
    }


# ----------------------------------------------------------------------------- part 6: first step


# Run as `python -c FIRST_STEP_HOOK train-teacher ...`: the `kd` console script (cli.entry:main)
# with one addition, a byte written to the pipe in KD_BENCH_FIRST_STEP_FD once the first
# optimizer step (forward, backward, update) is done: torch's global optimizer step hook, so
# nothing in the training loop needs to know.
FIRST_STEP_HOOK = """
import os, sys
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
def _first(optimizer, args, kwargs):
    fd = os.environ.pop("KD_BENCH_FIRST_STEP_FD", None)
    if fd is not None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        os.write(int(fd), b"1")
        os.close(int(fd))
register_optimizer_step_post_hook(_first)
sys.argv[0] = "kd"
from lspp_kd.cli.entry import main
sys.exit(main())
"""


def part_first_step(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    fresh = bench.scratch / "first-step"
    data_dir = fresh / "data"
    started = time.perf_counter()
    shutil.copytree(bench.data_dir, data_dir)  # a fresh folder: nothing cached next to it yet
    copy_seconds = time.perf_counter() - started
    env = {**os.environ, "XDG_CACHE_HOME": str(fresh / "cache")}
    runs = []
    for index in range(plan.launches):
        out = fresh / f"run-{index}"
        command = bench.teacher_command(out, 1, data_dir)
        result = launch([sys.executable, "-c", FIRST_STEP_HOOK, *command[1:]], env=env, first_step=True)
        if result.first_step_seconds is None:
            raise SystemExit("first-step: the run finished without reporting its first step "
                             "(did FIRST_STEP_HOOK's optimizer step hook not fire?)")
        runs.append({"first_step_seconds": result.first_step_seconds, "command_seconds": result.wall_seconds,
                     "train_seconds": json.loads((out / "metrics.json").read_text())["train_seconds"]})
        print(f"first-step launch {index + 1}: first step done at {result.first_step_seconds:.1f} s, "
              f"command {result.wall_seconds:.1f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    repeated = runs[1:]
    first_step = [r["first_step_seconds"] for r in repeated]
    whole = [r["command_seconds"] for r in repeated]
    return {
        "kd_command": shown(bench.teacher_command(Path("RUN_DIR"), 1)), "launches": plan.launches, "data_copy_seconds": copy_seconds,
        "results": {
            "first_launch": {key: runs[0][key] for key in ("first_step_seconds", "command_seconds")},
            "repeated_launches": {"first_step_seconds": summary(first_step), "command_seconds": summary(whole)},
            "first_over_repeated_median": {"first_step": runs[0]["first_step_seconds"] / statistics.median(first_step),
                                           "command": runs[0]["command_seconds"] / statistics.median(whole)},
        },
    }


# ----------------------------------------------------------------------------- report


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds < 0.1 else f"{seconds * 1e3:.1f}"


def md_teacher(part: dict) -> list[str]:
    lines = [
        f"{part['dataset']}; batch {part['batch_size']}; {part['steps']} timed steps after {part['warmup_steps']} warm-up "
        f"steps; {part['repeats']} repeats. Ours: `kd.training.loop.fit`, method lspp, in-memory uint8 data, augment "
        f"{part['augment']} on the batch, no evaluation (the loop's own training clock). Baseline, the paper's reference "
        "recipe: torchvision ImageFolder, per-sample PIL RandomCrop(32, padding=4, reflect) + RandomHorizontalFlip + "
        f"ToTensor + Normalize, DataLoader(batch {part['batch_size']}, shuffle, num_workers=2), SGD Nesterov 0.9, LS++ over the whole "
        "K x K matrix every step (checked equal to ours: same loss and gradients).",
        "",
        "| model | params | ours img/s (median) | ours img/s (best) | baseline img/s (median) | baseline img/s (best) "
        "| ours / baseline (medians) | ours / baseline (bests) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, row in part["results"].items():
        o, b, r = row["ours_images_per_second"], row["baseline_images_per_second"], row["ratio_ours_over_baseline"]
        lines.append(f"| {model} | {row['parameters']:,} | {o['median']:.0f} | {o['best']:.0f} | {b['median']:.0f} | {b['best']:.0f} "
                     f"| {r['of_medians']:.2f}x | {r['of_bests']:.2f}x |")
    return lines


def md_loss(part: dict) -> list[str]:
    def table(rows: dict, unit: str, scale: float) -> list[str]:
        out = [f"| K | CE {unit} (min / median) | LS++ ours {unit} | LS++ reference {unit} | ours / CE (medians, mins) "
               f"| reference / CE (medians, mins) | ours / reference (medians) |", "|---|---|---|---|---|---|---|"]
        for k, row in rows.items():
            t = row["step_seconds"]
            cell = {v: f"{t[v]['min'] * scale:.1f} / {t[v]['median'] * scale:.1f}" for v in LOSS_VARIANTS}
            ours, ref = row["ratio_lspp_over_ce"], row["ratio_reference_over_ce"]
            out.append(f"| {k} | {cell['ce']} | {cell['lspp']} | {cell['reference']} | {ours['of_medians']:.3f}, {ours['of_mins']:.3f} "
                       f"| {ref['of_medians']:.3f}, {ref['of_mins']:.3f} | {row['ratio_lspp_over_reference']['of_medians']:.3f} |")
        return out

    return [
        f"The loss alone: a linear head ({part['features']} -> K) on random features, batch {part['batch_size']}, forward + "
        f"backward + SGD update, {part['loss_steps']} timed steps after {part['loss_warmup_steps']} warm-up; "
        f"{part['repeats']} repeats, CE, ours and the reference interleaved in every repeat.",
        "",
        *table(part["results"]["loss_only"], "us/step", 1e6),
        "",
        f"A whole training step of the paper's AlexNet with a K-way head on random 32x32 RGB images, batch {part['batch_size']} "
        f"(as the training loop steps: TrainModule, SGD Nesterov with weight-decay groups), {part['step_steps']} timed steps after "
        f"{part['step_warmup_steps']} warm-up. Goal: LS++ / CE <= 1.02.",
        "",
        *table(part["results"]["alexnet_step"], "ms/step", 1e3),
    ]


def md_students(part: dict) -> list[str]:
    r = part["results"]
    lines = [
        f"{part['dataset']}; student {part['student']} ({part['student_parameters']:,} params), teacher {part['teacher']} "
        f"({part['teacher_parameters']:,} params); batch {part['batch_size']}, {part['steps']} steps per run after a "
        f"warm-up round, {part['repeats']} repeats (plain, proxy, kd in every repeat), through `kd.training.loop.fit`.",
        "",
        "| mode | step ms (min) | step ms (median) | / plain (medians) | / plain (mins) |",
        "|---|---|---|---|---|",
    ]
    for mode, t in r["step_seconds"].items():
        ratio = {"plain": None, "proxy": r["ratio_proxy_over_plain"], "kd": r["ratio_kd_over_plain"]}[mode]
        cells = f"{ratio['of_medians']:.3f} | {ratio['of_mins']:.3f}" if ratio else "1 | 1"
        lines.append(f"| {mode} | {fmt_ms(t['min'])} | {fmt_ms(t['median'])} | {cells} |")
    if "kd_teacher_forward_share" in r:
        share = r["kd_teacher_forward_share"]
        lines += ["", f"KD: the teacher's forward pass is {share['median']:.0%} of a KD step (median; min {share['min']:.0%})."]
    return lines


def md_memory(part: dict) -> list[str]:
    r = part["results"]
    return [
        f"`{part['kd_command']}`, {part['runs']} runs as subprocesses. Peak memory from its metrics.json "
        f"({part['peak_memory_kind']}: ru_maxrss of the process), cross-checked with os.wait4's ru_maxrss.",
        "",
        "| | min | median |",
        "|---|---|---|",
        f"| peak memory MiB (metrics.json) | {r['peak_memory_mb']['min']:.0f} | {r['peak_memory_mb']['median']:.0f} |",
        f"| peak RSS MiB (wait4) | {r['wait4_max_rss_mb']['min']:.0f} | {r['wait4_max_rss_mb']['median']:.0f} |",
        f"| whole command, s | {r['wall_seconds']['min']:.1f} | {r['wall_seconds']['median']:.1f} |",
        f"| of which training steps, s | {r['train_seconds']['min']:.2f} | {r['train_seconds']['median']:.2f} |",
    ]


def md_startup(part: dict) -> list[str]:
    lines = [
        f"Wall time from launch to exit, {part['repeats']} repeats after {part['warmup_runs']} untimed round(s), commands "
        "interleaved. Peak RSS: ru_maxrss from os.wait4 (a command that does nothing reports "
        f"{part['rss_floor_mb'] or 0:.0f} MiB).",
        "",
        "| command | s (min) | s (median) | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for name, row in part["results"].items():
        lines.append(f"| `{name}` | {row['wall_seconds']['min']:.2f} | {row['wall_seconds']['median']:.2f} | {row['max_rss_mb']['median']:.0f} |")
    return lines


def md_first_step(part: dict) -> list[str]:
    r = part["results"]
    first, again = r["first_launch"], r["repeated_launches"]
    return [
        f"`{part['kd_command']}` launched {part['launches']} times on a fresh copy of the data (copied in "
        f"{part['data_copy_seconds']:.1f} s) with a fresh XDG_CACHE_HOME: the first launch would fill a decoded-dataset "
        "cache, the repeated ones would read it. \"First step done\": launch until the first optimizer step has finished "
        "(start-up, imports, data loading, model and optimizer set-up, one step); \"command\": until it exits (plus the test pass "
        "and the artifacts).",
        "",
        "| launch | first step done, s | command, s |",
        "|---|---|---|",
        f"| first | {first['first_step_seconds']:.2f} | {first['command_seconds']:.2f} |",
        f"| repeated (min) | {again['first_step_seconds']['min']:.2f} | {again['command_seconds']['min']:.2f} |",
        f"| repeated (median) | {again['first_step_seconds']['median']:.2f} | {again['command_seconds']['median']:.2f} |",
        f"| first / repeated (median) | {r['first_over_repeated_median']['first_step']:.2f} | {r['first_over_repeated_median']['command']:.2f} |",
    ]


TITLES = {
    "teacher": ("Teacher training img/s: ours vs the paper's reference recipe", md_teacher),
    "loss": ("LS++ loss cost vs cross-entropy", md_loss),
    "students": ("Student step time: proxy and KD vs plain", md_students),
    "memory": ("Peak memory of a short teacher run", md_memory),
    "startup": ("Start-up time", md_startup),
    "first-step": ("Time to the first training step", md_first_step),
}


def write_report(results_dir: Path, report: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / NAME
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    machines = {json.dumps(part["machine"], sort_keys=True) for part in report["parts"].values()}
    lines = ["# Throughput", ""]
    if len(machines) == 1:
        lines += [f"Machine: {describe_machine(next(iter(report['parts'].values()))['machine'])}.", ""]
    for name in PARTS:
        if name not in report["parts"]:
            continue
        part = report["parts"][name]
        title, body = TITLES[name]
        lines += [f"## {name}: {title}", "", f"Command: `{part['command']}` ({part['measured']}"
                  + (", SMOKE RUN: tiny step counts and data, not a measurement" if part["smoke"] else "") + ").", ""]
        if len(machines) > 1:
            lines += [f"Machine: {describe_machine(part['machine'])}.", ""]
        share = part.get("other_processes_cpu_share")
        if share is not None:
            lines += [("**The machine was busy: these timings are not a clean measurement.** " if busy(part) else "")
                      + f"Other processes used {share:.0%} of the machine's CPU time while this part ran "
                      f"({part['part_seconds']:.0f} s).", ""]
        lines += [*body(part), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    return stem


RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "teacher": part_teacher, "loss": part_loss, "students": part_students,
    "memory": part_memory, "startup": part_startup, "first-step": part_first_step,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"the parts to run: {', '.join(PARTS)}, or all (the default)")
    parser.add_argument("--parts", dest="parts_list", help="the parts, comma-separated (the same as naming them)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and step counts, one repeat: checks that it runs")
    parser.add_argument("--data-dir", type=Path, help="the CIFAR-10 ImageFolder (default .data/cifar10-jpeg, unpacked "
                        "from the shared zip on first use; with --smoke, a small slice made in a temporary folder)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, help="repeats of every timing (default 5; 1 with --smoke)")
    parser.add_argument("--launches", type=int, help="first-step: launches of kd train-teacher (default 3, at least 2)")
    parser.add_argument("--memory-runs", type=int, help="memory: runs of kd train-teacher (default 3; 1 with --smoke)")
    parser.add_argument("--batch-size", type=int, help="default 128 (32 with --smoke)")
    parser.add_argument("--steps", type=int, help="timed steps per run for the teacher, students and AlexNet-step timings")
    parser.add_argument("--loss-steps", type=int, help="timed steps per run for the loss-only timings (default 200)")
    parser.add_argument("--memory-steps", type=int, help="training steps of the memory part's run (default 20)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the in-process parts (default: torch's own "
                        "default, which is what kd uses; recorded either way)")
    args = parser.parse_args()

    chosen = list(args.parts) + (args.parts_list.split(",") if args.parts_list else [])
    unknown = [p for p in chosen if p not in (*PARTS, "all")]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}, all")
    parts = list(PARTS) if not chosen or "all" in chosen else [p for p in PARTS if p in chosen]
    plan = SMOKE if args.smoke else Plan()
    overrides = {"repeats": args.repeats, "launches": args.launches, "batch_size": args.batch_size, "teacher_steps": args.steps,
                 "student_steps": args.steps, "step_steps": args.steps, "loss_steps": args.loss_steps, "memory_steps": args.memory_steps,
                 "memory_runs": args.memory_runs}
    plan = Plan(**{**plan.__dict__, **{key: value for key, value in overrides.items() if value is not None}})
    if plan.launches < 2:
        parser.error("--launches must be at least 2 (a first launch and a repeated one)")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]])
    stem = args.results_dir / NAME
    previous = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    report = {"parts": {name: part for name, part in previous.get("parts", {}).items() if name in PARTS}}
    with tempfile.TemporaryDirectory(prefix="kd-throughput-") as scratch:
        bench = Bench(args, plan, Path(scratch))
        info = machine(bench.device, args.threads is not None)
        print(f"{describe_machine(info)}; parts: {', '.join(parts)}" + (" (smoke)" if args.smoke else ""), flush=True)
        for name in parts:
            load, before = os.getloadavg(), cpu_seconds()
            started = time.perf_counter()
            print(f"== {name}", flush=True)
            result = RUNNERS[name](bench)
            wall = time.perf_counter() - started
            report["parts"][name] = {
                "command": command, "smoke": args.smoke, "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": info, "load_average": list(load), "load_average_end": list(os.getloadavg()),
                "other_processes_cpu_share": others_share(before, cpu_seconds(), wall), "part_seconds": wall, **result,
            }
            share = report["parts"][name]["other_processes_cpu_share"]
            print(f"== {name} took {wall:.1f} s" + (f"; other processes used {share:.0%} of the CPUs meanwhile" if share is not None else ""),
                  flush=True)
            write_report(args.results_dir, report)  # after every part: an interrupted run keeps what it measured
    print((stem.with_suffix(".md")).read_text())
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
