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

Under ``torchrun`` every rank runs this entry point. All ranks share one run directory (by
default ``outputs/<experiment>/torchrun_<TORCHELASTIC_RUN_ID>``, stable across torchrun's restarts;
it must be on a filesystem every node sees); rank 0 holds the run lock, writes Hydra's
``.hydra`` and ``train.log``, and chooses the checkpoint; rank ``r`` logs to ``train_rank<r>.log``.
A start is refused on every rank when any rank refuses it (exit 2 on all).
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
from .dist import Group, from_env, rank_from_env, world_size_from_env
from .fsio import atomic_write
from .resume import ResumePlan, StartupError, check_added_keys, plan_chosen, plan_resume, take_over_timeline

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
    if rf is not None and rf not in ("auto", "null", "None", ""):
        path = Path(rf).expanduser()
        if not path.exists():
            print(f"error: resume_from={rf}: no such checkpoint or run directory: {path.resolve()}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR)
        if _argv_value(argv, "hydra.run.dir") is None:
            argv = [*argv, f"hydra.run.dir={run_dir_of(path)}", "hydra.output_subdir=null"]
    if world_size_from_env() > 1:
        argv = _rank_argv(argv)
    return argv


def _rank_argv(argv: list[str]) -> list[str]:
    """Under torchrun: one run directory for every rank and every restart; rank 0 alone writes Hydra's files."""
    if _argv_value(argv, "hydra.run.dir") is None:
        run_id = "".join(c for c in os.environ.get("TORCHELASTIC_RUN_ID", "none") if c.isalnum() or c in "-_")
        argv = [*argv, f"hydra.run.dir=outputs/${{experiment}}/torchrun_{run_id}"]
    rank = rank_from_env()
    if rank > 0:
        if _argv_value(argv, "hydra.output_subdir") is None:
            argv = [*argv, "hydra.output_subdir=null"]
        argv = [*argv, f"hydra.job.name=train_rank{rank}"]
    return argv


def start(cfg: DictConfig, run_dir: Path, overrides: list[str], lock: RunLock, group: Group | None = None) -> Trainer:
    """Everything that can refuse a start, then the trainer ready at its first step (see :mod:`.resume`).

    With ranks: rank 0 takes the lock, removes leftovers and chooses the checkpoint, and tells the
    others; every rank then builds its trainer and restores; if any rank refuses, all do.
    """
    from .trainer import Trainer

    g = group or Group()
    check_added_keys(overrides)
    plan, refused = None, None
    if g.is_main:
        try:
            lock.acquire()
            CheckpointManager(run_dir / CHECKPOINTS_DIR).cleanup_temporaries()
            plan = plan_resume(cfg, overrides, run_dir)
        except REFUSALS as exc:
            refused = exc
    choice = g.broadcast(
        {"refused": f"{refused}" if refused else None, "path": str(plan.loaded.path) if plan and plan.loaded else None}
    )
    if refused is not None:
        raise refused
    if choice["refused"]:
        raise StartupError(f"rank 0 refused the start: {choice['refused']}")
    trainer, refused = None, None
    try:
        if plan is None:
            plan = plan_chosen(cfg, overrides, choice["path"], g.rank)
        trainer = _build(plan, run_dir, g, Trainer)
    except REFUSALS as exc:
        refused = exc
    others = [r for r in g.all_gather(f"rank {g.rank}: {refused}" if refused else None) if r]
    if refused is not None:
        raise refused
    if others:
        raise StartupError("another rank refused the start: " + "; ".join(others))
    if g.is_main:
        take_over_timeline(run_dir, plan.loaded)
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(plan.cfg))
    g.barrier()  # the timeline is taken over before any rank writes its history
    t = trainer.cfg.trainer
    resumed = plan.loaded.path if plan.loaded else None
    log.info(
        "train.start run_dir=%s experiment=%s max_steps=%d resume=%s threads=%d rank=%d world_size=%d "
        "batch_per_rank=%d grad_accum=%d global_batch=%d",
        run_dir,
        trainer.cfg.experiment,
        t.max_steps,
        resumed,
        t.num_threads,
        g.rank,
        g.world_size,
        trainer.cfg.data.batch_size,
        t.grad_accum_steps,
        trainer.cfg.data.batch_size * g.world_size * t.grad_accum_steps,
    )
    return trainer


def _build(plan: ResumePlan, run_dir: Path, g: Group, trainer_cls: type[Trainer]) -> Trainer:
    """This rank's trainer, restored from the plan's checkpoint (if any); every refusal is raised here."""
    validate_config(plan.cfg)
    if plan.cfg.logger == "tensorboard":
        from .tblog import require_tensorboard

        require_tensorboard()
    chaos = None
    if plan.cfg.chaos.enabled:
        from .chaos import Chaos  # only imported when chaos is on

        chaos = Chaos(plan.cfg.chaos, run_dir, g)
    trainer = trainer_cls(
        plan.cfg,
        run_dir,
        config_changes=plan.changes,
        observers=[chaos] if chaos else [],
        save_hooks=[chaos.save_hook] if chaos else [],
        group=g,
    )
    if plan.loaded is not None:
        if chaos is not None:
            chaos.on_resume(trainer, plan.loaded.state)
        trainer.restore(plan.loaded)
    return trainer


def _check_threads(cfg: DictConfig) -> None:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = os.cpu_count() or 1
    if local * cfg.trainer.num_threads > cores:
        log.warning(
            "threads.oversubscribed ranks_here=%d x trainer.num_threads=%d > %d cores: every rank will run several "
            "times slower; pass trainer.num_threads=%d",
            local,
            cfg.trainer.num_threads,
            cores,
            max(1, cores // local),
        )


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> int:
    """Start (refusals exit 2), then train (failures exit 1); the run lock is held throughout."""
    lock = RunLock(run_dir)
    try:
        group = from_env(cfg.trainer.device, cfg.trainer.dist_timeout_secs)
    except (ValueError, RuntimeError) as exc:
        log.error("train.refused %s: %s", type(exc).__name__, exc)
        print(f"error: cannot join the process group: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    _check_threads(cfg)
    try:
        try:
            trainer = start(cfg, run_dir, overrides, lock, group)
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
        group.close()


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
