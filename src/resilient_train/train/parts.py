"""The small ``Stateful`` parts of a run: counters, data position, per-rank state, EMA, the LR schedule.

Each part has ``state_dict()``/``load_state_dict()`` and nothing else to know: the trainer keeps
them in one mapping, and saving, loading and the required-key check all iterate that mapping.
Loading is fail-loud: a missing or malformed part is a :class:`StateError` naming it, raised while
the checkpoint is loaded, before any training step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..tokenizer.model import eval_copy
from .rng import RNGState

__all__ = [
    "StateError",
    "TrainCounters",
    "DataPosition",
    "RankState",
    "EMA",
    "optimizer_and_schedule",
    "warmup_cosine",
    "apply_hyperparameters",
]

log = logging.getLogger(__name__)


class StateError(ValueError):
    """A checkpoint's state is incomplete or malformed; the message names the part."""


def _need(state: Any, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise StateError(f"checkpoint lacks {where}/{missing}; cannot resume exactly")


class TrainCounters:
    """Optimizer steps done, samples seen, and the best validation loss so far."""

    KEYS = ("step", "samples_seen", "best_val_loss", "best_step")

    def __init__(self) -> None:
        self.step = 0
        self.samples_seen = 0
        self.best_val_loss = math.inf
        self.best_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _need(state, self.KEYS, "trainer")
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
        _need(state, ("epoch", "batch_in_epoch"), "data")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


class RankState:
    """The state each rank owns (its RNG streams and data position), saved under ``ranks/<rank>``.

    The RNG state is validated when loaded and applied later, by :meth:`apply_pending_rng`, right
    before the first batch: building the data loader must not disturb the generators it restores.
    """

    def __init__(self, rank: int, position: DataPosition, cuda_devices: list[int] | None = None) -> None:
        self.rank = rank
        self.position = position
        self.rng = RNGState(cuda_devices)
        self.pending_rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {str(self.rank): {"rng": self.rng.state_dict(), "data": self.position.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        key = str(self.rank)
        if not isinstance(state, dict) or not isinstance(state.get(key), dict):
            raise StateError(f"checkpoint lacks ranks/{key}; cannot resume exactly")
        mine = state[key]
        _need(mine, ("rng", "data"), f"ranks/{key}")
        self.rng.check(mine["rng"])
        self.position.load_state_dict(mine["data"])
        self.pending_rng = mine["rng"]

    def apply_pending_rng(self) -> None:
        if self.pending_rng is not None:
            self.rng.load_state_dict(self.pending_rng)
            self.pending_rng = None


class EMA:
    """Exponential moving average of the generator (the discriminator is not averaged).

    With ``warmup`` the decay of update ``n`` (``n = step // update_every``, 0-based) is
    ``min(decay, (1 + n) / (10 + n))`` (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``): the
    first update keeps 10% of the initial weights, and the average spans about the last tenth of the steps
    until the ramp meets ``decay`` (update 8991 at 0.999). Without it the initial random weights keep a share
    of ``decay ** n`` (37% after 1000 steps at 0.999), so what is evaluated, called best and exported measures
    them for thousands of steps. The decay is a function of the step alone, so resuming needs no state beyond
    the averaged weights and the trainer's step.
    """

    def __init__(self, model: torch.nn.Module, decay: float, update_every: int = 1, warmup: bool = True) -> None:
        self.decay = decay
        self.update_every = update_every
        self.warmup = warmup
        self.model = eval_copy(model)  # on the model's device; the model stays where it is
        self.model.requires_grad_(False)
        src = model.state_dict()
        self._pairs = [(t, src[k]) for k, t in self.model.state_dict().items()]

    def decay_at(self, step: int) -> float:
        """The decay of the update at ``step`` (the trainer's step before it is counted)."""
        n = step // self.update_every
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.update_every:
            return
        weight = 1.0 - self.decay_at(step)
        for ema_t, src in self._pairs:
            if ema_t.is_floating_point():
                ema_t.lerp_(src, weight)
            else:
                ema_t.copy_(src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)


def optimizer_and_schedule(params: Any, o: Any, lr: float) -> tuple[torch.optim.AdamW, Any]:
    """AdamW over ``params`` at base LR ``lr`` (``o``: the optimizer config) and its warmup + cosine schedule."""
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(o.warmup_steps, o.schedule_steps, o.min_lr_ratio))


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


def apply_hyperparameters(opt: Any, sched: Any, *, lr: float, betas: Any, weight_decay: float) -> None:
    """Make loaded optimizer and scheduler state use the config's LR, betas and weight decay.

    The loaded state carries the saved run's hyperparameters. Without a config change they are
    equal and nothing is touched; a change accepted with ``resume.allow_config_change`` must take
    effect, not merely be recorded in the manifest while training goes on with the old values.
    """
    betas = tuple(betas)
    for i, (group, mult) in enumerate(zip(opt.param_groups, sched.lr_lambdas)):
        if sched.base_lrs[i] != lr:
            sched.base_lrs[i] = lr
            group["initial_lr"] = lr
            group["lr"] = lr * mult(sched.last_epoch)
            sched._last_lr[i] = group["lr"]
        if tuple(group["betas"]) != betas:
            group["betas"] = betas
        if group["weight_decay"] != weight_decay:
            group["weight_decay"] = weight_decay
