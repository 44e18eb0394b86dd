"""Label Smoothing++ knowledge-distillation toolkit: the library layer.

`kd` knows nothing of the stages (`teachers`, `students`) or the command line (`cli`).

The public API, for use in your own training loop:

    from kd import LSPPLoss, ProxyTeacherLoss, CMatrix, load_cmatrix, save_cmatrix

* `LSPPLoss(num_classes, alpha=0.1)`: LS++ as a loss, `loss(logits, targets)`; it owns the
  learnable C logits and `export(path)`s the learned C-matrix (cmatrix.safetensors).
* `ProxyTeacherLoss(cmatrix_or_path)`: trains a student from a C-matrix alone.
* `CMatrix`, `load_cmatrix`, `save_cmatrix`, `CMatrixError`: the shareable C-matrix artifact.
* `REGISTRY`, `get_method`, `build_method`: every training method of the toolkit by name.
* `KDError`: the one error type for input a user can fix (one-line messages).

`import kd` is cheap (it imports neither torch nor numpy): the names above are imported on
first use (PEP 562 module `__getattr__`).
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY_EXPORTS: dict[str, str] = {
    "LSPPLoss": "kd.losses.modules",
    "ProxyTeacherLoss": "kd.losses.modules",
    "CMatrix": "kd.cmatrix.artifact",
    "CMatrixError": "kd.cmatrix.artifact",
    "load_cmatrix": "kd.cmatrix.artifact",
    "save_cmatrix": "kd.cmatrix.artifact",
    "REGISTRY": "kd.methods",
    "get_method": "kd.methods",
    "build_method": "kd.methods",
    "KDError": "kd.errors",
}

__all__ = [
    "REGISTRY",
    "CMatrix",
    "CMatrixError",
    "KDError",
    "LSPPLoss",
    "ProxyTeacherLoss",
    "__version__",
    "build_method",
    "get_method",
    "load_cmatrix",
    "save_cmatrix",
]

if _TYPE_CHECKING:
    from kd.losses.modules import LSPPLoss, ProxyTeacherLoss
    from kd.cmatrix.artifact import CMatrix, CMatrixError, load_cmatrix, save_cmatrix
    from kd.errors import KDError
    from kd.methods import REGISTRY, build_method, get_method


def __getattr__(name: str) -> _Any:
    """Import a public name on first access, then keep it in the module's namespace."""
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kd' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
