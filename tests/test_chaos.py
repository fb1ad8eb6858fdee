"""Chaos mode and the orchestrator's proof, including a negative control showing the proof can fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from resilient_train.chaos import ChaosSchedule
from resilient_train.orchestrator import default_schedule

CHAOS_TEST = REPO / "scripts" / "chaos_test.py"


def _cfg(seed, **rates):
    base = {
        "seed": seed,
        **{f"{k}_rate": 0.0 for k in ("step_kill", "save_kill", "sigterm", "corrupt")},
        **{f"{k}_steps": [] for k in ("step_kill", "save_kill", "sigterm", "corrupt")},
    }
    base.update(rates)
    return OmegaConf.create(base)


def test_schedule_is_a_pure_function_of_seed():
    a = ChaosSchedule(_cfg(3, step_kill_rate=0.1, save_kill_rate=0.3, corrupt_rate=0.05)).events(200)
    b = ChaosSchedule(_cfg(3, step_kill_rate=0.1, save_kill_rate=0.3, corrupt_rate=0.05)).events(200)
    c = ChaosSchedule(_cfg(4, step_kill_rate=0.1, save_kill_rate=0.3, corrupt_rate=0.05)).events(200)
    assert a == b and a != c and len(a) > 10
    assert {e["kind"] for e in a} == {"step_kill", "save_kill", "corrupt"}
    assert all("phase" in e for e in a if e["kind"] == "save_kill")
    explicit = ChaosSchedule(_cfg(0, sigterm_steps=[7])).events(20)
    assert explicit == [{"kind": "sigterm", "step": 7}]


def test_default_schedule_covers_every_kind_and_kills_inside_saves():
    for seed in range(5):
        s = default_schedule(seed, 60, 10)
        assert all(step % 10 == 0 for step in s["save_kill_steps"]) and len(s["save_kill_steps"]) == 2
        assert len(s["step_kill_steps"] + s["sigterm_steps"] + s["corrupt_steps"]) == 3
        assert default_schedule(seed, 60, 10) == s


def _orchestrate(out, *args):
    return subprocess.run(
        [sys.executable, str(CHAOS_TEST), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def test_killed_run_ends_bit_identical_to_uninterrupted(tmp_path):
    out = tmp_path / "chaos"
    proc = _orchestrate(out, "--steps", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out / "report.json")
    report = json.loads((out / "report.json").read_text())
    assert report["identical"] is True and report["steps"] == 30
    kinds = [e["kind"] for e in report["events"]]
    assert len(kinds) >= 5 and {"save_kill", "sigterm", "corrupt", "step_kill"} <= set(kinds)
    assert report["restarts"] >= 5
    assert (out / "loss.png").stat().st_size > 0 and (out / "report.md").exists()
    # The corrupted checkpoint was set aside, not deleted.
    assert list((out / "trial_0" / "chaos" / "checkpoints").glob("step_*.corrupt-*"))


@pytest.mark.parametrize("piece", ["rng"])
def test_proof_fails_when_resume_skips_state(tmp_path, piece):
    out = tmp_path / "chaos"
    proc = _orchestrate(out, "--steps", "30", "--skip-restore", piece)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["identical"] is False
    assert isinstance(report["first_diverging_step"], int) and 1 <= report["first_diverging_step"] <= 30
    assert "DIFFERENT" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("piece", ["data"])
def test_proof_fails_when_resume_skips_data_position(tmp_path, piece):
    proc = _orchestrate(tmp_path / "chaos", "--steps", "30", "--skip-restore", piece)
    assert proc.returncode == 1


@pytest.mark.slow
def test_multi_trial_with_external_kills_and_async_save(tmp_path):
    out = tmp_path / "chaos"
    proc = _orchestrate(
        out,
        "--steps",
        "60",
        "--trials",
        "2",
        "--external-kill",
        "--set",
        "checkpoint.async_save=true",
        "--max-restarts",
        "60",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["identical"] and len(report["trials"]) == 2
    assert "external_kill" in {e["kind"] for e in report["events"]}
