"""``python -m resilient_train.cli [overrides]``: the same as ``python train.py``."""

from .main import main

main()
