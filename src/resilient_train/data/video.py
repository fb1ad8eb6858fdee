"""One video file: what a probe knows of it, its frames decoded, resized and cropped; and writing one.

Owns :class:`VideoFile` (a probed file: size, content hash, frame count, each frame's presentation
time), :func:`probe`, :func:`content_hash`, :func:`decode_frames`, :func:`resize_crop`,
:class:`VideoReadError`, and :func:`write_video` (used by the tokenizer tools and the tests). The
clip index and its cache are :mod:`.clips`; folders, the split and :func:`~.folder.clips_of` are
:mod:`.folder`; the data fingerprint is :mod:`.fingerprint`.

* **A probe decodes nothing.** Every file is probed once at start-up (PyAV demuxes its packets: no
  decoding), giving its frame count and each frame's presentation time.
* **A clip's pixels depend only on the file's bytes and the preprocessing.** Decoding seeks to the
  key frame before the clip's first frame and decodes only up to its last; frames are converted to
  RGB (grey for ``channels=1``; an alpha channel is dropped), the shorter side is resized to
  ``image_size`` (bilinear, antialiased) and the centre cropped, so portrait and odd sizes work.
  Frame rates are not resampled: a variable-frame-rate file's frames are taken in presentation
  order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xxhash

__all__ = [
    "VideoReadError",
    "VideoFile",
    "content_hash",
    "probe",
    "write_video",
]

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


def short_error(exc: BaseException) -> str:
    """``exc`` in one line of at most about 300 characters: its type and its message."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def probe(path: str) -> tuple[int, float, int, int, tuple[int, ...]]:
    """``(frames, fps, width, height, pts)`` of the first video stream, from its packets; the first frame is decoded
    (a file with no decodable frame is unreadable, not short)."""
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
    _first_frame(path)
    return len(pts), float(rate) if rate else 0.0, int(width), int(height), tuple(sorted(pts))


def _first_frame(path: str) -> None:
    """Decode the first frame: a container whose packets are garbage (a GIF header and noise) would otherwise pass
    the probe as a short video."""
    import av

    try:
        with av.open(path) as container:
            next(container.decode(container.streams.video[0]))
    except StopIteration:
        raise VideoReadError("no decodable frame (the packets decode to nothing)") from None
    except Exception as exc:  # PyAV's errors: the codec refused the data
        raise VideoReadError(f"no decodable frame: {short_error(exc)}") from None


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
