"""Atomic folder operations of the checkpoint protocol: commit, set aside, remove. Torch-free.

The commit protocol follows Orbax's: write everything into a temporary sibling directory, fsync
every file and the directory, rename it to its final name, fsync the parent. A directory under
a final name is therefore always complete; readers trust only final names and ignore the rest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..fsio import fsync_dir
from .layout import TRASH_PREFIX, set_aside

__all__ = ["commit_dir", "move_aside", "remove_dir_safely"]


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a fully written, fsync'd temporary directory to its final name, durably."""
    fsync_dir(tmp)
    if final.exists():
        # A committed directory is never overwritten in place; keep the old one under another name.
        move_aside(final, "superseded")
    os.rename(tmp, final)
    fsync_dir(final.parent)


def move_aside(path: Path, reason: str) -> Path:
    """Rename a checkpoint folder out of the committed namespace (never delete evidence)."""
    return set_aside(path, reason, event="ckpt.move_aside")


def remove_dir_safely(path: Path) -> None:
    """Delete a committed directory without ever exposing a half-deleted one under its name.

    The directory is first renamed to a trash name (atomic), then removed; a crash in between
    leaves only a trash directory, which the next start cleans up.
    """
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
