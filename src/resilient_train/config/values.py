"""Plain values from a config, and the small predicates every section's validator shares.

A validator reads a key with ``get(key)`` (an unreadable key comes back as a falsy stand-in, never
an exception) and records a problem with ``need(cond, key, value, why)``; both are made by
:func:`~.validate.validate_config`. The predicates here never raise, whatever they are handed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf

#: ``get(key)``: the value at a dotted key (``"model.discr.dim"``), or a falsy stand-in when unreadable.
Get = Callable[[str], Any]
#: ``need(cond, key, value, why)``: unless ``cond``, record ``key=value: why``.
Need = Callable[[bool, str, Any, str], None]


class AtLeast(NamedTuple):
    """An integer key and its lowest value; ``note`` ends the error message."""

    key: str
    low: int
    note: str = ""


class RealRange(NamedTuple):
    """A real-number key, its bounds (each inclusive or not) and the error message; NaN and inf are refused."""

    key: str
    low: float
    low_inclusive: bool
    high: float
    high_inclusive: bool
    why: str


def to_plain(cfg: Any) -> Any:
    """Plain dicts and lists from a DictConfig, ListConfig or config dataclass; anything else as is."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return cfg


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_ge(v: Any, lo: int) -> bool:
    return is_int(v) and v >= lo


def finite(v: Any) -> bool:
    """A real number that is neither NaN nor infinite (ints are always finite)."""
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def not_nan(v: Any) -> bool:
    return is_int(v) or (isinstance(v, float) and not math.isnan(v))


def plain_list(v: Any) -> list[Any] | None:
    """``v`` as a plain list (a ListConfig converted), or None when it is not a list."""
    try:
        v = to_plain(v)
    except Exception:
        return None
    return list(v) if isinstance(v, (list, tuple)) else None


def show(v: Any) -> Any:
    """``v`` as an error message shows it: plain when it can be made plain."""
    try:
        return to_plain(v)
    except Exception:
        return v


def check_at_least(get: Get, need: Need, floors: Iterable[AtLeast]) -> None:
    for key, lo, note in floors:
        need(int_ge(get(key), lo), key, get(key), f"must be an integer >= {lo}{note}")


def check_real_ranges(get: Get, need: Need, ranges: Iterable[RealRange]) -> None:
    for key, lo, lo_in, hi, hi_in, why in ranges:
        v = get(key)
        ok = finite(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        need(ok, key, v, why)
