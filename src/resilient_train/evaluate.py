"""``python -m resilient_train.evaluate``: the command keeps this name; the code is
:mod:`resilient_train.tokenizer.evaluate`. Importing other names from here works until 0.2, with a warning."""

import sys

from ._imports import forward
from .tokenizer import evaluate as _impl

__getattr__ = forward(__name__, _impl)

if __name__ == "__main__":
    sys.exit(_impl.main())
