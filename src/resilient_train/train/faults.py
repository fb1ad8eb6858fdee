"""Faults the loop survives without a new process: non-finite values, diverged replicas, failed saves.

Invariants:

* **Agreed before any optimizer step.** :func:`agree_finite` runs on every rank after the backward
  pass and before ``optimizer.step()``: if a loss or a gradient norm is non-finite on *any* rank,
  every rank raises the same :class:`Fault` and nothing is stepped (a rank that stepped alone would
  have left the replicas apart). The discriminator's update is guarded the same way.
* **Replicas equal bit for bit.** :func:`check_replicas` compares a digest of every replicated tensor
  (weights, EMA, optimizer moments, schedules, counters) across ranks before every commit and every
  ``trainer.replica_check_every_n_steps``; a difference is a :class:`Fault` naming the rank and the
  tensor. With one process there is no replica to compare with: a silent bit flip in memory goes
  unseen there (a non-finite one is caught by the guard; one on disk by the checkpoint hashes).
* **A fault rolls back in-process** (:meth:`~.trainer.Trainer.roll_back`): the newest committed
  checkpoint through the same verified load as a resume (every file's hash), RNG and data position
  with it, then the steps are replayed. A transient fault then ends bit-identical to a run without it.
* **Never a loop.** :class:`RollbackBudget` counts the rollbacks of each step; the
  ``trainer.max_rollbacks + 1``-th fault at one step is a real divergence: :class:`DivergedError`,
  exit :data:`EXIT_DIVERGED`, naming the step, the values seen and the checkpoint rolled back to.
* **A failed save is not a failed run** (``checkpoint.on_save_error=continue``, the default): the
  error is logged and counted, no partial checkpoint is left, the next interval saves again; the
  last save of a run and the save of a stopping run are retried at once (:data:`SAVE_RETRIES`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint import tree
from ..dist import Group

__all__ = [
    "Fault",
    "DivergedError",
    "EXIT_DIVERGED",
    "SAVE_RETRIES",
    "RollbackBudget",
    "agree_finite",
    "check_replicas",
    "tensor_digests",
]

log = logging.getLogger(__name__)

#: The exit code of a run stopped by a real divergence (as sysexits' EX_DATAERR): do not just restart it.
EXIT_DIVERGED = 65
#: Extra attempts at once for a save that must not be skipped (the run's last, a stopping run's).
SAVE_RETRIES = 2


@dataclass(eq=False)
class Fault(Exception):
    """A fault every rank agreed on, at optimizer step ``step`` (the step being computed or just done)."""

    kind: str  # "nan" (a non-finite loss or gradient norm) or "replica" (replicas differ)
    step: int
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind} at step {self.step}: {self.detail}"


class DivergedError(RuntimeError):
    """The same fault came back at the same step after ``trainer.max_rollbacks`` rollbacks."""


class RollbackBudget:
    """At most ``max_per_step`` rollbacks for faults at one step; the next one raises :class:`DivergedError`."""

    def __init__(self, max_per_step: int) -> None:
        self.max_per_step = max_per_step
        self.counts: dict[int, int] = {}
        self.total = 0

    def spend(self, fault: Fault, target: str) -> int:
        """Count a rollback for ``fault`` (to ``target``); its number at this step, or raise when none is left."""
        n = self.counts.get(fault.step, 0) + 1
        if n > self.max_per_step:
            again = (
                f"again after {self.max_per_step} rollback(s) to {target}"
                if self.max_per_step
                else f"(trainer.max_rollbacks=0: no rollback to {target} tried)"
            )
            raise DivergedError(
                f"step {fault.step}: {fault.detail} {again} "
                f"(values seen: {fault.values}). Not a transient fault: the run diverges there. The committed "
                "checkpoints are intact; lower optimizer.lr (or optimizer.max_grad_norm), or resume from an "
                "earlier checkpoint with resume_from=PATH and resume.allow_config_change=true"
            )
        self.counts[fault.step] = n
        self.total += 1
        return n


def agree_finite(group: Group, step: int, values: dict[str, float], what: str) -> None:
    """Raise :class:`Fault` on every rank when any rank's ``values`` hold a non-finite number."""
    bad = not all(math.isfinite(v) for v in values.values())
    if not group.any(bad):
        return
    seen = group.all_gather({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    odd = {f"rank {r}": v for r, v in enumerate(seen) if any(isinstance(x, str) for x in v.values())}
    raise Fault("nan", step, f"non-finite {what} on {', '.join(odd)}", odd)


def tensor_digests(state: dict[str, Any]) -> dict[str, str]:
    """A short digest of every tensor of ``state`` (by its flat name) and one of the rest (``"(values)"``)."""
    skeleton, tensors = tree.encode(state)
    out = {"(values)": hashlib.blake2b(repr(sorted(_flat(skeleton))).encode(), digest_size=16).hexdigest()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h = hashlib.blake2b(digest_size=16)
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        out[name] = h.hexdigest()
    return out


def _flat(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flat(v, f"{prefix}{k}/")]
    if isinstance(obj, (list, tuple)):
        return [kv for i, v in enumerate(obj) for kv in _flat(v, f"{prefix}{i}/")]
    return [(prefix, repr(obj))]


def check_replicas(group: Group, step: int, replicated: dict[str, Any]) -> None:
    """Raise :class:`Fault` on every rank when a rank's replicated state differs from the majority's.

    With two ranks there is no majority: rank 0 is taken as the reference, and the message says so.
    """
    if not group.distributed:
        return
    mine = tensor_digests(replicated)
    every = group.all_gather(mine)
    odd: dict[str, list[str]] = {}
    for name in sorted(mine):
        values = [d.get(name) for d in every]
        if len(set(values)) == 1:
            continue
        majority = max(set(values), key=lambda v: (values.count(v), v == values[0]))
        for rank, v in enumerate(values):
            if v != majority:
                odd.setdefault(f"rank {rank}", []).append(name)
    if odd:
        ref = "the other ranks" if group.world_size > 2 else "rank 0 (two ranks: no majority)"
        named = "; ".join(f"{r}: {', '.join(n[:3])}{' ...' if len(n) > 3 else ''}" for r, n in odd.items())
        seen = {r: n[:3] for r, n in odd.items()}
        raise Fault("replica", step, f"replicated state differs from {ref}: {named}", seen)
