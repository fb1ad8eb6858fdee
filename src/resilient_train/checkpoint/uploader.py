"""Uploads beside the loop: committed checkpoints go to the store in step order, retried until they arrive.

Training never waits for the store. The manager hands over each checkpoint once it is committed
locally; one background thread uploads them oldest first (:func:`.remote.upload`), retrying a
failure with backoff (1 s doubling to 60 s) for as long as the run lives, and then applies the
store's retention (the newest ``keep_last`` plus the best; manifests first). The manager never
purges a local checkpoint before its upload is confirmed (:meth:`Uploader.confirmed`): with a
node-local disk it is the only copy. :meth:`Uploader.status` (the newest step on the store, the
backlog, the last error) goes into the heartbeat and ``status``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .layout import parse_step, read_best
from .remote import purge_remote, remote_checkpoints, upload
from .store import Store, StoreError

__all__ = ["Uploader"]

log = logging.getLogger(__name__)

MAX_BACKOFF_SECS = 60.0


class Uploader:
    """One background thread uploading ``root``'s committed checkpoints to ``store`` in step order."""

    def __init__(
        self,
        store: Store,
        root: Path,
        *,
        keep_last: int = 0,
        phase: Callable[[str, int, Path], None] | None = None,
    ) -> None:
        self.store, self.root, self.keep_last, self.phase = store, Path(root), keep_last, phase
        self._queue: list[Path] = []
        self._confirmed: set[str] = set()
        self._cond = threading.Condition()
        self._busy: Path | None = None
        self.newest: int | None = None
        self.last_error: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ckpt-upload", daemon=True)
        self._thread.start()

    # -- the training thread's side -----------------------------------------------------------

    def adopt(self, names: set[str]) -> None:
        """Checkpoints already committed on the store (found at start): confirmed without an upload."""
        with self._cond:
            self._confirmed |= names
            steps = [parse_step(n) for n in self._confirmed]
            self.newest = max((s for s in steps if s is not None), default=None)

    def submit(self, ckpt: Path) -> None:
        """Upload the committed checkpoint ``ckpt`` (after every one submitted before it)."""
        with self._cond:
            if ckpt.name not in self._confirmed and ckpt not in self._queue:
                self._queue.append(ckpt)
                self._queue.sort(key=lambda p: parse_step(p.name) or 0)
                self._cond.notify_all()

    def confirmed(self, name: str) -> bool:
        """Whether checkpoint ``name`` has reached the store (it may have been purged there since)."""
        with self._cond:
            return name in self._confirmed

    def status(self) -> dict[str, Any]:
        with self._cond:
            backlog = len(self._queue) + (self._busy is not None)
            return {
                "url": self.store.url,
                "newest_step": self.newest,
                "backlog": backlog,
                "last_error": self.last_error,
            }

    def wait(self, timeout: float) -> bool:
        """Block until every submitted checkpoint is on the store, or ``timeout`` seconds: whether it is."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the upload thread ----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                self._busy = self._queue.pop(0)
            ckpt = self._busy
            try:
                if ckpt.is_dir():  # purged meanwhile only if already confirmed; else it is a real loss
                    upload(self.store, ckpt, phase=self.phase)
                    self._after_upload(ckpt)
                backoff = 1.0
            except (StoreError, OSError) as exc:
                self._failed(ckpt, exc, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECS)
            except Exception as exc:  # never let the thread die: the run would silently stop uploading
                self._failed(ckpt, exc, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECS)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _after_upload(self, ckpt: Path) -> None:
        with self._cond:
            self._confirmed.add(ckpt.name)
            step = parse_step(ckpt.name)
            self.newest = step if self.newest is None else max(self.newest, step)
            self.last_error = None
        if self.keep_last > 0:
            try:
                self._retain()
            except StoreError as exc:  # retention is tidying: it is retried after the next upload
                log.warning("ckpt.remote_purge_failed url=%s error=%s", self.store.url, exc)

    def _retain(self) -> None:
        ours = sorted((c for c in remote_checkpoints(self.store) if c.committed), key=lambda c: c.step)
        keep = {c.name for c in ours[-self.keep_last :]}
        best = read_best(self.root)
        if best and best.get("path"):
            keep.add(str(best["path"]))
        purge_remote(self.store, keep)

    def _failed(self, ckpt: Path, exc: BaseException, backoff: float) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        log.warning(
            "ckpt.upload_failed step=%s url=%s retry_in=%.0fs error=%s", ckpt.name, self.store.url, backoff, exc
        )
        with self._cond:
            self._busy = None  # back in the queue: counted once in the backlog while it waits
            if ckpt not in self._queue:
                self._queue.insert(0, ckpt)
            self._cond.wait(backoff)
