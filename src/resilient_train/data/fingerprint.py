"""The data fingerprint: which files a run trains on, carried by every checkpoint.

* **The data travels with the run.** :func:`fingerprint` lists every file (path relative to
  ``data.path``, size, frame count, content hash) and the preprocessing; every checkpoint carries
  it, and a resume compares it with the data it finds (:func:`fingerprint_difference`): the same
  files under another ``data.path`` are accepted, different ones refused by name.

Imports neither torch nor PyAV: the resume checks use :func:`fingerprint_difference` alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import xxhash

if TYPE_CHECKING:
    from .clips import Preprocessing
    from .video import VideoFile

__all__ = ["fingerprint", "fingerprint_difference"]


def fingerprint(
    train: Sequence[VideoFile], val: Sequence[VideoFile], skipped: list[list[str]], split: str, prep: Preprocessing
) -> dict[str, Any]:
    """The files of each split, the files skipped (``[rel, why]``), how the split was made and the
    preprocessing; ``digest`` hashes all of it."""
    fp = {
        "train": [f.record() for f in train],
        "val": [f.record() for f in val],
        "skipped": sorted(skipped),
        "split": split,
        "preprocessing": asdict(prep),
    }
    fp["digest"] = xxhash.xxh3_128(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    return fp


def fingerprint_difference(saved: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints: files added, removed or changed, and the preprocessing."""
    out = []
    for split in ("train", "val"):
        a = {r[0]: r for r in saved.get(split, [])}
        b = {r[0]: r for r in here.get(split, [])}
        out += [f"{split}: removed {rel}" for rel in sorted(set(a) - set(b))]
        out += [f"{split}: added {rel}" for rel in sorted(set(b) - set(a))]
        out += [
            f"{split}: changed {rel} (size, frames, hash {a[rel][1:]} -> {b[rel][1:]})"
            for rel in sorted(set(a) & set(b))
            if a[rel] != b[rel]
        ]
    for key in ("preprocessing", "skipped", "split"):
        if saved.get(key) != here.get(key):
            out.append(f"{key}: {saved.get(key)!r} -> {here.get(key)!r}")
    return out
