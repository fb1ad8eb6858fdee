"""Mixed precision: autocast for the forward passes and losses, and the fp16 gradient scalers as resumable state.

``trainer.precision``:

* ``32`` (default): float32 throughout, no autocast;
* ``bf16-mixed``: the forward passes and losses of the generator and the discriminator (the gradient
  penalty included) under ``torch.autocast(device, torch.bfloat16)``; weights, gradients and optimizer
  state stay float32; no scaler (bfloat16 has float32's range);
* ``16-mixed``: the same with float16, and one :class:`torch.amp.GradScaler` per optimizer (the
  generator's and the discriminator's losses overflow at different scales: a shared scaler would let
  one's overflow skip the other's step). Their state (scale, growth tracker) and the count of steps
  each skipped because of inf/NaN gradients are the ``scaler`` part of every checkpoint, restored
  exactly: a resume that started the scaler afresh would train differently for hundreds of steps.

Invariants: the dtypes and the autocast context are :mod:`..tokenizer.autocast`'s (the tools run in
the same precisions); with ``32`` every method is a no-op, so the float32 bits are what they were
before this module existed. A precision the device cannot run is refused by :func:`check_precision`
before the model is built.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from ..tokenizer.autocast import PRECISIONS, autocast, check_precision

__all__ = ["PRECISIONS", "Precision", "check_precision", "fresh_parts", "scaler_problem"]

#: The optimizers that have a scaler in ``16-mixed``.
SCALED = ("gen", "discr")


class Precision:
    """Autocast and the gradient scalers of one run; ``Stateful`` (the checkpoint's ``scaler`` part) in ``16-mixed``."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.name = precision
        self.dtype = PRECISIONS[precision]
        self.device = device
        scaled = precision == "16-mixed"
        self.scalers = {k: torch.amp.GradScaler(device.type) for k in SCALED} if scaled else {}
        self.skipped = dict.fromkeys(SCALED, 0)

    @property
    def scaled(self) -> bool:
        return bool(self.scalers)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with autocast(self.name, self.device):
            yield

    def backward(self, loss: torch.Tensor, which: str) -> None:
        (self.scalers[which].scale(loss) if self.scaled else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer, which: str) -> None:
        """Before clipping: the gradients in their true units."""
        if self.scaled:
            self.scalers[which].unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, which: str) -> bool:
        """Step ``optimizer`` (the scaler skips it on inf/NaN gradients, and lowers its scale); whether it stepped."""
        if not self.scaled:
            optimizer.step()
            return True
        scaler = self.scalers[which]
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = not scaler.get_scale() < before  # a skipped step always halves the scale
        self.skipped[which] += 0 if stepped else 1
        return stepped

    # -- Stateful ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"precision": self.name, "skipped": dict(self.skipped)} | {
            k: s.state_dict() for k, s in self.scalers.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        problem = scaler_problem(state)
        if problem is not None:
            from .parts import StateError  # lazily: the checks import this module without the model

            raise StateError(f"checkpoint's scaler {problem}; cannot resume exactly")
        # New scalers: one left by a fault between unscale_() and update() (a rollback) would refuse the next step.
        self.scalers = {k: torch.amp.GradScaler(self.device.type) for k in self.scalers}
        for k, s in self.scalers.items():
            s.load_state_dict(dict(state[k]))
        self.skipped = {k: int(state["skipped"][k]) for k in SCALED}


def fresh_parts(state: dict[str, Any]) -> tuple[str, ...]:
    """Parts a checkpoint may lack: the fp16 scalers when it was written in another precision (an allowed change)."""
    config = state.get("config")
    saved = config.get("trainer", {}).get("precision") if isinstance(config, dict) else None
    return ("scaler",) if saved != "16-mixed" else ()


def scaler_problem(state: Any) -> str | None:
    """What is wrong with a saved ``scaler`` part (``None``: it can be restored)."""
    if not isinstance(state, dict):
        return "is not a mapping"
    skipped = state.get("skipped")
    if not isinstance(skipped, dict) or not all(
        isinstance(skipped.get(k), int) and not isinstance(skipped.get(k), bool) and skipped[k] >= 0 for k in SCALED
    ):
        return f"skipped={skipped!r} is not a count per optimizer {list(SCALED)}"
    for k in SCALED:
        s = state.get(k)
        if not isinstance(s, dict):
            return f"{k} is absent"
        scale, tracker = s.get("scale"), s.get("_growth_tracker")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            return f"{k}.scale={scale!r} is not a finite number > 0"
        if not isinstance(tracker, int) or isinstance(tracker, bool) or tracker < 0:
            return f"{k}._growth_tracker={tracker!r} is not an integer >= 0"
    return None
