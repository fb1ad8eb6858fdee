"""``python -m resilient_train.orchestrator``: the chaos proof under its old command name; the code is
:mod:`resilient_train.chaos` (``python -m resilient_train.chaos``). Other names imported from here work
until 0.2, with a warning."""

import sys

from . import chaos as _impl
from ._imports import forward

__getattr__ = forward(__name__, _impl)

if __name__ == "__main__":
    sys.exit(_impl.main())
