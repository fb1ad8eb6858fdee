"""Reconstruction and codebook metrics: checked against values computed another way, and in a real run's history."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from resilient_train.monitor import read_history
from resilient_train.tokenizer.metrics import codebook_stats, psnr, ssim


def test_psnr_of_a_known_error():
    x = torch.rand(3, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    assert torch.allclose(psnr(x, x + 0.1), torch.full((3,), 20.0), atol=1e-4)  # MSE 0.01
    assert torch.equal(psnr(x, x), torch.full((3,), 100.0))


def _naive_ssim_one_window(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two 11x11 images with the Gaussian window, written out from the paper's formulas."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    va, vb = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
    cov = (w * (a - mu_a) * (b - mu_b)).sum()
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))


def test_ssim_matches_the_formula_and_orders_by_damage():
    rng = np.random.default_rng(1)
    a = rng.random((11, 11))
    b = np.clip(a + rng.normal(0, 0.1, (11, 11)), 0, 1)
    t = lambda v: torch.tensor(v, dtype=torch.float32)[None, None, None]  # noqa: E731  (1, 1, 1, 11, 11)
    assert math.isclose(float(ssim(t(a), t(b))[0]), _naive_ssim_one_window(a, b), rel_tol=1e-4)
    x = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    scores = [float(ssim(x, (x + s * noise).clamp(0, 1)).mean()) for s in (0.0, 0.05, 0.2)]
    assert scores[0] == 1.0 and scores[0] > scores[1] > scores[2]


def test_codebook_usage_and_perplexity():
    uniform = codebook_stats(torch.arange(16), 64)
    assert uniform["codebook_usage"] == 0.25 and uniform["codes_seen"] == 16
    assert math.isclose(uniform["codebook_perplexity"], 16.0)
    one = codebook_stats(torch.full((100,), 7), 64)
    assert one["codebook_usage"] == 1 / 64 and one["codebook_perplexity"] == 1.0
    skewed = codebook_stats(torch.tensor([0] * 90 + [1] * 10), 4)
    assert math.isclose(skewed["codebook_perplexity"], math.exp(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))))


def test_a_run_logs_the_metrics_at_each_evaluation_and_status_shows_them(trained_run):
    evals = [r for r in read_history(trained_run) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1 and r["mse"] > 0
        assert 0 < r["codebook_usage"] <= 1 and r["codebook_perplexity"] >= 1
    out = subprocess.run(
        [sys.executable, "-m", "resilient_train.status", str(trained_run)], capture_output=True, text=True, cwd=REPO
    ).stdout
    assert f"PSNR {evals[-1]['psnr']:.2f} dB" in out and "codebook" in out and "perplexity" in out


@pytest.mark.slow  # extra coverage; keeps the default suite under 15 minutes
def test_tensorboard_log_continues_after_a_resume_without_duplicate_or_stale_steps(tmp_path):
    from conftest import run_train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=12", "checkpoint.every_n_steps=5", "logger=tensorboard")
    # Fork the timeline at step 10: what steps 11 and 12 logged belongs to the discarded one.
    run_train(run, f"resume_from={run / 'checkpoints' / 'step_00000010'}", "trainer.max_steps=14", experiment=None)
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    history = {r["step"]: r for r in read_history(run) if r["kind"] == "train"}
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 15))
    assert all(math.isclose(e.value, history[e.step]["loss"], rel_tol=1e-6) for e in loss)  # the new timeline's
    evals = {r["step"]: r for r in read_history(run) if r["kind"] == "eval"}
    assert [e.step for e in ea.Scalars("val/psnr")] == sorted(evals) == [10, 14]
    assert math.isclose(ea.Scalars("val/codebook_usage")[-1].value, evals[14]["codebook_usage"], rel_tol=1e-6)
    assert [e.step for e in ea.Images("samples")] == [10, 14]
    hparams = ea.PluginTagToContent("hparams")  # the hyperparameters, written once at the fresh start
    assert "_hparams_/session_start_info" in hparams and b"optimizer.lr" in hparams["_hparams_/session_start_info"]


@pytest.mark.slow  # extra coverage; keeps the default suite under 15 minutes
def test_tensorboard_after_an_in_process_rollback_has_each_step_once_and_counts_the_rollback(tmp_path):
    from conftest import run_train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=14", "logger=tensorboard", "chaos.enabled=true", "chaos.nan_steps=[13]")
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    history = {r["step"]: r for r in read_history(run) if r["kind"] == "train"}
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 15))  # steps 11-12 logged twice, shown once
    assert all(math.isclose(e.value, history[e.step]["loss"], rel_tol=1e-6) for e in loss)
    assert [(e.step, e.value) for e in ea.Scalars("faults/rollbacks")] == [(13, 1.0)]
