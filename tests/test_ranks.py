"""Training with ranks under real ``torchrun`` processes on gloo (one thread per rank: this machine has 2 cores).

DDP's gradients, the per-rank checkpoint layout and commit, the world-size refusal, a SIGTERM to
one rank, a SIGKILLed worker that torchrun restarts, a stopped peer that ends in an error instead
of a hang, and the chaos proof at 2 ranks (3 ranks and the negative controls: ``slow``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TRAIN, rank_pid, run_train, train_env, train_steps_logged, wait_for
from omegaconf import OmegaConf

from resilient_train.chaos import ChaosSchedule
from resilient_train.checkpoint import committed, load_checkpoint, read_manifest, verify_files
from resilient_train.config import ChaosConfig
from resilient_train.verify import compare_checkpoints

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
CHAOS_TEST = REPO / "scripts" / "chaos_test.py"
TESTS = Path(__file__).resolve().parent


def torchrun_train(
    run_dir: Path, *overrides: str, nproc: int = 2, max_restarts: int = 0, threads: int = 1
) -> list[str]:
    return [
        *TORCHRUN,
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        str(TRAIN),
        "+experiment=tiny",
        f"hydra.run.dir={run_dir}",
        "trainer.progress_bar=false",
        f"trainer.num_threads={threads}",
        "trainer.hang_timeout_secs=60",  # a collective then waits 90 s for a dead peer
        *overrides,
    ]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=train_env())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def victim_seed(kind: str, step: int, rank: int, world: int = 2) -> int:
    """A chaos seed whose schedule makes ``rank`` the victim of ``kind`` at ``step``."""
    for seed in range(100):
        if ChaosSchedule(OmegaConf.structured(ChaosConfig(seed=seed))).victim(kind, step, world) == rank:
            return seed
    raise AssertionError("no seed found")


@pytest.fixture(scope="module")
def ref2(tmp_path_factory) -> Path:
    """A 2-rank tiny run of 12 steps (checkpoints at 10 and 12), uninterrupted."""
    run_dir = tmp_path_factory.mktemp("ranks") / "ref2"
    ok(run(torchrun_train(run_dir, "trainer.max_steps=12")))
    return run_dir


def test_ddp_gradients_are_the_mean_of_each_ranks_own_bit_for_bit():
    proc = ok(run([*TORCHRUN, "--nproc-per-node=2", str(TESTS / "ddp_grads.py")]))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("DDP_GRADS "))
    report = json.loads(line.split(" ", 1)[1])
    for kind in ("gen", "discr"):  # the generator pass; the discriminator pass with the gradient penalty
        assert report[kind]["mismatches"] == [], report
        assert report[kind]["compared"] > 0 and report[kind]["differ_between_ranks"] > 0, report


def test_two_ranks_commit_one_checkpoint_listing_every_ranks_files(ref2):
    ckpt = committed(ref2 / "checkpoints")[-1]
    manifest = read_manifest(ckpt)
    assert (manifest["step"], manifest["world_size"], manifest["backend"]) == (12, 2, "gloo")
    assert manifest["replicated_digest"].startswith("xxh3_128:")
    for r in (0, 1):
        assert {f"ranks/{r}/state.json", f"ranks/{r}/state.safetensors"} <= set(manifest["files"])
    report = verify_files(ckpt)
    assert report.ok, report.errors
    ranks = report.loaded.state["ranks"]
    assert ranks["0"]["data"] == ranks["1"]["data"] == {"epoch": 0, "batch_in_epoch": 24}
    assert not ranks["0"]["rng"]["torch"].equal(ranks["1"]["rng"]["torch"]), "ranks share one random stream"
    # A rank reads the shared files and its own only.
    mine = load_checkpoint(ckpt, rank=1)
    assert set(mine.state["ranks"]) == {"1"} and mine.nbytes < report.loaded.nbytes
    # Rank 0 writes the run's files; every rank its heartbeat; rank 1 its own losses.
    assert (ref2 / "train.log").is_file() and (ref2 / "train_rank1.log").is_file()
    assert "train.start" in (ref2 / "train_rank1.log").read_text()
    for r in (0, 1):
        beat = json.loads((ref2 / "ranks" / str(r) / "heartbeat.json").read_text())
        assert (beat["rank"], beat["step"], beat["status"], beat["restart"]) == (r, 12, "finished", 0)
    own = [json.loads(x) for x in (ref2 / "ranks" / "1" / "history.jsonl").read_text().splitlines()]
    main = [json.loads(x) for x in (ref2 / "history.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in own if r["kind"] == "train"]
    assert [s for s, _ in train] == list(range(1, 13))
    assert [x["loss"] for x in main if x["kind"] == "train"] != [loss for _, loss in train]
    assert ok(run([sys.executable, "-m", "resilient_train.verify", str(ref2)])).stdout.count(" OK") == 2


@pytest.mark.slow  # extra coverage; keeps the default suite under 15 minutes
def test_world_size_change_is_refused_naming_both_sizes_unless_allowed(ref2, trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(ref2, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_train(run_dir, "resume_from=auto", "trainer.max_steps=14", "trainer.num_threads=1", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "written by 2 rank(s) but this run has 1" in proc.stderr
    assert "resume.allow_world_size_change=true" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing changed

    # One process -> two ranks: refused on every rank (torchrun reports its own exit 1).
    one = tmp_path / "one"
    shutil.copytree(trained_run, one)
    proc = run(torchrun_train(one, "resume_from=auto", "trainer.max_steps=22", threads=2))  # as trained_run
    assert proc.returncode == 1
    assert proc.stderr.count("written by 1 rank(s) but this run has 2") == 2, proc.stderr[-4000:]

    # Allowed: continues from the exact weights, and every later checkpoint says what happened.
    allow = ("resume_from=auto", "trainer.max_steps=14", "trainer.num_threads=1", "resume.allow_world_size_change=true")
    ok(run_train(run_dir, *allow))
    manifest = read_manifest(committed(run_dir / "checkpoints")[-1])
    assert (manifest["step"], manifest["world_size"]) == (14, 1)
    (change,) = [c for c in manifest["config_changes"] if c.startswith("world_size")]
    assert "world_size: 2 -> 1 at step 12" in change and "no bitwise continuity" in change
    # 24 global batches of 2 clips (a whole epoch) became 48 batches of 1: then 2 steps x 2 micro-batches.
    assert (manifest["epoch"], manifest["batch_in_epoch"]) == (1, 4)


def test_divergent_replicas_refuse_the_commit_on_every_rank(tmp_path):
    proc = run([*TORCHRUN, "--nproc-per-node=2", str(TESTS / "rank_divergence.py"), str(tmp_path / "run")])
    assert proc.returncode == 1  # torchrun's code when a worker fails (each exited 3)
    refused = [x for x in proc.stdout.splitlines() if x.startswith("REFUSED")]
    assert len(refused) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all("ranks [1] hold replicated state" in x and "commit refused" in x for x in refused)
    assert committed(tmp_path / "run" / "checkpoints") == []


@pytest.mark.slow  # moved to keep the default suite under 15 minutes
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_resume_matches(ref2, tmp_path):
    run_dir = tmp_path / "run"
    seed = victim_seed("sigterm", 7, rank=1)
    chaos = ["chaos.enabled=true", f"chaos.seed={seed}", "chaos.sigterm_steps=[7]"]
    proc = run(torchrun_train(run_dir, "trainer.max_steps=12", *chaos))
    assert proc.returncode == 1, proc.stderr[-3000:]  # both workers exited 75; torchrun (no restarts) says 1
    text = proc.stdout + proc.stderr
    assert text.count("train.stopped step=7 ") == 2 and text.count("exit=75") == 2, text[-4000:]
    assert [json.loads(x)["rank"] for x in (run_dir / "chaos_events.rank1.jsonl").read_text().splitlines()] == [1]
    for r in (0, 1):
        beat = json.loads((run_dir / "ranks" / str(r) / "heartbeat.json").read_text())
        assert (beat["step"], beat["status"]) == (7, "stopped")
    assert [p.name for p in committed(run_dir / "checkpoints")] == ["step_00000007"]
    ok(run(torchrun_train(run_dir, "trainer.max_steps=12", "resume_from=auto", *chaos)))
    assert compare_checkpoints(committed(ref2 / "checkpoints")[-1], committed(run_dir / "checkpoints")[-1]) is None


def test_sigkilled_worker_is_restarted_by_torchrun_and_the_run_ends_identical(ref2, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    cmd = torchrun_train(run_dir, "trainer.max_steps=12", "resume_from=auto", max_restarts=2)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=train_env())
    try:
        wait_for(lambda: train_steps_logged(run_dir) >= 3 and rank_pid(run_dir, 1), "step 3", proc, log)
        os.kill(rank_pid(run_dir, 1), signal.SIGKILL)  # one worker, never torchrun
        assert proc.wait(timeout=240) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "dist.init rank=1 world_size=2 local_rank=1 backend=gloo restart=1" in text, text[-4000:]
    assert compare_checkpoints(committed(ref2 / "checkpoints")[-1], committed(run_dir / "checkpoints")[-1]) is None


@pytest.mark.slow  # extra coverage; keeps the default suite under 15 minutes
def test_a_stopped_peer_ends_in_an_error_within_the_timeout_not_a_hang(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    # The watchdog off: the collective's own timeout is what ends the group (test_faults covers the watchdog).
    cmd = torchrun_train(run_dir, "trainer.max_steps=200", "trainer.dist_timeout_secs=8", "trainer.hang_timeout_secs=0")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=train_env())
    pid = None
    try:
        wait_for(lambda: train_steps_logged(run_dir) >= 3 and rank_pid(run_dir, 1), "step 3", proc, log)
        pid = rank_pid(run_dir, 1)
        os.kill(pid, signal.SIGSTOP)  # alive but silent: torchrun cannot see it, only the timeout can
        stopped = time.monotonic()
        wait_for(lambda: "train.failed" in log.read_text(), "rank 0's failure", proc, log, timeout=60)
        waited = time.monotonic() - stopped
        os.kill(pid, signal.SIGCONT)
        assert proc.wait(timeout=90) == 1
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert 8 <= waited < 40, waited  # the collective gave up after trainer.dist_timeout_secs, not gloo's 30 min


def _chaos(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "chaos"
    cmd = [sys.executable, str(CHAOS_TEST), "--nproc", "2", "--steps", "16", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=train_env())
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return proc, report


@pytest.mark.slow  # 60-80 s; the default suite keeps the 2-rank kill, SIGTERM and refusal tests (make chaos-test-ranks)
def test_two_rank_proof_with_a_killed_rank_a_kill_inside_a_save_a_sigterm_and_every_fault_beyond_death(tmp_path):
    proc, report = _chaos(tmp_path, "--seed", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["identical"] and report["nproc"] == 2, report
    kinds = {e["kind"] for e in report["events"]}
    every = {"step_kill", "save_kill", "sigterm", "corrupt", "hang", "nan", "bitflip", "io_error", "external_stop"}
    assert every <= kinds, report["events"]
    by_kind = {e["kind"]: e for e in report["events"]}
    assert by_kind["bitflip"]["recovery"] == "rollback" and by_kind["bitflip"]["tensor"]
    assert by_kind["external_stop"]["detected_by"] == "the peers' watchdog" and by_kind["external_stop"]["detect_secs"]
    assert {e.get("rank", 0) for e in report["events"]} == {0, 1}, report["events"]
    assert report["restarts"] >= 4, report
    md = (tmp_path / "chaos" / "report.md").read_text()
    assert "# Chaos test: IDENTICAL" in md and "| rank |" in md and "ranks: 2" in md


@pytest.mark.slow
@pytest.mark.parametrize("skip", ["rng", "data"])
def test_two_rank_proof_fails_when_rank_1_alone_skips_its_restore(tmp_path, skip):
    proc, report = _chaos(tmp_path, "--seed", "3", "--skip-restore", skip)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["identical"] is False and "DIFFERENT" in proc.stdout
    trial = report["trials"][0]
    assert trial.get("error") is None, trial  # it ran to the end: the comparison, not a crash, failed it
    assert trial["checkpoint_difference"] or trial["history_difference"]


@pytest.mark.slow
def test_three_ranks_reference_twice_identical_and_the_proof_holds(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        ok(run(torchrun_train(d, "trainer.max_steps=12", nproc=3)))
    assert read_manifest(committed(a / "checkpoints")[-1])["world_size"] == 3
    assert compare_checkpoints(committed(a / "checkpoints")[-1], committed(b / "checkpoints")[-1]) is None
    out = tmp_path / "chaos"
    cmd = [sys.executable, str(CHAOS_TEST), "--nproc", "3", "--steps", "16", "--seed", "5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=train_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["identical"] and report["nproc"] == 3


@pytest.mark.slow
def test_two_rank_proof_with_node_losses_resumes_from_the_store(tmp_path):
    """A node loss on either rank deletes the shared run directory; torchrun's restart resumes from the store."""
    proc, report = _chaos(tmp_path, "--seed", "7", "--steps", "30", "--remote", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["identical"] and report["nproc"] == 2 and report["remote"], report
    losses = [e for e in report["events"] if e["kind"] == "node_loss"]
    assert [(e["step"], e["rank"]) for e in losses] == [(19, 1), (28, 0)], report["events"]
    assert all(e["source"] == "store" and e["resumed_from"] >= 10 for e in losses), losses
    assert {"phase": "uploading", "rank": 0} in [{k: e.get(k) for k in ("phase", "rank")} for e in report["events"]]
