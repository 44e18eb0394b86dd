"""Integrations of the toolkit's losses with other training libraries, each an optional extra.

* `kd.integrations.transformers` (the `text` extra): LS++, the proxy teacher and Hinton KD for
  any sequence classifier under an unmodified Hugging Face `Trainer`, and a callback that
  exports the learned C-matrix.

Nothing here is imported by `kd` itself: a module is loaded, with its library, only when used.
"""
