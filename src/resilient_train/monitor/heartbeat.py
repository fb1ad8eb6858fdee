"""The heartbeat ``RUN/heartbeat.json``, the atomic write of a run's side files, and ``RUN/ranks/<rank>``.

``RUN/heartbeat.json`` is rewritten atomically by :class:`Heartbeat` every few seconds (and once at the
start, so a damaged one is replaced as soon as a run starts), so a reader
(``python -m resilient_train.status RUN``) can tell a live run from a dead one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..checkpoint.layout import set_aside
from ..fsio import atomic_write

__all__ = ["HEARTBEAT_FILE", "HEARTBEAT_STATUSES", "Heartbeat", "write_side_file", "rank_dir"]

HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_STATUSES = ("running", "finished", "stopped", "failed")


class Heartbeat:
    """Rewrites ``RUN/heartbeat.json`` at most every ``interval_secs`` (unless forced).

    ``beat`` is meant to be called every step: when it does not write it only reads the monotonic clock.
    """

    def __init__(self, run_dir: str | os.PathLike, *, interval_secs: float = 10.0, max_steps: int) -> None:
        if interval_secs < 0:
            raise ValueError(f"interval_secs must be >= 0, got {interval_secs}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / HEARTBEAT_FILE
        self.interval_secs = float(interval_secs)
        self.max_steps = int(max_steps)
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._last_write: float | None = None  # time.monotonic() of the last write
        self._state: dict[str, Any] = {"step": 0, "epoch": 0, "latest_checkpoint": None, "last_loss": None}
        self.closed = False
        self.upload: dict[str, Any] | None = None
        #: Recovery without a new process: rollbacks and failed saves (written when there was one).
        self.faults: dict[str, Any] | None = None
        self._faults_seen: tuple[Any, Any] = (0, 0)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def beat(
        self,
        *,
        step: int,
        epoch: int,
        latest_checkpoint: str | None,
        last_loss: float | None,
        force: bool = False,
        upload: dict[str, Any] | None = None,
        faults: dict[str, Any] | None = None,
    ) -> bool:
        """Record progress; write the file if forced or ``interval_secs`` passed since the last write.
        ``upload``: the object store's side (``newest_step``, ``backlog``, ``last_error``), when there is one."""
        now = time.monotonic()
        self._state = {"step": step, "epoch": epoch, "latest_checkpoint": latest_checkpoint, "last_loss": last_loss}
        self.upload = upload
        if faults is not None:
            self.faults = faults
            force = force or self._faults_seen != (faults.get("rollbacks"), faults.get("save_failures"))
            self._faults_seen = (faults.get("rollbacks"), faults.get("save_failures"))
        if not force and self._last_write is not None and now - self._last_write < self.interval_secs:
            return False
        self._write("running")
        self._last_write = now
        return True

    def close(self, status: str, upload: dict[str, Any] | None = None, faults: dict[str, Any] | None = None) -> None:
        """Write the final heartbeat with ``status`` (``finished``, ``stopped`` or ``failed``)."""
        if upload is not None:
            self.upload = upload
        if faults is not None:
            self.faults = faults
        if status not in HEARTBEAT_STATUSES:
            raise ValueError(f"status must be one of {HEARTBEAT_STATUSES}, got {status!r}")
        self._write(status)
        self._last_write = time.monotonic()
        self.closed = True

    def _write(self, status: str) -> None:
        last_loss = self._state["last_loss"]
        if last_loss is not None:
            last_loss = float(last_loss)
            if not math.isfinite(last_loss):  # keep the file strict JSON
                last_loss = None
        record = {
            "pid": self.pid,
            "host": self.host,
            "step": int(self._state["step"]),
            "epoch": int(self._state["epoch"]),
            "max_steps": self.max_steps,
            "time": time.time(),
            "status": status,
            "latest_checkpoint": self._state["latest_checkpoint"],
            "last_loss": last_loss,
        }
        if self.upload is not None:
            record["upload"] = self.upload
        if self.faults is not None and (self.faults.get("rollbacks") or self.faults.get("save_failures")):
            record["faults"] = self.faults
        write_side_file(self.path, json.dumps(record) + "\n")


def write_side_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Atomically replace a run's side file (a heartbeat) whatever is there: damaged content is simply replaced,
    and a folder under the name (which a file cannot replace) is first set aside, with a warning."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        set_aside(path, "damaged")
    atomic_write(path, data)


def rank_dir(run_dir: str | os.PathLike, rank: int) -> Path:
    """``RUN/ranks/<rank>``: the per-rank side files (heartbeat; history of ranks other than 0)."""
    return Path(run_dir) / "ranks" / str(int(rank))
