"""One writer per run directory, and a start's log held back until the start is accepted.

A start is a transaction: :class:`RunLock` is taken first, and :class:`PendingLog` keeps the
records of a start in memory so that a refused start writes no ``train.log``.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from .target import StartupError

__all__ = ["RunLock", "PendingLog"]


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``.

    The kernel drops the lock when its holder dies, so a lock left by a dead (even SIGKILLed)
    process is simply taken over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StartupError(
                f"cannot create the run lock {self.path}: {exc}; choose a writable hydra.run.dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()[:20] or "unknown"
            os.close(fd)
            raise StartupError(
                f"run directory {self.path.parent} is in use by another training process (pid {holder}); "
                "wait for it to exit or choose another hydra.run.dir"
            ) from None
        except OSError as exc:  # a filesystem without locks (some NFS mounts): one writer cannot be ensured
            os.close(fd)
            raise StartupError(
                f"cannot lock {self.path}: {exc}. This filesystem does not support flock, so two trainers could "
                "write the same run; put hydra.run.dir on a filesystem with locking (local disk, or NFS with "
                "lock support)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class PendingLog(logging.Handler):
    """The log file of a start (``train.log``): records are held in memory until the start is
    accepted, then written to the file, which stays open; a refused start writes no file."""

    def __init__(self, filename: str) -> None:
        super().__init__()
        self.filename = filename
        self.held: list[logging.LogRecord] | None = []
        self.file: logging.FileHandler | None = None
        self.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))

    def open(self, path: Path) -> None:
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(self.formatter)
        for record in self.held or []:
            self.file.handle(record)
        self.held = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.handle(record)
        elif self.held is not None and len(self.held) < 10000:
            self.held.append(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()
