"""SIGTERM and SIGINT while training: finish the step, save a checkpoint, exit 75; a second SIGINT exits 130 at once.

Committed checkpoints are safe either way (atomic commit); a temporary folder left by the second
SIGINT is removed at the next start.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

__all__ = ["StopSignals", "EXIT_PREEMPTED", "EXIT_ABORTED"]

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint was committed; resume with resume_from=auto
EXIT_ABORTED = 130  # second SIGINT: left at once, committed checkpoints untouched


class StopSignals:
    """While entered: ``received`` is the first SIGTERM/SIGINT seen (``None`` until then)."""

    def __init__(self, step: Callable[[], int]) -> None:
        self.step = step
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            os.write(2, b"second SIGINT: exiting immediately\n")
            os._exit(EXIT_ABORTED)
        self.received = signum
        log.warning(
            "signal.%s step=%d: finishing the step, saving a checkpoint, then exiting with %d",
            signal.Signals(signum).name,
            self.step(),
            EXIT_PREEMPTED,
        )

    def __enter__(self) -> StopSignals:
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
