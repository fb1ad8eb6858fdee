"""Tests for resilient_train.data: pure clips, resumable order, untouched global RNGs, real video files."""

from __future__ import annotations

import logging
import os
import random
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from resilient_train.data import (
    ResumableSampler,
    SequentialResumableSampler,
    SyntheticVideoDataset,
    VideoFolderDataset,
    VideoReadError,
    batches_per_epoch,
    build_datasets,
    build_loader,
)


def synth(seed: int = 0, split: str = "train", length: int = 16, **kw) -> SyntheticVideoDataset:
    args = dict(num_frames=5, image_size=16, channels=3, num_shapes=3)
    args.update(kw)
    return SyntheticVideoDataset(seed=seed, split=split, length=length, **args)


def data_cfg(**overrides):
    cfg = dict(
        name="synthetic",
        path=None,
        num_frames=5,
        image_size=16,
        channels=3,
        batch_size=4,
        num_workers=0,
        train_size=24,
        val_size=8,
        num_shapes=3,
        val_fraction=0.1,
        extensions=[".mp4", ".webm", ".gif"],
    )
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def global_rng_snapshot() -> tuple:
    np_state = np.random.get_state()
    return (
        torch.get_rng_state().clone(),
        (np_state[0], np_state[1].copy(), np_state[2], np_state[3], np_state[4]),
        random.getstate(),
    )


def assert_same_global_rng(before: tuple) -> None:
    after = global_rng_snapshot()
    assert torch.equal(before[0], after[0]), "global torch RNG was advanced"
    b, a = before[1], after[1]
    assert b[0] == a[0] and np.array_equal(b[1], a[1]) and b[2:] == a[2:], "global numpy RNG was advanced"
    assert before[2] == after[2], "python random was advanced"


# --------------------------------------------------------------------------------------------------
# Synthetic dataset
# --------------------------------------------------------------------------------------------------


def test_synthetic_shape_dtype_range():
    ds = synth(num_frames=7, image_size=24, channels=3)
    assert len(ds) == 16
    for i in range(4):
        x = ds[i]
        assert x.shape == (3, 7, 24, 24)
        assert x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert torch.isfinite(x).all()
        # Something moves: not every frame is identical.
        assert not torch.equal(x[:, 0], x[:, -1])
    grey = synth(channels=1)[0]
    assert grey.shape == (1, 5, 16, 16)


def test_synthetic_is_pure_function_of_seed_split_index():
    a, b = synth(seed=3), synth(seed=3)
    # Read b in a different order, and some items twice, before comparing.
    later = [b[i] for i in reversed(range(len(b)))]
    for i in range(len(a)):
        assert torch.equal(a[i], b[i])
        assert torch.equal(a[i], later[len(b) - 1 - i])
    # Same bytes in another dataset length: the clip does not depend on the length either.
    assert torch.equal(synth(seed=3, length=100)[5], a[5])


def test_synthetic_clips_differ():
    a = synth(seed=0)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], synth(seed=1)[0])
    assert not torch.equal(a[0], synth(seed=0, split="val")[0])
    clips = torch.stack([a[i] for i in range(len(a))])
    assert len({c.numpy().tobytes() for c in clips}) == len(a)


def test_synthetic_index_and_split_errors():
    ds = synth(length=4)
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds[-5]
    assert torch.equal(ds[-1], ds[3])
    with pytest.raises(ValueError, match="split"):
        synth(split="test")


def test_synthetic_render_is_fast():
    import time

    ds = synth(num_frames=16, image_size=64, length=200)
    ds[0]
    start = time.perf_counter()
    for i in range(50):
        ds[i]
    per_clip = (time.perf_counter() - start) / 50
    assert per_clip < 0.05, f"{per_clip * 1e3:.1f} ms per 64x64x16 clip"


def test_reading_clips_leaves_global_rngs_untouched():
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = global_rng_snapshot()
    ds = synth(seed=7)
    for i in range(len(ds)):
        ds[i]
    list(ResumableSampler(50, seed=1, epoch=2))
    assert_same_global_rng(before)


# --------------------------------------------------------------------------------------------------
# Samplers and loaders
# --------------------------------------------------------------------------------------------------


def test_sampler_is_permutation_fixed_by_seed_and_epoch():
    full = list(ResumableSampler(37, seed=5, epoch=0))
    assert sorted(full) == list(range(37))
    assert list(ResumableSampler(37, seed=5, epoch=0)) == full
    assert list(ResumableSampler(37, seed=5, epoch=1)) != full
    assert list(ResumableSampler(37, seed=6, epoch=0)) != full
    # Iterating twice gives the same order (no hidden state).
    s = ResumableSampler(37, seed=5, epoch=0)
    assert list(s) == list(s)
    # The order does not depend on the global torch RNG.
    torch.manual_seed(0)
    x = list(ResumableSampler(37, seed=5, epoch=3))
    torch.manual_seed(999)
    assert list(ResumableSampler(37, seed=5, epoch=3)) == x


@pytest.mark.parametrize("start", [0, 1, 12, 36, 37])
def test_sampler_start_index_resumes_same_permutation(start):
    full = list(ResumableSampler(37, seed=5, epoch=4))
    resumed = ResumableSampler(37, seed=5, epoch=4, start_index=start)
    assert len(resumed) == 37 - start
    assert list(resumed) == full[start:]


def test_sampler_rejects_bad_start():
    with pytest.raises(ValueError):
        ResumableSampler(10, seed=0, epoch=0, start_index=11)
    with pytest.raises(ValueError):
        SequentialResumableSampler(10, start_index=-1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_start_batch_yields_tail_of_epoch(num_workers):
    cfg = data_cfg(num_workers=num_workers)
    train, _ = build_datasets(cfg, seed=11)
    assert batches_per_epoch(train, cfg) == 6
    full = list(build_loader(train, cfg, seed=11, epoch=2))
    assert len(full) == 6
    assert all(b.shape == (4, 3, 5, 16, 16) for b in full)
    # Batches are the sampler's order applied to the dataset.
    order = list(ResumableSampler(len(train), seed=11, epoch=2))
    for j, batch in enumerate(full):
        assert torch.equal(batch, torch.stack([train[i] for i in order[4 * j : 4 * j + 4]]))
    for start_batch in (1, 4, 6):
        tail = list(build_loader(train, cfg, seed=11, epoch=2, start_batch=start_batch))
        assert len(tail) == 6 - start_batch
        for got, want in zip(tail, full[start_batch:]):
            assert torch.equal(got, want)
    other_epoch = list(build_loader(train, cfg, seed=11, epoch=3))
    assert not all(torch.equal(a, b) for a, b in zip(other_epoch, full))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_loaders_leaves_global_rngs_untouched(num_workers):
    cfg = data_cfg(num_workers=num_workers)
    train, val = build_datasets(cfg, seed=0)
    torch.manual_seed(42)
    np.random.seed(42)
    random.seed(42)
    before = global_rng_snapshot()
    loader = build_loader(train, cfg, seed=0, epoch=0, start_batch=2)
    for _ in range(2):  # iter() twice: each iterator draws a base seed (from the loader's own generator)
        assert len(list(loader)) == 4
    list(build_loader(val, cfg, seed=0, epoch=0, shuffle=False))
    assert_same_global_rng(before)


def test_sequential_loader_and_start_batch():
    cfg = data_cfg(batch_size=3)
    _, val = build_datasets(cfg, seed=0)
    batches = list(build_loader(val, cfg, seed=0, epoch=0, shuffle=False))
    assert len(batches) == 2  # 8 // 3, last partial batch dropped
    assert torch.equal(batches[0], torch.stack([val[i] for i in range(3)]))
    tail = list(build_loader(val, cfg, seed=0, epoch=0, shuffle=False, start_batch=1))
    assert len(tail) == 1 and torch.equal(tail[0], batches[1])
    with pytest.raises(ValueError, match="start_batch"):
        build_loader(val, cfg, seed=0, epoch=0, start_batch=3)


def test_build_datasets_synthetic_and_errors():
    cfg = data_cfg(train_size=10, val_size=3)
    train, val = build_datasets(cfg, seed=4)
    assert (len(train), len(val)) == (10, 3)
    assert train.split == "train" and val.split == "val"
    assert torch.equal(train[0], synth(seed=4)[0])
    # Any object with attributes works, not just DictConfig.
    ns = SimpleNamespace(**OmegaConf.to_container(cfg))
    assert torch.equal(build_datasets(ns, seed=4)[1][2], val[2])
    with pytest.raises(ValueError, match="data.name"):
        build_datasets(data_cfg(name="imagenet"), seed=0)
    with pytest.raises(ValueError, match="data.path"):
        build_datasets(data_cfg(name="folder", path=None), seed=0)


# --------------------------------------------------------------------------------------------------
# Folder of real videos
# --------------------------------------------------------------------------------------------------


def grey_ramp_frames(n: int, h: int, w: int) -> np.ndarray:
    """Frame t is uniformly grey with value 40 * t (few distinct colours, so GIF palettes are exact)."""
    return np.stack([np.full((h, w, 3), 40 * t, dtype=np.uint8) for t in range(n)])


def write_gif(path, frames: np.ndarray) -> None:
    iio.imwrite(path, frames, plugin="pillow", loop=0, duration=100)


def folder_ds(path, split="train", **kw) -> VideoFolderDataset:
    args = dict(num_frames=4, image_size=16, channels=3)
    args.update(kw)
    return VideoFolderDataset(path=str(path), split=split, **args)


def make_split_folder(root, names) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")  # listing never opens the files


def test_folder_gif_shape_range_determinism(tmp_path):
    write_gif(tmp_path / "a.gif", grey_ramp_frames(6, 20, 24))
    write_gif(tmp_path / "b.gif", grey_ramp_frames(6, 20, 24))
    ds = folder_ds(tmp_path, split="train", num_frames=6)
    assert len(ds) == 1 and ds.files[0].endswith("a.gif")
    x = ds[0]
    assert x.shape == (3, 6, 16, 16) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Uniform frames stay uniform through resize+crop, in frame order.
    want = torch.tensor([40 * t / 255 for t in range(6)]).view(1, 6, 1, 1).expand_as(x)
    assert torch.allclose(x, want, atol=1e-5)
    assert torch.equal(x, folder_ds(tmp_path, split="train", num_frames=6)[0])
    grey = folder_ds(tmp_path, num_frames=6, channels=1)[0]
    assert grey.shape == (1, 6, 16, 16)
    assert torch.allclose(grey, want[:1], atol=1e-5)


def test_folder_centre_crop_keeps_the_middle(tmp_path):
    # 16x24 frames with red 4-pixel borders left and right: image_size 16 needs no resize, and the
    # centre crop (columns 4..19) must contain only the green middle. (x is (C, T, H, W): x[0] is red.)
    frames = np.zeros((3, 16, 24, 3), dtype=np.uint8)
    frames[..., 1] = 255
    frames[:, :, :4] = (255, 0, 0)
    frames[:, :, 20:] = (255, 0, 0)
    write_gif(tmp_path / "a.gif", frames)
    write_gif(tmp_path / "z.gif", frames)
    x = folder_ds(tmp_path, num_frames=3)[0]
    assert torch.equal(x[1], torch.ones(3, 16, 16))
    assert torch.equal(x[0], torch.zeros(3, 16, 16)) and torch.equal(x[2], torch.zeros(3, 16, 16))
    # Downscaled 2x (32x48 -> 16x24 -> crop), the red borders are cut off; the antialiasing filter
    # only lets them bleed into the outermost kept column.
    big = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)
    write_gif(tmp_path / "a.gif", big)
    y = folder_ds(tmp_path, num_frames=3)[0]
    assert y.shape == (3, 3, 16, 16)
    assert torch.allclose(y[1, :, :, 1:-1], torch.ones(3, 16, 14), atol=1e-5)
    assert y[0, :, :, 1:-1].max() < 1e-5
    assert y[1].min() > 0.8 and y[0].max() < 0.2


def test_folder_short_video_repeats_last_frame(tmp_path, caplog):
    write_gif(tmp_path / "a.gif", grey_ramp_frames(6, 20, 24))
    write_gif(tmp_path / "b.gif", grey_ramp_frames(6, 20, 24))
    ds = folder_ds(tmp_path, num_frames=9)
    with caplog.at_level(logging.WARNING, logger="resilient_train.data"):
        x = ds[0]
        ds[0]
    assert x.shape == (3, 9, 16, 16)
    for t in range(6, 9):
        assert torch.equal(x[:, t], x[:, 5])
    assert not torch.equal(x[:, 4], x[:, 5])
    warnings = [r for r in caplog.records if "a.gif" in r.getMessage()]
    assert len(warnings) == 1, "the short-video warning is logged once per file"


def _write_ffmpeg(path, frames, **kw) -> None:
    try:
        iio.imwrite(path, frames, plugin="FFMPEG", fps=8, macro_block_size=1, **kw)
    except Exception as exc:  # pragma: no cover - depends on the local ffmpeg build
        pytest.skip(f"cannot write {os.path.basename(path)} here: {exc}")


@pytest.mark.parametrize("name, kw", [("clip.mp4", {}), ("clip.webm", {"codec": "libvpx-vp9"})])
def test_folder_reads_ffmpeg_videos(tmp_path, name, kw):
    frames = grey_ramp_frames(6, 32, 48)
    _write_ffmpeg(str(tmp_path / name), frames, **kw)
    write_gif(tmp_path / "zz.gif", frames)  # the val split
    ds = folder_ds(tmp_path, num_frames=5)
    assert ds.files[0].endswith(name)
    x = ds[0]
    assert x.shape == (3, 5, 16, 16) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    means = x.mean(dim=(0, 2, 3))
    want = torch.tensor([40 * t / 255 for t in range(5)])
    assert torch.allclose(means, want, atol=0.05), means  # lossy codec: roughly the right brightness
    assert torch.equal(x, folder_ds(tmp_path, num_frames=5)[0])


def test_folder_missing_and_empty(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        folder_ds(missing)
    empty = tmp_path / "empty_videos"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a video")
    with pytest.raises(ValueError, match="empty_videos") as info:
        folder_ds(empty)
    assert ".mp4" in str(info.value)


def test_folder_corrupt_file_names_the_file(tmp_path):
    (tmp_path / "x.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
    (tmp_path / "y.gif").write_bytes(np.random.default_rng(1).bytes(2048))
    train = folder_ds(tmp_path, split="train")
    val = folder_ds(tmp_path, split="val")
    with pytest.raises(VideoReadError, match="x.mp4"):
        train[0]
    with pytest.raises(ValueError, match="y.gif"):
        val[0]


def test_folder_split_rule_without_subfolders(tmp_path):
    names = [f"v{i:02d}.gif" for i in range(9)] + ["sub/w.MP4", "sub/deeper/a.webm", "readme.txt"]
    make_split_folder(tmp_path, names)
    train = folder_ds(tmp_path, split="train", val_fraction=0.2)
    val = folder_ds(tmp_path, split="val", val_fraction=0.2)
    rel = lambda ds: [os.path.relpath(f, tmp_path).replace(os.sep, "/") for f in ds.files]  # noqa: E731
    everything = sorted(n for n in names if not n.endswith(".txt"))
    assert rel(train) + rel(val) == everything  # sorted, recursive, case-insensitive extensions
    assert len(val) == 2  # round(11 * 0.2)
    assert rel(val) == everything[-2:]
    # At least one val file even for a tiny fraction.
    assert len(folder_ds(tmp_path, split="val", val_fraction=0.0)) == 1
    # Restricting the extensions.
    assert len(folder_ds(tmp_path, split="train", extensions=["gif"])) == 8


def test_folder_split_needs_a_training_file(tmp_path):
    make_split_folder(tmp_path / "one", ["only.gif"])
    with pytest.raises(ValueError, match="one") as info:
        folder_ds(tmp_path / "one", split="train")
    assert "1 file" in str(info.value)


def test_folder_train_val_subfolders(tmp_path):
    make_split_folder(tmp_path, ["train/b.gif", "train/x/a.mp4", "val/c.webm", "stray.gif"])
    train = folder_ds(tmp_path, split="train")
    val = folder_ds(tmp_path, split="val")
    assert [os.path.relpath(f, tmp_path) for f in train.files] == ["train/b.gif", os.path.join("train", "x", "a.mp4")]
    assert [os.path.relpath(f, tmp_path) for f in val.files] == [os.path.join("val", "c.webm")]
    make_split_folder(tmp_path / "empty_val", ["train/a.gif"])
    (tmp_path / "empty_val" / "val").mkdir()
    with pytest.raises(ValueError, match="val"):
        folder_ds(tmp_path / "empty_val", split="val")


def test_build_datasets_folder(tmp_path):
    for name in ("a.gif", "b.gif", "c.gif"):
        write_gif(tmp_path / name, grey_ramp_frames(6, 20, 24))
    cfg = data_cfg(name="folder", path=str(tmp_path), num_frames=4, val_fraction=0.34)
    del cfg["train_size"], cfg["val_size"], cfg["num_shapes"]  # the folder config group lacks them
    train, val = build_datasets(cfg, seed=0)
    assert (len(train), len(val)) == (2, 1)
    assert val[0].shape == (3, 4, 16, 16)
    cfg.batch_size = 1
    batches = list(build_loader(train, cfg, seed=0, epoch=0))
    assert len(batches) == 2 and batches[0].shape == (1, 3, 4, 16, 16)
