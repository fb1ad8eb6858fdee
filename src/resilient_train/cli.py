"""``python train.py [overrides]``: the Hydra entry point, the run lock and the one exit-code boundary.

Exit status:

* 0 finished;
* 2 refused before training started, for a reason the user can fix: an unknown key (also one
  added with ``+``), a bad value, a bad ``resume_from``, a refused config drift, a checkpoint that
  is invalid or incomplete, an environment that cannot reproduce the bits, a run directory in use;
* 1 a failure after ``train.start`` (logged with its traceback in ``train.log``);
* 75 stopped by SIGTERM/SIGINT after committing a checkpoint (run the same command with
  ``resume_from=auto`` to continue); 130 a second SIGINT (immediate exit).

The path of a resume, from the command line to the first batch, is in :mod:`resilient_train.resume`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError, CheckpointManager
from .checkpoint.layout import CHECKPOINTS_DIR, run_dir_of
from .config import CONFIG_DIR, register_configs, validate_config
from .fsio import atomic_write
from .resume import StartupError, check_added_keys, plan_resume, take_over_timeline

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["main", "run", "start", "RunLock", "EXIT_CONFIG_ERROR", "EXIT_FAILED"]

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2
#: What refuses a start with exit 2 (``StartupError``, ``StateError``, ``VideoReadError`` and
#: ``ConfigDriftError`` are ``ValueError``s); raised after ``train.start``, the same classes exit 1.
REFUSALS = (ValueError, CheckpointError, FileNotFoundError)

_task_started = False


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``.

    The kernel drops the lock when its holder dies, so a lock left by a dead (even SIGKILLed)
    process is simply taken over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"run directory {self.path.parent} is in use by another training process (pid {holder}); "
                "wait for it to exit or choose another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _argv_value(argv: list[str], key: str) -> str | None:
    for a in argv:
        k, sep, v = a.lstrip("+").partition("=")
        if sep and k == key:
            return v
    return None


def prepare_argv(argv: list[str]) -> list[str]:
    """Before Hydra runs: make ``resume_from=PATH`` write into PATH's run directory.

    Unless the user chose ``hydra.run.dir``, the resumed run continues in the original run
    directory; Hydra's ``.hydra`` snapshot is not rewritten there (the config that applies is the
    checkpoint's, recorded in every manifest).
    """
    rf = _argv_value(argv, "resume_from")
    if rf is None or rf in ("auto", "null", "None", ""):
        return argv
    path = Path(rf).expanduser()
    if not path.exists():
        print(f"error: resume_from={rf}: no such checkpoint or run directory: {path.resolve()}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR)
    if _argv_value(argv, "hydra.run.dir") is None:
        argv = [*argv, f"hydra.run.dir={run_dir_of(path)}", "hydra.output_subdir=null"]
    return argv


def start(cfg: DictConfig, run_dir: Path, overrides: list[str], lock: RunLock) -> Trainer:
    """Everything that can refuse a start, then the trainer ready at its first step (see :mod:`.resume`)."""
    from .trainer import Trainer

    check_added_keys(overrides)
    lock.acquire()
    CheckpointManager(run_dir / CHECKPOINTS_DIR).cleanup_temporaries()
    plan = plan_resume(cfg, overrides, run_dir)
    validate_config(plan.cfg)
    chaos = None
    if plan.cfg.chaos.enabled:
        from .chaos import Chaos  # only imported when chaos is on

        chaos = Chaos(plan.cfg.chaos, run_dir)
    trainer = Trainer(
        plan.cfg,
        run_dir,
        config_changes=plan.changes,
        observers=[chaos] if chaos else [],
        save_hooks=[chaos.save_hook] if chaos else [],
    )
    if plan.loaded is not None:
        if chaos is not None:
            chaos.on_resume(trainer, plan.loaded.state)
        trainer.restore(plan.loaded)
    take_over_timeline(run_dir, plan.loaded)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(plan.cfg))
    t = trainer.cfg.trainer
    resumed = plan.loaded.path if plan.loaded else None
    log.info(
        "train.start run_dir=%s experiment=%s max_steps=%d resume=%s threads=%d",
        run_dir,
        trainer.cfg.experiment,
        t.max_steps,
        resumed,
        t.num_threads,
    )
    return trainer


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> int:
    """Start (refusals exit 2), then train (failures exit 1); the run lock is held throughout."""
    lock = RunLock(run_dir)
    try:
        try:
            trainer = start(cfg, run_dir, overrides, lock)
        except REFUSALS as exc:
            log.error("train.refused %s: %s", type(exc).__name__, exc)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        try:
            return trainer.fit()
        except Exception as exc:
            log.error("train.failed %s: %s", type(exc).__name__, exc, exc_info=True)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    finally:
        lock.release()


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    hc = HydraConfig.get()
    raise SystemExit(run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task)))


def main() -> None:
    # magvit2-pytorch and its dependencies emit deprecation warnings from torch on import; they are
    # not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|magvit2_pytorch|vector_quantize)")
    sys.argv = [sys.argv[0], *prepare_argv(sys.argv[1:])]
    try:
        _hydra_main()
    except SystemExit as exc:
        # Hydra exits 1 for an unknown key, a value of the wrong type or a bad override, all found
        # while composing the config, before our task runs: that is a refused start.
        if exc.code == 1 and not _task_started:
            raise SystemExit(EXIT_CONFIG_ERROR) from None
        raise
    except Exception as exc:  # the same, raised as such under HYDRA_FULL_ERROR=1
        if _task_started:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


if __name__ == "__main__":
    main()
