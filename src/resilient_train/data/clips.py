"""The clips of probed video files, and the clip cache: :class:`VideoClips` under a :class:`Preprocessing`.

* **The clip index is a pure function of the files and the config.** Clip ``k`` of a file is the
  ``data.num_frames`` frames ``start, start + s, ..., start + (num_frames - 1) * s`` (``s =
  data.frame_step``) with ``start = k * data.clip_stride``, in presentation order; files shorter
  than one clip have no clip (:mod:`.folder` counts them). Sampling, sharding across ranks and
  mid-epoch resume therefore stay exact.
* **A cached clip is bit-identical to a decoded one.** A clip is decoded, resized and cropped by
  :mod:`.video`; the cache (``data.cache=memory|disk``) stores the finished float32 clip; disk
  entries are keyed by the file's fingerprint and the preprocessing, and written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import xxhash
from torch.utils.data import Dataset

from ..fsio import atomic_write
from .video import VideoFile, VideoReadError, decode_frames, resize_crop, short_error

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
        return os.path.join(self.cache_dir, self.prep.key(), f"{self.files[i].digest}-{start}.npy")

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip {index} out of range ({len(self)} clips)")
        index %= len(self)
        if self.cache == "memory" and index in self._memory:
            return self._memory[index].clone()
        if self.cache == "disk":
            path = self._cache_path(index)
            try:
                return torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError):
                pass  # absent (or damaged): decode and write it again
        clip = self.decode(index)
        if self.cache == "memory":
            self._memory[index] = clip.clone()
        elif self.cache == "disk":
            self._store(path, clip)
        return clip

    def decode(self, index: int) -> torch.Tensor:
        i, start = self.clips[index]
        f, p = self.files[i], self.prep
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
        import io

        os.makedirs(os.path.dirname(path), exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, clip.numpy(), allow_pickle=False)
        atomic_write(path, buf.getvalue())
