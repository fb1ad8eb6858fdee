"""Tests for resilient_train.data: pure clips, resumable order, untouched global RNGs, real video files."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from resilient_train.data import (
    ResumableSampler,
    SequentialResumableSampler,
    SyntheticVideoDataset,
    batches_per_epoch,
    build_data,
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
    train, _, _ = build_data(cfg, seed=11)
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
    train, val, _ = build_data(cfg, seed=0)
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
    _, val, _ = build_data(cfg, seed=0)
    batches = list(build_loader(val, cfg, seed=0, epoch=0, shuffle=False))
    assert len(batches) == 2  # 8 // 3, last partial batch dropped
    assert torch.equal(batches[0], torch.stack([val[i] for i in range(3)]))
    tail = list(build_loader(val, cfg, seed=0, epoch=0, shuffle=False, start_batch=1))
    assert len(tail) == 1 and torch.equal(tail[0], batches[1])
    with pytest.raises(ValueError, match="start_batch"):
        build_loader(val, cfg, seed=0, epoch=0, start_batch=3)


def test_build_data_synthetic_and_errors():
    cfg = data_cfg(train_size=10, val_size=3)
    train, val, fingerprint = build_data(cfg, seed=4)
    assert (len(train), len(val), fingerprint) == (10, 3, None)  # synthetic: the config determines the data
    assert train.split == "train" and val.split == "val"
    assert torch.equal(train[0], synth(seed=4)[0])
    # Any object with attributes works, not just DictConfig.
    ns = SimpleNamespace(**OmegaConf.to_container(cfg))
    assert torch.equal(build_data(ns, seed=4)[1][2], val[2])
    with pytest.raises(ValueError, match="data.name"):
        build_data(data_cfg(name="imagenet"), seed=0)
    with pytest.raises(ValueError, match="data.path"):
        build_data(data_cfg(name="folder", path=None), seed=0)
