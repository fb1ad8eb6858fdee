"""Nested state <-> (JSON skeleton, flat tensors): how ``state.json`` and ``state.safetensors`` split a state.

A tensor becomes ``{"__tensor__": key}`` in the skeleton, its key the path to it (``/trainer/rng``);
what JSON cannot say itself is tagged the same way: ``{"__float__": "nan"}``, ``{"__tuple__":
[...]}``, and ``{"__dict__": [[key, value], ...]}`` for a dict with int keys or keys that look like
tags. Decoding refuses anything else with a :class:`CheckpointError` naming the file, since the
skeleton comes from disk.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .manifest import STATE_TENSORS, CheckpointError

__all__ = ["encode", "decode"]


def encode(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)``: ``obj`` as JSON-ready data whose tensors refer by key to ``tensors``."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(obj, "", tensors), tensors


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"state key {k!r} at {path or '/'} must be str or int")
            items.append([k, _encode(v, f"{path}/{k}", tensors)])
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    raise TypeError(
        f"cannot store {type(obj).__name__} at {path or '/'} in a checkpoint (tensors, numbers, "
        "strings, lists, tuples and dicts only)"
    )


def decode(skeleton: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The state ``skeleton`` (parsed from the file ``where``) describes; raises only :class:`CheckpointError`."""
    try:
        return _decode(skeleton, tensors, where)
    except (TypeError, ValueError, RecursionError) as exc:  # a hostile or damaged skeleton
        raise CheckpointError(f"{where}: malformed state ({type(exc).__name__}: {exc})") from None


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"{where}: refers to tensor {key!r}, which {STATE_TENSORS} does not hold")
            return tensors[key]
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors, where) for k, v in obj["__dict__"]}
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    return obj
