"""The clips of probed video files, and the clip cache: :class:`VideoClips` under a :class:`Preprocessing`.

* **The clip index is a pure function of the files and the config.** Clip ``k`` of a file is the
  ``data.num_frames`` frames ``start, start + s, ..., start + (num_frames - 1) * s`` (``s =
  data.frame_step``) with ``start = k * data.clip_stride``, in presentation order; files shorter
  than one clip have no clip (:mod:`.folder` counts them). Sampling, sharding across ranks and
  mid-epoch resume therefore stay exact.
* **A cached clip is bit-identical to a decoded one.** A clip is decoded, resized and cropped by
  :mod:`.video`; the cache (``data.cache=memory|disk``) stores the finished float32 clip; disk
  entries are keyed by the file's fingerprint and the preprocessing, written atomically, and begin
  with the XXH3-128 of the rest: an entry damaged or edited on disk is logged (``data.cache_bad``),
  decoded again and rewritten, never used.
* **A file is read as it was indexed.** Before a clip is decoded, the file's size and content hash
  (:func:`.video.content_hash`) are checked against the index; a file replaced, truncated or removed
  while the run reads it stops the run with a :class:`.video.VideoReadError` naming the file (the
  result would silently differ otherwise; a resume compares the data fingerprint and refuses it too).
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import xxhash
from torch.utils.data import Dataset

from ..fsio import atomic_write
from .video import VideoFile, VideoReadError, content_hash, decode_frames, resize_crop, short_error

log = logging.getLogger(__name__)

#: A disk cache entry: the XXH3-128 digest (16 bytes) of the ``.npy`` bytes that follow it.
DIGEST_BYTES = 16

__all__ = ["Preprocessing", "VideoClips"]


@dataclass(frozen=True)
class Preprocessing:
    num_frames: int
    frame_step: int
    clip_stride: int
    image_size: int
    channels: int

    @property
    def span(self) -> int:
        return (self.num_frames - 1) * self.frame_step + 1

    def key(self) -> str:
        return xxhash.xxh3_64(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


class VideoClips(Dataset):
    """The clips of a list of probed files (see the module docstring): float32 ``(C, T, S, S)`` in [0, 1]."""

    def __init__(self, files: list[VideoFile], prep: Preprocessing, *, cache: str = "none", cache_dir: str = ""):
        if cache not in ("none", "memory", "disk"):
            raise ValueError(f"data.cache must be none, memory or disk, got {cache!r}")
        if cache == "disk" and not cache_dir:
            raise ValueError("data.cache=disk needs data.cache_dir")
        self.files, self.prep, self.cache, self.cache_dir = files, prep, cache, cache_dir
        self.clips = [
            (i, start) for i, f in enumerate(files) for start in range(0, f.frames - prep.span + 1, prep.clip_stride)
        ]
        self._memory: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.clips)

    def _cache_path(self, index: int) -> str:
        i, start = self.clips[index]
        return os.path.join(self.cache_dir, self.prep.key(), f"{self.files[i].digest}-{start}.clip")

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip {index} out of range ({len(self)} clips)")
        index %= len(self)
        if self.cache == "memory" and index in self._memory:
            return self._memory[index].clone()
        if self.cache == "disk":
            path = self._cache_path(index)
            cached = self._load(path)
            if cached is not None:
                return cached
        clip = self.decode(index)
        if self.cache == "memory":
            self._memory[index] = clip.clone()
        elif self.cache == "disk":
            self._store(path, clip)
        return clip

    def decode(self, index: int) -> torch.Tensor:
        i, start = self.clips[index]
        f, p = self.files[i], self.prep
        _check_unchanged(f)
        pts = f.pts[start : start + p.span : p.frame_step]
        try:
            frames = decode_frames(f.path, pts, p.channels)
        except VideoReadError as exc:
            raise VideoReadError(f"{f.path}: frames {start}..{start + p.span - 1}: {exc}") from None
        except Exception as exc:  # PyAV's errors: the container or codec failed
            raise VideoReadError(f"{f.path}: frames {start}..{start + p.span - 1}: {short_error(exc)}") from None
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (T, C, H, W)
        if p.channels == 3 and video.shape[1] == 1:
            video = video.expand(-1, 3, -1, -1)
        return resize_crop(video, p.image_size).permute(1, 0, 2, 3).contiguous()  # (C, T, S, S)

    def _store(self, path: str, clip: torch.Tensor) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, clip.numpy(), allow_pickle=False)
        data = buf.getvalue()
        atomic_write(path, xxhash.xxh3_128(data).digest() + data)

    def _load(self, path: str) -> torch.Tensor | None:
        """The cached clip at ``path``; ``None`` when absent, or damaged (logged): then it is decoded again."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("data.cache_bad path=%s error=%s: decoding again", path, short_error(exc))
            return None
        digest, data = raw[:DIGEST_BYTES], raw[DIGEST_BYTES:]
        if xxhash.xxh3_128(data).digest() != digest:
            log.warning("data.cache_bad path=%s error=hash mismatch (damaged or edited): decoding again", path)
            return None
        try:
            clip = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            log.warning("data.cache_bad path=%s error=%s: decoding again", path, short_error(exc))
            return None
        return torch.from_numpy(clip)


def _check_unchanged(f: VideoFile) -> None:
    """Raise :class:`VideoReadError` when ``f`` is no longer the file the run indexed."""
    try:
        size = os.path.getsize(f.path)
        same = size == f.size and content_hash(f.path, size) == f.digest
    except OSError as exc:
        raise VideoReadError(
            f"{f.path}: cannot be read any more ({short_error(exc)}); it was indexed when the run started. "
            "Restore it, or remove it from the folder and start a new run"
        ) from None
    if not same:
        raise VideoReadError(
            f"{f.path}: changed since the run indexed it at start (size {f.size} -> {size}, or its content); "
            "restore the original, or start a new run on the changed folder (a resume refuses changed data)"
        )
