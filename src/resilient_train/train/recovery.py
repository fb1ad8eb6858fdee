"""Recovery without a new process: the in-process rollback and the save-failure policy (see :mod:`.faults`).

:class:`Recovery` is a part the trainer is given; it never imports the trainer. It owns:

* the rollback (:meth:`Recovery.roll_back`): the target is the newest committed checkpoint (rank 0
  chooses, every rank reads its files through :func:`~..checkpoint.load_checkpoint`, every hash
  checked), or, before the first checkpoint, the state the run started from (kept in memory until
  a checkpoint is committed); every part is restored strictly, the data loader is rebuilt at the
  restored position with the restored RNG, and the observers are told (``history.jsonl`` is cut back
  and gets a ``rollback`` record; heartbeat, ``status`` and TensorBoard count it);
* the save policy (:meth:`Recovery.save`): ``checkpoint.on_save_error=continue`` logs
  ``ckpt.save_failed`` and goes on (the next interval saves again); a save that must not be skipped
  (the run's last, a stopping run's) is retried at once; ``stop`` raises the
  :class:`~..checkpoint.manager.SaveError` (exit 1).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import load_checkpoint
from ..checkpoint.manager import SaveError
from .faults import SAVE_RETRIES, Fault, RollbackBudget

if TYPE_CHECKING:
    from .observers import Observer

__all__ = ["Recovery"]

log = logging.getLogger(__name__)


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor cloned into CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class Recovery:
    """Rollbacks and failed saves of one process: what happened (:meth:`status`) and how to recover."""

    def __init__(self, max_rollbacks: int, on_save_error: str) -> None:
        self.budget = RollbackBudget(max_rollbacks)
        self.on_save_error = on_save_error
        self.save_failures = 0
        self.last_save_error: str | None = None
        self.last_rollback: dict[str, Any] | None = None
        self._initial: dict[str, Any] | None = None

    def status(self) -> dict[str, Any]:
        """For the heartbeat and ``status``: rollbacks, failed saves, the latest of each."""
        return {
            "rollbacks": self.budget.total,
            "last_rollback": self.last_rollback,
            "save_failures": self.save_failures,
            "last_save_error": self.last_save_error,
        }

    def keep_initial(self, trainer: Any) -> None:
        """At the first step of a run with no checkpoint: keep the state it starts from, to roll back to (in CPU
        memory, not the GPU's; dropped once a checkpoint is committed)."""
        if trainer.counters.step == 0 and trainer.ckpt.last_saved is None:
            self._initial = _cpu_copy(trainer.state_dict())

    # -- rollback ---------------------------------------------------------------------------------

    def roll_back(self, trainer: Any, fault: Fault, observers: Sequence[Observer]) -> None:
        """Restore the newest committed checkpoint (or the initial state) in this process and tell the observers;
        :class:`~.faults.DivergedError` when the fault's step has no rollback left."""
        t0 = time.perf_counter()
        g = trainer.group
        self.wait(trainer.ckpt, fault.step)  # an async save in flight lands first
        newest = trainer.ckpt.committed()
        target = g.broadcast(str(newest[-1]) if newest and g.is_main else None)
        if target is None and self._initial is None:
            raise RuntimeError(f"{fault}: no checkpoint and no initial state to roll back to")
        n = self.budget.spend(fault, target or "the initial state")
        log.warning(
            "rollback.start step=%d kind=%s attempt=%d/%d to=%s: %s",
            fault.step,
            fault.kind,
            n,
            self.budget.max_per_step,
            target or "initial",
            fault.detail,
        )
        if target is not None:
            loaded = load_checkpoint(Path(target), rank=g.rank if g.distributed else None)
            trainer.restore(loaded)
        else:
            trainer.load_state_dict(copy.deepcopy(self._initial))
        trainer.rewind_data()
        secs = time.perf_counter() - t0
        to_step = trainer.counters.step
        self.last_rollback = {"fault_step": fault.step, "kind": fault.kind, "to_step": to_step, "time": time.time()}
        record = {
            "kind": "rollback",
            "step": to_step,  # a record of the timeline that goes on from here (a later cut keeps it)
            "fault_step": fault.step,
            "fault": fault.kind,
            "detail": fault.detail,
            "attempt": n,
            "to": Path(target).name if target else "initial",
            "secs": round(secs, 4),
            "time": time.time(),
        }
        log.warning(
            "rollback.done step=%d kind=%s to_step=%d path=%s secs=%.3f redo=%d",
            fault.step,
            fault.kind,
            to_step,
            target or "initial",
            secs,
            fault.step - to_step,
        )
        for obs in observers:
            obs.on_rollback(trainer, record)

    # -- failed saves -----------------------------------------------------------------------------

    def save(self, ckpt: Any, save: Callable[[], None], step: int, must: bool) -> bool:
        """Run ``save`` (then wait for it when ``must``); whether it was written or is in flight. A
        :class:`SaveError` (of this save, or of the async one before it) is logged and counted; with ``must``
        the save is retried up to :data:`~.faults.SAVE_RETRIES` times, then raised; with
        ``checkpoint.on_save_error=stop`` it is raised at once."""
        attempts = 1 + (SAVE_RETRIES if must else 0)
        for attempt in range(1, attempts + 1):
            self.wait(ckpt, step)  # an async save's failure belongs to its own step, not to this one
            try:
                save()
                if must:
                    ckpt.wait()
                if ckpt.last_saved is not None:
                    self._initial = None  # a checkpoint exists: roll back to it, not to step 0
                return True
            except SaveError as exc:
                self.note_save_error(step, exc, attempt)
                if self.on_save_error == "stop" or attempt == attempts and must:
                    raise
        return False

    def wait(self, ckpt: Any, step: int) -> None:
        """Wait for the async save in flight; its failure is noted (and raised with ``on_save_error=stop``).
        Everything that waits for a save goes through here, so that ``continue`` holds wherever it surfaces."""
        try:
            ckpt.wait()
        except SaveError as exc:
            self.note_save_error(step, exc)
            if self.on_save_error == "stop":
                raise

    def note_save_error(self, step: int, exc: BaseException, attempt: int = 1) -> None:
        """Count and log a failed save (of ``exc.step`` when it says, else of ``step``)."""
        step = getattr(exc, "step", None) or step
        self.save_failures += 1
        self.last_save_error = f"step {step}: {exc}"
        log.error(
            "ckpt.save_failed step=%d attempt=%d failures=%d policy=%s error=%s",
            step,
            attempt,
            self.save_failures,
            self.on_save_error,
            exc,
        )
