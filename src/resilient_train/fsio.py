"""Durable files, without torch: fsync of a file and of its folder, and atomic replacement.

The one implementation used by the checkpoint manager, the monitor (heartbeat, history, plots),
the CLI (``config.yaml``), the chaos orchestrator's reports and the bench. The protocol is the
classic one (and Orbax's for whole folders, see :mod:`resilient_train.checkpoint.atomic`): write a
temporary sibling, fsync it, ``rename`` it over the final name, fsync the folder. A reader sees
the old file or the new one, never a mix; a crash leaves at most a temporary whose name starts
with :data:`TMP_PREFIX`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["TMP_PREFIX", "fsync_dir", "write_durable", "atomic_write", "temp_name"]

#: Every temporary this package writes starts with this; readers ignore such names.
TMP_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike, data: bytes | memoryview, *, exclusive: bool = True) -> None:
    """Write ``data`` to ``path`` and fsync it before returning; ``exclusive`` refuses an existing file."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A temporary sibling of ``path`` no other process or thread uses."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}")


def atomic_write(path: str | os.PathLike, data: bytes | str, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) so that readers never see a partial file.

    ``durable=False`` skips both fsyncs (still atomic, not crash-proof): for files that are cheap
    to make again, such as plots.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = temp_name(path)
    try:
        if durable:
            write_durable(tmp, data, exclusive=False)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
