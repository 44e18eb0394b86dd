"""Streaming ImageFolder data: `StreamingImageFolder`, torchvision's ImageFolder over a checked sample list.

Apart from `kd.data.datasets` because it subclasses torchvision's class, and importing torchvision
costs seconds (torchvision.ops pulls in torch._dynamo) that runs on in-memory data never need:
`kd.data.datasets` and `kd.data.loader` import this module only when they stream a dataset. The
class stays module-level here, so DataLoader workers started with spawn or forkserver can unpickle it.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import ImageFolder

from kd.data.decode import image_error
from kd.errors import KDError


class StreamingImageFolder(ImageFolder):
    """torchvision's ImageFolder over an already-checked (path, label) list (no second directory walk).

    Samples are (uint8 C x S x S tensor, label): `transform` (one argument, torchvision's
    convention) makes the tensor, unless `with_transform` gave a copy a transform of
    (image, sample index), such as the seeded training crop of `kd.data.augment.StreamingResizedCrop`.
    An unreadable file is a one-line KDError naming it; with `skip_bad` the next readable sample
    stands in for it (and a line on stderr names it). Module-level so DataLoader workers started
    with spawn or forkserver can unpickle it.
    """

    def __init__(
        self,
        root: Path,
        class_names: list[str],
        samples: list[tuple[str, int]],
        transform: Callable,
        loader: Callable,
        skip_bad: bool = False,
    ) -> None:
        self._kd_class_names = list(class_names)
        self._kd_samples = list(samples)
        self._kd_skip_bad = skip_bad
        self._kd_indexed_transform: Callable[[Any, int], torch.Tensor] | None = None
        super().__init__(str(root), transform=transform, loader=loader)

    def subset(self, indices: Sequence[int]) -> StreamingImageFolder:
        """A copy over the samples at `indices` only (in that order)."""
        twin = copy.copy(self)
        twin.samples = twin.imgs = [self.samples[i] for i in indices]
        twin.targets = [label for _, label in twin.samples]
        return twin

    def with_transform(self, transform: Callable[[Any, int], torch.Tensor]) -> StreamingImageFolder:
        """A copy (sharing the sample list) whose samples are `transform(image, index)`."""
        twin = copy.copy(self)
        twin._kd_indexed_transform = transform
        return twin

    def find_classes(self, directory: Any) -> tuple[list[str], dict[str, int]]:
        return list(self._kd_class_names), {name: i for i, name in enumerate(self._kd_class_names)}

    def make_dataset(self, directory: Any, *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        return list(self._kd_samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for step in range(len(self.samples) if self._kd_skip_bad else 1):
            path, label = self.samples[(index + step) % len(self.samples)]
            try:
                image = self.loader(path)
                if self._kd_indexed_transform is not None:
                    return self._kd_indexed_transform(image, index), label
                return (self.transform(image) if self.transform is not None else image), label
            except Exception as error:  # the loader's KDError, or a transform's failure on this file
                failure = image_error(path, error)
                if not self._kd_skip_bad:
                    raise failure from None
                print(f"kd: warning: {failure}; skipped (--skip-bad-images)", file=sys.stderr, flush=True)
        raise KDError(f"no readable image in {self.root}")
