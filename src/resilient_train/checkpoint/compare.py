"""Two checkpoints, or two states, compared bit for bit: the first difference, or None.

Tensors are compared by their bits (so NaNs and signed zeros count exactly), everything else by
value and type. :func:`compare_checkpoints` loads both checkpoints as a resume does and leaves out
what does not describe the training state: :data:`IGNORED_STATE_KEYS`, and the saved config, whose
keys that can change the result are compared through the manifests' ``config_hash`` (the hash the
trainer records of them; which keys those are is the config's rule, not this package's).
``python -m resilient_train.verify --compare``, the chaos proof and the tests use it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .files import load_checkpoint

__all__ = ["IGNORED_STATE_KEYS", "compare_states", "compare_checkpoints"]

# State keys that do not describe the training state itself.
IGNORED_STATE_KEYS = {"config_changes"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if t.is_complex() or t.element_size() not in ints:
        return t.view(torch.uint8)
    return t.view(ints[t.element_size()])


def compare_states(a: Any, b: Any, path: str = "") -> str | None:
    """The first difference between two states (bit for bit), or None if identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: dtype/shape {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        diff = int((_bits(a) != _bits(b)).sum())
        if diff:
            return f"{path}: shape {tuple(a.shape)}, {diff} of {a.numel()} elements differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}/{k}: present in only one checkpoint"
            d = compare_states(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = compare_states(x, y, f"{path}/{i}")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    if a != b or type(a) is not type(b):
        return f"{path}: {a!r} vs {b!r}"
    return None


def compare_checkpoints(a: Path, b: Path) -> str | None:
    """The first difference between checkpoints ``a`` and ``b`` (step, config hash, then state), or None."""
    la, lb = load_checkpoint(a), load_checkpoint(b)
    if la.step != lb.step:
        return f"manifest/step: {la.step} vs {lb.step}"
    ha, hb = la.manifest.get("config_hash"), lb.manifest.get("config_hash")
    if ha != hb:
        return f"manifest/config_hash: {ha} vs {hb} (the configs differ in a key that changes the result)"
    sa, sb = la.state, lb.state
    for s in (sa, sb):
        for k in (*IGNORED_STATE_KEYS, "config"):
            s.pop(k, None)
    return compare_states(sa, sb)
