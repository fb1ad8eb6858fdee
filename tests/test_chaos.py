"""Chaos mode and the orchestrator's proof, including a negative control showing the proof can fail."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from conftest import REPO, compose_cfg, run_train
from omegaconf import OmegaConf

from resilient_train.chaos import ChaosSchedule
from resilient_train.chaos.local_s3 import LocalS3
from resilient_train.chaos.orchestrator import default_schedule
from resilient_train.chaos.report import compare_histories, node_loss_resumes
from resilient_train.chaos.schedule import EVENT_KINDS, save_phase
from resilient_train.checkpoint.layout import SAVE_PHASES, UPLOAD_PHASE
from resilient_train.config import validate_config

CHAOS_TEST = REPO / "scripts" / "chaos_test.py"
OLD_KINDS = ("step_kill", "save_kill", "sigterm", "corrupt")


def _cfg(seed, **rates):
    base = {
        "seed": seed,
        **{f"{k}_rate": 0.0 for k in EVENT_KINDS},
        **{f"{k}_steps": [] for k in EVENT_KINDS},
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
    assert len(kinds) >= 8 and {"save_kill", "sigterm", "corrupt", "step_kill", "hang", "nan", "io_error"} <= set(kinds)
    assert report["restarts"] >= 6 and 124 in report["trials"][0]["exit_codes"]  # the hang: the watchdog's exit
    by_step = {e["kind"]: e for e in report["events"]}
    assert by_step["nan"]["recovery"] == "rollback" and by_step["hang"]["recovery"] == "restart"
    assert by_step["hang"]["detect_secs"] >= 9 and by_step["io_error"]["recovery"].startswith("none")
    assert by_step["nan"]["resumed_from"] < by_step["nan"]["step"] and by_step["hang"]["resumed_from"] % 10 == 0
    g = report["trials"][0]["goodput"]
    assert 0 < g["time"] < 1 and g["steps_computed"] == 30 + sum(e["redone"] or 0 for e in report["events"])
    md = (out / "report.md").read_text()
    assert "| nan | 0 |" in md and "finite guard" in md and "- goodput: time " in md
    assert (out / "loss.png").stat().st_size > 0 and (out / "report.md").exists()
    # The corrupted checkpoint was set aside, not deleted.
    assert list((out / "trial_0" / "chaos" / "checkpoints").glob("step_*.corrupt-*"))


def test_proof_fails_when_resume_skips_state(tmp_path):
    out = tmp_path / "chaos"
    proc = _orchestrate(out, "--steps", "20", "--skip-restore", "rng", "--kinds", "step_kill")  # one restart suffices
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


# ----------------------------------------------------------------------------------------------
# node loss and the object store


def test_node_loss_fires_where_asked_and_moves_no_other_kind():
    rates = {f"{k}_rate": 0.1 for k in OLD_KINDS}
    for seed in range(5):
        before = ChaosSchedule(_cfg(seed, **rates)).events(300)
        after = ChaosSchedule(_cfg(seed, node_loss_rate=0.05, node_loss_steps=[7], **rates)).events(300)
        assert [e for e in after if e["kind"] != "node_loss"] == before  # each kind and step draws on its own
        lost = [e["step"] for e in after if e["kind"] == "node_loss"]
        assert 7 in lost and len(lost) > 3
    assert ChaosSchedule(_cfg(0, node_loss_steps=[7, 12])).events(20) == [
        {"kind": "node_loss", "step": 7},
        {"kind": "node_loss", "step": 12},
    ]


def test_save_kills_strike_the_upload_only_with_a_store():
    steps = range(1, 400)
    for seed in range(3):
        plain, remote = ChaosSchedule(_cfg(seed)), ChaosSchedule(_cfg(seed), remote=True)
        without = [plain.save_phase(s) for s in steps]
        with_store = [remote.save_phase(s) for s in steps]
        assert set(without) == set(SAVE_PHASES)  # the save's own phases, as before the store existed
        assert without == [save_phase(seed, s) for s in steps]
        assert 0.4 < with_store.count(UPLOAD_PHASE) / len(steps) < 0.6
        # every save kill that does not move to the upload keeps the phase it has without a store
        assert all(w == o for w, o in zip(with_store, without) if w != UPLOAD_PHASE)
        uploads = [s for s, p in zip(steps, with_store) if p == UPLOAD_PHASE]
        assert {remote.victim("save_kill", s, 4) for s in uploads} == {0}  # rank 0 alone uploads


def test_default_schedule_with_a_store_adds_node_losses_and_an_upload_kill():
    for seed in range(10):
        plain, remote = default_schedule(seed, 60, 10), default_schedule(seed, 60, 10, remote=True)
        assert "node_loss_steps" not in plain
        for key in ("step_kill_steps", "sigterm_steps", "corrupt_steps"):
            assert remote[key] == plain[key]
        lost = remote["node_loss_steps"]
        taken = {s for key, steps in remote.items() if key != "node_loss_steps" for s in steps}
        assert len(lost) == 2 and all(13 <= s < 60 and s not in taken for s in lost)
        saves = remote["save_kill_steps"]
        assert len(saves) == 2 and all(s % 10 == 0 for s in saves)
        if any(save_phase(seed, s, remote=True) == UPLOAD_PHASE for s in range(10, 60, 10)):
            assert UPLOAD_PHASE in {save_phase(seed, s, remote=True) for s in saves}
    assert UPLOAD_PHASE in {
        save_phase(0, s, remote=True) for s in default_schedule(0, 60, 10, remote=True)["save_kill_steps"]
    }


def test_a_node_loss_needs_its_events_outside_the_run_directory():
    with pytest.raises(ValueError, match="chaos.events_dir"):
        validate_config(compose_cfg(["+experiment=tiny", "chaos.enabled=true", "chaos.node_loss_steps=[5]"]))
    validate_config(compose_cfg(["+experiment=tiny", "chaos.node_loss_steps=[5]"]))  # chaos off: nothing fires


def test_the_agent_refuses_events_inside_the_run_directory_it_would_delete(tmp_path):
    from resilient_train.chaos.agent import Chaos

    run = tmp_path / "run"
    for inside in (run, run / "events"):
        with pytest.raises(ValueError, match="deletes the run directory"):
            Chaos(_cfg(0, node_loss_steps=[5], events_dir=str(inside), skip_restore="", hold_phase=""), run)
    agent = Chaos(
        _cfg(0, node_loss_steps=[5], events_dir=str(tmp_path / "events"), skip_restore="", hold_phase=""), run
    )
    assert agent.events_dir == tmp_path / "events" and not run.exists()


def test_node_loss_report_reads_where_each_restart_resumed(tmp_path):
    log = tmp_path / "chaos.log"
    log.write_text(
        "[t][resilient_train.chaos.agent][WARNING] - chaos.node_loss step=14 rank=1 run_dir=/r\n"
        "[t][resilient_train.resume.remote][INFO] - resume.remote step=10 url=s3://b/p/step_00000010\n"
        "[t][resilient_train.train.trainer][INFO] - resume step=10 epoch=0 batch_in_epoch=20 path=/r/x\n"
        "[t][resilient_train.chaos.agent][WARNING] - chaos.node_loss step=17 rank=0 run_dir=/r\n"
        "[t][resilient_train.resume.plan][INFO] - resume.none run_dir=/r: no valid checkpoint yet, starting fresh\n"
        "[t][resilient_train.chaos.agent][WARNING] - chaos.node_loss step=19 rank=0 run_dir=/r\n"
        "[t][resilient_train.train.trainer][INFO] - resume step=10 epoch=0 batch_in_epoch=20 path=/r/x\n"
        "[t][resilient_train.chaos.agent][WARNING] - chaos.node_loss step=23 rank=0 run_dir=/r\n"
    )
    assert node_loss_resumes(log) == [
        {"step": 14, "rank": 1, "resumed_from": 10, "source": "store"},
        {"step": 17, "rank": 0, "resumed_from": 0, "source": "fresh"},
        {"step": 19, "rank": 0, "resumed_from": 10, "source": "local"},
        {"step": 23, "rank": 0, "resumed_from": None, "source": None},
    ]
    ref = [{"kind": "train", "step": s, "loss": s / 10} for s in range(1, 21)]
    assert compare_histories(ref, ref[10:], 20, first=11) is None  # steps 1-10 went with the node
    assert (
        compare_histories(ref, ref[11:], 20, first=11)
        == "step 11: train record appears 1x in the reference, 0x after chaos"
    )


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with LocalS3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.mark.slow  # moved to keep the default suite under 15 minutes
def test_node_loss_resumes_from_the_store(tmp_path, s3):
    """A node loss deletes the run directory; the same command in the empty directory resumes from the store,
    from exactly what reached it (the upload of step 20 is held: step 10), and ends bit-identical."""
    run, events = tmp_path / "run", tmp_path / "events"
    chaos = [
        "trainer.max_steps=30",
        f"checkpoint.remote={s3.url('node_loss')}",
        "resume_from=auto",
        "chaos.enabled=true",
        "chaos.node_loss_steps=[24]",
        f"chaos.events_dir={events}",
    ]
    lost = run_train(run, *chaos, "chaos.hold_phase=uploading@20", env=s3.env(), check=False)
    assert lost.returncode == -signal.SIGKILL, lost.stdout[-3000:] + lost.stderr[-3000:]
    assert not run.exists()  # the machine's disk went with it
    assert [
        (e["kind"], e["step"]) for e in map(json.loads, (events / "chaos_events.jsonl").read_text().splitlines())
    ] == [("node_loss", 24)]
    again = run_train(run, *chaos, env=s3.env())
    log = again.stdout + again.stderr
    assert "resume.remote step=10 " in log and "chaos.node_loss" not in log  # fired once, not again
    records = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in records if r["kind"] == "train") == 11  # steps 1-10 were not trained again
    ref = tmp_path / "ref"
    run_train(ref, "trainer.max_steps=30")
    proc = subprocess.run(
        [sys.executable, "-m", "resilient_train.verify", str(run), "--compare", str(ref)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "identical" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow  # 25-35 s; keeps the default suite under 15 minutes (node losses with a store stay in it)
def test_without_a_store_a_node_loss_starts_over_and_the_proof_says_so(tmp_path):
    """The negative control: with no store the restart starts from step 0 and, being deterministic, ends
    bit-identical all the same; the proof must still fail, because the node loss was not resumed from a store."""
    out = tmp_path / "chaos"
    kills = ("--kinds", "step_kill,save_kill,sigterm,corrupt")
    proc = _orchestrate(out, "--steps", "20", "--set", "chaos.node_loss_steps=[15]", *kills)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    (trial,) = report["trials"]
    assert trial["checkpoint_difference"] is None and trial["history_difference"] is None
    assert trial["node_loss_difference"] == (
        "node loss at step 15: the restart resumed from nothing (a fresh start at step 0), not from the object store"
    )
    assert trial["node_losses"] == [{"step": 15, "rank": 0, "resumed_from": 0, "source": "fresh"}]
    assert "# Chaos test: DIFFERENT" in (out / "report.md").read_text()


@pytest.mark.slow
def test_remote_proof_with_node_losses_ends_bit_identical(tmp_path):
    out = tmp_path / "chaos"
    proc = _orchestrate(out, "--steps", "30", "--remote")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["identical"] is True and report["remote"] is True
    (trial,) = report["trials"]
    losses = [e for e in report["events"] if e["kind"] == "node_loss"]
    assert len(losses) == 2 and all(e["source"] == "store" and e["resumed_from"] >= 10 for e in losses)
    assert {"save_kill", "step_kill", "sigterm", "corrupt"} <= {e["kind"] for e in report["events"]}
    assert UPLOAD_PHASE in {e.get("phase") for e in report["events"]}
    assert trial["history_from"] == losses[-1]["resumed_from"] + 1
    assert (out / "s3" / "moto.log").exists() and not list((out / "trial_0" / "chaos").glob("chaos_events*"))


def test_event_costs_read_detection_recovery_and_redone_steps_from_the_log(tmp_path):
    """The report's costs come from the trainer's stamped log lines; a missing line gives None, not a guess."""
    from datetime import datetime

    from resilient_train.chaos.costs import by_kind, event_costs, goodput

    def stamp(t: float) -> str:
        return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]

    t0 = 1_800_000_000.0
    lines = [
        (t0 + 0.5, "resilient_train.train.recovery", "rollback.start step=7 kind=nan attempt=1/3 to=initial: x"),
        (t0 + 0.55, "resilient_train.train.trainer", "resume step=3 epoch=0 batch_in_epoch=6 path=/x/step_00000003"),
        (t0 + 0.6, "resilient_train.train.recovery", "rollback.done step=7 kind=nan to_step=0 path=initial secs=0.1"),
        (t0 + 0.9, "resilient_train.train.observers", "train.first_step step=1 rank=0"),
        (t0 + 20.0, "resilient_train.train.watchdog", "watchdog.hang step=15 rank=0 secs=10.2 last=step"),
        (t0 + 25.0, "resilient_train.train.trainer", "resume step=10 epoch=0 batch_in_epoch=20 path=/x"),
        (t0 + 26.5, "resilient_train.train.observers", "train.first_step step=11 rank=0"),
    ]
    log = tmp_path / "chaos.log"
    log.write_text("".join(f"[{stamp(t)}][{name}][INFO] - {msg}\n" for t, name, msg in lines) + "noise\n")
    events = [
        {"kind": "nan", "step": 7, "time": t0 + 0.5},
        {"kind": "hang", "step": 15, "time": t0 + 9.8},
        {"kind": "io_error", "step": 40, "time": t0 + 30.0},  # no ckpt.save_failed line: not seen
    ]
    nan, hang, io = event_costs(events, log)
    assert (nan["recovery"], nan["resumed_from"], nan["redone"], nan["detect_secs"]) == ("rollback", 0, 7, 0.0)
    assert nan["to_new_step_secs"] == 0.4
    assert (hang["recovery"], hang["resumed_from"], hang["redone"], hang["detect_secs"]) == ("restart", 10, 5, 10.2)
    assert hang["to_new_step_secs"] == 16.7
    assert io["detect_secs"] is None and io["redone"] == 0 and io["to_new_step_secs"] is None
    assert goodput(40, 10.0, 40.0, [nan, hang, io]) == {
        "time": 0.25,
        "steps": round(40 / 52, 3),
        "steps_redone": 12,
        "steps_computed": 52,
    }
    assert by_kind([nan, hang, io])["hang"] == {"count": 1, "detect_secs": 10.2, "to_new_step_secs": 16.7, "redone": 5}
