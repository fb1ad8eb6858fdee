"""Mixed precision (``trainer.precision``): bf16 and fp16 autocast, the fp16 scalers as resumable state, the proof.

Every comparison is run against run on this machine: a run trained straight against one stopped and
resumed, in the same precision; the negative control shows that a resume without the scalers' state
is caught.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_train, train_env

from resilient_train.checkpoint import committed, load_checkpoint, read_manifest
from resilient_train.monitor import read_history
from resilient_train.tokenizer.autocast import SLOW_KERNELS
from resilient_train.train.precision import Precision, scaler_problem
from resilient_train.verify import compare_checkpoints

CHAOS_TEST = REPO / "scripts" / "chaos_test.py"
STEPS = 16
FAST = ("trainer.num_threads=1", "trainer.eval_every_n_steps=8", "checkpoint.every_n_steps=8")


def final(run):
    return committed(run / "checkpoints")[-1]


@pytest.mark.parametrize("precision", [pytest.param("bf16-mixed", marks=pytest.mark.slow), "16-mixed"])
def test_a_stopped_and_resumed_run_equals_one_trained_straight_in_each_precision(tmp_path, precision):
    straight, split = tmp_path / "straight", tmp_path / "split"
    first = run_train(straight, *FAST, f"trainer.precision={precision}", f"trainer.max_steps={STEPS}")
    # How fast this CPU's convolutions are in the precision is logged; slow ones (float16 without fp16 units) warned.
    speed = re.search(
        rf"precision\.(slow_kernels|kernels) trainer\.precision={precision} .*conv_speed=(\S+?):?\s",
        first.stdout + first.stderr,
    )
    assert speed, first.stderr[-3000:]
    assert (speed[1] == "slow_kernels") == (float(speed[2]) < SLOW_KERNELS), speed[0]
    run_train(split, *FAST, f"trainer.precision={precision}", "trainer.max_steps=8")
    run_train(split, "resume_from=auto", f"trainer.max_steps={STEPS}", experiment=None)
    assert compare_checkpoints(final(straight), final(split)) is None
    state = load_checkpoint(final(split)).state
    train = [r for r in read_history(split) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    if precision == "16-mixed":
        scaler = state["scaler"]
        assert scaler["precision"] == "16-mixed" and scaler_problem(scaler) is None
        assert train[-1]["skipped"] == scaler["skipped"] and train[-1]["scale"] == scaler["gen"]["scale"]
        # The generator's AdamW stepped once per step it did not skip: the checks accept exactly that.
        adam_steps = {float(s["step"]) for s in state["optim_gen"]["state"].values()}
        assert adam_steps == {STEPS - scaler["skipped"]["gen"]}
        shown = subprocess.run(
            [sys.executable, "-m", "resilient_train.status", str(split)], capture_output=True, text=True
        )
        want = f"gen {scaler['skipped']['gen']}, discr {scaler['skipped']['discr']}"
        assert "fp16 scaler:" in shown.stdout and want in shown.stdout, shown.stdout
    else:
        assert "scaler" not in state and "skipped" not in train[-1]


@pytest.mark.slow  # moved to keep the default suite under 15 minutes
def test_precision_differs_from_float32_and_changing_it_on_resume_is_refused_unless_allowed(tmp_path):
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    run_train(f32, *FAST, "trainer.max_steps=4", "checkpoint.every_n_steps=4")
    run_train(bf16, *FAST, "trainer.precision=bf16-mixed", "trainer.max_steps=4", "checkpoint.every_n_steps=4")
    assert compare_checkpoints(final(f32), final(bf16)) is not None  # autocast really ran
    proc = run_train(f32, "resume_from=auto", "trainer.max_steps=6", "trainer.precision=16-mixed", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.precision: '32' -> '16-mixed'" in proc.stderr and "allow_config_change" in proc.stderr
    assert [p.name for p in committed(f32 / "checkpoints")] == ["step_00000004"]
    allowed = (
        "resume_from=auto",
        "trainer.max_steps=6",
        "trainer.precision=16-mixed",
        "resume.allow_config_change=true",
    )
    run_train(f32, *allowed)
    manifest = read_manifest(final(f32))
    assert manifest["step"] == 6 and any("trainer.precision" in c for c in manifest["config_changes"])
    assert load_checkpoint(final(f32)).state["scaler"]["precision"] == "16-mixed"  # fresh scalers from there on


@pytest.mark.parametrize("value", ["fp8", "bf16", "64"])
def test_an_unknown_precision_is_refused_listing_the_choices(tmp_path, value):
    proc = run_train(tmp_path / "run", f"trainer.precision={value}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.precision" in proc.stderr and "['32', 'bf16-mixed', '16-mixed']" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_damaged_scaler_state_is_named():
    import torch

    good = Precision("16-mixed", torch.device("cpu")).state_dict()
    assert scaler_problem(good) is None
    assert "gen.scale" in scaler_problem({**good, "gen": {**good["gen"], "scale": float("nan")}})
    assert "discr is absent" in scaler_problem({k: v for k, v in good.items() if k != "discr"})
    assert "skipped" in scaler_problem({**good, "skipped": {"gen": -1, "discr": 0}})
    assert "_growth_tracker" in scaler_problem({**good, "gen": {**good["gen"], "_growth_tracker": True}})
    assert Precision("32", torch.device("cpu")).state_dict() == {"precision": "32", "skipped": {"gen": 0, "discr": 0}}


def _chaos(tmp_path, *args):
    out = tmp_path / "chaos"
    cmd = [sys.executable, str(CHAOS_TEST), "--steps", "30", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=train_env())
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return proc, report


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_the_chaos_proof_holds_in_each_precision(tmp_path, precision):
    proc, report = _chaos(tmp_path, "--set", f"trainer.precision={precision}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["identical"] and {"nan", "hang", "save_kill", "corrupt"} <= {e["kind"] for e in report["events"]}


@pytest.mark.slow
def test_the_chaos_proof_holds_in_16_mixed_with_two_ranks(tmp_path):
    proc, report = _chaos(tmp_path, "--nproc", "2", "--set", "trainer.precision=16-mixed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = {e["kind"] for e in report["events"]}
    assert report["identical"] and {"nan", "save_kill", "external_stop"} <= kinds, kinds


@pytest.mark.slow
def test_the_proof_fails_when_a_16_mixed_resume_starts_its_scalers_afresh(tmp_path):
    kills = ("--kinds", "step_kill,save_kill,sigterm,corrupt")
    proc, report = _chaos(tmp_path, "--set", "trainer.precision=16-mixed", "--skip-restore", "scaler", *kills)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    trial = report["trials"][0]
    assert trial.get("error") is None and report["identical"] is False
    assert trial["checkpoint_difference"] and trial["history_difference"]
