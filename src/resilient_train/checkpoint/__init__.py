"""Durable, verifiable checkpoints. Knows nothing of the model being trained.

Importing this package does not import torch: the layout (:mod:`.layout`) and the folder
operations (:mod:`.atomic`) are torch-free, so ``status`` and the chaos orchestrator can use
them; the names below that need torch are imported from their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .atomic import commit_dir, move_aside, remove_dir_safely
from .layout import (
    BEST_POINTER,
    MANIFEST,
    SAVE_PHASES,
    committed,
    is_checkpoint_dir,
    parse_step,
    read_best,
    step_dir_name,
)

# name -> submodule, for the names whose module imports torch (or may, later).
_LAZY = {
    "FORMAT_VERSION": "manifest",
    "CheckpointError": "manifest",
    "Loaded": "files",
    "VerifyReport": "files",
    "load_checkpoint": "files",
    "read_manifest": "manifest",
    "verify_files": "files",
    "verify_content": "files",
    "newest_valid": "files",
    "CheckpointManager": "manager",
    "compare_checkpoints": "compare",
    "compare_states": "compare",
}

__all__ = [
    "BEST_POINTER",
    "MANIFEST",
    "SAVE_PHASES",
    "commit_dir",
    "committed",
    "is_checkpoint_dir",
    "move_aside",
    "parse_step",
    "read_best",
    "remove_dir_safely",
    "step_dir_name",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
