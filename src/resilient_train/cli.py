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

from .checkpoint import CheckpointError
from .checkpoint.manager import SaveError
from .config import CONFIG_DIR, register_configs, validate_config
from .device import DeviceError, device_name, resolve_device, shares_gpu
from .dist import Group, from_env, rank_from_env, world_size_from_env
from .fsio import atomic_write
from .resume import (
    ResumePlan,
    StartupError,
    check_added_keys,
    plan_chosen,
    plan_resume,
    resume_target,
    take_over_timeline,
)

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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StartupError(
                f"cannot create the run lock {self.path}: {exc}; choose a writable hydra.run.dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()[:20] or "unknown"
            os.close(fd)
            raise StartupError(
                f"run directory {self.path.parent} is in use by another training process (pid {holder}); "
                "wait for it to exit or choose another hydra.run.dir"
            ) from None
        except OSError as exc:  # a filesystem without locks (some NFS mounts): one writer cannot be ensured
            os.close(fd)
            raise StartupError(
                f"cannot lock {self.path}: {exc}. This filesystem does not support flock, so two trainers could "
                "write the same run; put hydra.run.dir on a filesystem with locking (local disk, or NFS with "
                "lock support)"
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


#: Where ``.hydra/`` goes once the start is accepted (``None``: not written); set by :func:`prepare_argv`.
_hydra_subdir: str | None = ".hydra"


def prepare_argv(argv: list[str]) -> list[str]:
    """Before Hydra runs: check ``resume_from=PATH`` and make it write into PATH's run directory.

    Unless the user chose ``hydra.run.dir``, the resumed run continues in the original run
    directory; Hydra's ``.hydra`` snapshot is not rewritten there (the config that applies is the
    checkpoint's, recorded in every manifest). ``hydra.output_subdir`` is taken off the command
    line: Hydra would write it before the run lock is held, so :func:`start` writes it instead.
    """
    global _hydra_subdir
    subdir = _argv_value(argv, "hydra.output_subdir")
    argv = [a for a in argv if a.lstrip("+").partition("=")[0] != "hydra.output_subdir"]
    _hydra_subdir = ".hydra" if subdir is None else (None if subdir in ("null", "None", "") else subdir)
    dev = _argv_value(argv, "trainer.device")
    if dev is not None:  # before Hydra creates the run directory (a device in a config file: checked in run)
        try:
            resolve_device(dev)
        except DeviceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR) from None
    rf = _argv_value(argv, "resume_from")
    if rf is not None and rf not in ("auto", "null", "None", ""):
        try:
            run, _ = resume_target(rf)
        except StartupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR) from None
        if _argv_value(argv, "hydra.run.dir") is None:
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
    if _argv_value(argv, "hydra.run.dir") is None:
        run_id = "".join(c for c in os.environ.get("TORCHELASTIC_RUN_ID", "none") if c.isalnum() or c in "-_")
        argv = [*argv, f"hydra.run.dir=outputs/${{experiment}}/torchrun_{run_id}"]
    global _hydra_subdir
    rank = rank_from_env()
    if rank > 0:
        _hydra_subdir = None
        argv = [*argv, f"hydra.job.name=train_rank{rank}"]
    return argv


def start(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    lock: RunLock,
    group: Group | None = None,
    log_file: PendingLog | None = None,
) -> Trainer:
    """Everything that can refuse a start, then the trainer ready at its first step (see :mod:`.resume`).

    A transaction: the run lock, the resume target, config drift, the environment and the strict
    restore of the chosen checkpoint all run before anything in the run directory changes; a
    refusal leaves it as it was (the lock file aside). Once accepted: the log file opens, crash
    leftovers are removed, checkpoints that failed validation and later ones of a forked timeline
    are set aside, history is cut back, the best pointer is repaired, ``config.yaml`` and
    ``.hydra/`` are written.

    With ranks: rank 0 takes the lock and chooses the checkpoint, and tells the others; every rank
    then builds its trainer and restores; if any rank refuses, all do.
    """
    from .trainer import Trainer

    g = group or Group()
    check_added_keys(overrides)
    plan, refused = None, None
    if g.is_main:
        try:
            lock.acquire()
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
    # Accepted on every rank: only now does anything in the run directory change.
    if log_file is not None:
        log_file.open(run_dir / log_file.filename)
    if g.is_main:
        _take_over(run_dir, plan, trainer, cfg, overrides)
    g.barrier()  # the timeline is taken over before any rank writes its history
    t = trainer.cfg.trainer
    resumed = plan.loaded.path if plan.loaded else None
    log.info(
        "train.start run_dir=%s experiment=%s max_steps=%d resume=%s threads=%d rank=%d world_size=%d "
        "batch_per_rank=%d grad_accum=%d global_batch=%d device=%s name=%s",
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
        trainer.device,
        device_name(trainer.device),
    )
    return trainer


def _take_over(run_dir: Path, plan: ResumePlan, trainer: Trainer, cfg: DictConfig, overrides: list[str]) -> None:
    """Rank 0, once the start is accepted: make the run directory this run's."""
    trainer.ckpt.cleanup_temporaries()
    take_over_timeline(run_dir, plan.loaded, plan.set_aside)
    trainer.ckpt.repair_best(trainer.counters.best_step if plan.loaded else None, trainer.counters.best_val_loss)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(plan.cfg))
    if _hydra_subdir is not None and HydraConfig.initialized():
        hydra_dir = run_dir / _hydra_subdir
        hydra_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_write(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
        atomic_write(hydra_dir / "hydra.yaml", OmegaConf.to_yaml({"hydra": HydraConfig.get()}))


class PendingLog(logging.Handler):
    """The log file of a start (``train.log``): records are held in memory until the start is
    accepted, then written to the file, which stays open; a refused start writes no file."""

    def __init__(self, filename: str) -> None:
        super().__init__()
        self.filename = filename
        self.held: list[logging.LogRecord] | None = []
        self.file: logging.FileHandler | None = None
        self.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))

    def open(self, path: Path) -> None:
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(self.formatter)
        for record in self.held or []:
            self.file.handle(record)
        self.held = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.handle(record)
        elif self.held is not None and len(self.held) < 10000:
            self.held.append(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


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


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], log_name: str = "train") -> int:
    """Start (refusals exit 2), then train (failures exit 1); the run lock is held throughout.

    ``log_name``: the log file, ``RUN/<log_name>.log``, opened once the start is accepted.
    """
    try:  # a device the machine lacks is refused before the data, the run lock and the model
        device = resolve_device(cfg.trainer.device)
    except DeviceError as exc:
        log.error("train.refused %s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    lock = RunLock(run_dir)
    log_file = PendingLog(f"{log_name}.log")
    logging.getLogger().addHandler(log_file)
    try:
        group = from_env(device, cfg.trainer.dist_timeout_secs, shared_gpu=shares_gpu(device, cfg.trainer.device))
    except (ValueError, RuntimeError) as exc:
        log.error("train.refused %s: %s", type(exc).__name__, exc)
        print(f"error: cannot join the process group: {exc}", file=sys.stderr)
        logging.getLogger().removeHandler(log_file)
        return EXIT_CONFIG_ERROR
    _check_threads(cfg)
    try:
        try:
            trainer = start(cfg, run_dir, overrides, lock, group, log_file)
        except REFUSALS as exc:
            log.error("train.refused %s: %s", type(exc).__name__, exc)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        try:
            return trainer.fit()
        except Exception as exc:  # a failed save says all there is to say; anything else gets its traceback
            log.error("train.failed %s: %s", type(exc).__name__, exc, exc_info=not isinstance(exc, SaveError))
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    finally:
        lock.release()
        group.close()
        logging.getLogger().removeHandler(log_file)
        log_file.close()


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    hc = HydraConfig.get()
    raise SystemExit(run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), hc.job.name))


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
