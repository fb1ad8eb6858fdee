"""Folders of real videos: clips over whole files, exact frames, bad input, the split, the cache, the fingerprint.

Every video here is encoded in the test (PyAV, and Pillow for GIF) from frames whose content is known,
so a clip's frames are asserted exactly (lossless codecs) or identified frame by frame (lossy ones).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import run_train

from resilient_train.checkpoint import committed
from resilient_train.data import (
    VideoReadError,
    build_data,
    build_folder_datasets,
    build_loader,
    fingerprint_difference,
    in_val,
    list_videos,
    write_video,
)
from resilient_train.verify import compare_checkpoints


def frames_of(n: int, h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    """Frame t: a random image whose red channel is the constant 5 * t (so a frame names itself)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    out[:, :, :, 0] = (5 * np.arange(n, dtype=np.uint8))[:, None, None]
    return out


def level_frames(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    """Frame t is uniformly grey at level 3 * t + 20: what survives a lossy codec."""
    return np.stack([np.full((h, w, 3), 3 * t + 20, dtype=np.uint8) for t in range(n)])


def cfg(path, **kw):
    """A folder data config; validation comes from ``<path>/../val`` (one video) unless ``val_path`` is given."""
    val = Path(path).parent / "val"
    if "val_path" not in kw and not val.is_dir():
        val.mkdir(parents=True)
        write_video(val / "v.mkv", frames_of(50, seed=99), codec="ffv1", fps=10)
    base = dict(
        name="folder",
        path=str(path),
        num_frames=5,
        image_size=16,
        channels=3,
        batch_size=1,
        num_workers=0,
        frame_step=1,
        clip_stride=0,
        val_fraction=0.0,
        val_path=str(val),
        cache="none",
        cache_dir=None,
        skip_bad_files=False,
        extensions=[".mp4", ".webm", ".gif", ".mkv", ".mov", ".avi"],
    )
    base.update(kw)
    return SimpleNamespace(**base)


def as_uint8(clip: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) float in [0, 1] -> (T, H, W, C) uint8, exactly (the values are k / 255)."""
    return np.round(clip.permute(1, 2, 3, 0).numpy() * 255).astype(np.uint8)


LOSSLESS = [("ffv1", "mkv"), ("png", "mov"), ("gif", "gif")]


@pytest.fixture
def folder(tmp_path) -> Path:
    """An empty data folder (validation comes from a sibling, see :func:`cfg`)."""
    (tmp_path / "d").mkdir()
    return tmp_path / "d"


def write(path: Path, frames: np.ndarray, codec: str, **kw) -> None:
    if codec == "gif":  # Pillow's GIF writer; few colours per frame keep the palette exact
        iio.imwrite(path, frames, plugin="pillow", loop=0, duration=100)
    else:
        write_video(path, frames, codec=codec, fps=10, **kw)


@pytest.mark.parametrize("codec, ext", LOSSLESS)
def test_clips_cover_whole_videos_with_stride_and_frame_step_exactly(folder, codec, ext):
    frames = frames_of(40) if codec != "gif" else level_frames(40)
    write(folder / f"a.{ext}", frames, codec)
    train, _, _ = build_folder_datasets(cfg(folder))
    assert len(train) == 8  # clips of 5 frames end to end over 40
    for k in (0, 3, 7):
        assert np.array_equal(as_uint8(train[k]), frames[5 * k : 5 * k + 5]), k
    train, _, _ = build_folder_datasets(cfg(folder, frame_step=3, clip_stride=7))
    span = 13  # (5 - 1) * 3 + 1
    starts = list(range(0, 40 - span + 1, 7))
    assert len(train) == len(starts) == 4
    for k, start in enumerate(starts):
        assert np.array_equal(as_uint8(train[k]), frames[start : start + span : 3]), start


@pytest.mark.parametrize(
    "codec, ext, options",
    [
        ("libx264", "mp4", {"crf": "0"}),
        ("libvpx-vp9", "webm", {"lossless": "1"}),
        ("mpeg4", "avi", {"qmin": "1", "qmax": "2"}),
    ],
)
def test_lossy_containers_seek_to_the_right_frames(folder, codec, ext, options):
    frames = level_frames(60)
    write(folder / f"a.{ext}", frames, codec, options=options)
    train, _, _ = build_folder_datasets(cfg(folder, frame_step=2, clip_stride=11))
    for k in range(len(train)):
        got = as_uint8(train[k])[:, :, :, 1].astype(int).mean(axis=(1, 2))
        ids = np.round((got - 20) / 3).astype(int).tolist()
        assert ids == list(range(11 * k, 11 * k + 9, 2)), (k, got)


def test_variable_frame_rate_grey_alpha_and_portrait(folder):
    frames = frames_of(12)
    pts = [0, 1, 2, 5, 6, 7, 20, 21, 22, 23, 40, 41]  # gaps: a variable frame rate
    write(folder / "vfr.mkv", frames, "ffv1", pts=pts)
    train, _, _ = build_folder_datasets(cfg(folder, clip_stride=4))
    assert np.array_equal(as_uint8(train[1]), frames[4:9])  # presentation order, no resampling

    grey = frames_of(6)[:, :, :, :1]
    (folder / "vfr.mkv").unlink()
    write(folder / "grey.mkv", grey, "ffv1", pix_fmt="gray")
    rgb, _, _ = build_folder_datasets(cfg(folder))
    one, _, _ = build_folder_datasets(cfg(folder, channels=1))
    assert np.array_equal(as_uint8(one[0]), grey[:5])
    assert np.array_equal(as_uint8(rgb[0]), np.repeat(grey[:5], 3, axis=3))

    (folder / "grey.mkv").unlink()
    rgba = np.concatenate([frames_of(6), np.full((6, 16, 16, 1), 77, np.uint8)], axis=3)
    write(folder / "alpha.mov", rgba, "png", pix_fmt="rgba")
    train, _, _ = build_folder_datasets(cfg(folder))
    assert np.array_equal(as_uint8(train[0]), rgba[:5, :, :, :3])  # alpha dropped

    (folder / "alpha.mov").unlink()
    tall = np.zeros((6, 48, 16, 3), np.uint8)
    tall[:, 16:32] = frames_of(6)  # portrait: the middle third survives the centre crop
    write(folder / "tall.mkv", tall, "ffv1")
    train, _, _ = build_folder_datasets(cfg(folder))
    assert np.array_equal(as_uint8(train[0]), frames_of(6)[:5])


def test_short_files_are_skipped_and_counted_and_a_folder_without_clips_is_refused(folder, caplog):
    write(folder / "long.mkv", frames_of(12), "ffv1")
    write(folder / "short.mkv", frames_of(4), "ffv1")
    with caplog.at_level(logging.INFO):
        train, _, _ = build_folder_datasets(cfg(folder))
    assert len(train) == 2
    assert "2 files, 2 clips (1 skipped: 1 too short / 0 unreadable)" in caplog.text
    with pytest.raises(ValueError, match=r"no clip of 13 frames .* add longer videos"):
        build_folder_datasets(cfg(folder, num_frames=13))


def test_empty_folder_and_unknown_extensions_are_refused_by_name(folder):
    (folder / "notes.txt").write_text("no videos here")
    with pytest.raises(ValueError, match=f"data.path={folder}: no video files with extensions"):
        build_folder_datasets(cfg(folder))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_folder_datasets(cfg(folder / "missing"))


def test_unreadable_and_truncated_files_are_named_or_skipped_and_recorded(folder):
    write(folder / "good.mkv", frames_of(10), "ffv1")
    write(folder / "cut.mp4", level_frames(30), "libx264")
    data = (folder / "cut.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) // 3])
    (folder / "junk.webm").write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoReadError, match=r"cut.mp4: cannot read this video .* data.skip_bad_files=true"):
        build_folder_datasets(cfg(folder))
    train, _, fp = build_folder_datasets(cfg(folder, skip_bad_files=True))
    assert [f.rel for f in train.files] == ["good.mkv"] and len(train) == 2
    assert [s[0] for s in fp["skipped"]] == ["cut.mp4", "junk.webm"]
    assert str(folder) not in json.dumps(fp), "the fingerprint must not depend on where the folder is"


def test_hash_split_never_moves_a_file_when_others_are_added(tmp_path):
    names = [f"v{i:02d}.mkv" for i in range(30)]
    for n in names:
        (tmp_path / n).write_bytes(b"")  # listing and the split never open a file
    val = {r for r in list_videos(str(tmp_path), [".mkv"]) if in_val(r, 0.2)}
    assert 0 < len(val) < 30
    for i in range(30, 60):
        (tmp_path / f"v{i:02d}.mkv").write_bytes(b"")
    val2 = {r for r in list_videos(str(tmp_path), [".mkv"]) if in_val(r, 0.2)}
    assert val2 & set(names) == val


def test_val_path_and_subfolders(tmp_path):
    (tmp_path / "t" / "train").mkdir(parents=True)
    (tmp_path / "t" / "val").mkdir()
    write(tmp_path / "t" / "train" / "a.mkv", frames_of(10), "ffv1")
    write(tmp_path / "t" / "val" / "b.mkv", frames_of(5, seed=1), "ffv1")
    train, val, fp = build_folder_datasets(cfg(tmp_path / "t", val_path=None))
    assert (len(train), len(val), fp["split"]) == (2, 1, "train/ and val/")
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "elsewhere" / "c.mkv", frames_of(15, seed=2), "ffv1")
    train, val, fp = build_folder_datasets(cfg(tmp_path / "t" / "train", val_path=str(tmp_path / "elsewhere")))
    assert (len(train), len(val), fp["split"]) == (2, 3, "data.val_path")


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_clips_are_bit_identical_to_decoded_ones(tmp_path, cache):
    data = tmp_path / "v"
    data.mkdir()
    write(data / "a.mp4", level_frames(30, 24, 40), "libx264")  # lossy and resized: floats that are not k / 255
    plain, _, _ = build_folder_datasets(cfg(data))
    cached, _, _ = build_folder_datasets(cfg(data, cache=cache, cache_dir=str(tmp_path / "cache")))
    first = [cached[k] for k in range(len(cached))]
    again = [cached[k] for k in range(len(cached))]
    for k in range(len(plain)):
        assert torch.equal(first[k], plain[k]) and torch.equal(again[k], plain[k]), k
    if cache == "disk":
        files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
        assert len(files) == len(plain) and all(f.endswith(".clip") for f in files), files
        fresh, _, _ = build_folder_datasets(cfg(data, cache="disk", cache_dir=str(tmp_path / "cache")))
        assert torch.equal(fresh[2], plain[2])  # read back by another dataset (a new process would do the same)


def test_fingerprint_follows_the_files_not_the_folder(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    write(a / "x.mkv", frames_of(10), "ffv1")
    write(a / "y.mkv", frames_of(10, seed=1), "ffv1")
    _, _, fp = build_folder_datasets(cfg(a))
    shutil.copytree(a, tmp_path / "b")
    _, _, moved = build_folder_datasets(cfg(tmp_path / "b"))
    assert moved == fp
    write(tmp_path / "b" / "y.mkv", frames_of(10, seed=2), "ffv1")
    write(tmp_path / "b" / "z.mkv", frames_of(10, seed=3), "ffv1")
    (tmp_path / "b" / "x.mkv").unlink()
    _, _, changed = build_folder_datasets(cfg(tmp_path / "b"))
    diff = fingerprint_difference(fp, changed)
    assert diff[:2] == ["train: removed x.mkv", "train: added z.mkv"] and diff[2].startswith("train: changed y.mkv")


def test_folder_loader_with_workers_matches_without(folder):
    write(folder / "a.mkv", frames_of(40), "ffv1")
    c = cfg(folder, num_workers=2)
    train, _, _ = build_data(c, 0)
    with_workers = list(build_loader(train, c, seed=0, epoch=1, start_batch=3))
    c.num_workers = 0
    alone = list(build_loader(train, c, seed=0, epoch=1, start_batch=3))
    assert len(with_workers) == len(alone) == 5 and all(torch.equal(x, y) for x, y in zip(with_workers, alone))


# -- end to end: train.py on a folder -----------------------------------------------------------


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos") / "data"
    root.mkdir()
    for i in range(5):
        write(root / f"clip{i}.mp4", level_frames(25 + 5 * i, 24, 32), "libx264")
    return root


FOLDER = ("data=folder", "data.val_fraction=0.2", "data.num_workers=2", "data.cache=disk")


@pytest.mark.slow  # moved to keep the default suite under 15 minutes
def test_resume_mid_epoch_on_a_folder_with_workers_and_cache_is_bit_identical(video_folder, tmp_path):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    ref, split = tmp_path / "ref", tmp_path / "split"
    common = (*FOLDER, cache, f"data.path={video_folder}", "checkpoint.every_n_steps=3")
    run_train(ref, *common, "trainer.max_steps=8")
    run_train(split, *common, "trainer.max_steps=5")
    # Moved data: the same files under another path resume, with a log line.
    moved = tmp_path / "moved"
    shutil.copytree(video_folder, moved)
    proc = run_train(split, "resume_from=auto", "trainer.max_steps=8", f"data.path={moved}", *FOLDER, cache)
    assert "resume.data_moved" in proc.stdout + proc.stderr
    assert compare_checkpoints(committed(ref / "checkpoints")[-1], committed(split / "checkpoints")[-1]) is None

    # Changed data: refused before training, naming the file; allowed with the flag, and recorded.
    write(moved / "clip1.mp4", level_frames(40, 24, 32), "libx264")
    args = ("resume_from=auto", "trainer.max_steps=10", f"data.path={moved}", *FOLDER, cache)
    proc = run_train(split, *args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "changed clip1.mp4" in proc.stderr and "resume.allow_config_change=true" in proc.stderr
    run_train(split, *args, "resume.allow_config_change=true")
    manifest = json.loads((committed(split / "checkpoints")[-1] / "manifest.json").read_text())
    assert any(c.startswith("data: train: changed clip1.mp4") or "clip1.mp4" in c for c in manifest["config_changes"])
    assert manifest["data_fingerprint"]
