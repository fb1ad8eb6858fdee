"""Chaos mode: the trainer kills, preempts and corrupts itself on a seeded schedule.

Imported by the trainer only when ``chaos.enabled=true``. The schedule is a pure function of
``chaos.seed``, the event kind and the step (and, for kills inside a save, the save phase), so a
failure can be replayed. Each event is appended to ``chaos_events.jsonl`` in the events folder
(``chaos.events_dir``, by default the run directory) and fsync'd *before* it is carried out, and
fires at most once per events folder: a resumed run that replays a step does not die there again.

A node loss (``node_loss``) deletes the whole run directory, then SIGKILLs the trainer: the machine
and its disk are gone, and only the object store (``checkpoint.remote``) keeps the run. Its events
must be kept outside the run directory (``chaos.events_dir``), or the loss would erase its own
record and strike again after every restart; the agent refuses to start otherwise.

With ranks, the schedule also picks the victim rank of each event (a pure function of the seed,
the kind and the step): only the victim kills itself, sends itself SIGTERM, or damages a file (its
own files of the newest checkpoint). A kill before the rename may strike any rank; a kill at
``before_rename``, ``after_rename`` or ``uploading`` strikes rank 0, the committer and uploader.
A node loss with ranks deletes the shared run directory. Each rank appends to its own
``chaos_events.rank<r>.jsonl``; every rank reads all of them, so nothing fires twice after torchrun
restarts the group.

Faults beyond death: a ``hang`` blocks the victim inside the step (an ``Event.wait`` that releases
the GIL, as a process stuck in a collective or a dead file system is) until the watchdog ends it
(exit 124); a ``nan`` puts a NaN into one gradient of the victim after the backward pass (in
``16-mixed`` into the loss the guard checks: there a non-finite gradient is the scaler's overflow),
and the guard rolls back in-process; a ``bitflip`` flips one mantissa bit of one parameter of the
victim after the step (the replica check before the next commit rolls back; with one process
nothing can see it, so explicit bitflip steps are refused there and a bitflip rate is ignored); an
``io_error`` makes the save at that step fail with EIO or ENOSPC at a seeded phase
(``checkpoint.on_save_error`` decides what follows).

Chaos never draws from the process-global RNGs, so it cannot change the bits of training. The
schedule itself is :mod:`.schedule` (torch-free: the orchestrator uses it).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..checkpoint.layout import committed
from ..train.observers import Observer
from .schedule import ChaosSchedule, corrupt_checkpoint, events_file, read_events

__all__ = ["Chaos"]

log = logging.getLogger(__name__)


class Chaos(Observer):
    """The trainer-side agent that carries out the schedule: a step observer and a save hook.

    Also the home of the two seams the tests need, so that no production object has one:
    ``chaos.hold_phase`` parks the checkpoint writer at a save phase (a test then SIGKILLs it
    there), and ``chaos.skip_restore`` is the negative control, which damages the *loaded* state
    before the trainer sees it, so the proof can be shown to fail.
    """

    def __init__(self, cfg: Any, run_dir: Path, group: Any = None, remote: bool = False) -> None:
        """``remote``: the run uploads its checkpoints (``checkpoint.remote``), so save kills may strike the upload."""
        self.schedule = ChaosSchedule(cfg, remote)
        self.run_dir = Path(run_dir)
        self.events_dir = Path(cfg.events_dir) if cfg.events_dir else self.run_dir
        _check_events_dir(self.schedule, self.events_dir, self.run_dir)
        self.rank = group.rank if group is not None else 0
        self.world_size = group.world_size if group is not None else 1
        if self.world_size == 1 and self.schedule.steps["bitflip"]:
            raise ValueError(
                "chaos.bitflip_steps: a bit flip in one process's memory has no replica to be compared with and "
                "would silently change the run; schedule bit flips with ranks (torchrun) only"
            )
        if self.world_size == 1 and self.schedule.rates["bitflip"] > 0:
            log.warning("chaos.bitflip_rate ignored: one process has no replica to detect a bit flip with")
            self.schedule.rates["bitflip"] = 0.0
        self.skip_restore = str(cfg.skip_restore)
        phase, _, step = str(cfg.hold_phase).partition("@")
        self.hold = (phase, int(step) if step else None) if phase else None
        self.fired = {(e.get("kind"), e.get("step")) for e in read_events(self.events_dir)}
        log.info(
            "chaos.enabled seed=%d rates=%s already_fired=%d", self.schedule.seed, self.schedule.rates, len(self.fired)
        )

    def _due(self, kind: str, step: int) -> bool:
        """The event is scheduled, has not fired yet in this run, and strikes this rank."""
        return (
            (kind, step) not in self.fired
            and self.schedule.fires(kind, step)
            and self.schedule.victim(kind, step, self.world_size) == self.rank
        )

    def _record(self, kind: str, step: int, **extra: Any) -> None:
        event = {"kind": kind, "step": step, "time": time.time(), "pid": os.getpid(), **extra}
        if self.world_size > 1:
            event["rank"] = self.rank
        self.events_dir.mkdir(parents=True, exist_ok=True)
        with open(self.events_dir / events_file(self.rank, self.world_size), "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.fired.add((kind, step))
        detail = " ".join(f"{k}={v}" for k, v in extra.items())
        log.warning("chaos.%s step=%d rank=%d %s", kind, step, self.rank, detail)

    @staticmethod
    def _die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # not reached

    def on_resume(self, trainer: Any, state: dict[str, Any]) -> None:
        """Negative control: drop one restored part from the loaded state, so the proof must fail.

        With ranks it strikes the last rank alone: ``rng`` keeps its generators as they are, ``data``
        shifts the clips it reads by one (its position stays right, so the ranks still agree on it).
        """
        if self.skip_restore == "scaler":  # on every rank: it is replicated state, and the replica check would see one
            if "scaler" in state:  # 16-mixed: the gradient scalers start afresh, as a resume that lost them would
                log.warning("chaos.skip_restore=scaler: NOT restoring the gradient scalers (negative control)")
                state["scaler"] = trainer.precision.state_dict()
            return
        if not self.skip_restore or self.rank != self.world_size - 1:
            return
        rank = state.get("ranks", {}).get(str(trainer.rank.rank))
        if not isinstance(rank, dict):
            return  # nothing to drop; the restore reports what is missing
        if self.skip_restore == "data" and self.world_size > 1:
            log.warning(
                "chaos.skip_restore=data: rank %d reads its data slice shifted by one (negative control)", self.rank
            )
            trainer.train_ds = _Shifted(trainer.train_ds)
            return
        if self.skip_restore == "rng":
            log.warning("chaos.skip_restore=rng: NOT restoring RNG state (negative control)")
            rank["rng"] = trainer.rank.rng.state_dict()  # the generators as they are now: nothing restored
        elif self.skip_restore == "data":
            log.warning("chaos.skip_restore=data: NOT restoring the data position (negative control)")
            step = int(state["trainer"]["step"])
            rank["data"] = {"epoch": step * trainer.accum // trainer.batches_per_epoch, "batch_in_epoch": 0}

    def on_step(self, trainer: Any, record: dict[str, Any]) -> None:
        """After the optimizer step, before the step's checkpoint."""
        step = record["step"]
        if self._due("step_kill", step):
            self._record("step_kill", step)
            self._die()
        if self._due("sigterm", step):
            self._record("sigterm", step)
            os.kill(os.getpid(), signal.SIGTERM)  # the graceful path: save, then exit 75
        if self._due("bitflip", step):
            self._bitflip(trainer, step)
        if self._due("hang", step):
            self._record("hang", step)
            threading.Event().wait()  # blocked for good, the GIL released: only the watchdog ends this

    def on_backward(self, trainer: Any, step: int, values: dict[str, float]) -> None:
        """After the generator's backward pass, before the guard: a NaN in one gradient of the victim; in
        ``16-mixed``, where a non-finite gradient is the scaler's overflow to skip, in the loss the guard checks."""
        if not self._due("nan", step):
            return
        if trainer.precision.scaled:
            self._record("nan", step, where="loss")
            values["loss"] = float("nan")
            return
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        self._record("nan", step, where="gradient")
        grads[0].view(-1)[0] = float("nan")

    def _bitflip(self, trainer: Any, step: int) -> None:
        """Flip one mantissa bit of one parameter of this rank's model, in memory."""
        import torch

        params = [p for p in trainer.model.parameters() if p.dtype == torch.float32 and p.numel()]
        which, element, bit = self.schedule.bitflip(step)
        p = params[which % len(params)]
        i = element % p.numel()
        name = next(n for n, q in trainer.model.named_parameters() if q is p)
        self._record("bitflip", step, tensor=name, index=i, bit=bit)
        with torch.no_grad():
            p.data.view(-1)[i : i + 1].view(torch.int32).bitwise_xor_(1 << bit)

    def save_hook(self, phase: str, step: int, where: Path) -> None:
        """Called by the checkpoint manager at each save stage (maybe on the background thread)."""
        if self.hold is not None and self.hold[0] == phase and self.hold[1] in (None, step):
            (where.parent / f".held-{phase}-{step}").write_text(str(where))
            log.warning("ckpt.hold phase=%s step=%d path=%s (chaos.hold_phase)", phase, step, where)
            while True:
                time.sleep(1)
        if self._due("save_kill", step) and self.schedule.save_phase(step) == phase:
            self._record("save_kill", step, phase=phase, path=str(where))
            self._die()
        io_phase, code = self.schedule.io_error(step)
        if io_phase == phase and self._due("io_error", step):
            self._record("io_error", step, phase=phase, errno=code, path=str(where))
            number = getattr(errno, code)
            raise OSError(number, os.strerror(number), str(where))

    def on_saved(self, trainer: Any, record: dict[str, Any]) -> None:
        """After the step's checkpoint (if any): damage the newest committed one, then crash; or lose the node."""
        step = record["step"]
        if self._due("corrupt", step):
            self._corrupt(trainer, step)
        if self._due("node_loss", step):
            self._record("node_loss", step, run_dir=str(self.run_dir))
            shutil.rmtree(self.run_dir, ignore_errors=True)  # the disk goes with the machine
            self._die()

    def _corrupt(self, trainer: Any, step: int) -> None:
        """Damage one file of the newest committed checkpoint, then crash (nothing to damage: nothing happens)."""
        trainer.recovery.wait(trainer.ckpt, step)  # a failed async save is the run's policy's, not a crash
        found = committed(trainer.ckpt.root)
        if not found:
            return
        how = self.schedule.corruption(step)
        target = found[-1]
        self._record("corrupt", step, how=how, path=str(target))
        mine = self.rank if self.world_size > 1 else None  # with ranks: one of the victim's own files
        name = corrupt_checkpoint(target, how, seed=self.schedule.seed + step, rank=mine)
        log.warning("chaos.corrupted path=%s file=%s how=%s", target, name, how)
        self._die()


def _check_events_dir(schedule: ChaosSchedule, events_dir: Path, run_dir: Path) -> None:
    """A node loss deletes the run directory: its events must be recorded outside it."""
    if not (schedule.rates["node_loss"] > 0 or schedule.steps["node_loss"]):
        return
    events, run = events_dir.resolve(), run_dir.resolve()
    if events == run or run in events.parents:
        raise ValueError(
            f"chaos.events_dir={events_dir}: a node loss (chaos.node_loss_*) deletes the run directory {run_dir}; "
            "keep the events in a folder outside it, or they are lost with it and the loss strikes again"
        )


class _Shifted:
    """A dataset whose clip ``i`` is the original's ``i + 1`` (the data negative control with ranks)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[(index + 1) % len(self.dataset)]
