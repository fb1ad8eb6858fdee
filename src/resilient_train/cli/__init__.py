"""The command line: ``python train.py [overrides]`` (also ``python -m resilient_train.cli``, ``resilient-train``).

Owns: the command line before Hydra (:mod:`.argv`), the start transaction that composes resume
and the loop (:mod:`.start`), and the Hydra entry point with the one exit-code boundary
(:mod:`.main`). May import every other part of the package; nothing imports it.

Exit status:

* 0 finished;
* 2 refused before training started, for a reason the user can fix: an unknown key (also one
  added with ``+``), a bad value, a device the machine lacks, a bad ``resume_from``, a refused
  config drift, a checkpoint that is invalid or incomplete, an environment that cannot reproduce
  the bits, a run directory in use;
* 1 a failure after ``train.start`` (logged with its traceback in ``train.log``);
* 75 stopped by SIGTERM/SIGINT after committing a checkpoint (run the same command with
  ``resume_from=auto`` to continue); 130 a second SIGINT (immediate exit).

The path of a resume, from the command line to the first batch, is in :mod:`resilient_train.resume`.

Under ``torchrun`` every rank runs this entry point. All ranks share one run directory (by
default ``outputs/<experiment>/torchrun_<TORCHELASTIC_RUN_ID>``, stable across torchrun's restarts;
it must be on a filesystem every node sees); rank 0 holds the run lock, writes Hydra's
``.hydra`` and ``train.log``, and chooses the checkpoint; rank ``r`` logs to ``train_rank<r>.log``.
A start is refused on every rank when any rank refuses it (exit 2 on all).
"""

from __future__ import annotations

from ..resume.lock import PendingLog, RunLock
from .argv import EXIT_CONFIG_ERROR, prepare_argv
from .main import EXIT_FAILED, main, run
from .start import REFUSALS, start

__all__ = [
    "main",
    "run",
    "start",
    "prepare_argv",
    "RunLock",
    "PendingLog",
    "REFUSALS",
    "EXIT_CONFIG_ERROR",
    "EXIT_FAILED",
]
