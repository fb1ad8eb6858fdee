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

import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from .checkpoint import CheckpointError, CheckpointManager, Loaded
from .checkpoint.manager import SaveHook
from .config import TrainConfig, TrainerConfig, config_hash, to_plain, typed
from .data import batches_per_epoch, build_data, build_loader
from .device import resolve_device
from .dist import Group
from .metrics import Reconstruction
from .model import build_model
from .monitor import plot_loss, save_sample_grid
from .observers import Observer, default_observers
from .rng import RNGState, rank_seed, seed_everything
from .state import (
    EMA,
    DataPosition,
    RankState,
    StateError,
    TrainCounters,
    apply_hyperparameters,
    capture_env,
    check_env,
    package_versions,
    warmup_cosine,
)

__all__ = [
    "Trainer",
    "configure_process",
    "EXIT_FINISHED",
    "EXIT_PREEMPTED",
    "EXIT_ABORTED",
    "TENSOR_GROUPS",
    "REQUIRED_PARTS",
]

log = logging.getLogger(__name__)

EXIT_FINISHED = 0
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint was committed; resume with resume_from=auto
EXIT_ABORTED = 130  # second SIGINT: left at once, committed checkpoints untouched

#: Parts saved as a flat safetensors file of their own (the rest goes to state.json/state.safetensors).
TENSOR_GROUPS = ("model", "ema")
#: The ``Stateful`` parts every checkpoint holds (plus ``ema`` when enabled), in ``Trainer.states`` order.
REQUIRED_PARTS = ("model", "optim_gen", "optim_discr", "sched_gen", "sched_discr", "trainer", "ranks")


def configure_process(t: TrainerConfig) -> None:
    """Process-wide settings the bits depend on: thread count and deterministic kernels.

    ``trainer.deterministic=false`` switches them off again (in a process that trained with them on)
    and lets cuDNN pick its fastest convolution per shape (``cudnn.benchmark``).
    """
    torch.set_num_threads(t.num_threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(t.deterministic)
    torch.backends.cudnn.benchmark = not t.deterministic


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
    ) -> None:
        """``device``: where to train; by default ``trainer.device`` resolved for this process (:mod:`.device`)."""
        self.cfg = cfg = typed(cfg)
        self.group = g = group or Group()
        self.run_dir = Path(run_dir)
        self.config_changes = list(config_changes)
        self.observers = list(observers)
        t, o, m = cfg.trainer, cfg.optimizer, cfg.model
        configure_process(t)
        self.device = device if device is not None else resolve_device(t.device)  # LOCAL_RANK's GPU under torchrun
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.accum = t.grad_accum_steps
        self.use_gan = m.use_gan
        # The data first: a folder that cannot be used is refused before the model is built.
        self.train_ds, self.val_ds, self.data_fingerprint = build_data(cfg.data, cfg.seed)
        seed_everything(cfg.seed)  # right before the model is built: its initial weights follow the seed

        self.model = build_model(m).to(self.device)
        if g.distributed:  # the same initial weights everywhere, then a random stream of each rank's own
            seed_everything(rank_seed(cfg.seed, g.rank))
        self.net: torch.nn.Module = self.model  # what the loop calls: the model, or DDP around it (fit)
        betas = tuple(o.betas)
        self.opt_gen = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=betas, weight_decay=o.weight_decay)
        self.opt_discr = torch.optim.AdamW(
            self.model.discr_parameters(), lr=o.discr_lr, betas=betas, weight_decay=o.weight_decay
        )
        sched = warmup_cosine(o.warmup_steps, o.schedule_steps, o.min_lr_ratio)
        self.sched_gen = torch.optim.lr_scheduler.LambdaLR(self.opt_gen, sched)
        self.sched_discr = torch.optim.lr_scheduler.LambdaLR(self.opt_discr, sched)
        self.ema = EMA(self.model, t.ema.decay, t.ema.update_every) if t.ema.enabled else None

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
        ck = cfg.checkpoint
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=ck.keep_last,
            async_save=ck.async_save,
            every_n_steps=ck.every_n_steps,
            save_on_best=ck.save_on_best,
            hooks=save_hooks,
            group=g,
        )
        self.env = capture_env(self.device)  # the same on every rank
        # Fixed for the run: computed once, not at every save.
        self._metadata = {"config_hash": config_hash(cfg), "versions": package_versions(), "env": self.env}
        if self.data_fingerprint is not None:
            self._metadata["data_fingerprint"] = self.data_fingerprint["digest"]
        if g.distributed:
            self._metadata["global_batch"] = cfg.data.batch_size * g.world_size * self.accum
        self._iter = None
        self.stop_signal: int | None = None
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
        missing = [k for k in (*self.states, "env") if k not in state]
        if missing:
            raise StateError(f"checkpoint lacks {missing}; cannot resume exactly")
        for name, part in self.states.items():
            part.load_state_dict(state[name])
        o = self.cfg.optimizer
        # The config's hyperparameters win over the loaded ones (they differ only after an allowed change).
        apply_hyperparameters(self.opt_gen, self.sched_gen, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        apply_hyperparameters(
            self.opt_discr, self.sched_discr, lr=o.discr_lr, betas=o.betas, weight_decay=o.weight_decay
        )

    def restore(self, loaded: Loaded) -> None:
        """Load a verified checkpoint: environment check, every part strictly, counters against the manifest."""
        t0 = time.perf_counter()
        self.config_changes += check_env(loaded.state.get("env"), self.env, allow=self.cfg.resume.allow_config_change)
        self._convert_device_rng(loaded)
        self._check_world_size(loaded)
        self._check_data(loaded)
        try:
            self.load_state_dict(loaded.state)
        except (StateError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{loaded.path}: cannot be restored: {exc}") from exc
        if loaded.step != self.counters.step:
            raise CheckpointError(f"{loaded.path}: manifest step {loaded.step} != trainer step {self.counters.step}")
        log.info("ckpt.load step=%d path=%s secs=%.3f", self.counters.step, loaded.path, time.perf_counter() - t0)
        log.info(
            "resume step=%d epoch=%d batch_in_epoch=%d path=%s",
            self.counters.step,
            self.position.epoch,
            self.position.batch_in_epoch,
            loaded.path,
        )

    def _check_data(self, loaded: Loaded) -> None:
        """The files the checkpoint was trained on, against the ones found now (wherever they are)."""
        saved, here = loaded.state.get("data_fingerprint"), self.data_fingerprint
        if here is None:
            return
        if not isinstance(saved, dict):
            log.warning("resume.data_unchecked path=%s: the checkpoint holds no data fingerprint", loaded.path)
            return
        from .video import fingerprint_difference

        diffs = fingerprint_difference(saved, here)
        old_path = (loaded.state.get("config") or {}).get("data", {}).get("path")
        if not diffs:
            if old_path != self.cfg.data.path:
                log.info(
                    "resume.data_moved from=%s to=%s: the same files (fingerprint %s)",
                    old_path,
                    self.cfg.data.path,
                    here["digest"][:12],
                )
            return
        listed = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
        msg = f"the data under data.path={self.cfg.data.path} differs from the data {loaded.path} was trained on:\n  "
        if not self.cfg.resume.allow_config_change:
            raise StateError(
                msg + listed + "\nRestore those files, or pass resume.allow_config_change=true to train on the "
                "new data (recorded in the next checkpoint's manifest)."
            )
        log.warning("resume.data_change allowed by resume.allow_config_change: %s", "; ".join(diffs))
        self.config_changes += [f"data: {d}" for d in diffs]

    def _convert_device_rng(self, loaded: Loaded) -> None:
        """After an allowed change of device kind: this device's random stream starts afresh (seeded from
        the run's seed, rank and step); the CPU streams carry over as they are."""
        env = loaded.state.get("env")
        ranks = loaded.state.get("ranks")
        mine = ranks.get(str(self.group.rank)) if isinstance(ranks, dict) else None
        if not isinstance(env, dict) or env.get("device") == self.env["device"] or not isinstance(mine, dict):
            return
        cuda = []
        if self.device.type == "cuda":
            with torch.random.fork_rng(devices=[self.device]):
                torch.cuda.manual_seed(rank_seed(self.cfg.seed, self.group.rank, loaded.step))
                cuda = [torch.cuda.get_rng_state(self.device)]
        if isinstance(mine.get("rng"), dict):
            mine["rng"] = {**mine["rng"], "cuda": cuda}
        log.warning(
            "resume.device_change from=%s to=%s step=%d: fresh random stream on %s (no bitwise continuity)",
            env.get("device"),
            self.env["device"],
            loaded.step,
            self.device,
        )

    def _check_world_size(self, loaded: Loaded) -> None:
        """Refuse a checkpoint of another world size, or (when allowed) carry it over and say so."""
        saved, here = loaded.manifest.get("world_size", 1), self.group.world_size
        if saved == here:
            return
        if not self.cfg.resume.allow_world_size_change:
            raise StateError(
                f"{loaded.path} was written by {saved} rank(s) but this run has {here}: per-rank RNG streams and "
                f"data slices cannot carry over bit for bit. Start with {saved} rank(s) (torchrun --nproc-per-node "
                f"{saved}), or pass resume.allow_world_size_change=true to continue with exact weights and "
                "optimizer state but fresh per-rank random streams (recorded: no bitwise continuity)"
            )
        cfg_saved = loaded.state.get("config") or {}
        batch_saved = int(cfg_saved.get("data", {}).get("batch_size", self.cfg.data.batch_size))
        epoch, done = int(loaded.manifest.get("epoch", 0)), int(loaded.manifest.get("batch_in_epoch", 0))
        samples = done * batch_saved * saved  # samples consumed in the current epoch
        per_batch = self.cfg.data.batch_size * here
        if samples % per_batch:
            raise StateError(
                f"{loaded.path}: {samples} samples of epoch {epoch} consumed by {saved} rank(s) is not a whole number "
                f"of global batches of {per_batch} on {here} rank(s); resume on {saved} rank(s)"
            )
        step, rank = loaded.step, self.group.rank
        seed_everything(rank_seed(self.cfg.seed, rank, step))  # applied right before the first batch, as any
        rng = RNGState(self.rank.rng.cuda_devices).state_dict()
        loaded.state["ranks"] = {
            str(rank): {"rng": rng, "data": {"epoch": epoch, "batch_in_epoch": samples // per_batch}}
        }
        note = (
            f"world_size: {saved} -> {here} at step {step} (resume.allow_world_size_change: data position "
            f"converted through {samples} samples consumed, fresh per-rank RNG streams; no bitwise continuity)"
        )
        log.warning("resume.world_size_change %s", note)
        self.config_changes.append(note)

    # -- data -------------------------------------------------------------------------------

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

    # -- ranks ------------------------------------------------------------------------------

    def wrap_ddp(self) -> None:
        """Put DDP around the tokenizer (all ranks together, after any restore).

        ``find_unused_parameters``: the generator pass leaves no parameter unused, but the
        discriminator pass uses the discriminator only (as magvit2-pytorch's own trainer). It also
        keeps the bucket layout fixed: DDP rebuilds buckets in gradient-ready order only when it is
        off, so a resumed process reduces in the same order as the uninterrupted one. The gradient
        penalty's ``autograd.grad`` is taken with respect to the frames, never the parameters, so
        it does not trigger DDP's hooks; its effect reaches the parameters through the normal
        backward of the discriminator loss.
        """
        if not self.group.distributed or self.net is not self.model:
            return
        from torch.nn.parallel import DistributedDataParallel

        dev = [self.device.index] if self.device.type == "cuda" else None
        self.net = DistributedDataParallel(
            self.model, device_ids=dev, find_unused_parameters=True, forward_sync_buffers=False
        )

    def _sync(self, last: bool):
        """DDP averages gradients on the last micro-batch only (``no_sync`` before it)."""
        if last or self.net is self.model:
            return contextlib.nullcontext()
        return self.net.no_sync()

    # -- one optimizer step -----------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        m, o = self.cfg.model, self.cfg.optimizer
        vcff = m.video_contains_first_frame
        self.model.train()
        self.opt_gen.zero_grad(set_to_none=True)
        batches = [self.next_batch() for _ in range(self.accum)]
        loss_sum = recon_sum = 0.0
        for i, video in enumerate(batches):
            with self._sync(i == len(batches) - 1):
                loss, parts = self.net(video, return_loss=True, video_contains_first_frame=vcff)
                (loss / self.accum).backward()
            loss_sum += loss.item() / self.accum
            recon_sum += parts.recon_loss.item() / self.accum
        gen_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.max_grad_norm)
        self.opt_gen.step()
        self.sched_gen.step()
        discr = None
        if self.use_gan:
            # One discriminator step per optimizer step, on the step's last micro-batch. Its grads
            # are zeroed first: the generator's adversarial loss also reached the discriminator.
            self.opt_discr.zero_grad(set_to_none=True)
            gp = self.counters.step % m.grad_penalty_every == 0
            dloss, _ = self.net(
                batches[-1], return_discr_loss=True, apply_gradient_penalty=gp, video_contains_first_frame=vcff
            )
            dloss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.discr_parameters(), o.max_grad_norm)
            self.opt_discr.step()
            self.sched_discr.step()
            discr = dloss.item()
        if self.ema is not None:
            self.ema.update(self.counters.step)
        self.counters.step += 1
        return {
            "loss": loss_sum,
            "recon_loss": recon_sum,
            "discr_loss": discr,
            "grad_norm": float(gen_norm),
            "lr": self.sched_gen.get_last_lr()[0],
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``val_loss`` and the reconstruction and codebook metrics (:mod:`.metrics`) on the validation clips."""
        t = self.cfg.trainer
        model = self.ema.model if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        vcff = self.cfg.model.video_contains_first_frame
        loader = build_loader(self.val_ds, self.cfg.data, seed=self.cfg.seed, epoch=0, shuffle=False)
        losses, samples, metrics = [], None, Reconstruction(self.cfg.model.fsq_levels)
        for i, video in enumerate(loader):
            if i >= t.eval_batches:
                break
            video = video.to(self.device)
            loss, recon = model(video, return_recon_loss_only=True, video_contains_first_frame=vcff)
            losses.append(loss.item())
            _, codes = model.encode(video, quantize=True, video_contains_first_frame=vcff)
            metrics.add(video, recon, codes)
            if samples is None:
                samples = (video[: t.num_samples].cpu(), recon[: t.num_samples].cpu())
        model.train(was_training)
        if samples is not None and t.num_samples > 0:
            save_sample_grid(samples[0], samples[1], self.run_dir / "samples" / f"step_{self.counters.step:08d}.png")
        return {"val_loss": sum(losses) / len(losses), **metrics.result()}

    def maybe_evaluate(self) -> tuple[float | None, bool]:
        """Evaluate every ``eval_every_n_steps`` and at the last step: ``(val_loss, improved)``."""
        c, t = self.counters, self.cfg.trainer
        if c.step % t.eval_every_n_steps and c.step != t.max_steps:
            return None, False
        self.last_eval = self.group.broadcast(self.evaluate() if self.group.is_main else None)  # rank 0 evaluates
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
            "config_changes": list(self.config_changes),
        }

        def on_commit(path: Path) -> None:
            if is_best:
                self.ckpt.set_best(step, float(val_loss))

        self.ckpt.save(step, state, tensor_groups=TENSOR_GROUPS, metadata=metadata, on_commit=on_commit, rank_state=own)

    # -- signals ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            # Second Ctrl-C: leave now. Committed checkpoints are safe (atomic commit); a partial
            # temporary directory is removed at the next start.
            os.write(2, b"second SIGINT: exiting immediately\n")
            os._exit(EXIT_ABORTED)
        self.stop_signal = signum
        log.warning(
            "signal.%s step=%d: finishing the step, saving a checkpoint, then exiting with %d",
            signal.Signals(signum).name,
            self.counters.step,
            EXIT_PREEMPTED,
        )

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``trainer.max_steps`` or until a signal: exit code 0 (finished) or 75 (stopped, saved)."""
        c, t, g = self.counters, self.cfg.trainer, self.group
        observers = [*default_observers(t, g), *self.observers]
        if self.cfg.logger == "tensorboard" and g.is_main:
            from .tblog import TensorBoardObserver

            observers.append(TensorBoardObserver())
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        status, last, stopping = "failed", {}, False
        self.wrap_ddp()
        try:
            for obs in observers:
                obs.on_start(self)
            while c.step < t.max_steps and not stopping:
                last = {**self.train_step(), "step": c.step, "epoch": self.position.epoch, "time": time.time()}
                last["val_loss"], improved = self.maybe_evaluate()
                for obs in observers:
                    obs.on_step(self, last)
                stopping = g.any(self.stop_signal is not None)  # a signal to any rank stops them all here
                if self.ckpt.should_save(c.step, last=c.step == t.max_steps, improved=improved, stopping=stopping):
                    self.save_checkpoint(val_loss=last["val_loss"], is_best=improved and self.ckpt.save_on_best)
                for obs in observers:
                    obs.on_saved(self, last)
            self.ckpt.wait()
            status = "finished" if c.step >= t.max_steps else "stopped"
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for obs in observers:
                try:
                    obs.on_end(self, status)
                except Exception as exc:  # e.g. a full disk: never hide the error that ended the run
                    log.warning("observer.on_end_failed %s: %s: %s", type(obs).__name__, type(exc).__name__, exc)
        if status == "stopped":
            log.warning("train.stopped step=%d signal=%s exit=%d", c.step, self.stop_signal, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        if not g.is_main:
            log.info("train.done step=%d rank=%d", c.step, g.rank)
            return EXIT_FINISHED
        try:
            plot_loss(self.run_dir)
        except ValueError as exc:
            log.warning("plot skipped: %s", exc)
        log.info(
            "train.done step=%d epoch=%d loss=%.6f best_val_loss=%.6g best_step=%d run_dir=%s",
            c.step,
            self.position.epoch,
            last.get("loss", float("nan")),
            c.best_val_loss,
            c.best_step,
            self.run_dir,
        )
        return EXIT_FINISHED
