"""Weights files, and starting a network from pretrained weights as timm does.

A weights file is a safetensors file, or a PyTorch state dict read with
`torch.load(weights_only=True)` (also inside a checkpoint dict under "state_dict", "model" or
"model_state_dict"); `DistributedDataParallel`'s and `torch.compile`'s key prefixes are
removed. Class names travel in the safetensors metadata key `class_names` (a JSON list, as in
C-matrix files and a toolkit run's model.safetensors) or in a checkpoint dict's "class_names".

`load_initial_weights` starts a freshly built network (`kd.models.networks.build_model`) from
such weights (`--pretrained-path`) or from the model's published ones (`--pretrained`, the only
place the toolkit reaches the network, through timm's or torchvision's own download and cache),
adapted as timm adapts pretrained weights (`timm.models.load_pretrained`):

* the first convolution is adapted to the data's channel count (`timm.models.adapt_input_conv`:
  RGB -> gray sums the channels, gray -> RGB repeats them at a third);
* the classifier keeps its rows when the weights' classes are the data's (by name where both
  are known: reordered, or a subset picked), and is re-initialised otherwise;
* any other tensor that is missing, unexpected or of another shape is a one-line `KDError`
  naming the first.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kd.errors import KDError, one_line
from kd.models.networks import BUILTIN_MODELS, split_model_name

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@dataclass
class WeightsFile:
    """Weights read into a state dict, with the class names they carry and where they came from."""

    path: Path | None  # None: a model's published weights (`source` names them)
    state: dict[str, torch.Tensor]
    class_names: list[str] | None
    sha256: str | None
    source: str  # for messages and config.json: the file, or "timm:NAME (published weights)"

    def record(self, flag: str) -> dict[str, Any]:
        """What config.json records of these weights (and `--resume` compares)."""
        if self.path is None:
            return {f"{flag}_source": self.source}
        return {f"{flag}_path": str(self.path.expanduser().resolve()), f"{flag}_sha256": self.sha256}


# ---------------------------------------------------------------------------------------------
# reading a weights file


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and then the JSON header's '{'."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _names_from(value: Any, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(n, str) and n for n in value):
        raise KDError(f"{where}: class_names must be a non-empty list of non-empty strings")
    return list(value)


def _read_safetensors(path: Path, where: str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            state = {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as error:  # safetensors raises several types for a bad file
        raise KDError(f"{where}: not a valid safetensors file (truncated or corrupt? {one_line(error, 80)})") from None
    names = None
    if "class_names" in metadata:
        try:
            names = _names_from(json.loads(metadata["class_names"]), where)
        except ValueError:
            raise KDError(f"{where}: metadata class_names is not valid JSON (expected a JSON list of strings)") from None
    return state, names


def _torch_load_problem(error: Exception) -> str:
    """The gist of a failed `torch.load(weights_only=True)` (its message is a page long)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker not in text:
        return f"{type(error).__name__}: {one_line(error, 80)}"
    detail = one_line(text.split(marker, 1)[1].split("Check the documentation", 1)[0]).split(". ")[0]
    if "Unsupported global" in detail:
        return f"it pickles objects, not only tensors: {one_line(detail, 60)}; save the state_dict() instead"
    return f"weights_only=True cannot read it: {one_line(detail, 60)}"


def _read_torch(path: Path, where: str) -> tuple[dict[str, Any], list[str] | None]:
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and EOF errors of a corrupt or non-weights file
        raise KDError(
            f"{where}: neither a safetensors file nor a PyTorch state dict ({_torch_load_problem(error)})"
        ) from None
    if not isinstance(loaded, dict):
        raise KDError(f"{where}: holds a {type(loaded).__name__}, not a state dict")
    names = _names_from(loaded["class_names"], where) if "class_names" in loaded else None
    for key in STATE_DICT_KEYS:
        if isinstance(loaded.get(key), dict):
            return loaded[key], names
    return {key: value for key, value in loaded.items() if key != "class_names"}, names


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def read_weights_file(path: str | os.PathLike, flag: str) -> WeightsFile:
    """Read a weights file (see the module docstring); every problem is a one-line `KDError` naming `flag`."""
    from kd.cmatrix.artifact import file_sha256

    file = Path(path)
    where = f"{flag} {path}"
    if not file.exists():
        raise KDError(f"{where}: file not found")
    if file.is_dir():
        raise KDError(f"{where}: is a directory, not a weights file")
    try:
        reader = _read_safetensors if _is_safetensors(file) else _read_torch
    except OSError as error:
        raise KDError(f"{where}: cannot read the file ({error.strerror or error})") from None
    state, names = reader(file, where)
    if not isinstance(state, dict) or not state:
        raise KDError(f"{where}: holds no tensors")
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise KDError(f"{where}: entry {str(not_tensors[0])!r} is not a tensor; expected a state dict of tensors")
    return WeightsFile(file, _strip_wrapper_prefixes(state), names, file_sha256(file), str(path))


# ---------------------------------------------------------------------------------------------
# model names


def model_library(name: str) -> str:
    """"builtin", "timm" or "torchvision": who defines the network `--model NAME` builds."""
    library, _ = split_model_name(name)
    return library or ("builtin" if name in BUILTIN_MODELS else "timm")


# ---------------------------------------------------------------------------------------------
# published weights (--pretrained)


def published_weights(model: str) -> WeightsFile:
    """The model's published weights through timm's (Hugging Face hub) or torchvision's download and cache.

    Offline (or any failed download) is a one-line `KDError` that names `--pretrained-path`.
    """
    bare = split_model_name(model)[1]
    library = model_library(model)
    if library == "builtin":
        raise KDError(
            f"--pretrained: the built-in {model!r} has no published weights; pass --pretrained-path FILE "
            "(a toolkit run's model.safetensors, say)"
        )
    from huggingface_hub.utils import logging as hub_logging  # its import sets the hub's log level: import first

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity(hub_logging.CRITICAL)  # offline, the hub logs each failed request; the error below says it once
    try:
        if library == "timm":
            import timm

            net = timm.create_model(bare, pretrained=True)
            names = None
            tag = getattr(net, "pretrained_cfg", {}).get("tag")
            source = f"timm:{bare}" + (f".{tag}" if tag and "." not in bare else "")
            state = net.state_dict()
        else:
            import torchvision.models

            weights = torchvision.models.get_model_weights(bare).DEFAULT
            state = weights.get_state_dict(progress=True)
            names = list(weights.meta.get("categories") or []) or None
            source = f"tv:{bare} ({weights})"
    except KDError:
        raise
    except Exception as error:  # noqa: BLE001 - network, hub and cache errors of both libraries
        raise KDError(
            f"--pretrained: cannot get the published weights of {model} ({one_line(error, 120)}); offline, "
            "download them where there is a network and pass --pretrained-path FILE"
        ) from None
    finally:
        hub_logging.set_verbosity(level)
    return WeightsFile(None, _strip_wrapper_prefixes(dict(state)), names, None, f"{source} (published weights)")


# ---------------------------------------------------------------------------------------------
# adapting weights to a network


def first_conv_name(net: nn.Module) -> str | None:
    """The network's input convolution: timm's pretrained config says; else the first `nn.Conv2d`."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, str) and isinstance(_submodule(net, first), nn.Conv2d):
        return first
    return next((name for name, module in net.named_modules() if isinstance(module, nn.Conv2d)), None)


def classifier_names(net: nn.Module, num_classes: int) -> tuple[str, ...]:
    """The network's classifier layer(s): timm's pretrained config says; else the last linear (or 1x1
    convolution) layer with `num_classes` outputs."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    named = cfg.get("classifier")
    named = (named,) if isinstance(named, str) else tuple(named or ())
    if named and all(isinstance(_submodule(net, name), (nn.Linear, nn.Conv2d)) for name in named):
        return named
    last = None
    for name, module in net.named_modules():
        outputs = module.out_features if isinstance(module, nn.Linear) else module.out_channels if isinstance(module, nn.Conv2d) else None
        if outputs == num_classes:
            last = name
    if last is None:
        raise KDError(f"cannot find the classifier of {type(net).__name__}: no layer with {num_classes} outputs")
    return (last,)


def _submodule(net: nn.Module, name: str) -> nn.Module | None:
    try:
        return net.get_submodule(name)
    except AttributeError:
        return None


def _timm_filter(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter for the model's family (original-format keys, resampled position
    embeddings), as `timm.create_model(pretrained=True)` applies it."""
    import sys

    module = sys.modules.get(type(net).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None) if getattr(net, "pretrained_cfg", None) else None
    if filter_fn is None:
        return state
    try:
        return filter_fn(dict(state), net)
    except TypeError:
        return filter_fn(dict(state))
    except Exception:  # noqa: BLE001 - a filter that does not apply: compare the weights as they are
        return state


def _adapt_input_conv(channels: int, weight: torch.Tensor, base_channels: int) -> torch.Tensor:
    from timm.models import adapt_input_conv

    if "base_chans" in inspect.signature(adapt_input_conv).parameters:
        return adapt_input_conv(channels, weight, base_chans=base_channels)
    if base_channels == 1:  # timm before base_chans: its own rule (repeat, scaled by base / in)
        return weight.float().repeat(1, channels, 1, 1).to(weight.dtype) * (1.0 / channels)
    return adapt_input_conv(channels, weight)


def _head_rows(file_names: Sequence[str] | None, file_classes: int, data_names: Sequence[str]) -> list[int] | None:
    """The classifier rows that serve the data's classes, in its order; None: re-initialise the head."""
    if file_names is None:
        return list(range(file_classes)) if file_classes == len(data_names) else None
    if len(file_names) != file_classes or not set(data_names) <= set(file_names):
        return None
    index = {name: row for row, name in enumerate(file_names)}
    return [index[name] for name in data_names]


def load_initial_weights(
    net: nn.Module, model: str, weights: WeightsFile, class_names: Sequence[str], flag: str
) -> list[str]:
    """Load `weights` into `net` (built for the data's classes and channels), adapted as the module
    docstring says; returns one-line notes of what was adapted. Any other mismatch is a `KDError`."""
    from timm.models import load_pretrained

    state = _timm_filter(net, weights.state)
    expected = net.state_dict()
    num_classes = len(class_names)
    notes: list[str] = []
    conv = first_conv_name(net)
    conv_key = f"{conv}.weight" if conv else None
    heads = classifier_names(net, num_classes)
    head_keys = {f"{name}.{part}" for name in heads for part in ("weight", "bias")}

    # The classifier: its rows for the data's classes, or a fresh one.
    file_classes = {int(state[key].shape[0]) for key in head_keys if key in state}
    rows = _head_rows(weights.class_names, file_classes.pop(), class_names) if len(file_classes) == 1 else None
    if rows is not None:
        for key in head_keys & state.keys():
            state[key] = state[key][rows]
    if rows is None or any(state[key].shape != expected[key].shape for key in head_keys & state.keys()):
        state = {key: value for key, value in state.items() if key not in head_keys}
        why = "the weights name other classes" if weights.class_names is not None else "another class count"
        notes.append(f"classifier {', '.join(heads)} re-initialised ({why}: {len(class_names)} classes here)")
    elif list(rows) != list(range(len(rows))):
        notes.append(f"classifier rows picked by class name ({len(rows)} of {len(weights.class_names or [])})")

    # The input convolution, adapted to the data's channels.
    if conv_key in state and conv_key in expected and state[conv_key].shape != expected[conv_key].shape:
        got, want = state[conv_key], expected[conv_key]
        module = net.get_submodule(conv)
        base = got.shape[1] * module.groups  # the file's input channels
        if got.ndim == 4 and got.shape[0] == want.shape[0] and got.shape[2:] == want.shape[2:]:
            try:
                state[conv_key] = _adapt_input_conv(module.in_channels, got, base)
            except (NotImplementedError, AssertionError, ValueError):
                pass  # left as it is: the shape check below names it
            if state[conv_key].shape == want.shape:
                notes.append(f"input convolution {conv} adapted from {base} to {module.in_channels} channel(s)")

    missing = [key for key in expected if key not in state and key not in head_keys and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    mismatched = [(key, list(state[key].shape), list(expected[key].shape))
                  for key in state if key in expected and state[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        if mismatched:
            key, got, want = mismatched[0]
            first = f"{key!r}: {got} in the file, {want} in the model"
        else:
            first = f"{(missing or unexpected)[0]!r} {'missing from the file' if missing else 'not in the model'}"
        counts = ", ".join(f"{n} {what}" for n, what in ((len(missing), "missing"), (len(unexpected), "unexpected"),
                                                            (len(mismatched), "of another shape")) if n)
        raise KDError(f"{flag} {weights.source}: does not fit --model {model} ({counts}; first {first})")

    # timm's own loader (the state passed through, the classifier dropped when it was re-initialised).
    cfg = {"state_dict": state, "num_classes": num_classes if head_keys <= state.keys() else -1,
           "classifier": heads, "input_size": (expected[conv_key].shape[1] if conv_key in expected else 3, 1, 1),
           "first_conv": conv}
    load_pretrained(net, pretrained_cfg=cfg, num_classes=num_classes,
                    in_chans=cfg["input_size"][0], filter_fn=None, strict=head_keys <= state.keys())
    return notes
