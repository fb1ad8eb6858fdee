"""What each fault of a chaos trial cost: how it was detected and how fast, how it was recovered, the steps
redone, the time from the fault to the first new step, and the trial's goodput.

Read from what the chaos arm left (no clock of its own): the events (each stamped when it struck),
and the trainer's log lines (each stamped by the logging module). For each event:

* ``detected_by`` and ``detect_secs``: a process death is seen at once by the process that waits
  for it (the orchestrator, torchrun); a hang by the watchdog (``watchdog.hang ... secs=``, its
  own measure); a NaN by the finite guard and a bit flip by the replica digests (the next
  ``rollback.start``); a corruption by the hash check of the next start (``ckpt.invalid``); a
  failing save by the ``OSError`` at the write (``ckpt.save_failed``);
* ``recovery``: ``restart`` (a new process, ``resume step=N``), ``rollback`` (in-process,
  ``rollback.done ... to_step=N``) or ``none`` (a failed save: training went on);
* ``redone``: the steps computed again, the event's step minus the step it went back to;
* ``to_new_step_secs``: from the fault to the end of the first step computed after it (the trainer's
  ``train.first_step`` line after a start or a rollback).

The goodput of a trial: the reference arm's wall time over the chaos arm's, and useful steps over
steps computed (useful + redone). Torch-free.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["event_costs", "goodput", "by_kind", "DETECTED_BY"]

#: How each kind of event is detected.
DETECTED_BY = {
    "step_kill": "process exit",
    "save_kill": "process exit",
    "node_loss": "process exit",
    "external_kill": "process exit",
    "sigterm": "signal handler",
    "corrupt": "hash check at the next start",
    "hang": "watchdog",
    "external_stop": "the peers' watchdog",
    "nan": "finite guard before the optimizer step",
    "bitflip": "replica digests before the commit",
    "io_error": "OSError at the write",
}
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
_LINES = {
    "resume": re.compile(r"\bresume step=(\d+)|\bresume\.none\b"),
    "rollback_start": re.compile(r"rollback\.start step=(\d+)"),
    "rollback_done": re.compile(r"rollback\.done step=(\d+) kind=\w+ to_step=(\d+)"),
    "hang": re.compile(r"watchdog\.hang step=(\d+) rank=(\d+) secs=([\d.]+)"),
    "invalid": re.compile(r"ckpt\.invalid "),
    "save_failed": re.compile(r"ckpt\.save_failed step=(\d+)"),
    "first_step": re.compile(r"train\.first_step step=(\d+)"),
}


def _log_lines(log_path: Path) -> list[tuple[float, str, re.Match]]:
    """``(time, what, match)`` for every line of the chaos log that tells about a detection or a recovery."""
    out = []
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    for line in text.splitlines():
        stamp = _STAMP.match(line)
        if not stamp:
            continue
        for what, pattern in _LINES.items():
            if m := pattern.search(line):
                when = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((when, what, m))
                break
    return out


def _first(lines: list[tuple[float, str, re.Match]], after: float, *whats: str) -> tuple[float, str, re.Match] | None:
    # Log stamps have millisecond resolution: a line in the same millisecond as the event counts as after it.
    return next(((t, w, m) for t, w, m in lines if t >= after - 0.001 and w in whats), None)


def event_costs(events: list[dict[str, Any]], log_path: Path) -> list[dict[str, Any]]:
    """``events`` (each with ``kind``, ``step`` and ``time``), each with what it cost added."""
    lines = _log_lines(log_path)
    out = []
    for e in events:
        te, kind, step = e.get("time"), e["kind"], e.get("step")
        cost: dict[str, Any] = {"detected_by": DETECTED_BY.get(kind, "?")}
        if te is None:
            out.append({**e, **cost})
            continue
        cost.update(_detection(kind, te, lines))
        cost.update(_recovery(kind, te, step, lines))
        new = _first(lines, te, "first_step") if kind != "io_error" else None
        cost["to_new_step_secs"] = round(max(0.0, new[0] - te), 2) if new is not None else None
        out.append({**e, **cost})
    return out


def _detection(kind: str, te: float, lines: list[tuple[float, str, re.Match]]) -> dict[str, Any]:
    """When the fault was seen, counted from when it struck (None where the log does not say)."""
    seen = None
    if kind in ("hang", "external_stop"):
        hit = _first(lines, te, "hang")
        return {"detect_secs": round(float(hit[2][3]), 2) if hit else None}
    if kind in ("nan", "bitflip"):
        seen = _first(lines, te, "rollback_start")
    elif kind == "corrupt":
        seen = _first(lines, te, "invalid")
    elif kind == "io_error":
        seen = _first(lines, te, "save_failed")
    elif kind in DETECTED_BY:
        return {"detect_secs": 0.0}
    return {"detect_secs": round(max(0.0, seen[0] - te), 2) if seen else None}


def _recovery(kind: str, te: float, step: int | None, lines: list[tuple[float, str, re.Match]]) -> dict[str, Any]:
    """How the run went on: ``recovery``, ``resumed_from`` and the steps ``redone``."""
    if kind == "io_error":
        return {"recovery": "none (training went on)", "resumed_from": None, "redone": 0}
    hit = _first(lines, te, "resume", "rollback_start")
    if hit is not None and hit[1] == "rollback_start":  # the restore inside a rollback logs a resume line too
        hit = _first(lines, hit[0], "rollback_done")
    if hit is None:
        return {"recovery": None, "resumed_from": None, "redone": None}
    how = "rollback" if hit[1] == "rollback_done" else "restart"
    back_to = int(hit[2][2] if how == "rollback" else hit[2][1] or 0)  # resume.none: a fresh start
    redone = max(0, step - back_to) if isinstance(step, int) else None
    return {"recovery": how, "resumed_from": back_to, "redone": redone}


def goodput(steps: int, ref_secs: float, chaos_secs: float, events: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial's goodput: time (reference / chaos wall time) and work (useful steps / steps computed)."""
    redone = sum(e.get("redone") or 0 for e in events)
    return {
        "time": round(ref_secs / chaos_secs, 3) if chaos_secs > 0 else None,
        "steps": round(steps / (steps + redone), 3) if steps else None,
        "steps_redone": redone,
        "steps_computed": steps + redone,
    }


def by_kind(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per event kind: how many, the mean detection time and time to the first new step, the steps redone."""

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if isinstance(v, (int, float))]
        return round(sum(values) / len(values), 2) if values else None

    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({e["kind"] for e in events}):
        mine = [e for e in events if e["kind"] == kind]
        out[kind] = {
            "count": len(mine),
            "detect_secs": mean([e.get("detect_secs") for e in mine]),
            "to_new_step_secs": mean([e.get("to_new_step_secs") for e in mine]),
            "redone": sum(e.get("redone") or 0 for e in mine),
        }
    return out
