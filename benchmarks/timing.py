"""How every benchmark times things: interleaved repetitions, medians, per-step durations, a time budget.

Every ratio compares two sides timed in the same run with their repetitions interleaved (the order
rotates each repetition) and the median taken, so load from other processes hits both sides alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def interleaved(fns: dict[str, Any], reps: int, *, after: Any = None) -> dict[str, list[float]]:
    """Time each function ``reps`` times, rotating the order every repetition; ``after(name)`` untimed."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t0)
            if after is not None:
                after(n)
    return out


def within_budget(n: int, budget_s: float, name: str) -> Iterator[int]:
    """0, 1, ... n-1, stopping early (after at least one) when the next would end past ``budget_s``:
    a busy machine must not stretch the bench."""
    t0 = time.perf_counter()
    for i in range(n):
        spent = time.perf_counter() - t0
        if i and spent + spent / i > budget_s:
            say(f"  {name}: stopping after {i} pairs (time budget {budget_s:.0f}s)")
            return
        yield i


def durations(times: list[float]) -> list[float]:
    """Per-step seconds between the ends of consecutive steps (the first step, a warm-up, is not timed)."""
    return [b - a for a, b in zip(times, times[1:])]
