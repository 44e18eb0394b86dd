"""Label Smoothing++ knowledge-distillation toolkit: the library layer.

`kd` knows nothing of the stages (`teachers`, `students`) or the command line (`cli`).
"""

__version__ = "0.1.0"
