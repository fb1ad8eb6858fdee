"""resilient-train: a MAGVIT-v2 tokenizer trainer whose checkpoints are verified to work."""

import os as _os

# Bits must not depend on the machine's load or on where the allocator put a tensor. Intel MKL
# may pick fewer threads than asked under load (MKL_DYNAMIC) and may take alignment-dependent
# code paths (fixed by Conditional Numerical Reproducibility, MKL_CBWR=...,STRICT). These are read
# when torch loads MKL, so they are set here, before any module of this package imports torch.
# A user's own setting wins; whatever is in force is recorded in every checkpoint.
DETERMINISM_ENV = {"MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE", "MKL_CBWR": "AUTO,STRICT"}
for _k, _v in DETERMINISM_ENV.items():
    _os.environ.setdefault(_k, _v)

__version__ = "0.1.0"

from . import _imports  # noqa: E402
from . import startup as _startup  # noqa: E402,F401  (the start's clock: the first phase ends at this import)

_imports.install()  # the old module paths (resilient_train.trainer, ...) for one more release


def load_tokenizer(path, device="cpu"):
    """An exported tokenizer (``python -m resilient_train.export``), in eval mode; see :mod:`.export`."""
    from .tokenizer.export import load_tokenizer as _load

    return _load(path, device)
