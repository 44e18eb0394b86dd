"""The data a finished run was trained and evaluated on, rebuilt from its config.json.

`kd cmatrix from-teacher RUN_DIR` averages a teacher's predictions over the run's training
split and `kd plot RUN_DIR` draws the reliability diagram of its test split: both need the very
splits the run had. `load_run_data` loads the run's dataset at the run's image size and repeats
the run's own selections with the run's seed, in the run's order (`kd.training.run.prepare_run`):
`--train-per-class`, then `--val-split` (whose images the run held out of training).
"""

from __future__ import annotations

import os
from dataclasses import replace

from kd.data.datasets import ImageDataset, load_dataset
from kd.data.splits import train_per_class, validation_split
from kd.errors import KDError


def load_run_data(
    run_dir: str | os.PathLike, config: dict, dataset: str | None = None, data_dir: str | os.PathLike | None = None
) -> ImageDataset:
    """The dataset the run in `run_dir` was trained on, with its training, validation and test splits.

    `config` is the run's config.json (`kd.training.rundir.load_run_model` returns it). With
    `dataset` or `data_dir` another dataset is loaded instead, whole (at the run's image size, and
    without the run's selections, which were made on the run's data). The dataset's class names
    must be the run's, in order, or it is a one-line KDError. The data is normalised with the run's recorded
    mean and std (a pretrained model's own, for a fine-tuned run), as its network saw it.
    """
    data = load_dataset(
        dataset or config.get("dataset", "digits"), data_dir or config.get("data_dir"),
        image_size=config["image_size"], skip_bad_images=bool(config.get("skip_bad_images")),
    )
    if dataset is None and data_dir is None:
        seed = config.get("seed", 0)
        if config.get("train_per_class"):
            data = train_per_class(data, config["train_per_class"], seed)
        if config.get("val_split"):
            data = validation_split(data, config["val_split"], seed)
    if list(data.class_names) != list(config["class_names"]):
        raise KDError(f"the dataset's classes differ from those the run in {run_dir} was trained on")
    if config.get("mean") and config.get("std"):  # normalised as the run's network was (a pretrained model's own, say)
        data = replace(data, mean=tuple(config["mean"]), std=tuple(config["std"]))
    return data
