"""The training loop over a mapping of named ``Stateful`` parts.

``Trainer.states`` names every part of the resumable state (model, EMA, both optimizers, both LR
schedules, counters, this rank's RNG and data position); saving, loading and the required-key
check all iterate it. Policy lives elsewhere: the checkpoint manager answers "save now?", step
observers (:mod:`.observers`: history, heartbeat, progress bar, chaos) watch the loop, and the
CLI (:mod:`.cli`) decides what to resume from (:mod:`.resume`).

With ranks (:mod:`.dist`, under torchrun) the same loop runs on every rank, as in nanoGPT: the
model is wrapped in DDP (gradients averaged; ``no_sync`` on all but the last micro-batch), each
rank reads its own slice of every global batch and draws from its own random streams, rank 0
alone evaluates (and tells the others the result) and writes the run's files, and the decision
to stop is collective, so every rank saves at the same step or none does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from ..checkpoint import CheckpointError, CheckpointManager, Loaded
from ..checkpoint.layout import SAVE_PHASES
from ..checkpoint.manager import SaveHook
from ..checkpoint.store import Store
from ..config import TrainConfig, config_hash, to_plain, typed
from ..data.loader import batches_per_epoch, build_data, build_loader
from ..dist import Group
from ..monitor import plot_loss
from ..tokenizer.model import build_model
from .compiled import compile_generator
from .device import indexed, resolve_device
from .env import capture_env, configure_process, package_versions
from .evaluation import Evaluator
from .faults import Fault, check_replicas
from .observers import HeartbeatObserver, HistoryObserver, Observer, ProgressObserver, RankHeartbeatObserver
from .parts import (
    EMA,
    DataPosition,
    RankState,
    StateError,
    TrainCounters,
    apply_hyperparameters,
    optimizer_and_schedule,
)
from .precision import Precision, fresh_parts
from .ranks import wrap_ddp
from .recovery import Recovery
from .rng import rank_seed, seed_everything
from .signals import EXIT_ABORTED, EXIT_PREEMPTED, StopSignals
from .step import gan_step
from .watchdog import Watchdog

__all__ = [
    "Trainer",
    "EXIT_FINISHED",
    "EXIT_PREEMPTED",
    "EXIT_ABORTED",
    "TENSOR_GROUPS",
    "REQUIRED_PARTS",
]

log = logging.getLogger(__name__)

EXIT_FINISHED = 0

#: Parts saved as a flat safetensors file of their own (the rest goes to state.json/state.safetensors).
TENSOR_GROUPS = ("model", "ema")
#: The ``Stateful`` parts every checkpoint holds (plus ``ema`` when enabled), in ``Trainer.states`` order.
REQUIRED_PARTS = ("model", "optim_gen", "optim_discr", "sched_gen", "sched_discr", "trainer", "ranks")


class Trainer:
    """Trains the tokenizer in ``run_dir``; itself ``Stateful`` through :meth:`state_dict`."""

    def __init__(
        self,
        cfg: TrainConfig | DictConfig,
        run_dir: str | os.PathLike,
        *,
        config_changes: Sequence[str] = (),
        observers: Sequence[Observer] = (),
        save_hooks: Sequence[SaveHook] = (),
        group: Group | None = None,
        device: torch.device | None = None,
        data: tuple[Dataset, Dataset, dict[str, Any] | None] | None = None,
    ) -> None:
        """``device``: where to train (by default ``trainer.device`` resolved for this process, :mod:`.device`);
        ``data``: ``(train, val, fingerprint)`` as :func:`..data.build_data` gives them (by default built here)."""
        # Long on purpose: every part built in the order the bits depend on (data, seed, model, optimizers, EMA).
        self.cfg = cfg = typed(cfg)
        self.group = g = group or Group()
        self.run_dir = Path(run_dir)
        self.config_changes = list(config_changes)
        self.observers = list(observers)
        t, o, m = cfg.trainer, cfg.optimizer, cfg.model
        configure_process(t)
        self.device = indexed(device if device is not None else resolve_device(t.device))  # LOCAL_RANK's GPU
        self.accum = t.grad_accum_steps
        # The data first: a folder that cannot be used is refused before the model is built.
        self.train_ds, self.val_ds, self.data_fingerprint = data or build_data(cfg.data, cfg.seed)
        seed_everything(cfg.seed)  # right before the model is built: its initial weights follow the seed

        self.model = build_model(m).to(self.device)
        if g.distributed:  # the same initial weights everywhere, then a random stream of each rank's own
            seed_everything(rank_seed(cfg.seed, g.rank))
        self.net: torch.nn.Module = self.model  # what the loop calls: the model, or DDP around it (fit)
        self.opt_gen, self.sched_gen = optimizer_and_schedule(self.model.parameters(), o, o.lr)
        self.opt_discr, self.sched_discr = optimizer_and_schedule(self.model.discr_parameters(), o, o.discr_lr)
        self.ema = EMA(self.model, t.ema.decay, t.ema.update_every, t.ema.warmup) if t.ema.enabled else None
        self.precision = Precision(t.precision, self.device)

        self.batches_per_epoch = batches_per_epoch(self.train_ds, cfg.data, g.world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"data: the train split holds {len(self.train_ds)} clips, fewer than one global batch "
                f"(data.batch_size={cfg.data.batch_size} per rank x {g.world_size} rank(s))"
            )
        self.counters = TrainCounters()
        self.position = DataPosition()
        # The random streams this process draws from: the CPU's, and its own GPU's when it trains on one.
        self.rank = RankState(g.rank, self.position, [self.device.index] if self.device.type == "cuda" else [])
        parts = (self.model, self.opt_gen, self.opt_discr, self.sched_gen, self.sched_discr, self.counters, self.rank)
        self.states: dict[str, Any] = dict(zip(REQUIRED_PARTS, parts))
        if self.ema is not None:
            self.states["ema"] = self.ema
        if self.precision.scaled:  # 16-mixed: the gradient scalers' state is part of every checkpoint
            self.states["scaler"] = self.precision
        ck = cfg.checkpoint
        self.recovery = Recovery(t.max_rollbacks, ck.on_save_error)
        self.watchdog = Watchdog(t.hang_timeout_secs, self.run_dir, g.rank, lambda: self.counters.step)
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=ck.keep_last,
            async_save=ck.async_save,
            every_n_steps=ck.every_n_steps,
            save_on_best=ck.save_on_best,
            hooks=[*save_hooks, self._save_progress],
            group=g,
            remote=Store(ck.remote, ck.remote_options) if ck.remote and g.is_main else None,
        )
        self.env = capture_env(self.device)  # the same on every rank
        self._metadata = run_metadata(cfg, self.env, self.data_fingerprint, g)  # computed once, not at every save
        self._iter = None
        self.evaluator = Evaluator(cfg, self.val_ds, self.device, self.run_dir, g)
        self.last_eval: dict[str, float] = {}  # the latest evaluation's metrics (observers log them)

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {name: part.state_dict() for name, part in self.states.items()}
        state.update(config=to_plain(self.cfg), env=self.env, config_changes=list(self.config_changes))
        if self.data_fingerprint is not None:
            state["data_fingerprint"] = self.data_fingerprint
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every part; the RNG is applied right before the first batch (see :meth:`next_batch`)."""
        missing = [k for k in (*self.states, "env") if k not in state and k not in fresh_parts(state)]
        if missing:
            raise StateError(f"checkpoint lacks {missing}; cannot resume exactly")
        for name, part in self.states.items():
            if name in state:
                part.load_state_dict(state[name])
        o = self.cfg.optimizer
        # The config's hyperparameters win over the loaded ones (they differ only after an allowed change).
        for opt, sched, lr in ((self.opt_gen, self.sched_gen, o.lr), (self.opt_discr, self.sched_discr, o.discr_lr)):
            apply_hyperparameters(opt, sched, lr=lr, betas=o.betas, weight_decay=o.weight_decay)

    def restore(self, loaded: Loaded) -> None:
        """Load a checkpoint that :mod:`..resume` has verified and admitted: every part strictly, then
        the step against the manifest."""
        t0 = time.perf_counter()
        try:
            self.load_state_dict(loaded.state)
        except (StateError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{loaded.path}: cannot be restored: {exc}") from exc
        if loaded.step != self.counters.step:
            raise CheckpointError(f"{loaded.path}: manifest step {loaded.step} != trainer step {self.counters.step}")
        c, p = self.counters, self.position
        log.info("ckpt.load step=%d path=%s secs=%.3f", c.step, loaded.path, time.perf_counter() - t0)
        log.info("resume step=%d epoch=%d batch_in_epoch=%d path=%s", c.step, p.epoch, p.batch_in_epoch, loaded.path)

    def _save_progress(self, phase: str, step: int, where: Path) -> None:
        if phase in SAVE_PHASES:  # the upload thread's phase is not the loop's progress
            self.watchdog.beat(phase)

    # -- data -------------------------------------------------------------------------------

    def rewind_data(self) -> None:
        """After a rollback: the loader is rebuilt at the restored position, with the restored RNG."""
        self._iter = None

    def next_batch(self) -> torch.Tensor:
        if self.position.batch_in_epoch >= self.batches_per_epoch:
            self.position.epoch += 1
            self.position.batch_in_epoch = 0
            self._iter = None
        if self._iter is None:
            loader = build_loader(
                self.train_ds,
                self.cfg.data,
                seed=self.cfg.seed,
                epoch=self.position.epoch,
                start_batch=self.position.batch_in_epoch,
                rank=self.group.rank,
                world_size=self.group.world_size,
                pin_memory=self.device.type == "cuda",
            )
            self._iter = iter(loader)
            self.rank.apply_pending_rng()  # after the loader is rebuilt, before the first batch
        batch = next(self._iter)
        self.position.batch_in_epoch += 1
        self.counters.samples_seen += batch.shape[0] * self.group.world_size  # global: the same on every rank
        # From pinned memory (the loader pins it for a GPU) the copy need not wait: the batch is
        # a fresh tensor that nothing writes again, and kernels using it run after the copy.
        return batch.to(self.device, non_blocking=self.device.type == "cuda")

    # -- one optimizer step -----------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step of the generator and the discriminator (:func:`.step.gan_step`)."""
        return gan_step(self)

    def maybe_evaluate(self) -> tuple[float | None, bool]:
        """Evaluate every ``eval_every_n_steps`` and at the last step: ``(val_loss, improved)``."""
        c = self.counters
        if not self.evaluator.due(c.step):
            return None, False
        self.last_eval = self.evaluator.run(self.model, self.ema.model if self.ema is not None else None, c.step)
        val_loss = self.last_eval["val_loss"]
        improved = val_loss < c.best_val_loss
        if improved:
            c.best_val_loss, c.best_step = val_loss, c.step
        return val_loss, improved

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, *, val_loss: float | None, is_best: bool) -> None:
        step = self.counters.step
        state = self.state_dict()
        own = state.pop("ranks")[str(self.group.rank)]
        metadata = {
            **self._metadata,
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.batch_in_epoch,
            "created": time.time(),
            "val_loss": val_loss,
            "val_weights": self.evaluator.weights,
            "config_changes": list(self.config_changes),
        }

        def on_commit(path: Path) -> None:
            if is_best:
                self.ckpt.set_best(step, float(val_loss), weights=self.evaluator.weights)

        self.ckpt.save(step, state, tensor_groups=TENSOR_GROUPS, metadata=metadata, on_commit=on_commit, rank_state=own)

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``trainer.max_steps`` or until a signal: exit code 0 (finished) or 75 (stopped, saved).

        A :class:`~.faults.Fault` (a non-finite value, replicas apart) rolls back in-process (:mod:`.recovery`)."""
        c, t, g = self.counters, self.cfg.trainer, self.group
        observers = [*default_observers(self.cfg, g), *self.observers]
        status, last, stopping = "failed", {}, False
        if self.net is self.model:  # compiled in place (keys unchanged), then DDP: all ranks, after any restore
            self.net = wrap_ddp(compile_generator(self.model) if t.compile else self.model, g, self.device)
        self.recovery.keep_initial(self)
        signals = StopSignals(lambda: c.step).__enter__()
        self.watchdog.start()
        try:
            for obs in observers:
                obs.on_start(self)
            while c.step < t.max_steps and not stopping:
                try:
                    last = {**self.train_step(), "step": c.step, "epoch": self.position.epoch, "time": time.time()}
                    last["val_loss"], improved = self.maybe_evaluate()
                    for obs in observers:
                        obs.on_step(self, last)
                    stopping = g.any(signals.received is not None)  # a signal to any rank stops them all here
                    self._save_if_due(last, improved, stopping)
                except Fault as fault:
                    self.recovery.roll_back(self, fault, observers)
                    stopping = False  # a signal still pending stops the run at the next step, with a save
                    self.watchdog.beat("rollback")
                    continue
                for obs in observers:
                    obs.on_saved(self, last)
                self.watchdog.beat("step")
            self.recovery.wait(self.ckpt, c.step)
            done = c.step >= t.max_steps  # at the end, uploads that did not arrive are a failure (SaveError)
            with self.watchdog.paused():  # bounded by checkpoint.upload_timeout_secs
                self.ckpt.finish_uploads(self.cfg.checkpoint.upload_timeout_secs, finished_at=c.step if done else None)
            status = "finished" if done else "stopped"
        finally:
            self.watchdog.stop()
            signals.__exit__()
            for obs in observers:
                try:
                    obs.on_end(self, status)
                except Exception as exc:  # e.g. a full disk: never hide the error that ended the run
                    log.warning("observer.on_end_failed %s: %s: %s", type(obs).__name__, type(exc).__name__, exc)
        if status == "stopped":
            log.warning("train.stopped step=%d signal=%s exit=%d", c.step, signals.received, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        _done(self, last)
        return EXIT_FINISHED

    def _save_if_due(self, last: dict[str, Any], improved: bool, stopping: bool) -> None:
        """The step's checkpoint when one is due, after the ranks agreed their replicas are equal."""
        c, t = self.counters, self.cfg.trainer
        final = c.step == t.max_steps
        save = self.ckpt.should_save(c.step, last=final, improved=improved, stopping=stopping)
        every = t.replica_check_every_n_steps
        if save or (every > 0 and c.step % every == 0):
            check_replicas(self.group, c.step, {k: p.state_dict() for k, p in self.states.items() if k != "ranks"})
        if save:
            best = improved and self.ckpt.save_on_best
            save_now = lambda: self.save_checkpoint(val_loss=last["val_loss"], is_best=best)  # noqa: E731
            self.recovery.save(self.ckpt, save_now, c.step, final or stopping)


def run_metadata(cfg: TrainConfig, env: dict[str, Any], fingerprint: dict[str, Any] | None, g: Group) -> dict[str, Any]:
    """What every manifest of the run records besides the step's own values."""
    meta = {"config_hash": config_hash(cfg), "versions": package_versions(), "env": env}
    if fingerprint is not None:
        meta["data_fingerprint"] = fingerprint["digest"]
    if g.distributed:
        meta["global_batch"] = cfg.data.batch_size * g.world_size * cfg.trainer.grad_accum_steps
    return meta


def _done(trainer: Trainer, last: dict[str, Any]) -> None:
    """The end of a finished run: the loss plot (rank 0) and the ``train.done`` line."""
    c, g = trainer.counters, trainer.group
    if not g.is_main:
        log.info("train.done step=%d rank=%d", c.step, g.rank)
        return
    try:
        plot_loss(trainer.run_dir)
    except ValueError as exc:
        log.warning("plot skipped: %s", exc)
    log.info(
        "train.done step=%d epoch=%d loss=%.6f best_val_loss=%.6g best_step=%d run_dir=%s",
        c.step,
        trainer.position.epoch,
        last.get("loss", float("nan")),
        c.best_val_loss,
        c.best_step,
        trainer.run_dir,
    )


def default_observers(cfg: Any, group: Any = None) -> list[Observer]:
    """History and heartbeat always; the progress bar when ``trainer.progress_bar`` (rank 0's run files);
    with ranks, every rank's own heartbeat, and the losses of the ranks other than 0; TensorBoard on rank 0
    with ``logger=tensorboard``."""
    t = cfg.trainer
    main = group is None or group.is_main
    out: list[Observer] = [HistoryObserver(t.log_every_n_steps, group.rank if group is not None else 0)]
    if main:
        out.append(HeartbeatObserver(t.heartbeat_secs, t.max_steps))
        if t.progress_bar:
            out.append(ProgressObserver(t.max_steps))
    if group is not None and group.distributed:
        out.append(RankHeartbeatObserver(t.heartbeat_secs, group.rank, group.restart))
    if main and cfg.logger == "tensorboard":
        from .tblog import TensorBoardObserver

        out.append(TensorBoardObserver())
    return out
