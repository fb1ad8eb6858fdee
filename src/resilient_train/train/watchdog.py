"""The hang watchdog: a thread that ends a process whose training stopped making progress.

Invariants:

* progress is a finished step, a save phase passed or a collective returned (:meth:`Watchdog.beat`);
  nothing else resets the clock, so a rank blocked in a collective whose peer froze (SIGSTOP, a dead
  GPU), in a dead file system or in a deadlock is seen, whatever holds it;
* past ``trainer.hang_timeout_secs`` without progress the watchdog writes every thread's stack
  (:mod:`faulthandler`) to ``RUN/hangs/<rank>-<step>.txt``, logs ``watchdog.hang step=… rank=…
  secs=…`` and exits the process with :data:`EXIT_HUNG` (``os._exit``: a hung main thread cannot
  run ``finally`` blocks). ``torchrun --max-restarts``, a job script or the chaos orchestrator then
  restarts the run, which resumes as after any crash; committed checkpoints are untouched (a save
  in flight leaves only its temporary folder);
* a section known to be long and bounded by its own timeout (the end-of-run upload wait) pauses
  the clock (:meth:`Watchdog.paused`); the process's first step (kernels loaded, memory touched,
  loader workers started, on a machine that may be busy) gets :data:`FIRST_STEP_FACTOR` times the
  timeout, as nvidia-resiliency-ext's initial heartbeat timeout does;
* the distributed collective timeout is longer than the watchdog's by :data:`COLLECTIVE_MARGIN_SECS`
  unless set (``trainer.dist_timeout_secs``), so that a peer's hang is reported by the watchdog,
  with stacks, rather than by a collective's error; :func:`collective_timeout` is the one rule, and
  it warns (``dist.timeout_below_watchdog``) when a set one is shorter than the watchdog's.

The thread polls about ten times per timeout (at least every second) and never touches training
state, so it changes no bits.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["Watchdog", "EXIT_HUNG", "HANGS_DIR", "COLLECTIVE_MARGIN_SECS", "FIRST_STEP_FACTOR", "collective_timeout"]

log = logging.getLogger(__name__)

#: The exit code of a process the watchdog ended (as GNU ``timeout``'s): restart it with ``resume_from=auto``.
EXIT_HUNG = 124
#: Where the stacks of a hung process are written, under the run directory.
HANGS_DIR = "hangs"
#: How much longer a collective waits than the watchdog, when ``trainer.dist_timeout_secs`` is not set.
COLLECTIVE_MARGIN_SECS = 30.0
#: Until the process's first step is done, the watchdog waits this many times its timeout.
FIRST_STEP_FACTOR = 3.0


def collective_timeout(hang_timeout_secs: float, dist_timeout_secs: float | None) -> float:
    """How long a collective waits for a peer: ``trainer.dist_timeout_secs`` when set, else the watchdog's
    timeout plus :data:`COLLECTIVE_MARGIN_SECS` (120 s with the watchdog off)."""
    if dist_timeout_secs is not None:
        if 0 < dist_timeout_secs < hang_timeout_secs:
            log.warning(
                "dist.timeout_below_watchdog dist_timeout_secs=%g hang_timeout_secs=%g: a frozen peer ends the group "
                "by a collective's error (exit 1) before the watchdog reports it with stacks (exit 124); set "
                "trainer.dist_timeout_secs=null to let the watchdog speak first",
                dist_timeout_secs,
                hang_timeout_secs,
            )
        return float(dist_timeout_secs)
    return float(hang_timeout_secs) + COLLECTIVE_MARGIN_SECS if hang_timeout_secs > 0 else 120.0


class Watchdog:
    """Exit with :data:`EXIT_HUNG` after ``timeout_secs`` without :meth:`beat`; ``timeout_secs <= 0``: off."""

    def __init__(
        self,
        timeout_secs: float,
        run_dir: Path,
        rank: int,
        step: Callable[[], int],
        *,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.timeout = float(timeout_secs)
        self.run_dir, self.rank, self.step = Path(run_dir), rank, step
        self._exit = exit
        self._last = time.monotonic()
        self._what = "start"
        self._stepped = False
        self._paused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    def beat(self, what: str = "step") -> None:
        """Progress: a step finished, a save phase passed, a collective returned."""
        self._last, self._what = time.monotonic(), what
        self._stepped = self._stepped or what == "step"

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A section bounded by its own timeout: the clock stops inside and restarts after it."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self.beat("resumed")

    def start(self) -> Watchdog:
        if self.enabled and self._thread is None:
            self.beat("start")
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
            log.info("watchdog.start timeout_secs=%g rank=%d", self.timeout, self.rank)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        poll = min(1.0, self.timeout / 10)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if self._paused or idle < self.timeout * (1.0 if self._stepped else FIRST_STEP_FACTOR):
                continue
            self._fire(idle)
            return

    def _fire(self, idle: float) -> None:
        """Write every thread's stack, log the hang, and end the process."""
        step = self.step()
        path = self.run_dir / HANGS_DIR / f"{self.rank}-{step}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"hang at step {step} on rank {self.rank}: no progress for {idle:.1f} s after {self._what}\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                os.fsync(f.fileno())
        except OSError as exc:  # a dead file system may be the hang itself: the log line still goes out
            path = f"(not written: {exc})"
        log.error(
            "watchdog.hang step=%d rank=%d secs=%.1f last=%s stacks=%s exit=%d",
            step,
            self.rank,
            idle,
            self._what,
            path,
            EXIT_HUNG,
        )
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        self._exit(EXIT_HUNG)
