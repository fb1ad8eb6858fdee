"""The training loop and every piece of resumable state, each ``Stateful``.

``Trainer.state_dict()`` collects model, EMA, both optimizers, both LR schedules, counters, data
position and RNG; :class:`~resilient_train.checkpoint.CheckpointManager` writes it atomically.
Restoring is fail-loud: a missing key or an environment that cannot reproduce the bits is an
error naming it.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from . import DETERMINISM_ENV, __version__
from .checkpoint import CheckpointManager, load_checkpoint
from .config import config_hash, to_plain
from .data import batches_per_epoch, build_datasets, build_loader
from .model import build_model
from .monitor import Heartbeat, HistoryWriter, atomic_write_text, plot_loss, read_history, save_sample_grid
from .rng import RNGState, seed_everything

__all__ = [
    "Trainer",
    "TrainCounters",
    "DataPosition",
    "EMA",
    "EXIT_FINISHED",
    "EXIT_PREEMPTED",
    "EXIT_ABORTED",
    "capture_env",
    "warmup_cosine",
]

log = logging.getLogger(__name__)

EXIT_FINISHED = 0
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint was committed; resume with resume_from=auto
EXIT_ABORTED = 130  # second SIGINT: left at once, committed checkpoints untouched

TENSOR_GROUPS = ("model", "ema")


class TrainCounters:
    """Optimizer steps done, samples seen, and the best validation loss so far."""

    def __init__(self) -> None:
        self.step = 0
        self.samples_seen = 0
        self.best_val_loss = math.inf
        self.best_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.best_val_loss = float(state["best_val_loss"])
        self.best_step = int(state["best_step"])


class DataPosition:
    """Where the data stream is: epoch and batches consumed within it (per rank)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


class EMA:
    """Exponential moving average of the generator (the discriminator is not averaged)."""

    def __init__(self, model: torch.nn.Module, decay: float, update_every: int = 1) -> None:
        self.decay = decay
        self.update_every = update_every
        self.model = model.copy_for_eval() if hasattr(model, "copy_for_eval") else _eval_copy(model)
        self.model.requires_grad_(False)
        src = model.state_dict()
        self._pairs = [(t, src[k]) for k, t in self.model.state_dict().items()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.update_every:
            return
        for ema_t, src in self._pairs:
            if ema_t.is_floating_point():
                ema_t.lerp_(src, 1.0 - self.decay)
            else:
                ema_t.copy_(src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)


def _eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def warmup_cosine(warmup_steps: int, schedule_steps: int, min_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine to ``min_ratio`` at ``schedule_steps``, then flat.

    Applied by ``LambdaLR`` to the real base LR (the magvit2 trainer's wrapper left the LR at
    lr/warmup_steps; here the multiplier is exactly 1 at the end of warmup).
    """

    def mult(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, schedule_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return mult


def capture_env(device: str) -> dict[str, Any]:
    """What determines the bits of a run on this machine."""
    env = {
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "machine": platform.machine(),
        "determinism_env": {k: os.environ.get(k) for k in DETERMINISM_ENV},
    }
    if device.startswith("cuda"):
        env["cuda_name"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"resilient_train": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("magvit2-pytorch", "vector-quantize-pytorch", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


class Trainer:
    """Trains the tokenizer in ``run_dir``; itself ``Stateful`` through :meth:`state_dict`."""

    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike, *, config_changes: list[str] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.config_changes = config_changes or []
        t = cfg.trainer
        torch.set_num_threads(int(t.num_threads))
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.device = torch.device(t.device)
        seed_everything(int(cfg.seed))

        self.model = build_model(cfg.model).to(self.device)
        o = cfg.optimizer
        betas = tuple(float(b) for b in o.betas)
        self.opt_gen = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=betas, weight_decay=o.weight_decay)
        self.use_gan = bool(cfg.model.use_gan)
        self.opt_discr = torch.optim.AdamW(
            self.model.discr_parameters(), lr=o.discr_lr, betas=betas, weight_decay=o.weight_decay
        )
        sched = warmup_cosine(int(o.warmup_steps), int(o.schedule_steps), float(o.min_lr_ratio))
        self.sched_gen = torch.optim.lr_scheduler.LambdaLR(self.opt_gen, sched)
        self.sched_discr = torch.optim.lr_scheduler.LambdaLR(self.opt_discr, sched)
        self.ema = EMA(self.model, float(t.ema.decay), int(t.ema.update_every)) if t.ema.enabled else None

        self.train_ds, self.val_ds = build_datasets(cfg.data, int(cfg.seed))
        self.batches_per_epoch = batches_per_epoch(self.train_ds, cfg.data)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"data: the train split holds {len(self.train_ds)} clips, fewer than one batch "
                f"(data.batch_size={cfg.data.batch_size})"
            )
        self.counters = TrainCounters()
        self.position = DataPosition()
        self.rng = RNGState()
        self._iter = None
        self._pending_rng: dict[str, Any] | None = None
        self.stop_signal: int | None = None
        self.chaos = None
        ck = cfg.checkpoint
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", keep_last=int(ck.keep_last), async_save=bool(ck.async_save)
        )
        if cfg.chaos.enabled:
            from .chaos import Chaos  # only imported when chaos is on

            self.chaos = Chaos(cfg.chaos, self.run_dir, self.ckpt)
            self.ckpt.hook = self.chaos.save_hook
        self.env = capture_env(str(self.device))

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optim_gen": self.opt_gen.state_dict(),
            "optim_discr": self.opt_discr.state_dict(),
            "sched_gen": self.sched_gen.state_dict(),
            "sched_discr": self.sched_discr.state_dict(),
            "trainer": self.counters.state_dict(),
            # Per-rank state lives under its rank so multi-process training can add ranks later.
            "ranks": {"0": {"rng": self.rng.state_dict(), "data": self.position.state_dict()}},
            "config": to_plain(self.cfg),
            "env": self.env,
            "config_changes": list(self.config_changes),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], *, skip: str = "") -> None:
        """Restore everything; RNG is applied right before the first batch (see :meth:`next_batch`)."""
        required = ["model", "optim_gen", "optim_discr", "sched_gen", "sched_discr", "trainer", "ranks", "env"]
        if self.ema is not None:
            required.append("ema")
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"checkpoint lacks {missing}; cannot resume exactly")
        self._check_env(state["env"])
        self.model.load_state_dict(state["model"], strict=True)
        self.opt_gen.load_state_dict(state["optim_gen"])
        self.opt_discr.load_state_dict(state["optim_discr"])
        self.sched_gen.load_state_dict(state["sched_gen"])
        self.sched_discr.load_state_dict(state["sched_discr"])
        self._apply_optimizer_config()
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.counters.load_state_dict(state["trainer"])
        rank = state["ranks"].get("0")
        if rank is None or "rng" not in rank or "data" not in rank:
            raise KeyError("checkpoint lacks ranks/0/rng or ranks/0/data; cannot resume exactly")
        if skip == "data":
            log.warning("chaos.skip_restore=data: NOT restoring the data position (negative control)")
            self.position.epoch = self.counters.step * self.cfg.trainer.grad_accum_steps // self.batches_per_epoch
        else:
            self.position.load_state_dict(rank["data"])
        if skip == "rng":
            log.warning("chaos.skip_restore=rng: NOT restoring RNG state (negative control)")
        else:
            self._pending_rng = rank["rng"]

    def _apply_optimizer_config(self) -> None:
        """The loaded optimizer and scheduler state carries the saved run's hyperparameters; the config's win.

        Without a config change they are equal and nothing is touched. A change accepted with
        ``resume.allow_config_change`` (optimizer.lr, discr_lr, betas, weight_decay) must take
        effect, not merely be recorded in the manifest while training goes on with the old values.
        """
        o = self.cfg.optimizer
        betas = tuple(float(b) for b in o.betas)
        for opt, sched, base in (
            (self.opt_gen, self.sched_gen, float(o.lr)),
            (self.opt_discr, self.sched_discr, float(o.discr_lr)),
        ):
            for i, (group, mult) in enumerate(zip(opt.param_groups, sched.lr_lambdas)):
                if sched.base_lrs[i] != base:
                    sched.base_lrs[i] = base
                    group["initial_lr"] = base
                    group["lr"] = base * mult(sched.last_epoch)
                    sched._last_lr[i] = group["lr"]
                if tuple(group["betas"]) != betas:
                    group["betas"] = betas
                if group["weight_decay"] != float(o.weight_decay):
                    group["weight_decay"] = float(o.weight_decay)

    def _check_env(self, saved: dict[str, Any]) -> None:
        here = self.env
        diffs = [
            f"{k}: {saved.get(k)!r} -> {here.get(k)!r}"
            for k in ("torch", "num_threads", "cpu_capability", "device", "cuda_devices", "machine", "determinism_env")
            if saved.get(k) != here.get(k)
        ]
        if not diffs:
            return
        msg = "the environment differs from the checkpoint's, so the bits cannot match: " + "; ".join(diffs)
        if self.cfg.resume.allow_config_change:
            log.warning("resume.env_change %s (allowed by resume.allow_config_change)", msg)
            self.config_changes.extend(f"env.{d}" for d in diffs)
        else:
            raise RuntimeError(msg + ". Set resume.allow_config_change=true to continue anyway.")

    def restore(self, ckpt_path: Path) -> None:
        t0 = time.perf_counter()
        state, manifest = load_checkpoint(ckpt_path)
        self.load_state_dict(state, skip=str(self.cfg.chaos.skip_restore))
        if manifest["step"] != self.counters.step:
            raise RuntimeError(f"{ckpt_path}: manifest step {manifest['step']} != trainer step {self.counters.step}")
        log.info("ckpt.load step=%d path=%s secs=%.3f", self.counters.step, ckpt_path, time.perf_counter() - t0)
        self._reconcile_best()
        log.info(
            "resume step=%d epoch=%d batch_in_epoch=%d path=%s",
            self.counters.step,
            self.position.epoch,
            self.position.batch_in_epoch,
            ckpt_path,
        )

    def _reconcile_best(self) -> None:
        """A crash between a best checkpoint's commit and the pointer update leaves ``best.json`` stale."""
        c = self.counters
        if c.best_step < 0:
            return
        pointer = self.ckpt.best()
        if pointer is not None and pointer.get("step") == c.best_step:
            return
        if (self.ckpt.root / f"step_{c.best_step:08d}").is_dir():
            log.warning("ckpt.best_reconciled pointer=%s counters.best_step=%d", pointer, c.best_step)
            self.ckpt.set_best(c.best_step, c.best_val_loss)

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
                seed=int(self.cfg.seed),
                epoch=self.position.epoch,
                start_batch=self.position.batch_in_epoch,
            )
            self._iter = iter(loader)
            if self._pending_rng is not None:  # restored after the loader is rebuilt, before the first batch
                self.rng.load_state_dict(self._pending_rng)
                self._pending_rng = None
        batch = next(self._iter)
        self.position.batch_in_epoch += 1
        self.counters.samples_seen += int(batch.shape[0])
        return batch.to(self.device, non_blocking=False)

    # -- one optimizer step -----------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        accum = int(cfg.trainer.grad_accum_steps)
        vcff = bool(cfg.model.video_contains_first_frame)
        self.model.train()
        self.opt_gen.zero_grad(set_to_none=True)
        batches = [self.next_batch() for _ in range(accum)]
        loss_sum = recon_sum = 0.0
        for video in batches:
            loss, parts = self.model(video, return_loss=True, video_contains_first_frame=vcff)
            (loss / accum).backward()
            loss_sum += loss.item() / accum
            recon_sum += parts.recon_loss.item() / accum
        gen_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optimizer.max_grad_norm)
        self.opt_gen.step()
        self.sched_gen.step()
        discr = None
        if self.use_gan:
            # One discriminator step per optimizer step, on the step's last micro-batch. Its grads
            # are zeroed first: the generator's adversarial loss also reached the discriminator.
            self.opt_discr.zero_grad(set_to_none=True)
            gp = self.counters.step % int(cfg.model.grad_penalty_every) == 0
            dloss, _ = self.model(
                batches[-1], return_discr_loss=True, apply_gradient_penalty=gp, video_contains_first_frame=vcff
            )
            dloss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.discr_parameters(), cfg.optimizer.max_grad_norm)
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
    def evaluate(self) -> float:
        model = self.ema.model if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        vcff = bool(self.cfg.model.video_contains_first_frame)
        loader = build_loader(self.val_ds, self.cfg.data, seed=int(self.cfg.seed), epoch=0, shuffle=False)
        losses, samples = [], None
        for i, video in enumerate(loader):
            if i >= int(self.cfg.trainer.eval_batches):
                break
            video = video.to(self.device)
            loss, recon = model(video, return_recon_loss_only=True, video_contains_first_frame=vcff)
            losses.append(loss.item())
            if samples is None:
                samples = (video[: self.cfg.trainer.num_samples].cpu(), recon[: self.cfg.trainer.num_samples].cpu())
        model.train(was_training)
        if samples is not None and self.cfg.trainer.num_samples > 0:
            save_sample_grid(samples[0], samples[1], self.run_dir / "samples" / f"step_{self.counters.step:08d}.png")
        return sum(losses) / len(losses)

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, *, val_loss: float | None, is_best: bool) -> None:
        step = self.counters.step
        metadata = {
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.batch_in_epoch,
            "config_hash": config_hash(self.cfg),
            "versions": _versions(),
            "env": self.env,
            "created": time.time(),
            "val_loss": val_loss,
            "config_changes": list(self.config_changes),
        }

        def on_commit(path: Path) -> None:
            if is_best:
                self.ckpt.set_best(step, float(val_loss))

        self.ckpt.save(step, self.state_dict(), tensor_groups=TENSOR_GROUPS, metadata=metadata, on_commit=on_commit)

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

    def fit(self, resume_path: Path | None = None) -> int:
        cfg, c = self.cfg, self.counters
        if resume_path is not None:
            self.restore(resume_path)
        history = HistoryWriter(self.run_dir)
        heartbeat = Heartbeat(
            self.run_dir, interval_secs=float(cfg.trainer.heartbeat_secs), max_steps=int(cfg.trainer.max_steps)
        )
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = _progress(cfg, c.step)
        last: dict[str, float] = {}
        status = "failed"
        try:
            while c.step < cfg.trainer.max_steps and self.stop_signal is None:
                last = self.train_step()
                step, epoch = c.step, self.position.epoch
                if step % cfg.trainer.log_every_n_steps == 0:
                    history.write({"kind": "train", "step": step, "epoch": epoch, **last, "time": time.time()})
                val_loss, improved = None, False
                if step % cfg.trainer.eval_every_n_steps == 0 or step == cfg.trainer.max_steps:
                    val_loss = self.evaluate()
                    improved = val_loss < c.best_val_loss
                    if improved:
                        c.best_val_loss, c.best_step = val_loss, step
                    history.write(
                        {"kind": "eval", "step": step, "epoch": epoch, "val_loss": val_loss, "time": time.time()}
                    )
                if self.chaos is not None:
                    self.chaos.on_step_end(step)
                if (
                    step % cfg.checkpoint.every_n_steps == 0
                    or step == cfg.trainer.max_steps
                    or (improved and cfg.checkpoint.save_on_best)
                    or self.stop_signal is not None
                ):
                    self.save_checkpoint(val_loss=val_loss, is_best=improved and cfg.checkpoint.save_on_best)
                if self.chaos is not None:
                    self.chaos.after_checkpoint(step)
                latest = self.ckpt.last_saved.name if self.ckpt.last_saved else None
                heartbeat.beat(step=step, epoch=epoch, latest_checkpoint=latest, last_loss=last["loss"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{last['loss']:.4f}", refresh=False)
            self.ckpt.wait()
            status = "finished" if c.step >= cfg.trainer.max_steps else "stopped"
        finally:
            if bar is not None:
                bar.close()
            for s, h in old.items():
                signal.signal(s, h)
            history.close()
            heartbeat.close(status)
        if status == "finished":
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
        log.warning("train.stopped step=%d signal=%s exit=%d", c.step, self.stop_signal, EXIT_PREEMPTED)
        return EXIT_PREEMPTED


def _progress(cfg: DictConfig, initial: int):
    if not cfg.trainer.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(
        total=int(cfg.trainer.max_steps),
        initial=initial,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def truncate_history(run_dir: Path, step: int) -> int:
    """Drop history records after ``step`` (they belong to a timeline that a resume discards)."""
    path = Path(run_dir) / "history.jsonl"
    if not path.exists():
        return 0
    import json

    records = read_history(run_dir)
    kept = [r for r in records if int(r.get("step", 0)) <= step]
    if len(kept) != len(records) or path.read_bytes()[-1:] not in (b"\n", b""):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)
