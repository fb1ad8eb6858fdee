"""Datasets, samplers and loaders whose output depends only on (seed, epoch, position).

Bit-exact resume needs three things from the data pipeline, and this module provides all of them:

* every clip is a pure function of where it comes from (``(seed, split, index)`` for the synthetic
  set, the file's bytes for a folder of videos), never of how many clips were read before;
* the order of an epoch is a pure function of ``(seed, epoch)``, and a run resumed at batch ``b``
  sees exactly the remaining batches of that same order (:class:`ResumableSampler`);
* nothing here draws from the process-global generators (Python ``random``, NumPy, torch). In
  particular :func:`build_loader` gives the ``DataLoader`` its own ``torch.Generator``: without one,
  every ``iter(loader)`` draws the workers' base seed from the global torch RNG, which would make
  the model's random numbers depend on how many times a loader was iterated.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import operator
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "SyntheticVideoDataset",
    "VideoFolderDataset",
    "VideoReadError",
    "ResumableSampler",
    "SequentialResumableSampler",
    "build_datasets",
    "build_loader",
    "batches_per_epoch",
]

log = logging.getLogger(__name__)

_SPLIT_IDS = {"train": 0, "val": 1}
_PILLOW_EXTENSIONS = frozenset({".gif", ".png", ".apng", ".webp", ".tif", ".tiff"})
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _split_id(split: str) -> int:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    return _SPLIT_IDS[split]


def _u64(x: int) -> int:
    """Map any Python int onto [0, 2**64) so it can be used as seed entropy (which must be non-negative)."""
    return int(x) % (1 << 64)


def _mix_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers, without touching any global generator."""
    state = np.random.SeedSequence([_u64(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def _check_positive(**values: int) -> None:
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
        _check_positive(num_frames=num_frames, image_size=image_size, channels=channels)
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


# --------------------------------------------------------------------------------------------------
# Folder of real videos
# --------------------------------------------------------------------------------------------------


class VideoReadError(ValueError):
    """A video file could not be decoded."""


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = [extensions]
    out = []
    for ext in extensions:
        ext = str(ext).strip().lower()
        if not ext:
            continue
        out.append(ext if ext.startswith(".") else "." + ext)
    if not out:
        raise ValueError("extensions must name at least one file extension")
    return tuple(dict.fromkeys(out))


def _list_videos(folder: str, extensions: tuple[str, ...]) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if name.lower().endswith(extensions):
                found.append(os.path.join(root, name))
    # Sort on the path relative to the folder, with "/" separators, so the order is the same everywhere.
    return sorted(found, key=lambda p: os.path.relpath(p, folder).replace(os.sep, "/"))


def _short_error(exc: BaseException) -> str:
    """Type and message of an exception; long multi-line messages (ffmpeg's stderr) keep first and last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 2:
        text = f"{lines[0]} ... {lines[-1]}"
    else:
        text = " ".join(lines)
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _frame_to_float(frame: np.ndarray) -> np.ndarray:
    """One decoded frame -> float32 (H, W, C) in [0, 1] with C in {1, 3}."""
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3:
        raise ValueError(f"unexpected frame shape {frame.shape}")
    if frame.shape[2] == 2:  # grey + alpha
        frame = frame[:, :, :1]
    elif frame.shape[2] == 4:  # RGBA: drop alpha
        frame = frame[:, :, :3]
    elif frame.shape[2] not in (1, 3):
        raise ValueError(f"unexpected number of colour channels {frame.shape[2]}")
    if np.issubdtype(frame.dtype, np.integer):
        return frame.astype(np.float32) / np.float32(np.iinfo(frame.dtype).max)
    if frame.dtype == np.bool_:
        return frame.astype(np.float32)
    return np.clip(frame.astype(np.float32), 0.0, 1.0)


class VideoFolderDataset(Dataset):
    """Videos (mp4, webm, gif, ...) found recursively under a folder.

    Splits: if ``path/train`` and ``path/val`` both exist they are the splits; otherwise the files
    under ``path`` (sorted) are split so that the last ``max(1, round(n * val_fraction))`` are
    validation and the rest training.

    Each item is the first ``num_frames`` frames (the last frame repeated if the video is shorter),
    converted to RGB (or grey when ``channels == 1``), shorter side resized to ``image_size`` and
    centre-cropped: float32 ``(C, T, image_size, image_size)`` in [0, 1].
    """

    def __init__(
        self,
        *,
        path: str,
        split: str,
        num_frames: int,
        image_size: int,
        channels: int = 3,
        val_fraction: float = 0.1,
        extensions: Sequence[str] = (".mp4", ".webm", ".gif"),
    ) -> None:
        _split_id(split)
        _check_positive(num_frames=num_frames, image_size=image_size)
        if int(channels) not in (1, 3):
            raise ValueError(f"channels must be 1 or 3 for real videos, got {channels}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        root = os.fspath(path)
        if not os.path.exists(root):
            raise FileNotFoundError(f"video folder {root!r} does not exist")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"video folder {root!r} is not a directory")

        self.root = root
        self.split = split
        self.num_frames = int(num_frames)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.val_fraction = float(val_fraction)
        self.extensions = _normalise_extensions(extensions)
        self._warned_short: set[str] = set()

        train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            folder = train_dir if split == "train" else val_dir
            self.files = _list_videos(folder, self.extensions)
            if not self.files:
                raise ValueError(f"no video files with extensions {list(self.extensions)} found under {folder!r}")
        else:
            files = _list_videos(root, self.extensions)
            n = len(files)
            if n == 0:
                raise ValueError(f"no video files with extensions {list(self.extensions)} found under {root!r}")
            n_val = max(1, round(n * self.val_fraction))
            if n - n_val < 1:
                raise ValueError(
                    f"video folder {root!r} has only {n} file(s); splitting off {n_val} for validation "
                    f"(val_fraction={self.val_fraction}) leaves none for training. Add more videos or "
                    f"create {root!r}/train and {root!r}/val subfolders."
                )
            self.files = files[: n - n_val] if split == "train" else files[n - n_val :]
        log.info("VideoFolderDataset %s split=%s: %d file(s)", root, split, len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        file = self.files[_normalise_index(index, len(self.files))]
        frames = self._read_frames(file)  # (t, H, W, C) float32, 1 <= t <= num_frames
        t = frames.shape[0]
        if t < self.num_frames:
            if file not in self._warned_short:
                self._warned_short.add(file)
                log.warning(
                    "video %s has %d frame(s), fewer than num_frames=%d; repeating its last frame",
                    file,
                    t,
                    self.num_frames,
                )
            pad = np.repeat(frames[-1:], self.num_frames - t, axis=0)
            frames = np.concatenate([frames, pad], axis=0)

        if self.channels == 1 and frames.shape[3] == 3:
            frames = (frames @ _LUMA)[..., None]
        elif self.channels == 3 and frames.shape[3] == 1:
            frames = np.repeat(frames, 3, axis=3)

        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, C, H, W)
        video = self._resize_crop(video)
        return video.permute(1, 0, 2, 3).contiguous()  # (C, T, H, W)

    def _plugin(self, file: str) -> str:
        return "pillow" if os.path.splitext(file)[1].lower() in _PILLOW_EXTENSIONS else "FFMPEG"

    def _read_frames(self, file: str) -> np.ndarray:
        import imageio.v3 as iio

        frames: list[np.ndarray] = []
        try:
            # Iterate rather than imread(index=None): only the frames we need are decoded.
            iterator = iio.imiter(file, plugin=self._plugin(file))
            try:
                for frame in iterator:
                    frames.append(_frame_to_float(np.asarray(frame)))
                    if len(frames) == self.num_frames:
                        break
            finally:
                iterator.close()
            if not frames:
                raise ValueError("the file contains no frames")
            if len({f.shape for f in frames}) > 1:
                raise ValueError(f"frames have different shapes: {sorted({f.shape for f in frames})}")
            return np.stack(frames)
        except VideoReadError:
            raise
        except Exception as exc:  # imageio raises OSError, ValueError, RuntimeError, ... depending on the plugin
            raise VideoReadError(f"cannot read video file {file!r}: {_short_error(exc)}") from exc

    def _resize_crop(self, video: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        h, w = video.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
            if (new_h, new_w) != (h, w):
                video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            video = video[:, :, top : top + size, left : left + size]
        return video.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Samplers and loaders
# --------------------------------------------------------------------------------------------------


def _check_start(length: int, start_index: int) -> tuple[int, int]:
    length, start_index = int(length), int(start_index)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not 0 <= start_index <= length:
        raise ValueError(f"start_index must be in [0, {length}], got {start_index}")
    return length, start_index


class ResumableSampler(Sampler[int]):
    """A permutation of ``range(length)`` fixed by ``(seed, epoch)``, started at ``start_index``.

    The permutation comes from a private ``torch.Generator`` seeded from ``(seed, epoch)`` alone, so
    a run resumed at batch ``b`` with ``start_index = b * batch_size`` sees exactly the indices the
    uninterrupted run would have seen from that point on.

    With ranks (``world_size > 1``) every rank computes the same permutation and takes its own
    slice of each global batch: global batch ``g`` is ``perm[g*W*B : (g+1)*W*B]`` and rank ``r``
    reads ``perm[(g*W + r)*B : (g*W + r + 1)*B]`` (``B = batch_size``). ``start_index`` is then
    ``b * W * B``; only whole global batches are yielded, so every rank runs the same number of steps.
    """

    def __init__(
        self,
        length: int,
        *,
        seed: int,
        epoch: int,
        start_index: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
    ) -> None:
        self.length, self.start_index = _check_start(length, start_index)
        self.seed = int(seed)
        self.epoch = int(epoch)
        _check_positive(world_size=world_size, batch_size=batch_size)
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)

    def permutation(self) -> list[int]:
        """The whole epoch's order, including the positions skipped by ``start_index``."""
        g = torch.Generator()
        g.manual_seed(_mix_seed(self.seed, self.epoch))
        return torch.randperm(self.length, generator=g).tolist()

    def _indices(self) -> list[int]:
        perm = self.permutation()
        if self.world_size == 1:
            return perm[self.start_index :]
        step, b = self.world_size * self.batch_size, self.batch_size
        out: list[int] = []
        for start in range(self.start_index, self.length - step + 1, step):
            out += perm[start + self.rank * b : start + (self.rank + 1) * b]
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.length - self.start_index
        return (self.length - self.start_index) // (self.world_size * self.batch_size) * self.batch_size


class SequentialResumableSampler(Sampler[int]):
    """``start_index, start_index + 1, ..., length - 1``."""

    def __init__(self, length: int, *, start_index: int = 0) -> None:
        self.length, self.start_index = _check_start(length, start_index)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start_index, self.length))

    def __len__(self) -> int:
        return self.length - self.start_index


_MISSING = object()


def _cfg_get(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    """``cfg.key`` for a DictConfig, dataclass or any object; a missing or ``???`` value gives ``default``."""
    try:
        value = getattr(cfg, key)
    except Exception as exc:  # AttributeError, omegaconf's ConfigAttributeError / MissingMandatoryValue
        if default is _MISSING:
            raise ValueError(f"data config has no value for data.{key}") from exc
        return default
    if value == "???" and default is not _MISSING:
        return default
    return value


def build_datasets(data_cfg: Any, seed: int) -> tuple[Dataset, Dataset]:
    """The (train, val) datasets described by the ``data`` config group."""
    name = _cfg_get(data_cfg, "name")
    num_frames = int(_cfg_get(data_cfg, "num_frames"))
    image_size = int(_cfg_get(data_cfg, "image_size"))
    channels = int(_cfg_get(data_cfg, "channels", 3))
    if name == "synthetic":
        common = dict(
            seed=seed,
            num_frames=num_frames,
            image_size=image_size,
            channels=channels,
            num_shapes=int(_cfg_get(data_cfg, "num_shapes", 3)),
        )
        train = SyntheticVideoDataset(split="train", length=int(_cfg_get(data_cfg, "train_size")), **common)
        val = SyntheticVideoDataset(split="val", length=int(_cfg_get(data_cfg, "val_size")), **common)
        return train, val
    if name == "folder":
        path = _cfg_get(data_cfg, "path", None)
        if path is None or str(path) in ("", "???"):
            raise ValueError("data.path must name a folder of videos when data.name='folder'")
        extensions = _cfg_get(data_cfg, "extensions", None) or (".mp4", ".webm", ".gif")
        common = dict(
            path=str(path),
            num_frames=num_frames,
            image_size=image_size,
            channels=channels,
            val_fraction=float(_cfg_get(data_cfg, "val_fraction", 0.1)),
            extensions=[str(e) for e in extensions],
        )
        return VideoFolderDataset(split="train", **common), VideoFolderDataset(split="val", **common)
    raise ValueError(f"unknown data.name {name!r}; expected 'synthetic' or 'folder'")


def batches_per_epoch(dataset: Dataset, data_cfg: Any, world_size: int = 1) -> int:
    """Full global batches per epoch (``world_size`` ranks x ``data.batch_size`` clips; the rest is dropped)."""
    batch_size = int(_cfg_get(data_cfg, "batch_size"))
    _check_positive(batch_size=batch_size, world_size=world_size)
    return len(dataset) // (batch_size * world_size)  # type: ignore[arg-type]


def build_loader(
    dataset: Dataset,
    data_cfg: Any,
    *,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader over one epoch, starting at (global) batch ``start_batch`` of that epoch's fixed order.

    Iterating it never touches the global RNGs: the order comes from :class:`ResumableSampler` and
    the loader's worker base seed from its own generator seeded from ``(seed, epoch)``. With ranks,
    this rank's slice of every global batch (see :class:`ResumableSampler`).
    """
    batch_size = int(_cfg_get(data_cfg, "batch_size"))
    num_workers = int(_cfg_get(data_cfg, "num_workers", 0))
    _check_positive(batch_size=batch_size)
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
    length = len(dataset)  # type: ignore[arg-type]
    n_batches = length // (batch_size * world_size)
    if not 0 <= int(start_batch) <= n_batches:
        raise ValueError(f"start_batch must be in [0, {n_batches}] (batches per epoch), got {start_batch}")
    start_index = int(start_batch) * batch_size * world_size
    sampler: Sampler[int]
    if shuffle:
        sampler = ResumableSampler(
            length,
            seed=seed,
            epoch=epoch,
            start_index=start_index,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
        )
    else:
        if world_size != 1:
            raise ValueError("an unshuffled loader (evaluation) is read by one rank only")
        sampler = SequentialResumableSampler(length, start_index=start_index)

    generator = torch.Generator()
    generator.manual_seed(_mix_seed(seed, epoch, 0x5EED))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = False
        if "fork" in multiprocessing.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        generator=generator,
        **kwargs,
    )
