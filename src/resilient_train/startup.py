"""Where the seconds of a process start go, from the process's birth to its first trained step: one log line.

A start happens once per process, so the recorder is process-wide: :func:`mark` closes a phase at the moment it
is called (a phase runs from the previous mark); :func:`report` logs every phase once, after the first step::

    resume.timing interpreter=0.03 imports=2.43 config=0.42 model_imports=2.90 read_verify=0.06 data=0.08
        checks=0.00 build=0.05 restore=0.02 setup=0.01 first_step=0.60 total=6.78 path=RUN/checkpoints/step_00000010

(``start.timing`` for a fresh start). The phases, in order: ``interpreter`` (the process's birth to the first
import of this package), ``imports`` (the command line's modules, torch among them), ``config`` (Hydra's
composition), ``model_imports`` (magvit2-pytorch, torchvision and the ``torch._dynamo`` they import), ``read_verify``
(the run lock, choosing the checkpoint, reading it and checking every file's size and hash), ``data`` (the data
index), ``checks`` (the checkpoint against this process), ``build`` (the model, optimizers and loader),
``restore``, ``setup`` (what ``fit`` prepares before the loop: compile, DDP, the rollback copy) and ``first_step``.
A phase a start does not pass through (a fresh start reads no checkpoint) is absent.

The birth comes from ``/proc/self/stat`` (Linux); elsewhere the first phase starts when this module is imported.
"""

from __future__ import annotations

import logging
import os
import time

__all__ = ["mark", "resumed_from", "report", "phases"]

log = logging.getLogger(__name__)


def _birth() -> float:
    """``time.time()`` of the process's birth (Linux), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: ticks since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


_marks: list[tuple[str, float]] = [("born", _birth()), ("interpreter", time.time())]
_reported = False
_context: dict[str, object] = {}


def mark(phase: str, at: float | None = None) -> None:
    """Close ``phase`` now or at ``at`` (``time.time()``); a phase marked twice keeps both spans, summed."""
    _marks.append((phase, time.time() if at is None else at))


def resumed_from(path: object) -> None:
    """The checkpoint this process resumes from: the line is ``resume.timing`` and names it."""
    _context["path"] = path


def phases() -> dict[str, float]:
    """Seconds per phase so far, in order, and ``total`` (birth to the last mark)."""
    out: dict[str, float] = {}
    for (_, before), (name, at) in zip(_marks, _marks[1:]):
        out[name] = out.get(name, 0.0) + max(0.0, at - before)
    out["total"] = max(0.0, _marks[-1][1] - _marks[0][1])
    return out


def report() -> None:
    """Log the ``resume.timing`` (or ``start.timing``) line, once per process."""
    global _reported
    if _reported:
        return
    _reported = True
    spans = " ".join(f"{k}={v:.2f}" for k, v in phases().items())
    if "path" in _context:
        log.info("resume.timing %s path=%s", spans, _context["path"])
    else:
        log.info("start.timing %s", spans)
