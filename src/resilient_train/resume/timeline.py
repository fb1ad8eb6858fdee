"""The run directory made this run's, once a start is accepted: the timeline from the resumed step on.

Checkpoints that failed validation are set aside as corrupt; resuming from an older point forks
the timeline, so this run's later checkpoints are set aside (``resume_from=auto`` cannot pick them)
and history after the step is cut (bad lines go to ``history.rejected.jsonl``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoint import Loaded, committed, move_aside, parse_step
from ..checkpoint.layout import CHECKPOINTS_DIR
from ..monitor import rank_dir, truncate_history

__all__ = ["take_over_timeline"]

log = logging.getLogger(__name__)


def take_over_timeline(run_dir: Path, loaded: Loaded | None, invalid: list[Path] = ()) -> None:
    """Make this run directory's future start at the resumed step (called once the start is accepted).

    Checkpoints that failed validation are set aside as corrupt. Resuming from an older point (of
    this run or another) forks the timeline: later checkpoints here are set aside so that a later
    ``resume_from=auto`` cannot pick them up, and history records after the step are dropped.
    """
    for path in invalid:
        if path.is_dir():
            move_aside(path, "corrupt")
    found = committed(run_dir / CHECKPOINTS_DIR)
    if loaded is None:
        if not found:
            _truncate_histories(run_dir, 0)
        return
    for newer in found:
        if newer.resolve() != loaded.path.resolve() and parse_step(newer.name) > loaded.step:
            move_aside(newer, "superseded")
    dropped = _truncate_histories(run_dir, loaded.step)
    if dropped:
        log.info("resume.history_truncated records=%d after step=%d", dropped, loaded.step)


def _truncate_histories(run_dir: Path, step: int) -> int:
    """Cut ``history.jsonl`` and every rank's ``ranks/<r>/history.jsonl`` back to ``step``."""
    ranks = run_dir / "ranks"
    others = (
        [rank_dir(run_dir, int(p.name)) for p in ranks.iterdir() if p.name.isascii() and p.name.isdigit()]
        if ranks.is_dir()
        else []
    )
    return sum(truncate_history(d, step) for d in [run_dir, *others])
