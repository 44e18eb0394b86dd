"""One way to run a stage: settings, accelerator, run directory, data, model, loop, artifacts.

A stage (teachers/, students/) prepares a run, builds its method once the data is known, and
trains it:

    with prepare_run("teacher", settings, method_cls) as run:    # checks, --out's lock, data, student network
        return run.train(method_cls(Setup(run.data.num_classes, ...)))

Everything else, including which files land in the run directory and what `config.json` and
`metrics.json` hold, is shared here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn

import kd
from kd.data.augment import AugmentOptions, check_augment, default_augment, makes_soft_labels, parse_augment
from kd.data.datasets import ImageDataset, dataset_key, load_dataset
from kd.data.fingerprint import data_fingerprint
from kd.data.loader import DeviceBatches
from kd.data.splits import train_per_class, validation_split
from kd.errors import KDError, one_line
from kd.io import write_json_atomic
from kd.methods import ExportInfo, Method, soft_target_methods
from kd.models.networks import build_model, split_model_name
from kd.models.weights import WeightsFile, load_initial_weights, model_library, published_weights, read_weights_file
from kd.training.loop import FitResult, TrainingDiverged, TrainModule, fit, make_accelerator
from kd.training.optim import optimizer_steps_per_epoch
from kd.training.rundir import (
    CONFIG_FILE, METRICS_FILE, MODEL_FILE, STATUS_FILE, TENSORBOARD_DIR, abandon_run_dir, check_out, finish_run_dir, latest_checkpoint,
    lock_out, prepare_run_dir, read_run_config, save_model, work_dir,
)
from kd.training.settings import augment_params, check_settings, recorded, resume_keys, trackers

# config.json keys that are not settings but must match for `--resume` to continue the same run
# (the declared settings say for themselves whether `--resume` compares them).
DERIVED_RESUME_KEYS = (
    "stage", "dataset_name", "num_classes", "class_names", "in_channels", "method", "mode", "teacher_weights_sha256",
    "soft_labels_sha256", "augment_options", "world_size", "data_fingerprint", "pretrained_sha256", "pretrained_source",
    "c_init_sha256",
)


def _start_trackers(accelerator: Any, work: Path, run_config: dict[str, Any]) -> None:
    """Point Accelerate's trackers at the run directory and log the run's scalar settings."""
    accelerator.project_configuration.logging_dir = str(work)
    scalars = {key: value for key, value in run_config.items() if isinstance(value, (int, float, str, bool))}
    accelerator.init_trackers(TENSORBOARD_DIR, config=scalars, init_kwargs={"tensorboard": {"flush_secs": 10}})


# Keys that are not flags themselves: a mismatch names the flag that decides them.
_DECIDED_BY = {
    "dataset_name": "--data-dir", "data_fingerprint": "--data-dir", "num_classes": "--data-dir",
    "class_names": "--data-dir", "in_channels": "--data-dir", "world_size": "processes (world size)",
    "pretrained_sha256": "--pretrained-path", "pretrained_source": "--pretrained",
    "c_init_sha256": "--c-init",
}


def check_resume_config(out: Path, old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A one-line `KDError` naming the first flag whose value differs from the run being resumed."""
    new = json.loads(json.dumps(new))  # compare as config.json holds it (tuples become lists)
    for key in keys:
        if key in old and key in new and old[key] != new[key]:
            flag = _DECIDED_BY.get(key, f"--{key.replace('_', '-')}")
            what = "gives other data" if flag == "--data-dir" and key != "dataset_name" else f"is {_short(new[key])}"
            raise KDError(
                f"--resume: {flag} {what} but the run in {out} used {_short(old[key])}; "
                "pass the original flags, or start a new run with another --out"
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def augment_options(settings: Any, method_cls: type[Method]) -> AugmentOptions:
    """The run's augmentations (the flags, or the dataset's default), checked before any data is read.

    Values that depend on the image size are checked again once the data is known.
    """
    names = parse_augment(settings.augment) if settings.augment is not None else default_augment(dataset_key(settings.dataset))
    options = AugmentOptions(names, **augment_params(settings))
    check_augment(options, settings.image_size or 1 << 20)
    if makes_soft_labels(options) and not method_cls.soft_targets:
        raise KDError(
            f"--method {method_cls.name} takes class labels only, and --augment {','.join(names)} makes label "
            f"distributions (mixup, cutmix): drop those, or use a method that takes them ({', '.join(soft_target_methods())})"
        )
    return options


def dry_forward(net: nn.Module, data: ImageDataset, model: str) -> None:
    """Run the network on two training images: a model that cannot take the data fails here, in one line."""
    images, _, _, _ = next(iter(DeviceBatches(data, "train", min(2, len(data.train)), torch.device("cpu"), training=False, num_workers=0)))
    net.eval()
    try:
        with torch.no_grad():
            shape = tuple(net(images).shape)
    except Exception as error:  # noqa: BLE001 - any failure here means the model does not fit the data
        raise KDError(
            f"model {model} cannot run on {data.channels}x{data.image_size}x{data.image_size} images "
            f"({one_line(error, 160)}); pass --image-size N with a size it takes"
        ) from None
    finally:
        net.train()
    if shape != (len(images), data.num_classes):
        raise KDError(f"model {model} gives outputs of shape {shape} for {len(images)} images, not ({len(images)}, {data.num_classes})")


def prepare_run(stage: str, settings: Any, method_cls: type[Method]) -> Run:
    """Check the settings, read the data and build the network; `--out` is not touched yet
    (but for its lock, `.OUT.kd-lock` beside it, taken first: see `kd.training.rundir.lock_out`).

    Every check runs before `--out` is touched (flags, out, data, model, then the stage's
    method: teacher, C-matrix; then a forward pass in `Run.train`): a failure leaves an
    existing run as it was.
    """
    check_settings(settings)
    accelerator = make_accelerator(settings.mixed_precision, settings.grad_accum, trackers(settings.log_with), settings.out)
    settings.mixed_precision = accelerator.mixed_precision  # not given: `accelerate launch`'s, else "no"
    if settings.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would accept it and silently train in float32.
        raise KDError("--mixed-precision fp16 needs a GPU; use bf16 on the CPU")
    lock, error = None, None  # one run per --out: its main process holds the lock until the run ends
    if accelerator.is_main_process:
        try:
            lock = lock_out(settings.out, settings.overwrite, settings.resume)
        except KDError as refused:
            error = str(refused)
    error = broadcast_object_list([error])[0] if accelerator.num_processes > 1 else error
    if error is not None:
        raise KDError(error)
    try:
        return _prepare(stage, settings, method_cls, accelerator, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _prepare(stage: str, settings: Any, method_cls: type[Method], accelerator: Accelerator, lock: Any) -> Run:
    out = check_out(settings.out, settings.overwrite, settings.resume)
    augment = augment_options(settings, method_cls)
    start = StartingWeights.read(settings, accelerator)
    set_seed(settings.seed)
    with accelerator.main_process_first():  # --download: one process fetches, the others then read
        data = load_dataset(settings.dataset, settings.data_dir, download=settings.download,
                            image_size=settings.image_size or start.image_size, skip_bad_images=settings.skip_bad_images)
    whole_data = data_fingerprint(data, settings.dataset, settings.data_dir)  # before any selection
    if settings.train_per_class is not None:
        data = train_per_class(data, settings.train_per_class, settings.seed)
    if settings.val_split is not None:
        data = validation_split(data, settings.val_split, settings.seed)
    for note in data.notes:
        accelerator.print(note)
    check_augment(augment, data.image_size)
    optimizer_steps_per_epoch(len(data.train), settings.batch_size, accelerator.num_processes, settings.grad_accum)
    # The student is built before the method so a teacher's construction does not shift the
    # random stream: the same seed gives the same initial student with every method.
    net = build_model(settings.model, data.num_classes, data.channels, data.image_size)
    data = start.apply(net, data, settings.model, accelerator)
    return Run(stage, settings, accelerator, out, augment, data, net, extra_config=start.record(),
               whole_data_fingerprint=whole_data, lock=lock)


@dataclass
class StartingWeights:
    """Where the network's weights start (`--pretrained`, `--pretrained-path`; else its random init), and
    the input convention that comes with a pretrained timm or torchvision model (its size, mean and std)."""

    weights: WeightsFile | None = None
    flag: str = ""
    input: Any = None  # kd.models.pretrained.InputConfig of a timm / torchvision model, else None

    @classmethod
    def read(cls, settings: Any, accelerator: Accelerator) -> StartingWeights:
        """Read the weights (a one-line `KDError` for a bad file, or offline) before any data is."""
        if settings.pretrained_path is not None:
            weights, flag = read_weights_file(settings.pretrained_path, "--pretrained-path"), "--pretrained-path"
        elif settings.pretrained:
            with accelerator.main_process_first():  # one process downloads, the others read the cache
                weights, flag = published_weights(settings.model), "--pretrained"
        else:
            return cls()
        library = model_library(settings.model)
        if library == "builtin":
            return cls(weights, flag)
        from kd.models.pretrained import ModelSpec, teacher_input_config

        return cls(weights, flag, teacher_input_config(ModelSpec(library, split_model_name(settings.model)[1])))

    @property
    def image_size(self) -> int | None:
        """The model's own input side (the longer one), the data's size unless --image-size says otherwise."""
        return max(self.input.size) if self.input is not None else None

    def apply(self, net: nn.Module, data: ImageDataset, model: str, accelerator: Accelerator) -> ImageDataset:
        """Load the weights into `net`; the data, normalised with the model's own mean and std where it has them."""
        if self.weights is None:
            return data
        for note in load_initial_weights(net, model, self.weights, data.class_names, self.flag):
            accelerator.print(f"note: {self.flag}: {note}")
        if self.input is None:
            return data
        from kd.models.pretrained import with_channels

        own = with_channels(self.input, data.channels)  # gray data: the channels' average, as the adapted first convolution sums them
        return replace(data, mean=tuple(own.mean), std=tuple(own.std))

    def record(self) -> dict[str, Any]:
        return self.weights.record("pretrained") if self.weights else {}


@dataclass
class Run:
    """A prepared run: its settings, accelerator, data and network; `train` does the rest."""

    stage: str
    settings: Any
    accelerator: Accelerator
    out: Path
    augment: AugmentOptions
    data: ImageDataset
    net: nn.Module
    extra_config: dict[str, Any] = field(default_factory=dict)  # the stage's own config.json keys
    whole_data_fingerprint: str = ""  # the dataset's before --train-per-class / --val-split (stored soft labels name it)
    lock: Any = None  # the main process's `OutLock` on --out, released when `train` ends

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        """`with prepare_run(...) as run:` releases --out's lock however the stage ends (a bad teacher, say)."""
        if self.lock is not None:
            self.lock.release()

    def train(self, method: Method) -> Path:
        """Train the network with `method`; write config.json, checkpoints, weights, artifacts and metrics."""
        try:
            return self._train(method)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _train(self, method: Method) -> Path:
        settings, accelerator, out, data = self.settings, self.accelerator, self.out, self.data
        dry_forward(self.net, data, settings.model)
        run_config = self.config(method)
        if settings.resume:  # the original config.json stays; it must describe the same run
            check_resume_config(out, read_run_config(work_dir(out, resume=True)), run_config,
                                resume_keys(settings, DERIVED_RESUME_KEYS))
        work = [prepare_run_dir(out, settings.overwrite, settings.resume) if accelerator.is_main_process else None]
        work = Path(broadcast_object_list(work)[0])
        resume_from = latest_checkpoint(work) if settings.resume else None
        if resume_from is not None:
            accelerator.print(f"{data.describe()} | {self.stage} {settings.model} | resuming from {resume_from}")
        elif accelerator.is_main_process:
            write_json_atomic(work / CONFIG_FILE, run_config)
            staged = f" (staged in {work} until it finishes)" if work != out else ""
            accelerator.print(f"{data.describe()} | {self.stage} {settings.model} | {run_config.get('method', '')} -> {out}{staged}")
        if settings.log_with:
            _start_trackers(accelerator, work, run_config)
        # Training's own random stream (dropout) starts from the seed whatever building the method
        # drew (a teacher network's initialisation): live KD and stored soft labels, say, see the same masks.
        set_seed(settings.seed)
        try:
            result = fit(TrainModule(self.net, method), data, settings, accelerator,
                         run_dir=work, resume_from=resume_from, augment=self.augment, desc=self.stage)
        except TrainingDiverged as error:
            if accelerator.is_main_process:
                if work == out:
                    write_json_atomic(out / STATUS_FILE, {"status": "diverged", "step": error.step, "loss": str(error.loss)})
                abandon_run_dir(work, out)
            raise
        if accelerator.is_main_process:
            self.write_artifacts(work, method, result)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return out

    def config(self, method: Method) -> dict[str, Any]:
        """config.json: the recorded settings, the stage's and method's own keys, and what the data turned out to be."""
        settings, data = self.settings, self.data
        flags = recorded(settings)
        if settings.data_dir is not None:
            flags["data_dir"] = str(Path(settings.data_dir).expanduser().resolve())
        return {
            **flags,
            **self.extra_config,
            "stage": self.stage,
            **method.card(),
            "augment": list(self.augment.names),
            "augment_options": self.augment.resolved(data.image_size, streaming=not data.in_memory),
            "dataset_name": data.name,
            "data_fingerprint": data_fingerprint(data, settings.dataset, settings.data_dir),
            "num_classes": data.num_classes,
            "class_names": list(data.class_names),
            "in_channels": data.channels,
            "image_size": data.image_size,
            "mean": list(data.mean),
            "std": list(data.std),
            "world_size": self.accelerator.num_processes,
            "effective_batch_size": settings.batch_size * settings.grad_accum * self.accelerator.num_processes,
            "toolkit_version": kd.__version__,
        }

    def write_artifacts(self, work: Path, method: Method, result: FitResult) -> None:
        """The main process's final writes: weights, the method's artifacts (cmatrix.safetensors), metrics.json."""
        settings, data, out = self.settings, self.data, self.out
        save_model(work / MODEL_FILE, self.net, data.class_names)
        method.export(work, ExportInfo(
            class_names=tuple(data.class_names), dataset=data.name, model=settings.model,
            test_top1=result.metrics.get("test_top1"),
        ))
        metrics = {
            "stage": self.stage,
            **method.card(),
            "model": settings.model,
            **result.metrics,
            "epochs": result.epochs,
            "steps": result.steps,
            "train_seconds": result.train_seconds,
            "seconds_per_epoch": result.train_seconds / max(result.epochs, 1),
            "images_per_second": result.images_per_second,
            "peak_memory_mb": result.peak_memory_mb,
            "peak_memory_kind": result.peak_memory_kind,
            **result.method_metrics,
            "epoch_train_loss": result.epoch_train_loss,
            "epoch_loss_parts": result.epoch_loss_parts,
            "num_classes": data.num_classes,
            "class_names": list(data.class_names),
            "world_size": self.accelerator.num_processes,
            "grad_accum": result.grad_accum,
            "effective_batch_size": result.effective_batch_size,
            "skipped_images": data.skipped_images,
            "resumed_from_step": result.resumed_from_step,
            "mixed_precision": settings.mixed_precision,
            "device": str(self.accelerator.device),
        }
        write_json_atomic(work / METRICS_FILE, metrics)
        finish_run_dir(work, out)
        val = f"val top-1 {result.metrics['val_top1']:.4f}  " if "val_top1" in result.metrics else ""
        self.accelerator.print(
            f"{val}test top-1 {result.metrics['test_top1']:.4f}  NLL {result.metrics['test_nll']:.4f}  "
            f"ECE {result.metrics['test_ece']:.4f}  in {result.train_seconds:.1f}s "
            f"({result.images_per_second:.0f} img/s) -> {out}"
        )
