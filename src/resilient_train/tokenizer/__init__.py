"""The tokenizer: building it, and using what training made of it.

Owns: building magvit2-pytorch's ``VideoTokenizer`` from the config (:mod:`.model`, the only
module that imports ``magvit2_pytorch``), the reconstruction and codebook metrics
(:mod:`.metrics`), and the tools on a trained tokenizer: :mod:`.export` (a folder magvit2-pytorch
loads alone, ``load_tokenizer``), :mod:`.tokenize` (videos in, codes out) and :mod:`.evaluate`.
``python -m resilient_train.export|tokenize|evaluate`` run the last three.

May import: the base, ``checkpoint``, ``config`` and ``data``. Never the loop (``train``) or above.
"""

from .._imports import lazy

_LAZY = {
    "build_model": "model",
    "eval_copy": "model",
    "model_kwargs": "model",
    "Reconstruction": "metrics",
    "export_tokenizer": "export",
    "load_tokenizer": "export",
}
__all__ = list(_LAZY)
__getattr__ = lazy(__name__, _LAZY)
