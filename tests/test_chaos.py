"""Chaos mode and the orchestrator's proof, including a negative control showing the proof can fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from resilient_train.chaos import ChaosSchedule
from resilient_train.chaos.orchestrator import default_schedule

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


def test_default_schedule_for_a_run_barely_past_its_first_checkpoint():
    for seed in range(20):
        s = default_schedule(seed, 12, 10)  # steps 2..11 only; 11 alone comes after the checkpoint at 10
        assert s["save_kill_steps"] == [10] and s["corrupt_steps"] == [11]
        assert len(s["step_kill_steps"]) == len(s["sigterm_steps"]) == 1
        assert s["step_kill_steps"] != s["sigterm_steps"] and {*s["step_kill_steps"], *s["sigterm_steps"]} <= {
            *range(2, 10)
        }
    assert default_schedule(0, 8, 10)["corrupt_steps"] == []  # nothing committed to damage before the end


def _orchestrate(out, *args):
    """``scripts/chaos_test.py --out OUT ...``, run from OUT's parent (a temporary folder, not the repo)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, str(CHAOS_TEST), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out.parent,
    )


def _assert_proof_failed(proc, out):
    """The negative control: the run completed (no trial errored) and the comparison found a difference."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert [t for t in report["trials"] if "error" in t] == [], proc.stdout + proc.stderr
    assert report["identical"] is False
    step = report["first_diverging_step"]
    assert isinstance(step, int) and not isinstance(step, bool) and 1 <= step <= report["steps"]
    assert "DIFFERENT" in proc.stdout


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


def test_proof_fails_when_resume_skips_state(tmp_path):
    out = tmp_path / "chaos"
    proc = _orchestrate(out, "--steps", "30", "--skip-restore", "rng")
    _assert_proof_failed(proc, out)


@pytest.mark.slow
def test_proof_fails_when_resume_skips_data_position(tmp_path):
    out = tmp_path / "chaos"
    proc = _orchestrate(out, "--steps", "30", "--skip-restore", "data")
    _assert_proof_failed(proc, out)


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
