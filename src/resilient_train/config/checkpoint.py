"""The ``checkpoint`` and ``resume`` sections: when checkpoints are written and kept, what a resume may change."""

from __future__ import annotations

from dataclasses import dataclass

from .values import AtLeast


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    # Keep the K newest committed checkpoints plus the best; 0 keeps all.
    keep_last: int = 3
    async_save: bool = False
    save_on_best: bool = True


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
