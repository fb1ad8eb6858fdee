"""Durable, verifiable checkpoints. Knows nothing of the model being trained."""

from .atomic import atomic_write_bytes, commit_dir, fsync_dir, move_aside
from .format import (
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    VerifyReport,
    load_checkpoint,
    read_manifest,
    verify_files,
)
from .manager import BEST_POINTER, SAVE_PHASES, CheckpointManager, parse_step, step_dir_name

__all__ = [
    "BEST_POINTER",
    "FORMAT_VERSION",
    "MANIFEST",
    "SAVE_PHASES",
    "CheckpointError",
    "CheckpointManager",
    "VerifyReport",
    "atomic_write_bytes",
    "commit_dir",
    "fsync_dir",
    "load_checkpoint",
    "move_aside",
    "parse_step",
    "read_manifest",
    "step_dir_name",
    "verify_files",
]
