"""The clips both trainers of ``make bench-quality`` read: synthetic videos written as lossless RGB MP4 files.

* **Lossless.** H.264 in its RGB profile (``libx264rgb``, ``qp=0``) stores the 8-bit RGB frames exactly, at the
  model's size (no resize: the two readers cut larger frames differently, ours resizing the shorter side and
  cropping, upstream's MP4 reader only cropping). :func:`check_readers` demands that both readers (PyAV for ours,
  OpenCV for magvit2-pytorch's ``VideoDataset``) give the same tensors, bit for bit.
* **Long enough for upstream's reader.** ``magvit2_pytorch.data.video_to_tensor`` drops two frames: the last one it
  decodes (``frames[:-1]``), then one more (``[:, :num_frames]`` with its default ``num_frames=-1``); each file
  holds ``num_frames + 2`` frames so that both readers have the first ``num_frames`` (ours cuts clip 0 of each
  file: ``data.clip_stride`` defaults to one clip). Upstream's GIF reader crashes in 0.5.1, hence MP4.
* ``train/`` and ``val/`` subfolders: our loop's split (``data=folder``); upstream's trainer is given ``train/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from resilient_train.data.synthetic import SyntheticVideoDataset
from resilient_train.data.video import write_video

#: Frames beyond ``num_frames`` in each file (upstream's MP4 reader drops the last ones).
SPARE_FRAMES = 2
LOSSLESS = dict(codec="libx264rgb", pix_fmt="rgb24", options={"qp": "0"})


def write_clips(root: Path, *, train: int, val: int, num_frames: int, image_size: int, seed: int = 1234) -> Path:
    """``root/train`` and ``root/val``: ``train`` and ``val`` synthetic clips of ``num_frames + SPARE_FRAMES``
    frames, quantized to 8 bits; kept when already written with the same sizes (``root/clips.txt``)."""
    stamp = f"train={train} val={val} num_frames={num_frames} image_size={image_size} seed={seed} v1\n"
    if (root / "clips.txt").is_file() and (root / "clips.txt").read_text() == stamp:
        return root
    for split, count in (("train", train), ("val", val)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.mp4"):
            old.unlink()
        frames = SyntheticVideoDataset(
            seed=seed, split=split, length=count, num_frames=num_frames + SPARE_FRAMES, image_size=image_size
        )
        for i in range(count):
            clip = (frames[i].permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)  # (T, H, W, C)
            write_video(folder / f"clip{i:04d}.mp4", clip, **LOSSLESS)
    (root / "clips.txt").write_text(stamp)
    return root


def check_readers(folder: Path, num_frames: int, image_size: int) -> dict[str, int]:
    """Every file of ``folder`` decoded by both readers must give the same ``num_frames`` frames, bit for bit;
    returns how many frames each reader saw in the first file (ours: the probe's count; upstream's: what its
    ``video_to_tensor`` returns). Raises ``AssertionError`` naming the first file that differs."""
    from magvit2_pytorch.data import VideoDataset, video_to_tensor

    from resilient_train.data.clips import Preprocessing
    from resilient_train.data.folder import clips_of

    clips, _ = clips_of([folder], Preprocessing(num_frames, 1, num_frames, image_size, 3))
    mine = {}
    for f in clips.files:
        mine[os.path.basename(f.path)] = f
    theirs = VideoDataset(str(folder), image_size, num_frames=num_frames)
    by_name = {p.name: i for i, p in enumerate(theirs.paths)}
    if sorted(by_name) != sorted(mine) or len(clips) != len(mine):
        raise AssertionError(f"{folder}: the readers see different files or clips ({len(by_name)}, {len(clips)})")
    for k, f in enumerate(clips.files):
        a, b = clips[k], theirs[by_name[os.path.basename(f.path)]]
        if a.shape != b.shape or not torch.equal(a, b):
            worst = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
            raise AssertionError(
                f"{f.path}: our reader and magvit2-pytorch's differ (shapes {a.shape} {b.shape}, max |diff| {worst})"
            )
    first = clips.files[0]
    return {"frames_in_file": int(first.frames), "frames_upstream_reads": int(video_to_tensor(first.path).shape[1])}
