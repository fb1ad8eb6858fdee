"""Folders of real videos: a clip index over whole files, seek-and-decode, a clip cache, a data fingerprint.

Three invariants, as for the synthetic data (:mod:`.data`):

* **The clip index is a pure function of the files and the config.** Every file is probed once at
  start-up (PyAV demuxes its packets: no decoding), giving its frame count and each frame's
  presentation time. Clip ``k`` of a file is the ``data.num_frames`` frames ``start, start + s,
  ..., start + (num_frames - 1) * s`` (``s = data.frame_step``) with ``start = k *
  data.clip_stride``, in presentation order; files shorter than one clip are skipped and counted.
  Sampling, sharding across ranks and mid-epoch resume therefore stay exact.
* **A clip's pixels depend only on the file's bytes and the preprocessing.** Decoding seeks to the
  key frame before the clip's first frame and decodes only up to its last; frames are converted to
  RGB (grey for ``channels=1``; an alpha channel is dropped), the shorter side is resized to
  ``image_size`` (bilinear, antialiased) and the centre cropped, so portrait and odd sizes work.
  Frame rates are not resampled: a variable-frame-rate file's frames are taken in presentation
  order. The cache (``data.cache=memory|disk``) stores the finished float32 clip, so a cached clip
  is bit-identical to a decoded one; disk entries are keyed by the file's fingerprint and the
  preprocessing, and written atomically.
* **The data travels with the run.** :func:`fingerprint` lists every file (path relative to
  ``data.path``, size, frame count, content hash) and the preprocessing; every checkpoint carries
  it, and a resume compares it with the data it finds: the same files under another ``data.path``
  are accepted, different ones refused by name.

Split: ``train/`` and ``val/`` subfolders when both exist; otherwise a file is validation when a
hash of its relative path falls below ``data.val_fraction`` (adding a file never moves another
between splits); ``data.val_path`` names a separate validation folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from torch.utils.data import Dataset

from .fsio import atomic_write

__all__ = [
    "VideoReadError",
    "VideoFile",
    "VideoClips",
    "build_folder_datasets",
    "fingerprint_difference",
    "content_hash",
    "probe",
    "write_video",
    "clips_of",
    "Preprocessing",
]

log = logging.getLogger(__name__)

#: Bytes hashed at each end of a file for its content hash (with its size): see :func:`content_hash`.
HASH_EDGE = 1 << 20


class VideoReadError(ValueError):
    """A video file could not be read or decoded; the message names the file and what failed."""


@dataclass(frozen=True)
class VideoFile:
    rel: str  # path relative to its folder, "/" separators
    path: str
    size: int
    digest: str
    frames: int
    fps: float
    width: int
    height: int
    pts: tuple[int, ...]  # every frame's presentation time, in presentation order

    def record(self) -> list[Any]:
        return [self.rel, self.size, self.frames, self.digest]


def content_hash(path: str, size: int) -> str:
    """XXH3-128 of the size, the first and the last MiB of the file.

    Not the whole file: the index is rebuilt at every start, and hashing a terabyte of video at every
    restart would cost minutes per start; an edit that keeps the size, the frame count and both ends
    is not detected.
    """
    h = xxhash.xxh3_128()
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(HASH_EDGE))
        if size > 2 * HASH_EDGE:
            f.seek(size - HASH_EDGE)
            h.update(f.read(HASH_EDGE))
        elif size > HASH_EDGE:
            h.update(f.read())
    return h.hexdigest()


def _short_error(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def probe(path: str) -> tuple[int, float, int, int, tuple[int, ...]]:
    """``(frames, fps, width, height, pts)`` of the first video stream, from its packets (nothing is decoded)."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise VideoReadError("no video stream")
        vs = container.streams.video[0]
        pts = []
        for packet in container.demux(vs):
            if packet.size == 0:
                continue  # the flush packet at the end
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None:
                raise VideoReadError("a packet without a timestamp")
            pts.append(int(t))
        rate = vs.average_rate or vs.guessed_rate
        width, height = vs.codec_context.width, vs.codec_context.height
    if not pts:
        raise VideoReadError("the file contains no frames")
    if len(set(pts)) != len(pts):
        raise VideoReadError("frames with equal timestamps")
    return len(pts), float(rate) if rate else 0.0, int(width), int(height), tuple(sorted(pts))


def _frame_array(frame: Any, channels: int) -> np.ndarray:
    return frame.to_ndarray(format="gray" if channels == 1 else "rgb24").reshape(frame.height, frame.width, -1)


def decode_frames(path: str, pts: Sequence[int], channels: int) -> np.ndarray:
    """The frames with presentation times ``pts`` (ascending): uint8 ``(T, H, W, C)``.

    Seeks to the key frame at or before the first and decodes up to the last; when the container
    cannot seek there (the first frame decoded comes after the one wanted), decodes from the start.
    """
    import av

    want = {int(t): i for i, t in enumerate(pts)}
    out: list[np.ndarray | None] = [None] * len(pts)
    first, last = int(pts[0]), int(pts[-1])
    for seek in (True, False):
        found = 0
        with av.open(path) as container:
            vs = container.streams.video[0]
            if seek and first > 0:
                container.seek(first, stream=vs, backward=True, any_frame=False)
            for frame in container.decode(vs):
                t = frame.pts
                if t is None:
                    continue
                if seek and found == 0 and t > first:
                    break  # the seek landed after the first frame wanted: decode from the start
                if t in want and out[want[t]] is None:
                    out[want[t]] = _frame_array(frame, channels)
                    found += 1
                if t >= last:
                    break
        if found == len(pts):
            shapes = {a.shape for a in out}
            if len(shapes) > 1:
                raise VideoReadError(f"frames of different sizes {sorted(shapes)}")
            return np.stack(out)
    missing = sum(a is None for a in out)
    raise VideoReadError(f"{missing} of {len(pts)} frames could not be decoded (truncated or damaged?)")


def resize_crop(video: torch.Tensor, size: int) -> torch.Tensor:
    """``(T, C, H, W)`` float: shorter side to ``size`` (bilinear, antialiased), centre crop, clamp to [0, 1]."""
    h, w = video.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        if (new_h, new_w) != (h, w):
            video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        video = video[:, :, top : top + size, left : left + size]
    return video.clamp(0.0, 1.0)


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
            raise VideoReadError(f"{f.path}: frames {start}..{start + p.span - 1}: {_short_error(exc)}") from None
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


# ----------------------------------------------------------------------------------------------
# the folder: files, split, index, fingerprint


def list_videos(folder: str, extensions: Sequence[str]) -> list[str]:
    """Relative paths ("/" separators, sorted) of the files under ``folder`` with one of ``extensions``."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.lower().endswith(exts) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def in_val(rel: str, val_fraction: float) -> bool:
    """The hash split: a function of the relative path alone, so adding a file never moves another."""
    return xxhash.xxh3_64(rel.encode()).intdigest() / 2.0**64 < val_fraction


def _probe_all(folder: str, rels: list[str], skip_bad: bool) -> tuple[list[VideoFile], list[list[str]]]:
    files, bad = [], []
    for rel in rels:
        path = os.path.join(folder, rel)
        try:
            size = os.path.getsize(path)
            digest = content_hash(path, size)
            frames, fps, w, h, pts = probe(path)
        except Exception as exc:  # PyAV raises its own errors for a damaged container
            why = _short_error(exc).replace(path, rel)  # the fingerprint must not depend on where the data is
            if not skip_bad:
                raise VideoReadError(
                    f"{path}: cannot read this video ({why}); remove it, or pass data.skip_bad_files=true to skip it"
                ) from None
            log.warning("data.skip_bad_file path=%s error=%s", path, why)
            bad.append([rel, why])
            continue
        files.append(VideoFile(rel, path, size, digest, frames, fps, w, h, pts))
    return files, bad


def build_folder_datasets(d: Any) -> tuple[VideoClips, VideoClips, dict[str, Any]]:
    """``(train, val, fingerprint)`` for ``data=folder``; each problem is a ``ValueError`` naming the folder or file."""
    root = str(d.path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.path={root}: no such folder")
    exts = [str(e) for e in d.extensions]
    prep = Preprocessing(
        num_frames=int(d.num_frames),
        frame_step=int(d.frame_step),
        clip_stride=int(d.clip_stride) or (int(d.num_frames) - 1) * int(d.frame_step) + 1,
        image_size=int(d.image_size),
        channels=int(d.channels),
    )
    val_root = str(d.val_path) if d.val_path else None
    if val_root is not None:
        if not os.path.isdir(val_root):
            raise FileNotFoundError(f"data.val_path={val_root}: no such folder")
        train_rels, val_rels, how = list_videos(root, exts), list_videos(val_root, exts), "data.val_path"
        train_dir, val_dir = root, val_root
    elif os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
        train_rels, val_rels, how = list_videos(train_dir, exts), list_videos(val_dir, exts), "train/ and val/"
    else:
        rels = list_videos(root, exts)
        train_dir = val_dir = root
        train_rels = [r for r in rels if not in_val(r, float(d.val_fraction))]
        val_rels = [r for r in rels if in_val(r, float(d.val_fraction))]
        how = f"hash of the path, val_fraction={d.val_fraction}"
    for rels, where in ((train_rels, train_dir), (val_rels, val_dir)):
        if not rels:
            raise ValueError(
                f"data.path={root}: no video files with extensions {exts} under {where} (searched recursively)"
                + (
                    ""
                    if where != root or val_root
                    else "; with few files, raise data.val_fraction or use train/ and val/ subfolders or data.val_path"
                )
            )
    train_files, train_bad = _probe_all(train_dir, train_rels, bool(d.skip_bad_files))
    val_files, val_bad = _probe_all(val_dir, val_rels, bool(d.skip_bad_files))
    cache_dir = str(d.cache_dir) if d.cache_dir else ""
    if str(d.cache) == "disk" and not cache_dir:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(base, "resilient_train", "clips")
    if str(d.cache) == "memory" and int(getattr(d, "num_workers", 0)) > 0:
        log.warning(
            "data.cache=memory with data.num_workers>0: each worker keeps its own cache for one epoch only; "
            "use data.cache=disk"
        )
    train = VideoClips(train_files, prep, cache=str(d.cache), cache_dir=cache_dir)
    val = VideoClips(val_files, prep, cache=str(d.cache), cache_dir=cache_dir)
    for name, ds, rels, bad in (("train", train, train_rels, train_bad), ("val", val, val_rels, val_bad)):
        short = sum(f.frames < prep.span for f in ds.files)
        log.info(
            "data.index split=%s %d files, %d clips (%d skipped: %d too short / %d unreadable) split_by=%s",
            name,
            len(rels),
            len(ds),
            short + len(bad),
            short,
            len(bad),
            how,
        )
        if not len(ds):
            raise ValueError(
                f"data.path={root}: the {name} split has no clip of {prep.num_frames} frames "
                f"(frame_step={prep.frame_step}: {prep.span} frames of a file) among {len(rels)} file(s): "
                + ("add longer videos, or lower data.num_frames / data.frame_step" if rels else "it has no files")
            )
    fp = {
        "train": [f.record() for f in train_files],
        "val": [f.record() for f in val_files],
        "skipped": sorted(train_bad + val_bad),
        "split": how,
        "preprocessing": asdict(prep),
    }
    fp["digest"] = xxhash.xxh3_128(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    return train, val, fp


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


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    *,
    codec: str = "libx264",
    fps: int = 25,
    pix_fmt: str | None = None,
    pts: Sequence[int] | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """Encode uint8 frames ``(T, H, W, C)`` (C: 1 grey, 3 RGB, 4 RGBA) with PyAV.

    ``pts`` (in units of 1/``fps``; by default frame i is at i) allows a variable frame rate.
    """
    import fractions

    import av

    frames = np.asarray(frames, dtype=np.uint8)
    src = {1: "gray", 3: "rgb24", 4: "rgba"}[frames.shape[3]]
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt or {"gif": "pal8", "png": "rgb24", "ffv1": "bgr0"}.get(codec, "yuv420p")
        stream.codec_context.time_base = fractions.Fraction(1, fps)
        if options:
            stream.options = dict(options)
        for i, f in enumerate(frames):
            image = f[:, :, 0] if src == "gray" else f
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=src)
            frame.pts = int(pts[i]) if pts is not None else i
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


DEFAULT_EXTENSIONS = (".mp4", ".webm", ".gif", ".mkv", ".mov", ".avi")


def clips_of(
    inputs: Sequence[str | os.PathLike], prep: Preprocessing, *, skip_bad: bool = False
) -> tuple[VideoClips, list[list[str]]]:
    """Every clip of the given video files and folders (searched recursively), no split: for tools
    (tokenize, evaluate) that take whatever the user names. Returns the clips and the skipped files."""
    files: list[VideoFile] = []
    bad: list[list[str]] = []
    for item in map(str, inputs):
        if os.path.isdir(item):
            found, skipped = _probe_all(item, list_videos(item, DEFAULT_EXTENSIONS), skip_bad)
        elif os.path.isfile(item):
            found, skipped = _probe_all(os.path.dirname(item) or ".", [os.path.basename(item)], skip_bad)
        else:
            raise FileNotFoundError(f"{item}: no such video file or folder")
        files += found
        bad += skipped
    clips = VideoClips(files, prep)
    if not len(clips):
        raise ValueError(f"no clip of {prep.span} frames in {[str(i) for i in inputs]}")
    return clips, bad
