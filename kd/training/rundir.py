"""Run directories: what a stage writes and how the next stage reads it back.

A run directory holds `config.json` (everything needed to rebuild the model and re-run),
`model.safetensors` (weights, no pickle), `metrics.json`, `summary.csv` (one row per epoch,
rewritten as each epoch ends), `tensorboard/` with `--log-with tensorboard`, and for an LS++
teacher `cmatrix.safetensors`. Every file is written atomically.

Checkpoints of the full training state live under `checkpoints/`: each is a directory
`step-NNNNNNNN` (optimizer steps done) written by Accelerate's `save_state` into a hidden
temporary directory `.tmp-step-NNNNNNNN` and renamed to its final name only when complete,
so the highest-numbered `step-*` directory is always a complete checkpoint.

A run directory belongs to one run at a time: the main process of a run holds an advisory lock
(`flock`) on `.OUT.kd-lock` beside `OUT` (in its parent, so never inside a run) from before it
decides anything about `--out` until the run ends (see `lock_out`). The kernel drops the lock
when the process dies, even by SIGKILL.
"""

from __future__ import annotations

import atexit
import csv
import errno
import fcntl
import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Sequence

from safetensors.torch import load_file
from torch import nn

from kd.errors import KDError
from kd.io import save_safetensors_atomic, write_text_atomic

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.safetensors"
CMATRIX_FILE = "cmatrix.safetensors"
STATUS_FILE = "status.json"  # written only when a run fails (e.g. diverged), for `kd compare`
SUMMARY_FILE = "summary.csv"
TENSORBOARD_DIR = "tensorboard"  # `--log-with tensorboard`: the event files
CHECKPOINTS_DIR = "checkpoints"
# What a run owns in its directory: replaced by `--overwrite`, nothing else is touched.
ARTIFACTS = (
    CONFIG_FILE, MODEL_FILE, CMATRIX_FILE, STATUS_FILE, SUMMARY_FILE, TENSORBOARD_DIR, CHECKPOINTS_DIR,
    METRICS_FILE,  # last: its presence means "finished"
)
# An `--overwrite` run is built here, inside --out, and swapped in only once it has finished.
STAGING_DIR = ".kd-staging"
# The lock of the run that holds --out, `.NAME.kd-lock` beside it (its PID inside): outside the run
# directory, so never run content; removed when the run ends (a killed run leaves it, unlocked and harmless).
LOCK_SUFFIX = ".kd-lock"
KEEP_CHECKPOINTS = 2
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary, unfinished ones excluded)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The highest-numbered complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def temporary_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where a checkpoint is written before it is complete (the same name on every process)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{_TMP_PREFIX}{checkpoint_name(step)}"


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_checkpoint(tmp: Path, step: int, keep: int = KEEP_CHECKPOINTS) -> Path:
    """Make a fully written temporary checkpoint final (an atomic rename), then prune old ones.

    Main process only. Until the rename, the previous checkpoint is untouched, so a crash while
    saving leaves it as the latest complete one; older checkpoints are deleted only after.
    """
    root = tmp.parent
    final = root / checkpoint_name(step)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again: swap it out, then drop the old copy
        stale = root / f"{_TMP_PREFIX}old-{final.name}"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.iterdir():  # unfinished saves of killed runs
        if leftover.name.startswith(_TMP_PREFIX) and leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of `--out`: `.NAME.kd-lock` in its parent (the same for every path to it)."""
    resolved = Path(out).expanduser().resolve()
    return resolved.parent / f".{resolved.name or 'root'}{LOCK_SUFFIX}"


def _check_out_path(out: Path, overwrite: bool, resume: bool) -> None:
    if resume and overwrite:
        raise KDError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if out.exists() and not out.is_dir():
        raise KDError(f"--out {out} exists and is not a directory")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise KDError(f"cannot write to --out {out}: {parent} is not a writable directory")


class OutLock:
    """The advisory lock a run holds on its `--out` (see `lock_path`); `release` ends it.

    Taken by the main process only (the ranks of one run share it). Released when the run ends:
    the lock file is removed, then the parent folders this run created for it if they are empty
    again (a run that failed its checks leaves nothing behind). A process that dies drops the
    lock at once.
    """

    def __init__(self, path: Path, fd: int, created: list[Path]) -> None:
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        global _HELD
        if self.fd < 0:
            return
        try:  # removed while still held, so no other run can lock the old file after us
            self.path.unlink(missing_ok=True)
            for folder in self.created:  # deepest first; only if empty
                folder.rmdir()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1
            if _HELD is self:
                _HELD = None


_HELD: OutLock | None = None  # the lock this process holds: one run at a time per process


def _release_held() -> None:
    if _HELD is not None:
        _HELD.release()


atexit.register(_release_held)


def _holder_pid(fd: int) -> str:
    """The PID the holder wrote into the lock file (it writes it just after taking the lock)."""
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


def lock_out(out: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> OutLock:
    """Take `--out` for this run (main process), before anything about it is decided.

    Creates the parent of `out` if needed (removed again by `release` if the run leaves it
    empty), then `flock`s `lock_path(out)` without waiting and writes this process's PID into it. Another
    live run holding it: a one-line `KDError` naming its PID, and nothing is touched. A lock
    file that was removed or replaced between opening and locking it is opened again.
    """
    global _HELD
    out = Path(out)
    _check_out_path(out, overwrite, resume)
    _release_held()  # a command that ended without releasing (only possible in-process)
    path = lock_path(out)
    created: list[Path] = []  # the folders this run made, deepest first
    while True:
        try:
            if not path.parent.is_dir():
                missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
                path.parent.mkdir(parents=True)
                created = missing
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue  # made by another run just now
        except FileNotFoundError:
            created = []  # its folder was removed by a run that released it just now
            continue
        except OSError as error:
            raise KDError(f"cannot write to --out {out}: {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise KDError(f"cannot lock --out {out}: {error.strerror or error}") from None
            pid = _holder_pid(fd)
            os.close(fd)
            raise KDError(f"--out {out} is in use by another kd run (pid {pid}); wait for it, or pass another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder we waited on removed it as it finished: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD = OutLock(path, fd, created)
    return _HELD


def check_out(out: str | os.PathLike, overwrite: bool, resume: bool = False) -> Path:
    """Every check on `--out` that needs no write: run before anything is read or created
    (but after `lock_out`, which creates the parent of `out` and its lock file if needed).

    An existing non-empty directory is refused unless `overwrite`; with `resume`, `out` must
    hold a run (or an unfinished `--overwrite` run) with at least one complete checkpoint.
    """
    out = Path(out)
    _check_out_path(out, overwrite, resume)
    if resume:
        work = work_dir(out, resume=True)
        if not (work / CONFIG_FILE).is_file():
            raise KDError(f"--resume: {out} holds no run to resume (no {CONFIG_FILE}); drop --resume to start a new run")
        if latest_checkpoint(work) is None:
            raise KDError(
                f"--resume: no complete checkpoint in {work / CHECKPOINTS_DIR}; "
                "start again with --overwrite (and --checkpoint-every N to make checkpoints)"
            )
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise KDError(f"--out {out} already exists and is not empty; pass --overwrite to replace its run, or choose another --out")
    return out


def work_dir(out: Path, resume: bool = False) -> Path:
    """Where a run writes: `out` itself, or its staging directory when it replaces a run there.

    A resumed run continues an unfinished `--overwrite` run if one is staged.
    """
    staging = out / STAGING_DIR
    if resume:
        return staging if (staging / CONFIG_FILE).is_file() else out
    return staging if out.is_dir() and any(p.name != STAGING_DIR for p in out.iterdir()) else out


def prepare_run_dir(out: str | os.PathLike, overwrite: bool, resume: bool = False) -> Path:
    """Create the directory the run writes into (after `check_out`); returns it.

    A new run in an empty or absent `out` writes there directly. A run that replaces
    (`--overwrite`) one in `out` is built in `out/.kd-staging` and swapped in by
    `finish_run_dir` only once it has finished, so a failed or killed run leaves the old one
    intact. Nothing is deleted here but an earlier unfinished staging directory.
    """
    out = Path(out)
    work = work_dir(out, resume)
    try:
        if work != out and not resume:
            shutil.rmtree(work, ignore_errors=True)  # a killed earlier --overwrite run being replaced too
        work.mkdir(parents=True, exist_ok=True)
        probe = work / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise KDError(f"cannot write to --out {out}: {error.strerror or error}") from None
    return work


def finish_run_dir(work: Path, out: Path) -> None:
    """Swap a finished staged run into `out`: its artifacts replace the old run's, other files stay."""
    if work == out:
        return
    try:
        for name in ARTIFACTS:
            new, old = work / name, out / name
            if old.is_dir() and not old.is_symlink():
                trash = out / f"{_TMP_PREFIX}old-{name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
            if new.exists():
                os.replace(new, old)
            else:
                old.unlink(missing_ok=True)  # the old run's, and this run made none: it must not pass for this run's
        shutil.rmtree(work, ignore_errors=True)
    except OSError as error:
        raise KDError(f"cannot replace the run in {out}: {error.strerror or error}; the new run is in {work}") from None


def abandon_run_dir(work: Path, out: Path) -> None:
    """A staged run that failed: remove it; the run it was to replace stays as it was."""
    if work != out:
        shutil.rmtree(work, ignore_errors=True)


def save_model(path: str | os.PathLike, net: nn.Module, class_names: Sequence[str] | None = None) -> None:
    """Network weights as safetensors (tensors cloned so tied weights save without complaint); the
    metadata key `class_names` (a JSON list, as in C-matrix files) names the outputs, so a
    fine-tuning run started from the file knows whether its classifier fits its data."""
    state = {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}
    metadata = {"class_names": json.dumps(list(class_names))} if class_names is not None else None
    save_safetensors_atomic(path, state, metadata)


def read_run_json(run_dir: str | os.PathLike, name: str, when_missing: str) -> dict:
    """One JSON file of a run directory, with one-line errors for a missing or broken one."""
    path = Path(run_dir) / name
    if not Path(run_dir).is_dir():
        raise KDError(f"run directory not found: {run_dir}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KDError(f"{run_dir}: no {name} ({when_missing})") from None
    except (OSError, json.JSONDecodeError) as error:
        raise KDError(f"{path}: unreadable ({error})") from None


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run directory, checked for what rebuilding its model needs."""
    config = read_run_json(run_dir, CONFIG_FILE, "not a run directory")
    path = Path(run_dir) / CONFIG_FILE
    missing = [key for key in ("model", "num_classes", "in_channels", "image_size", "class_names") if key not in config]
    if missing:
        raise KDError(f"{path}: missing {', '.join(missing)}")
    return config


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild a run's network from config.json and load model.safetensors (no pickle)."""
    from kd.models.networks import build_model  # rundir is imported by stages that may not need models

    config = read_run_config(run_dir)
    weights = Path(run_dir) / MODEL_FILE
    if not weights.is_file():
        raise KDError(f"{run_dir}: no {MODEL_FILE} (did the run finish?)")
    net = build_model(config["model"], config["num_classes"], config["in_channels"], config["image_size"])
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises several types for corrupt files
        raise KDError(f"{weights}: not a valid safetensors file ({' '.join(str(error).split())[:200]})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise KDError(f"{weights}: weights do not fit model {config['model']!r} ({str(error).splitlines()[0]})") from None
    return net.eval(), config


# summary.csv's leading columns; then the loss parts (train_*), then val_* and test_* as they appear.
_SUMMARY_FIRST = ("epoch", "step", "lr", "images_per_second", "train_seconds")


def write_summary(path: str | os.PathLike, rows: list[dict[str, float]]) -> None:
    """Write the per-epoch rows as CSV (atomically); a column missing from a row is left empty."""
    columns = [name for name in _SUMMARY_FIRST if any(name in row for row in rows)]
    for row in rows:
        columns += [name for name in row if name not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.8g}" if isinstance(value, float) else value) for key, value in row.items()})
    write_text_atomic(path, text.getvalue())
