"""How a ratio is judged: the median of its interleaved pairs' ratios, printed with their spread.

A pair is one repetition of ours and of the baseline run next to each other (the order rotating), so
load from other processes hits both alike; its ratio is ours / baseline as that ratio is defined
(seconds, or steps/s turned the right way by the module that measured it, in ``pair_ratios``).
The median of at least :data:`MIN_PAIRS` pairs is the verdict: one slow sample cannot flip it.
Fewer pairs (``--quick``, or a time budget cut short) give a value, never a verdict.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

__all__ = ["MIN_PAIRS", "pair_ratios", "judge", "verdict"]

MIN_PAIRS = 5


def pair_ratios(entry: dict[str, Any]) -> list[float]:
    """The ratio of each pair: the module's own ``pair_ratios``, else ``ours_samples_s[i] / baseline_samples_s[i]``
    (samples taken interleaved, repetition by repetition); empty when the entry has neither."""
    if "pair_ratios" in entry:
        return [float(r) for r in entry["pair_ratios"]]
    ours, base = entry.get("ours_samples_s"), entry.get("baseline_samples_s")
    if ours and base and len(ours) == len(base):
        return [a / b for a, b in zip(ours, base)]
    return []


def judge(entry: dict[str, Any], fallback: Callable[[], float]) -> dict[str, Any]:
    """``ratio`` (the median of the pairs, or ``fallback()`` when there are none), ``pairs``, ``spread`` [min, max]."""
    ratios = pair_ratios(entry)
    if not ratios:
        return {"ratio": fallback(), "pairs": 0, "spread": None}
    return {"ratio": statistics.median(ratios), "pairs": len(ratios), "spread": [min(ratios), max(ratios)]}


def verdict(value: float, op: str, target: float | None, pairs: int) -> str:
    """``yes`` / ``NO`` for a target met or missed on enough pairs; ``yes?`` / ``NO?`` on fewer; blank untargeted."""
    if target is None:
        return ""
    ok = value <= target if op == "<=" else value >= target
    return ("yes" if ok else "NO") + ("" if pairs >= MIN_PAIRS else "?")
