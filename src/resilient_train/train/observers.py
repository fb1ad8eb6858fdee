"""Step observers: what watches the loop without steering it (history, heartbeat, progress bar, chaos).

``Trainer.fit`` calls every observer at the same points, in order:

* ``on_start(trainer)`` once, after any restore, before the first step;
* ``on_step(trainer, record)`` after each optimizer step (and its evaluation, if any), before the
  step's checkpoint: ``record`` holds ``step``, ``epoch``, the train metrics, ``time`` (when the
  optimizer step ended) and ``val_loss`` (``None`` when the step did not evaluate);
* ``on_saved(trainer, record)`` with the same record, after the step's checkpoint decision (whether
  or not it saved);
* ``on_end(trainer, status)`` once, with ``finished``, ``stopped`` or ``failed``, also on an error;
* ``on_backward(trainer, step, values)`` inside step ``step``, after the generator's backward pass and
  before the finite-value guard, which then checks ``values`` (the step's loss; only chaos acts here);
* ``on_rollback(trainer, record)`` after an in-process rollback (:mod:`.recovery`) restored the state
  of ``record["step"]``: the history is cut back to it and gets the ``rollback`` record.

An observer never changes training state, so the bits of a run do not depend on which are attached
(chaos, the one exception, injects its faults through these hooks).

With ranks, rank 0 writes the run's files (``history.jsonl``, ``heartbeat.json``, the progress bar);
every rank writes ``ranks/<r>/heartbeat.json`` (pid, step, restart count) so that ``status`` and the
orchestrator can see each rank, and ranks other than 0 log their own losses to
``ranks/<r>/history.jsonl`` (the losses before the gradient exchange differ per rank).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from .. import startup
from ..monitor import Heartbeat, HistoryWriter, rank_dir, truncate_history, write_side_file

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)

__all__ = [
    "Observer",
    "HistoryObserver",
    "HeartbeatObserver",
    "RankHeartbeatObserver",
    "ProgressObserver",
]


class Observer:
    """Base class: every hook does nothing."""

    def on_start(self, trainer: Trainer) -> None:
        pass

    def on_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_saved(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_end(self, trainer: Trainer, status: str) -> None:
        pass

    def on_backward(self, trainer: Trainer, step: int, values: dict[str, float]) -> None:
        pass

    def on_rollback(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass


class HistoryObserver(Observer):
    """Appends train records (every ``log_every_n_steps``) and eval records to ``history.jsonl``; logs
    ``train.first_step step=N`` when the first step after a start or a rollback is done (the chaos report
    measures recovery to it)."""

    TRAIN_KEYS = ("loss", "recon_loss", "discr_loss", "grad_norm", "lr")

    def __init__(self, every: int, rank: int = 0) -> None:
        self.every = every
        self.rank = rank
        self.writer: HistoryWriter | None = None
        self.first = True

    def _dir(self, trainer: Trainer) -> Any:
        return rank_dir(trainer.run_dir, self.rank) if self.rank else trainer.run_dir

    def on_start(self, trainer: Trainer) -> None:
        self.writer = HistoryWriter(self._dir(trainer))
        startup.mark("setup")

    def on_rollback(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """The replayed steps are logged again: the records after the restored step go, the rollback is kept."""
        self.writer.close()
        truncate_history(self._dir(trainer), record["step"])
        self.writer = HistoryWriter(self._dir(trainer))
        self.writer.write(record)
        self.first = True

    def on_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        step, epoch = record["step"], record["epoch"]
        if self.first:
            log.info("train.first_step step=%d rank=%d", step, self.rank)
            self.first = False
            startup.mark("first_step", at=record["time"])  # when the step ended, before any evaluation
            startup.report()  # once per process: not after a rollback
        if step % self.every == 0:  # stamped when the step ended, before any evaluation
            metrics = {k: record[k] for k in self.TRAIN_KEYS} | {
                k: record[k] for k in ("scale", "skipped") if k in record
            }
            self.writer.write({"kind": "train", "step": step, "epoch": epoch, **metrics, "time": record["time"]})
        if record["val_loss"] is not None:  # val_loss, reconstruction and codebook metrics (.metrics)
            metrics = {"val_loss": record["val_loss"], **trainer.last_eval}
            self.writer.write({"kind": "eval", "step": step, "epoch": epoch, **metrics, "time": time.time()})

    def on_end(self, trainer: Trainer, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class HeartbeatObserver(Observer):
    """Keeps ``heartbeat.json`` fresh so that ``status`` can tell a live run from a dead one."""

    def __init__(self, interval_secs: float, max_steps: int) -> None:
        self.interval_secs, self.max_steps = interval_secs, max_steps
        self.heartbeat: Heartbeat | None = None

    def on_start(self, trainer: Trainer) -> None:
        """Write the first heartbeat now (``running``, at the resumed step and epoch), not after the first step:
        whatever ``heartbeat.json`` held (a previous run's final beat, damage) is replaced once a start is
        accepted, and ``status`` sees this process during a slow first step."""
        self.heartbeat = Heartbeat(trainer.run_dir, interval_secs=self.interval_secs, max_steps=self.max_steps)
        latest = trainer.ckpt.last_saved.name if trainer.ckpt.last_saved else None
        self.heartbeat.beat(
            step=trainer.counters.step,
            epoch=trainer.position.epoch,
            latest_checkpoint=latest,
            last_loss=None,
            force=True,
        )

    def on_saved(self, trainer: Trainer, record: dict[str, Any]) -> None:
        latest = trainer.ckpt.last_saved.name if trainer.ckpt.last_saved else None
        self.heartbeat.beat(
            step=record["step"],
            epoch=record["epoch"],
            latest_checkpoint=latest,
            last_loss=record["loss"],
            upload=trainer.ckpt.upload_status(),
            faults=trainer.recovery.status(),
        )

    def on_rollback(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.on_saved(trainer, {"step": record["step"], "epoch": trainer.position.epoch, "loss": None})

    def on_end(self, trainer: Trainer, status: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close(status, upload=trainer.ckpt.upload_status(), faults=trainer.recovery.status())


class RankHeartbeatObserver(Observer):
    """``RUN/ranks/<r>/heartbeat.json``: this rank's pid, step, torchrun restart count and status."""

    def __init__(self, interval_secs: float, rank: int, restart: int) -> None:
        self.interval_secs, self.rank, self.restart = interval_secs, rank, restart
        self._last = 0.0

    def _write(self, trainer: Trainer, status: str) -> None:
        record = {
            "rank": self.rank,
            "pid": os.getpid(),
            "step": trainer.counters.step,
            "restart": self.restart,
            "status": status,
            "time": time.time(),
        }
        path = rank_dir(trainer.run_dir, self.rank) / "heartbeat.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_side_file(path, json.dumps(record) + "\n")
        self._last = time.monotonic()

    def on_start(self, trainer: Trainer) -> None:
        self._write(trainer, "running")

    def on_saved(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if time.monotonic() - self._last >= self.interval_secs:
            self._write(trainer, "running")

    def on_end(self, trainer: Trainer, status: str) -> None:
        self._write(trainer, status)


class ProgressObserver(Observer):
    """A tqdm bar on stderr."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.bar: Any = None

    def on_start(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.max_steps,
            initial=trainer.counters.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def on_rollback(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.bar.reset(total=self.max_steps)
        self.bar.update(record["step"])

    def on_saved(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.4f}", refresh=False)

    def on_end(self, trainer: Trainer, status: str) -> None:
        if self.bar is not None:
            self.bar.close()
