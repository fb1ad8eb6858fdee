"""What an exported tokenizer folder must hold, checked before anything is built or loaded from it.

``config.json`` (at most :data:`MAX_CONFIG_BYTES`) is checked whole and every problem is reported in one
``ValueError`` naming the file (the ``need(cond, key, value, why)`` pattern of ``config.validate``): the
format, the constructor arguments (only names ``magvit2_pytorch.VideoTokenizer`` takes, of the types
its beartype checks want, sizes within :data:`LIMITS` so that a typo cannot ask for terabytes), the clip
and the first-frame flag. ``tokenizer.safetensors`` is opened as safetensors only (never a pickle); a
file that is not one, or whose tensors do not fit the model the config builds, is a ``ValueError``
naming the file and the first tensors that differ. Every message ends with what to do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..config.model import LAYER_TYPES, MAX_CODEBOOK_SIZE

__all__ = ["LIMITS", "MAX_CONFIG_BYTES", "check_config", "check_weights", "read_weights"]

MAX_CONFIG_BYTES = 1 << 20
#: The largest value each size may take (far beyond any trained MAGVIT-v2, far below an allocation that hangs).
LIMITS = {
    "image_size": 4096,
    "channels": 4,
    "init_dim": 4096,
    "num_codebooks": 64,
    "attn_heads": 64,
    "attn_dim_head": 1024,
    "num_frames": 4096,
}
REDO = "re-export it with python -m resilient_train.export"


def _int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _layers_ok(layers: Any) -> bool:
    if not isinstance(layers, list) or not layers:
        return False
    for x in layers:
        name = x if isinstance(x, str) else x[0] if isinstance(x, list) and len(x) == 2 else None
        if name not in LAYER_TYPES or (isinstance(x, list) and not _int(x[1], 1, LIMITS["init_dim"])):
            return False
    return True


def check_config(cfg: Any, path: Path, fmt: str) -> None:
    """Raise one ``ValueError`` listing every problem of the parsed ``config.json`` at ``path``."""
    # Long on purpose: one flat list of checks, each naming its key.
    from inspect import signature

    from magvit2_pytorch import VideoTokenizer

    problems: list[str] = []

    def need(cond: bool, key: str, value: Any, why: str) -> None:
        if not cond:
            problems.append(f"{key}={json.dumps(value)[:80]}: {why}")

    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: holds {type(cfg).__name__}, not a JSON object; {REDO}")
    if cfg.get("format") != fmt:
        raise ValueError(f"{path}: format {cfg.get('format')!r}, this code reads {fmt!r}; {REDO}")
    kw, clip = cfg.get("kwargs"), cfg.get("clip")
    need(isinstance(kw, dict), "kwargs", kw, "must be an object of VideoTokenizer arguments")
    need(isinstance(clip, dict), "clip", clip, "must be an object (num_frames, image_size, channels)")
    need(
        isinstance(cfg.get("video_contains_first_frame"), bool),
        "video_contains_first_frame",
        cfg.get("video_contains_first_frame"),
        "must be true or false",
    )
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems) + f"; {REDO}")
    known = set(signature(VideoTokenizer.__init__).parameters) - {"self"}
    unknown = sorted(set(kw) - known)
    need(not unknown, "kwargs", unknown, "are not VideoTokenizer arguments (another version or program wrote this?)")
    for key, hi in LIMITS.items():
        if key in kw:
            need(_int(kw[key], 1, hi), f"kwargs.{key}", kw[key], f"must be an integer in 1..{hi}")
    need(
        _layers_ok(kw.get("layers")),
        "kwargs.layers",
        kw.get("layers"),
        f"must be a list of layer names or [name, dim] pairs, names from {sorted(LAYER_TYPES)}",
    )
    levels = kw.get("fsq_levels")
    need(
        isinstance(levels, list)
        and 0 < len(levels) <= 16
        and all(_int(v, 2, 1 << 16) for v in levels)
        and math.prod(levels) <= MAX_CODEBOOK_SIZE,
        "kwargs.fsq_levels",
        levels,
        f"must be 1..16 integers in 2..65536 whose product is at most {MAX_CODEBOOK_SIZE}",
    )
    digest = cfg.get("weights_xxh3_128")
    need(
        digest is None
        or (isinstance(digest, str) and len(digest) == 32 and all(c in "0123456789abcdef" for c in digest)),
        "weights_xxh3_128",
        digest,
        "must be the 32 hex digits of an XXH3-128",
    )
    need(kw.get("use_fsq") is True, "kwargs.use_fsq", kw.get("use_fsq"), "must be true (an FSQ tokenizer)")
    need(
        kw.get("perceptual_loss_weight", 0) == 0,
        "kwargs.perceptual_loss_weight",
        kw.get("perceptual_loss_weight"),
        "must be 0: a perceptual loss would download VGG16",
    )
    need(
        _int(clip.get("num_frames"), 1, LIMITS["num_frames"]),
        "clip.num_frames",
        clip.get("num_frames"),
        f"must be an integer in 1..{LIMITS['num_frames']}",
    )
    for key in ("image_size", "channels"):
        need(clip.get(key) == kw.get(key), f"clip.{key}", clip.get(key), f"must equal kwargs.{key} ({kw.get(key)})")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems) + f"; {REDO}")


def read_weights(path: Path, digest: str | None) -> dict[str, Any]:
    """The tensors of ``tokenizer.safetensors``, read into memory (never mapped: a file changed under a mapping
    kills the process) and checked against ``digest`` (its XXH3-128 in ``config.json``; ``None``: an export
    older than the digest); safetensors only: a pickle or anything else is refused."""
    import xxhash
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; {REDO}") from None
    if digest is not None and xxhash.xxh3_128(raw).hexdigest() != digest:
        raise ValueError(f"{path}: its XXH3-128 is not the one config.json records (damaged or edited); {REDO}")
    try:
        return load(raw)
    except Exception as exc:  # safetensors' own errors: a header too large, invalid JSON, a pickle, truncation
        text = " ".join(str(exc).split())[:200]
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {text}); {REDO}") from None


def check_weights(model: Any, weights: dict[str, Any], path: Path) -> None:
    """Raise ``ValueError`` naming the first tensors of ``weights`` that do not fit ``model`` (names or shapes)."""
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    shapes = [
        f"{k} {tuple(weights[k].shape)} != {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(weights))
        if weights[k].shape != want[k].shape
    ]
    problems = [
        f"{len(x)} {what} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
        for x, what in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
        if x
    ]
    if problems:
        raise ValueError(f"{path}: does not fit the model config.json describes: {'; '.join(problems)}; {REDO}")
