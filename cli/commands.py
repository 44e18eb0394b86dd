"""The training and report commands: `kd train-teacher`, `kd distill`, `kd methods`, `kd compare`.

Loaded by `cli.main` only when one of them runs (or shows its help), so `kd --help` and
`kd --version` never import torch.
"""

from __future__ import annotations

import dataclasses

import click

from cli.config_file import config_option
from kd.augment import AugmentOptions
from kd.datasets import DATASET_NAMES
from kd.io import write_text_atomic
from kd.models import BUILTIN_MODELS
from kd.pretrained import (
    TEACHER_CLASSES_HELP,
    TEACHER_IMAGE_SIZE_HELP,
    TEACHER_MODEL_HELP,
    TEACHER_WEIGHTS_HELP,
)

DATASET_HELP = (
    "digits (built in, the default), cifar10, cifar100, mnist, fashionmnist, svhn (torchvision, "
    "read from --data-dir), or imagefolder (--data-dir holding train/<class>/* and test/<class>/* or val/<class>/*)."
)
assert all(name in DATASET_HELP for name in DATASET_NAMES)
MODEL_HELP = f"{', '.join(BUILTIN_MODELS)}, or any timm model name (random init)."


def _apply(options: list) -> callable:
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


_AUGMENT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AugmentOptions)}

# Flags every training command shares: data, model, optimisation, run directory, precision.
run_options = _apply([
    click.option("--dataset", default="digits", show_default=True, help=DATASET_HELP),
    click.option("--data-dir", type=click.Path(file_okay=False), help="Dataset root (torchvision datasets, imagefolder)."),
    click.option("--download", is_flag=True, help="Let torchvision download the dataset into --data-dir if it is missing."),
    click.option(
        "--train-per-class", type=int, default=None, metavar="N",
        help="Train on N images per class only: a stratified subset picked with --seed (the test split stays whole). "
        "For small-data experiments and quick runs.",
    ),
    click.option(
        "--val-split", type=float, default=None, metavar="FRACTION",
        help="Hold out this fraction of every class's training images (stratified, picked with --seed) as a "
        "validation split, evaluated every --eval-every epochs and at the end. The test split is evaluated once, at the end.",
    ),
    click.option(
        "--eval-every", type=int, default=None, metavar="EPOCHS",
        help="With --val-split: validate every EPOCHS epochs (and after the last). Default: every epoch.",
    ),
    click.option(
        "--log-with", metavar="TRACKERS",
        help="Also log each epoch's scalars (summary.csv's columns) to these Accelerate trackers, comma-separated: "
        "tensorboard (into OUT/tensorboard; pip install 'lspp-kd[tensorboard]'), wandb, mlflow, comet_ml, aim, ...",
    ),
    click.option(
        "--channels-last/--no-channels-last", default=True, show_default=True,
        help="Train convolutional networks in channels-last (NHWC) memory format, the faster layout for oneDNN and "
        "cuDNN (measured: the paper's AlexNet step about 5-10% faster on a 2-core CPU). Results agree to float tolerance.",
    ),
    click.option(
        "--compile", is_flag=True,
        help="torch.compile the network. Compiling takes about 30 s on a 2-core CPU for the paper's AlexNet and "
        "gained about 6% per step there, so it is off by default; it pays on long runs and on GPUs. Dropout masks "
        "then come from the compiler's own generator: a compiled run repeats itself but not an uncompiled one.",
    ),
    click.option(
        "--skip-bad-images", is_flag=True,
        help="imagefolder: leave out images that cannot be read (counted in metrics.json) instead of stopping with an error naming the first.",
    ),
    click.option(
        "--model", default="small_cnn", show_default=True,
        help=MODEL_HELP,
    ),
    click.option("--epochs", type=int, default=30, show_default=True, help="Training epochs."),
    click.option("--batch-size", type=int, default=64, show_default=True, help="Batch size per process."),
    click.option("--lr", type=float, default=0.05, show_default=True, help="Peak learning rate (SGD, Nesterov momentum 0.9, warm-up + cosine)."),
    click.option("--weight-decay", type=float, default=5e-4, show_default=True, help="Weight decay (not on biases, norms or the C logits)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Random seed (initialisation, shuffling, augmentation)."),
    click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps (smoke runs, benchmarks)."),
    click.option("--image-size", type=int, default=None, help="Side length the model sees (default: the dataset's own size)."),
    click.option("--out", required=True, type=click.Path(), help="Run directory to create (weights, config.json, metrics.json, ...)."),
    click.option("--overwrite", is_flag=True, help="Replace the run in an existing non-empty --out."),
    click.option(
        "--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
        help="Passed to Accelerate; losses and the C-matrix stay in float32. fp16 needs a GPU; bf16 also runs on the CPU.",
    ),
    click.option(
        "--grad-accum", type=int, default=1, show_default=True,
        help="Gradient accumulation: one optimizer step per N batches, i.e. an effective batch of "
        "batch-size x N x processes. The schedule, --max-steps and checkpoint steps count optimizer steps.",
    ),
    click.option(
        "--checkpoint-every", type=int, default=None, metavar="EPOCHS",
        help="Save the full training state (model, C logits, optimizer, schedule, RNG, position) to "
        "OUT/checkpoints/step-NNNNNNNN every EPOCHS epochs and at the end; the last 2 are kept.",
    ),
    click.option(
        "--checkpoint-every-steps", type=int, default=None, metavar="STEPS",
        help="Also (or instead) save a checkpoint every STEPS optimizer steps, mid-epoch included.",
    ),
    click.option(
        "--augment", metavar="LIST",
        help="Training augmentations, comma-separated: crop (reflect-pad and random crop; a random-resized crop "
        "for streamed data), flip (horizontal), randaugment, then (on normalised images) cutout, mixup, cutmix, each "
        "group in the order given; none for nothing. Default: crop,flip for cifar10/100, fashionmnist and imagefolder; crop for digits, mnist and svhn. "
        "Do not flip digits, text or anything whose orientation carries meaning.",
    ),
    click.option("--crop-padding", type=int, default=None, help="crop: padding in pixels. Default: image size / 8."),
    click.option("--cutout-size", type=int, default=None, help="cutout: side of the zeroed square. Default: image size / 2."),
    click.option("--randaugment-n", type=int, default=None, help=f"randaugment: ops per image. Default: {_AUGMENT_DEFAULTS['randaugment_n']}."),
    click.option("--randaugment-m", type=int, default=None, help=f"randaugment: magnitude, 0-30. Default: {_AUGMENT_DEFAULTS['randaugment_m']}."),
    click.option("--mixup-alpha", type=float, default=None, help=f"mixup: Beta(a, a) parameter. Default: {_AUGMENT_DEFAULTS['mixup_alpha']}."),
    click.option("--cutmix-alpha", type=float, default=None, help=f"cutmix: Beta(a, a) parameter. Default: {_AUGMENT_DEFAULTS['cutmix_alpha']}."),
    click.option(
        "--mix-switch-prob", type=float, default=None,
        help=f"With both mixup and cutmix: the probability that a batch uses cutmix. Default: {_AUGMENT_DEFAULTS['mix_switch_prob']}.",
    ),
    click.option(
        "--resume", is_flag=True,
        help="Continue the run in an existing --out from its latest complete checkpoint (same flags as the original run).",
    ),
])


def method_options(stage: str, default_text: str) -> callable:
    """`--method` and one flag per method parameter, all from the registry's declarations.

    Parameter flags default to None ("not given"): the chosen method's own default applies,
    and a flag the chosen method does not declare is an error rather than silently ignored.
    """
    from kd.methods import format_default, method_names, stage_params

    options = [click.option(
        "--method", type=click.Choice(method_names(stage)), default=None,
        help=f"Training method (default: {default_text}). `kd methods` describes each and its parameters.",
    )]
    for declared in stage_params(stage).values():
        param = declared[0][1]
        if len({p.help for _, p in declared}) == 1:
            text = f"{', '.join(method for method, _ in declared)}: {param.help}"
        else:
            text = "; ".join(f"{method}: {p.help}" for method, p in declared)
        if param.type is bool:
            options.append(click.option(param.flag, is_flag=True, default=False, help=f"{text}."))
            continue
        defaults = ", ".join(f"{method} {format_default(p.default)}" for method, p in declared)
        kind = click.Choice(param.choices) if param.choices else param.type
        options.append(click.option(param.flag, type=kind, default=None, help=f"{text}. Default: {defaults}."))
    return _apply(options)


def _split_method_params(stage: str, options: dict) -> dict:
    """Click's flat options -> RunConfig's fields: method parameters and augmentation parameters apart."""
    from kd.methods import stage_params

    options["method_params"] = {name: options.pop(name) for name in stage_params(stage)}
    options["augment_params"] = {name: options.pop(name) for name in _AUGMENT_DEFAULTS if name != "names"}
    return options


@click.command("train-teacher")
@config_option("teacher")
@run_options
@method_options("teacher", "lspp, which exports cmatrix.safetensors; so does ols")
def train_teacher_command(**options) -> None:
    """Train a teacher network (with LS++ by default) and export its cmatrix.safetensors."""
    from kd.run import RunConfig
    from teachers.train import train_teacher

    train_teacher(RunConfig(**_split_method_params("teacher", options)))


@click.command("distill")
@config_option("student")
@run_options
@click.option("--proxy", type=click.Path(dir_okay=False), help="C-matrix file: proxy-teacher targets (1-a)*onehot + a*C[y], no teacher network (method proxy).")
@click.option("--teacher", type=click.Path(file_okay=False), help="Teacher run directory: classic per-sample KD (method kd). Or use --teacher-model.")
@click.option("--teacher-model", metavar="NAME", help=TEACHER_MODEL_HELP + " Classic per-sample KD (method kd); an alternative to --teacher.")
@click.option("--teacher-weights", type=click.Path(dir_okay=False), help=TEACHER_WEIGHTS_HELP)
@click.option("--teacher-image-size", type=int, default=None, metavar="N", help=TEACHER_IMAGE_SIZE_HELP)
@click.option("--teacher-classes", type=click.Path(dir_okay=False), help=TEACHER_CLASSES_HELP)
@method_options("student", "proxy with --proxy, kd with --teacher or --teacher-model, onehot with neither")
def distill_command(**options) -> None:
    """Train a student: from a proxy C-matrix (--proxy), a teacher network (--teacher RUN_DIR, or a pretrained
    --teacher-model NAME with --teacher-weights FILE), or plain labels."""
    from students.distill import StudentConfig, distill

    distill(StudentConfig(**_split_method_params("student", options)))


@click.command("methods")
@click.option("--markdown", is_flag=True, help="Print the table as markdown (the README's method table).")
def methods_command(markdown: bool) -> None:
    """List the training methods, the stages they serve and their parameters."""
    from kd.methods import REGISTRY, format_default, get_method, methods_markdown

    if markdown:
        click.echo(methods_markdown(), nl=False)
        return
    for name in REGISTRY:
        cls = get_method(name)
        click.echo(f"{name:<7} [{'/'.join(cls.stages)}] {cls.summary}")
        for param in cls.params:
            click.echo(f"          {param.flag} ({format_default(param.default)}): {param.help}")


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Also write the table as markdown to this file.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the table as CSV to this file.")
def compare_command(run_dirs: tuple[str, ...], markdown_path: str | None, csv_path: str | None) -> None:
    """Compare runs side by side: accuracy, calibration, time and memory."""
    from kd.report import compare_rows, to_csv, to_markdown, to_text

    rows = compare_rows(run_dirs)
    click.echo(to_text(rows))
    if markdown_path:
        write_text_atomic(markdown_path, to_markdown(rows))
    if csv_path:
        write_text_atomic(csv_path, to_csv(rows))
