"""A start is a transaction: every check that can refuse it, then the trainer ready at its first step.

The lock, the plan (:mod:`..resume.plan`: the checkpoint read once, drift), the config, the data,
the checks of the checkpoint against this process (:mod:`..resume.admit`) and the strict restore
all run before anything in the run directory changes; a refusal leaves it as it was (the lock
file aside). Once every rank has accepted: the log file opens, crash leftovers are removed, the
timeline is taken over (:mod:`..resume.timeline`), the best pointer is repaired, ``config.yaml``
and ``.hydra/`` are written, the data's probe cache is saved (``data_probes.json``, read by every rank
while building, see :mod:`..data.probes`), and ``train.start`` is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .. import startup
from ..checkpoint import CheckpointError
from ..config import flatten, to_plain, typed, validate_config
from ..data.loader import build_data
from ..data.probes import ProbeCache
from ..dist import Group
from ..fsio import atomic_write
from ..resume.admit import admit
from ..resume.lock import PendingLog, RunLock
from ..resume.plan import ResumePlan, check_added_keys, plan_chosen, plan_resume
from ..resume.target import StartupError
from ..resume.timeline import take_over_timeline
from ..train.compiled import check_compile
from ..train.device import device_name, indexed, resolve_device
from ..train.env import capture_env, configure_process
from ..train.precision import check_precision
from ..train.trainer import Trainer
from .argv import hydra_subdir

__all__ = ["start", "same_config_everywhere", "REFUSALS"]

log = logging.getLogger(__name__)

#: What refuses a start with exit 2 (``StartupError``, ``StateError``, ``VideoReadError``,
#: ``DeviceError`` and ``ConfigDriftError`` are ``ValueError``s); after ``train.start`` they exit 1.
REFUSALS = (ValueError, CheckpointError, FileNotFoundError)


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
    ``.hydra/`` are written, and rank 0 saves the probe cache the data index read and filled.

    With ranks: rank 0 takes the lock and chooses the checkpoint, and tells the others; every rank
    then builds its trainer and restores; if any rank refuses, all do.
    """
    # Long on purpose: the transaction's steps in their order (plan, build, vote, accept, take over).
    g = group or Group()
    check_added_keys(overrides)
    same_config_everywhere(cfg, g)
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
    probes = ProbeCache.in_run(run_dir)  # read by the data index on every rank; written below, once accepted
    try:
        if plan is None:
            plan = plan_chosen(cfg, overrides, choice["path"], g.rank)
        startup.mark("read_verify")
        trainer = _build(plan, run_dir, g, probes)
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
        probes.save()  # only when it changed; a cache that cannot be written is logged, never fatal
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


def same_config_everywhere(cfg: DictConfig, g: Group) -> None:
    """With ranks: every rank composed the same config, or every rank refuses, naming the keys and the ranks
    (a rank started with another override would train another model and corrupt the shared checkpoints)."""
    if not g.distributed:
        return
    mine = flatten(to_plain(cfg))
    differ = [
        f"rank {r}: {k}: {mine.get(k, '<absent>')!r} on rank {g.rank}, {other.get(k, '<absent>')!r} there"
        for r, other in enumerate(g.all_gather(mine))
        for k in sorted(set(mine) | set(other))
        if mine.get(k, "<absent>") != other.get(k, "<absent>")
    ]
    if differ:
        raise StartupError(
            "the ranks were started with different configs: "
            + "; ".join(differ[:5])
            + ("; ..." if len(differ) > 5 else "")
            + ". Start every rank with the same command line and overrides"
        )


def _take_over(run_dir: Path, plan: ResumePlan, trainer: Trainer, cfg: DictConfig, overrides: list[str]) -> None:
    """Rank 0, once the start is accepted: make the run directory this run's."""
    trainer.ckpt.cleanup_temporaries()
    take_over_timeline(run_dir, plan.loaded, plan.set_aside)
    trainer.ckpt.start_uploads()  # what an earlier process committed but did not upload
    trainer.ckpt.repair_best(trainer.counters.best_step if plan.loaded else None, trainer.counters.best_val_loss)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(plan.cfg))
    subdir = hydra_subdir()
    if subdir is not None and HydraConfig.initialized():
        hydra_dir = run_dir / subdir
        hydra_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_write(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
        atomic_write(hydra_dir / "hydra.yaml", OmegaConf.to_yaml({"hydra": HydraConfig.get()}))


def _build(plan: ResumePlan, run_dir: Path, g: Group, probes: ProbeCache | None = None) -> Trainer:
    """This rank's trainer, restored from the plan's checkpoint (if any); every refusal is raised here."""
    validate_config(plan.cfg)
    cfg = typed(plan.cfg)
    if cfg.logger == "tensorboard":
        from ..train.tblog import require_tensorboard

        require_tensorboard()
    configure_process(cfg.trainer)  # the thread count and kernels the environment check compares
    device = indexed(resolve_device(cfg.trainer.device))
    check_precision(cfg.trainer.precision, device)  # before the data and the model
    if cfg.trainer.compile:
        check_compile(device)
    data = build_data(cfg.data, cfg.seed, probes)  # a folder that cannot be used is refused before the model is built
    startup.mark("data")
    changes = list(plan.changes)
    if plan.loaded is not None:
        changes += admit(plan.loaded, cfg, env=capture_env(device), device=device, group=g, fingerprint=data[2])
        startup.mark("checks")
    chaos = None
    if cfg.chaos.enabled:
        from ..chaos.agent import Chaos  # only imported when chaos is on

        chaos = Chaos(cfg.chaos, run_dir, g, remote=bool(cfg.checkpoint.remote))
    trainer = Trainer(
        cfg,
        run_dir,
        config_changes=changes,
        observers=[chaos] if chaos else [],
        save_hooks=[chaos.save_hook] if chaos else [],
        group=g,
        device=device,
        data=data,
    )
    startup.mark("build")
    if plan.loaded is not None:
        if chaos is not None:
            chaos.on_resume(trainer, plan.loaded.state)
        trainer.restore(plan.loaded)
        startup.mark("restore")
        startup.resumed_from(plan.loaded.path)
    return trainer
