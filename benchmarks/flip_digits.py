"""What a horizontal flip does to handwritten digits: a digit-image folder, LeNet, --augment crop vs crop,flip.

    python benchmarks/flip_digits.py [--seeds 0 1 2] [--epochs 3]

scikit-learn's digits are written out as an ImageFolder tree of PNGs (the fixed stratified split
the toolkit's `digits` dataset uses) under .data/digits-folder, as a user's own folder would be;
ImageFolder's default augmentation is crop,flip. Each variant is a real `kd train-teacher` run of
the paper's LeNet (--image-size 32) per seed. Writes benchmarks/results/flip_digits.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from _seeds import RESULTS, run_kd, summarise, write_report

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"--augment crop": ["--augment", "crop"], "--augment crop,flip (the ImageFolder default)": ["--augment", "crop,flip"]}


def digits_folder(root: Path) -> Path:
    from kd.data.datasets import load_dataset

    if (root / "test").is_dir():
        return root
    data = load_dataset("digits")
    for split_name, split in (("train", data.train), ("test", data.test)):
        for index, (image, label) in enumerate(zip(split.images, split.labels)):
            folder = root / split_name / data.class_names[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(image[0])).save(folder / f"{index:04d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    folder = digits_folder(ROOT / ".data" / "digits-folder")
    common = ["train-teacher", "--dataset", "imagefolder", "--data-dir", str(folder), "--model", "lenet", "--image-size", "32",
              "--method", "onehot", "--epochs", str(args.epochs), "--batch-size", "32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in VARIANTS.items():
            runs = [run_kd([*common, *flags, "--seed", str(seed)], Path(tmp) / f"{flags[1]}-{seed}") for seed in args.seeds]
            rows.append(summarise(name, args.seeds, runs))
    command = " ".join(["python", "benchmarks/flip_digits.py", *sys.argv[1:]])
    title = f"Flipping handwritten digits: LeNet on a digit-image folder ({args.epochs} epochs, seeds {' '.join(map(str, args.seeds))})"
    write_report(args.results_dir / "flip_digits", title, command, rows, {"epochs": args.epochs})


if __name__ == "__main__":
    main()
