"""The built-in data set: coloured shapes moving and bouncing, each clip a pure function of (seed, split, index).

It needs no files and is identical on every machine. Also the seed helpers the loaders share: a
well-mixed 64-bit seed from integers, drawn without touching any global generator.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticVideoDataset", "mix_seed", "check_positive"]

_SPLIT_IDS = {"train": 0, "val": 1}


def _split_id(split: str) -> int:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    return _SPLIT_IDS[split]


def _u64(x: int) -> int:
    """Map any Python int onto [0, 2**64) so it can be used as seed entropy (which must be non-negative)."""
    return int(x) % (1 << 64)


def mix_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers, without touching any global generator."""
    state = np.random.SeedSequence([_u64(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _normalise_index(index: int, length: int) -> int:
    i = operator.index(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for dataset of length {length}")
    return i


# --------------------------------------------------------------------------------------------------
# Synthetic clips
# --------------------------------------------------------------------------------------------------


def _bounce(start: np.ndarray, velocity: np.ndarray, t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Positions of points moving at constant velocity and reflecting elastically off [lo, hi].

    ``start``, ``velocity``, ``lo``, ``hi`` have shape (..., 2); ``t`` has shape (T,). Returns (T, ..., 2).
    Unfolding the reflections turns the motion into a triangle wave, so no per-frame loop is needed.
    """
    span = np.maximum(hi - lo, 1e-6)
    x = (start - lo) + velocity * t.reshape((-1,) + (1,) * start.ndim)
    x = np.mod(x, 2.0 * span)
    return lo + span - np.abs(x - span)


class SyntheticVideoDataset(Dataset):
    """Coloured circles and squares moving and bouncing off the frame edges.

    Clip ``i`` is a pure function of ``(seed, split, i)``: it is rendered from a private
    ``numpy.random.Generator`` seeded with ``[seed, split_id, i]``, so it does not matter which
    process reads it, in which order, or how often. Returns float32 ``(C, T, H, W)`` in [0, 1].
    """

    def __init__(
        self,
        *,
        seed: int,
        split: str,
        length: int,
        num_frames: int,
        image_size: int,
        channels: int = 3,
        num_shapes: int = 3,
    ) -> None:
        self.split_id = _split_id(split)
        if int(length) < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        check_positive(num_frames=num_frames, image_size=image_size, channels=channels)
        if int(num_shapes) < 0:
            raise ValueError(f"num_shapes must be >= 0, got {num_shapes}")
        self.seed = int(seed)
        self.split = split
        self.length = int(length)
        self.num_frames = int(num_frames)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.num_shapes = int(num_shapes)
        # Pixel-centre coordinates, shared by every clip.
        coords = np.arange(self.image_size, dtype=np.float32) + np.float32(0.5)
        self._ys = coords.reshape(-1, 1)
        self._xs = coords.reshape(1, -1)
        self._t = np.arange(self.num_frames, dtype=np.float32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        i = _normalise_index(index, self.length)
        rng = np.random.default_rng([_u64(self.seed), self.split_id, i])
        return torch.from_numpy(self._render(rng))

    def _render(self, rng: np.random.Generator) -> np.ndarray:
        size = float(self.image_size)
        c, n = self.channels, self.num_shapes

        # Background: a dark colour with a gentle linear gradient in a random direction.
        base = rng.uniform(0.0, 0.25, size=c).astype(np.float32)
        tint = rng.uniform(-0.1, 0.1, size=c).astype(np.float32)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ramp = (math.cos(angle) * self._xs + math.sin(angle) * self._ys) / size - 0.5  # (H, W) in ~[-0.7, 0.7]
        background = np.clip(base[:, None, None] + tint[:, None, None] * ramp[None], 0.0, 1.0)
        video = np.broadcast_to(background[:, None], (c, self.num_frames, self.image_size, self.image_size)).copy()
        if n == 0:
            return video

        # Shape parameters, all drawn up front so the draw order is fixed.
        is_square = rng.random(n) < 0.5
        radius = rng.uniform(0.08, 0.22, size=n) * size  # half side for squares
        radius = np.maximum(radius, 1.0)
        colour = rng.uniform(0.35, 1.0, size=(n, c)).astype(np.float32)
        lo = np.repeat(radius[:, None], 2, axis=1)
        hi = size - lo
        start = lo + rng.random((n, 2)) * (hi - lo)
        speed = rng.uniform(0.03, 0.12, size=n) * size  # pixels per frame
        heading = rng.uniform(0.0, 2.0 * math.pi, size=n)
        velocity = np.stack([np.cos(heading), np.sin(heading)], axis=1) * speed[:, None]
        centres = _bounce(start, velocity, self._t, lo, hi).astype(np.float32)  # (T, n, 2) as (y, x)

        # Each shape only touches a small square window around it in each frame. The coverage (alpha) of
        # every window is computed for all frames at once; compositing then works on per-frame views of
        # the video (basic slicing, no copies). Pixels outside a window would get alpha == 0 exactly,
        # so this equals compositing over the whole frame.
        for k in range(n):
            window = min(self.image_size, math.ceil(2.0 * radius[k] + 3.0))
            offsets = np.arange(window, dtype=np.float32) + np.float32(0.5)
            top = np.clip(np.floor(centres[:, k, 0] - radius[k] - 1.0).astype(np.int64), 0, self.image_size - window)
            left = np.clip(np.floor(centres[:, k, 1] - radius[k] - 1.0).astype(np.int64), 0, self.image_size - window)
            dy = (top[:, None].astype(np.float32) + offsets - centres[:, k, 0:1])[:, :, None]  # (T, w, 1)
            dx = (left[:, None].astype(np.float32) + offsets - centres[:, k, 1:2])[:, None, :]  # (T, 1, w)
            if is_square[k]:
                dist = np.maximum(np.abs(dy), np.abs(dx))
            else:
                dist = np.sqrt(dy * dy + dx * dx)
            # One pixel of anti-aliased edge.
            alpha = np.clip(np.float32(radius[k] + 0.5) - dist, 0.0, 1.0)  # (T, w, w)
            col = colour[k][:, None, None]
            for t in range(self.num_frames):
                y, x = int(top[t]), int(left[t])
                view = video[:, t, y : y + window, x : x + window]  # (C, w, w), a view
                view += alpha[t] * (col - view)
        return np.clip(video, 0.0, 1.0, out=video)
