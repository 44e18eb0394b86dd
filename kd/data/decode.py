"""Reading image files: one image into a uint8 tensor, many in DataLoader worker processes.

`open_image` decodes one file with PIL in the dataset's mode ('L' or 'RGB'); `decode_cached`
decodes a list of files into one uint8 N x C x S x S tensor (through the decoded-data cache,
`kd.data.cache`); `read_headers` reads only their (mode, width, height) headers. A file that
cannot be read is a one-line `KDError` naming it (`image_error`), or, with `skip_bad`, a
failure returned to the caller, which leaves the file out.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kd.data import cache as datacache
from kd.errors import KDError, one_line

# Formats torchvision.io decodes natively (fast path); the rest go through PIL.
_FAST_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# PIL modes that make a one-channel dataset; every other mode is converted to RGB.
GRAY_MODES = frozenset({"L", "LA", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

# A file over this size has its header read by PIL before torchvision decodes it, so a
# decompression bomb (over twice PIL.Image.MAX_IMAGE_PIXELS) is refused, as PIL and torchvision's
# ImageFolder refuse it, before torchvision allocates its pixels. A smaller PNG or (Huffman-coded)
# JPEG cannot unpack to that many: deflate packs at most 1032 bytes into one.
_UNCHECKED_BYTES = 64 * 2**10

# Decoding happens in chunks of about this many bytes per worker round trip.
_CHUNK_BYTES = 2 * 2**20
_MIN_CHUNK = 64
_MAX_CHUNK = 1024

# A file's header: its PIL mode, width and height.
Header = tuple[str, int, int]
# A file that could not be read: its index in the list of files, and a one-line message.
Failure = tuple[int, str]


def image_error(path: str, error: BaseException) -> KDError:
    """`cannot read image PATH: REASON`, one line of at most 300 characters (a KDError passes as is)."""
    from PIL import UnidentifiedImageError

    if isinstance(error, KDError):
        return error
    if isinstance(error, UnidentifiedImageError):
        reason = "not an image file PIL can identify (corrupt or unsupported)"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = one_line(error, 300)
    shown = path if len(path) <= 200 else "..." + path[-197:]
    return KDError(one_line(f"cannot read image {shown}: {reason}", 300))


def _to_mode(image: Any, channels: int) -> Any:
    """A PIL image as 'L' (channels 1) or 'RGB' (channels 3); 16-bit gray is scaled to 8 bits."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def open_image(path: str, channels: int = 3) -> Any:
    """Open and fully decode `path` with PIL, in the dataset's mode; a one-line KDError if it cannot."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return _to_mode(image, channels)
    except Exception as error:  # PIL raises many types for bad files
        raise image_error(path, error) from None


def _probe(path: str) -> Header:
    """PIL mode, width and height of an image, from its header (the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode, image.size[0], image.size[1]
    except Exception as error:
        raise image_error(path, error) from None


def _decode_one(path: str, channels: int, size: int) -> torch.Tensor:
    """One image as a uint8 channels x size x size tensor: torchvision.io for JPEG/PNG/WebP, else PIL."""
    image = None
    if path.lower().endswith(_FAST_EXTENSIONS):
        if os.path.getsize(path) > _UNCHECKED_BYTES:
            _probe(path)  # a bomb (or a large file that is no image) is a KDError, before it is read whole
        try:
            from torchvision.io import ImageReadMode, decode_image

            data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
            mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
            image = decode_image(data, mode=mode)
            if image.ndim == 4:  # animated image: first frame
                image = image[0]
            if image.dtype != torch.uint8 or image.shape[0] != channels:
                image = None  # 16-bit PNG or an odd mode: let PIL (and `_to_mode`) handle it
        except (RuntimeError, ImportError, ValueError, OSError):
            image = None  # unsupported, corrupt or unreadable: PIL decides (and names the error)
    if image is None:
        array = np.asarray(open_image(path, channels))
        image = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)
    if image.shape[-2:] != (size, size):
        from torchvision.transforms.v2 import functional as TF

        image = TF.resize(image.unsqueeze(0), [size, size], antialias=True)[0]
    return image


# ----------------------------------------------------------------------------- many files, in worker processes


class _FileChunks(Dataset):
    """Item i = (start, result for files[start:start+chunk], failures), made in a worker process.

    A failure is (index into files, one-line message); the chunk's other files are still done.
    Subclasses say what a chunk's result is (`_new`) and how one file goes into it (`_one`).
    """

    def __init__(self, files: list[str], chunk: int) -> None:
        self.files, self.chunk = files, max(1, chunk)

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.chunk)

    def _new(self, count: int) -> Any:
        raise NotImplementedError

    def _one(self, result: Any, offset: int, path: str) -> None:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[int, Any, list[Failure]]:
        start = index * self.chunk
        paths = self.files[start : start + self.chunk]
        result = self._new(len(paths))
        failures = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision >= 0.29 deprecates its decoders; PIL's noise
            for offset, path in enumerate(paths):
                try:
                    self._one(result, offset, path)
                except Exception as error:  # reported, with the file's name, by the main process
                    failures.append((start + offset, str(image_error(path, error))))
        return start, result, failures


class _DecodeChunks(_FileChunks):
    """A chunk's result: its images decoded into one uint8 tensor."""

    def __init__(self, files: list[str], channels: int, size: int, chunk: int) -> None:
        super().__init__(files, chunk)
        self.channels, self.size = channels, size

    def _new(self, count: int) -> torch.Tensor:
        return torch.empty((count, self.channels, self.size, self.size), dtype=torch.uint8)

    def _one(self, result: torch.Tensor, offset: int, path: str) -> None:
        result[offset] = _decode_one(path, self.channels, self.size)


class _HeaderChunks(_FileChunks):
    """A chunk's result: the (mode, width, height) header of each file, None where unreadable."""

    def _new(self, count: int) -> list[Header | None]:
        return [None] * count

    def _one(self, result: list, offset: int, path: str) -> None:
        result[offset] = _probe(path)


def _identity(item: Any) -> Any:
    return item


def _run_chunks(chunks: _FileChunks, desc: str, skip_bad: bool, take: Callable[[int, Any], None]) -> list[Failure]:
    """Work through `chunks` with DataLoader worker processes, handing each chunk's result to
    `take(start, result)`. Returns the failures; without `skip_bad` the first is raised as a KDError."""
    from tqdm import tqdm

    workers = min(4, os.cpu_count() or 1, len(chunks)) if len(chunks) > 1 else 0
    loader = DataLoader(chunks, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity)
    failures: list[Failure] = []
    with tqdm(total=len(chunks.files), desc=desc, leave=False, file=sys.stderr, unit="img", disable=None) as progress:
        for start, result, bad in loader:
            if bad and not skip_bad:
                raise KDError(bad[0][1])
            failures.extend(bad)
            take(start, result)
            progress.update(len(result))
    return failures


def decode_cached(
    files: list[str], channels: int, size: int, desc: str, skip_bad: bool = False
) -> tuple[torch.Tensor, list[Failure]]:
    """`_decode_all` through the decoded-data cache (`kd.data.cache`): only a clean decode is cached."""
    key = datacache.cache_key(files, channels, size)
    images = datacache.load_decoded(key, (len(files), channels, size, size))
    if images is not None:
        return images, []
    images, failures = _decode_all(files, channels, size, desc, skip_bad)
    if not failures:
        datacache.store_decoded(key, images)
    return images, failures


def _decode_all(
    files: list[str], channels: int, size: int, desc: str, skip_bad: bool = False
) -> tuple[torch.Tensor, list[Failure]]:
    """Decode `files` into one uint8 N x C x size x size tensor with DataLoader worker processes.

    Returns the tensor and the failures (index, message), whose rows are left undefined; without
    `skip_bad` the first failure is raised as a KDError instead.
    """
    out = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    chunk = max(_MIN_CHUNK, min(_MAX_CHUNK, _CHUNK_BYTES // (channels * size * size)))

    def take(start: int, images: torch.Tensor) -> None:
        out[start : start + images.shape[0]] = images

    failures = _run_chunks(_DecodeChunks(files, channels, size, chunk), desc, skip_bad, take)
    return out, failures


def read_headers(
    files: list[str], desc: str, skip_bad: bool = False, workers: bool = True
) -> tuple[list[Header | None], list[Failure]]:
    """The (mode, width, height) header of every file (None where unreadable) and the failures.

    Without `skip_bad` the first failure is raised as a KDError. `workers=False` reads them in this
    process (for a small probe, where starting workers would cost more than it saves).
    """
    headers: list[Header | None] = [None] * len(files)

    def take(start: int, result: list) -> None:
        headers[start : start + len(result)] = result

    chunk = _MAX_CHUNK if workers else len(files)
    return headers, _run_chunks(_HeaderChunks(files, chunk), desc, skip_bad, take)
