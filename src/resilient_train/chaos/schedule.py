"""The fault schedule, the events it records and the damage it does; torch-free (the orchestrator uses it).

The schedule is a pure function of ``chaos.seed``, the event kind and the step (and, for kills
inside a save, the save phase), so a failure can be replayed; each kind and step has its own
seeded draw, so adding a kind moves no other kind's events. With ``checkpoint.remote`` half the
kills inside a save (a draw of their own) strike the upload instead (``uploading``: files on the
store, manifest not yet); the others, and every kill without a store, keep the save phase they
always had. With ranks it also picks the victim rank of
each event: a kill before the rename may strike any rank; a kill at ``before_rename``,
``after_rename`` or ``uploading`` strikes rank 0, the committer and uploader. Each event is
appended to ``chaos_events.jsonl`` (``chaos_events.rank<r>.jsonl`` with ranks) in the events
folder (``chaos.events_dir``, by default the run directory) before it is carried out.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

from ..checkpoint.layout import SAVE_PHASES, UPLOAD_PHASE
from ..config.chaos import EVENT_KINDS

__all__ = [
    "ChaosSchedule",
    "EVENT_KINDS",
    "EVENTS_FILE",
    "events_file",
    "read_events",
    "save_phase",
    "corrupt_checkpoint",
]

EVENTS_FILE = "chaos_events.jsonl"
#: Save phases only rank 0 (the committer, and the uploader) reaches.
COMMITTER_PHASES = ("before_rename", "after_rename", UPLOAD_PHASE)
#: With ``checkpoint.remote``: the share of save kills that strike the upload instead of the save.
UPLOAD_KILL_SHARE = 0.5
#: Where an ``io_error`` strikes a save: a write call, before the rename (a failure after it is no failure).
IO_ERROR_PHASES = ("files_partial", "files_written", "before_rename")
#: The errors a failing disk gives (``errno`` names).
IO_ERRORS = ("EIO", "ENOSPC")


def _rng(seed: int, kind: str, step: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{kind}:{step}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def save_phase(seed: int, step: int, remote: bool = False) -> str:
    """The stage at which a ``save_kill`` at ``step`` strikes.

    With a store (``remote``) a draw of its own sends :data:`UPLOAD_KILL_SHARE` of the save kills to the
    upload; every other one keeps the phase it has without a store.
    """
    if remote and _rng(seed, "upload_phase", step).random() < UPLOAD_KILL_SHARE:
        return UPLOAD_PHASE
    return _rng(seed, "save_phase", step).choice(SAVE_PHASES)


class ChaosSchedule:
    """Which events the schedule holds at a step: a pure function of (seed, kind, step).

    ``remote``: the run uploads to an object store (``checkpoint.remote``), so a save kill may strike
    the upload too.
    """

    def __init__(self, cfg: Any, remote: bool = False) -> None:
        self.seed = int(cfg.seed)
        self.remote = remote
        self.rates = {k: float(getattr(cfg, f"{k}_rate")) for k in EVENT_KINDS}
        self.steps = {k: {int(s) for s in getattr(cfg, f"{k}_steps")} for k in EVENT_KINDS}

    def fires(self, kind: str, step: int) -> bool:
        return step in self.steps[kind] or _rng(self.seed, kind, step).random() < self.rates[kind]

    def save_phase(self, step: int) -> str:
        """The save stage at which a ``save_kill`` at ``step`` strikes."""
        return save_phase(self.seed, step, self.remote)

    def io_error(self, step: int) -> tuple[str, str]:
        """Where and how the save at ``step`` fails: a phase of :data:`IO_ERROR_PHASES`, an errno name."""
        rng = _rng(self.seed, "io_error_phase", step)
        return rng.choice(IO_ERROR_PHASES), rng.choice(IO_ERRORS)

    def bitflip(self, step: int) -> tuple[int, int, int]:
        """Which bit flips at ``step``: (parameter draw, element draw, bit of the float32 mantissa, 0-22).

        The draws are reduced modulo the parameter count and its size by the agent. A mantissa bit keeps
        the value finite: the flip is silent, as silent data corruption is."""
        rng = _rng(self.seed, "bitflip_where", step)
        return rng.randrange(2**31), rng.randrange(2**31), rng.randrange(23)

    def corruption(self, step: int) -> str:
        return _rng(self.seed, "corruption", step).choice(("flip_byte", "truncate"))

    def victim(self, kind: str, step: int, world_size: int) -> int:
        """The rank an event strikes (always 0 with one rank; the committer for the late save phases)."""
        if world_size <= 1 or (kind == "save_kill" and self.save_phase(step) in COMMITTER_PHASES):
            return 0
        if kind == "io_error" and self.io_error(step)[0] in COMMITTER_PHASES:
            return 0
        return _rng(self.seed, f"victim:{kind}", step).randrange(world_size)

    def events(self, max_step: int) -> list[dict[str, Any]]:
        """The whole schedule up to ``max_step`` (for reports and reproducibility tests)."""
        out = []
        for step in range(1, max_step + 1):
            for kind in EVENT_KINDS:
                if self.fires(kind, step):
                    ev = {"kind": kind, "step": step}
                    if kind == "save_kill":
                        ev["phase"] = self.save_phase(step)
                    if kind == "io_error":
                        ev["phase"], ev["errno"] = self.io_error(step)
                    out.append(ev)
        return out


def events_file(rank: int, world_size: int) -> str:
    return EVENTS_FILE if world_size <= 1 else f"chaos_events.rank{rank}.jsonl"


def read_events(events_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event recorded in the events folder (``chaos_events.jsonl`` and every rank's file), in time order."""
    out = []
    for path in sorted(Path(events_dir).glob("chaos_events*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by the kill it announced
    return sorted(out, key=lambda e: e.get("time", 0))


def corrupt_checkpoint(ckpt: Path, how: str, seed: int = 0, rank: int | None = None) -> str:
    """Damage one data file of ``ckpt`` (with ``rank``: of that rank's own files) as a failing disk would:
    flip a byte or truncate it."""
    where = ckpt if rank is None else ckpt / "ranks" / str(rank)
    files = sorted(p for p in where.iterdir() if p.name.endswith(".safetensors"))
    rng = random.Random(seed)
    target = files[rng.randrange(len(files))]
    data = bytearray(target.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        i = rng.randrange(len(data))
        data[i] ^= 0xFF
    with open(target, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return str(target.relative_to(ckpt))
