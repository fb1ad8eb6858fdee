"""The ``checkpoint`` and ``resume`` sections: when and where checkpoints are kept, what a resume may change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..checkpoint.store import SCHEMES
from .values import AtLeast, Get, Need, RealRange


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    # Keep the K newest committed checkpoints plus the best; 0 keeps all.
    keep_last: int = 3
    async_save: bool = False
    save_on_best: bool = True
    # An object store every committed checkpoint is also uploaded to (s3://bucket/prefix, gs://, az://, file://);
    # credentials and endpoint from the environment (AWS_*), the rest in remote_options (obstore's store options).
    remote: str | None = None
    remote_options: dict[str, Any] = field(default_factory=dict)
    # On SIGTERM and at the end: how long to wait for the last checkpoint to reach the store.
    upload_timeout_secs: float = 300.0
    # A save that fails on the file system (EIO, ENOSPC): "continue" logs it and saves again at the next
    # interval (the run's last save is retried at once); "stop" ends the run with exit 1.
    on_save_error: str = "continue"
    # The weights "best" is chosen on and `export` writes by default: "ema" (the model's own when EMA is off)
    # or "model". Both are evaluated; the other's metrics are logged with its name as a prefix (model_psnr).
    best_of: str = "ema"


@dataclass
class ResumeConfig:
    allow_config_change: bool = False
    # Resume on a different number of ranks: exact weights and optimizer state, the data position
    # converted through samples consumed, fresh per-rank RNG streams (no bitwise continuity; recorded).
    allow_world_size_change: bool = False


# ----------------------------------------------------------------------------------------------
# validation: integer floors only (resume's keys are booleans, free)

AT_LEAST: tuple[AtLeast, ...] = (
    AtLeast("checkpoint.every_n_steps", 1),
    AtLeast("checkpoint.keep_last", 0, " (0 keeps every checkpoint)"),
)

REAL_RANGES: tuple[RealRange, ...] = (
    RealRange("checkpoint.upload_timeout_secs", 0, True, float("inf"), False, "must be a finite number >= 0"),
)


def check_checkpoint(get: Get, need: Need) -> None:
    """``checkpoint.remote`` names a store by a scheme it can open, with a bucket (or a path)."""
    remote = get("checkpoint.remote")
    ok = remote is None or (
        isinstance(remote, str) and remote.startswith(SCHEMES) and len(remote.split("://", 1)[1].strip("/")) > 0
    )
    need(ok, "checkpoint.remote", remote, f"must be null or a URL starting with one of {list(SCHEMES)}")
    policy = get("checkpoint.on_save_error")
    need(policy in ("continue", "stop"), "checkpoint.on_save_error", policy, "must be 'continue' or 'stop'")
    best_of = get("checkpoint.best_of")
    need(best_of in ("ema", "model"), "checkpoint.best_of", best_of, "must be 'ema' or 'model'")
