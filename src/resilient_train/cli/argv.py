"""The command line before Hydra sees it: what may be refused or settled before anything is written.

``resume_from=PATH`` is checked and made to write into PATH's run directory; ``trainer.device``
is checked against the machine; under torchrun every rank gets the same run directory and only
rank 0 writes Hydra's files.
"""

from __future__ import annotations

import os
import sys

from ..checkpoint.store import is_remote_url
from ..dist import rank_from_env, world_size_from_env
from ..resume.target import StartupError, resume_target
from ..train.device import DeviceError, resolve_device

__all__ = ["prepare_argv", "hydra_subdir", "argv_value", "EXIT_CONFIG_ERROR"]

EXIT_CONFIG_ERROR = 2


def argv_value(argv: list[str], key: str) -> str | None:
    for a in argv:
        k, sep, v = a.lstrip("+").partition("=")
        if sep and k == key:
            return v
    return None


#: Where ``.hydra/`` goes once the start is accepted (``None``: not written); set by :func:`prepare_argv`.
_hydra_subdir: str | None = ".hydra"


def hydra_subdir() -> str | None:
    """Where ``.hydra/`` goes once the start is accepted (``None``: not written)."""
    return _hydra_subdir


def prepare_argv(argv: list[str]) -> list[str]:
    """Before Hydra runs: check ``resume_from=PATH`` and make it write into PATH's run directory.

    Unless the user chose ``hydra.run.dir``, the resumed run continues in the original run
    directory; Hydra's ``.hydra`` snapshot is not rewritten there (the config that applies is the
    checkpoint's, recorded in every manifest). ``hydra.output_subdir`` is taken off the command
    line: Hydra would write it before the run lock is held, so :func:`start` writes it instead.
    """
    global _hydra_subdir
    subdir = argv_value(argv, "hydra.output_subdir")
    argv = [a for a in argv if a.lstrip("+").partition("=")[0] != "hydra.output_subdir"]
    _hydra_subdir = ".hydra" if subdir is None else (None if subdir in ("null", "None", "") else subdir)
    dev = argv_value(argv, "trainer.device")
    if dev is not None:  # before Hydra creates the run directory (a device in a config file: checked in run)
        try:
            resolve_device(dev)
        except DeviceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR) from None
    rf = argv_value(argv, "resume_from")
    if rf is not None and rf not in ("auto", "null", "None", "") and not is_remote_url(rf):
        try:
            run, _ = resume_target(rf)
        except StartupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR) from None
        if argv_value(argv, "hydra.run.dir") is None:
            if run is None:
                print(
                    f"error: resume_from={rf} is a checkpoint outside a run directory (its folder is not "
                    "RUN/checkpoints); pass hydra.run.dir=NEW_RUN to say where the resumed run goes",
                    file=sys.stderr,
                )
                raise SystemExit(EXIT_CONFIG_ERROR)
            argv = [*argv, f"hydra.run.dir={run}"]
            _hydra_subdir = None
    if world_size_from_env() > 1:
        argv = _rank_argv(argv)
    return argv


def _rank_argv(argv: list[str]) -> list[str]:
    """Under torchrun: one run directory for every rank and every restart; rank 0 alone writes Hydra's files."""
    if argv_value(argv, "hydra.run.dir") is None:
        run_id = "".join(c for c in os.environ.get("TORCHELASTIC_RUN_ID", "none") if c.isalnum() or c in "-_")
        argv = [*argv, f"hydra.run.dir=outputs/${{experiment}}/torchrun_{run_id}"]
    global _hydra_subdir
    rank = rank_from_env()
    if rank > 0:
        _hydra_subdir = None
        argv = [*argv, f"hydra.job.name=train_rank{rank}"]
    return argv
