"""The EMA's warm-up (``trainer.ema.warmup``): the average starts at the trained weights, not the random initial ones,
and a checkpoint written before the warm-up existed resumes with the constant decay it had. Both weights are
evaluated, and "best" and ``export`` name the ones they hold (``checkpoint.best_of``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_train
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_resume import rewrite_json_in_checkpoint

from resilient_train.checkpoint import committed, load_checkpoint
from resilient_train.monitor import read_history
from resilient_train.tokenizer.model import build_model
from resilient_train.train.parts import EMA
from resilient_train.train.rng import seed_everything
from resilient_train.verify import compare_checkpoints


def test_the_decay_ramps_from_a_tenth_to_the_configured_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, 0.999, update_every=2)
    assert [ema.decay_at(s) for s in (0, 1, 2, 180)] == [0.1, 0.1, 2 / 11, 91 / 100]
    assert ema.decay_at(2 * 8991) == pytest.approx(0.999) and ema.decay_at(10**9) == 0.999
    assert EMA(model, 0.999, warmup=False).decay_at(0) == 0.999
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(0)  # the first update keeps a tenth of the initial weights
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, 0.1 * init[k] + 0.9 * (init[k] + 1.0), rtol=0, atol=1e-6)
    ema.update(1)  # not an update step (update_every=2): nothing changes
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in ema.state_dict().items())


def _distances(run) -> tuple[float, float]:
    """|EMA - trained| and |initial - trained| over the generator's weights at the run's last checkpoint."""
    state = load_checkpoint(committed(run / "checkpoints")[-1]).state
    cfg = OmegaConf.create(state["config"])
    seed_everything(cfg.seed)
    init = build_model(cfg.model).state_dict()
    ema, model = state["ema"], state["model"]
    keys = [k for k, v in ema.items() if v.is_floating_point()]
    dist = lambda a: torch.sqrt(sum(((a[k] - model[k]) ** 2).sum() for k in keys)).item()  # noqa: E731
    return dist(ema), dist(init)


def test_the_ema_tracks_the_trained_weights_and_without_the_warm_up_stays_near_the_initial_ones(tmp_path):
    gaps = {}
    for warmup in ("true", "false"):  # magvit64's decay; 10 steps
        run = tmp_path / warmup
        run_train(run, "trainer.max_steps=10", "trainer.ema.decay=0.999", f"trainer.ema.warmup={warmup}")
        gaps[warmup] = _distances(run)
    ema_gap, init_gap = gaps["true"]
    assert init_gap > 0 and ema_gap < 0.25 * init_gap, gaps
    ema_gap, init_gap = gaps["false"]  # 0.999^10: the average is still 99% the initial weights
    assert ema_gap > 0.9 * init_gap, gaps


@pytest.mark.slow
def test_a_checkpoint_written_before_the_warm_up_resumes_with_the_constant_decay(tmp_path):
    straight, old = tmp_path / "straight", tmp_path / "old"
    common = ("trainer.ema.warmup=false", "checkpoint.every_n_steps=5", "trainer.eval_every_n_steps=5")
    run_train(straight, *common, "trainer.max_steps=10")
    run_train(old, *common, "trainer.max_steps=5")
    # As the code before the key wrote it: no trainer.ema.warmup in the saved config (its hash is unchanged).
    (ckpt,) = committed(old / "checkpoints")
    rewrite_json_in_checkpoint(ckpt, "state.json", lambda s: s["config"]["trainer"]["ema"].pop("warmup"))
    refused = run_train(old, "resume_from=auto", "trainer.max_steps=10", "trainer.ema.warmup=true", check=False)
    assert refused.returncode == 2 and "trainer.ema.warmup: False -> True" in refused.stderr, refused.stderr
    # A restart loop's line names the experiment again (whose default is now true): the old behaviour is kept.
    run_train(old, "resume_from=auto", "trainer.max_steps=10", *common[1:])
    assert compare_checkpoints(committed(straight / "checkpoints")[-1], committed(old / "checkpoints")[-1]) is None


def _evals(run) -> list[dict]:
    return [r for r in read_history(run) if r["kind"] == "eval"]


def test_both_weights_are_evaluated_and_best_and_export_name_the_ones_they_hold(trained_run, tmp_path):
    # The default (checkpoint.best_of=ema): plain names are the EMA's, model_* the trained weights'.
    evals = _evals(trained_run)
    assert evals and all({"psnr", "val_loss", "model_psnr", "model_val_loss", "model_ssim"} <= r.keys() for r in evals)
    best = json.loads((trained_run / "checkpoints" / "best.json").read_text())
    assert best["weights"] == "ema" and best["val_loss"] == min(r["val_loss"] for r in evals)
    shown = subprocess.run(
        [sys.executable, "-m", "resilient_train.status", str(trained_run)], capture_output=True, text=True
    )
    assert "val (model): loss" in shown.stdout and "ema weights)" in shown.stdout, shown.stdout

    # checkpoint.best_of=model: "best" is chosen on the trained weights, and export writes them by default.
    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=20", "checkpoint.best_of=model")
    evals = _evals(run)
    assert all("ema_val_loss" in r and "model_val_loss" not in r for r in evals)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["weights"] == "model" and best["val_loss"] == min(r["val_loss"] for r in evals)
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "resilient_train.export", str(run), "--out", str(out)]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    assert json.loads((out / "config.json").read_text())["weights"] == "model"
    state = load_checkpoint(committed(run / "checkpoints")[-1]).state
    exported = load_file(out / "tokenizer.safetensors")
    assert all(torch.equal(v, state["model"][k]) for k, v in exported.items())
    assert not all(torch.equal(v, state["ema"][k]) for k, v in exported.items() if v.is_floating_point())
