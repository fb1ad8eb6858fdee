"""Where checkpoints live in a run directory, and how to recognise them. Torch-free.

::

    RUN/checkpoints/step_00000120/manifest.json   a committed checkpoint (the manifest is written last)
    RUN/checkpoints/best.json                     {"step", "path", "val_loss"}: the best checkpoint
    RUN/checkpoints/.tmp-*  .trash-*              leftovers of an interrupted save or delete

The manager, the CLI, ``verify``, ``status`` and the chaos orchestrator all read the layout
through this module, so that none of them needs torch to find a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ..fsio import TMP_PREFIX

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST",
    "BEST_POINTER",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "SAVE_PHASES",
    "step_dir_name",
    "parse_step",
    "committed",
    "is_checkpoint_dir",
    "run_dir_of",
    "checkpoints_under",
    "read_best",
]

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
BEST_POINTER = "best.json"
TRASH_PREFIX = ".trash-"
#: Stages of a save, in order; the manager calls its save hooks (chaos, the tests' hold) at each one.
SAVE_PHASES = ("files_partial", "files_written", "before_rename", "after_rename")
_STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed checkpoint's folder name, ``None`` for any other name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def committed(root: str | os.PathLike) -> list[Path]:
    """Committed checkpoint folders under ``root``, oldest first; temporaries and set-aside ones are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` names one checkpoint (rather than a run directory or a ``checkpoints`` folder)."""
    path = Path(path)
    return (path / MANIFEST).exists() or path.name.startswith("step_")


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run directory holding a checkpoint (``RUN/checkpoints/step_N``), or ``path`` itself."""
    path = Path(path).resolve()
    return path.parent.parent if is_checkpoint_dir(path) else path


def checkpoints_under(path: str | os.PathLike) -> list[Path]:
    """``[path]`` for a checkpoint; every committed checkpoint for a run directory or its ``checkpoints``."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return [path]
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    return committed(root)


def read_best(root: str | os.PathLike) -> dict[str, Any] | None:
    """The best pointer under a ``checkpoints`` folder; ``None`` when absent or unreadable (logged)."""
    path = Path(root) / BEST_POINTER
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ckpt.best_pointer_unreadable path=%s error=%s", path, exc)
        return None
    return best if isinstance(best, dict) else None
