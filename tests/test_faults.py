"""Faults beyond death: the hang watchdog, the finite guard and the in-process rollback, replica checks, failed saves.

Real training subprocesses of the tiny experiment with the chaos kinds ``nan``, ``io_error`` and ``hang``
(one process), ``bitflip`` (ranks only, under a real ``torchrun`` on gloo), a real divergence (a huge
learning rate), a real SIGSTOP of one rank; each run is compared with an uninterrupted reference run
of the same session (final checkpoint bit for bit, every step's losses). The watchdog's own thread is
also driven directly, with a real thread and an exit callable that records instead of ending pytest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TRAIN, compose_cfg, rank_pid, run_train, train_env, train_steps_logged, wait_for
from omegaconf import OmegaConf

from resilient_train.chaos import ChaosSchedule
from resilient_train.chaos.report import compare_histories
from resilient_train.checkpoint import committed, read_manifest, verify_files
from resilient_train.config import ChaosConfig, validate_config
from resilient_train.dist import Group
from resilient_train.monitor import read_history
from resilient_train.status import pid_alive
from resilient_train.train.faults import (
    EXIT_DIVERGED,
    DivergedError,
    Fault,
    RollbackBudget,
    agree_finite,
    check_replicas,
    tensor_digests,
)
from resilient_train.train.watchdog import COLLECTIVE_MARGIN_SECS, EXIT_HUNG, Watchdog, collective_timeout
from resilient_train.verify import compare_checkpoints

STEPS = 30  # one process: checkpoints at 10, 20, 30
STEPS2 = 40  # two ranks
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


# ----------------------------------------------------------------------------------------------
# helpers


def train(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The tiny experiment, ``trainer.max_steps=30`` unless overridden; the exit code is the caller's to check."""
    steps = () if any(o.startswith("trainer.max_steps=") for o in overrides) else (f"trainer.max_steps={STEPS}",)
    return run_train(run_dir, *steps, *overrides, timeout=timeout, check=False)


def torchrun_cmd(run_dir: Path, *overrides: str, max_restarts: int = 0) -> list[str]:
    """Two ranks of one thread each (2 cores); ``trainer.dist_timeout_secs`` left to its default (hang + 30 s)."""
    return [
        *TORCHRUN,
        "--nproc-per-node=2",
        f"--max-restarts={max_restarts}",
        str(TRAIN),
        "+experiment=tiny",
        f"hydra.run.dir={run_dir}",
        "trainer.progress_bar=false",
        "trainer.num_threads=1",
        f"trainer.max_steps={STEPS2}",
        *overrides,
    ]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=train_env())


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def final(run_dir: Path) -> Path:
    found = committed(run_dir / "checkpoints")
    assert found, f"no committed checkpoint under {run_dir}"
    return found[-1]


def assert_identical(ref: Path, other: Path, steps: int, *, rank: int | None = None) -> None:
    """Final checkpoints equal bit for bit (every rank's files), and every step's train/eval losses."""
    assert final(ref).name == final(other).name == f"step_{steps:08d}"
    assert compare_checkpoints(final(ref), final(other)) is None
    assert compare_histories(read_history(ref), read_history(other), steps) is None
    if rank is not None:
        own = Path("ranks", str(rank), "history.jsonl")
        assert compare_histories(read_history(ref / own), read_history(other / own), steps) is None


def heartbeat(run_dir: Path) -> dict:
    return json.loads((run_dir / "heartbeat.json").read_text())


def rollbacks(run_dir: Path) -> list[tuple[int, int, str, str]]:
    """``(to_step, fault_step, fault, to)`` of every rollback record of the run's history, in file order."""
    return [(r["step"], r["fault_step"], r["fault"], r["to"]) for r in read_history(run_dir) if r["kind"] == "rollback"]


def temporaries(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def status(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "resilient_train.status", str(run_dir), *args], timeout=60)


def seed_with_victims(wanted: dict[tuple[str, int], int], world: int = 2) -> int:
    """A chaos seed whose schedule makes each ``(kind, step)`` strike the given rank."""
    for seed in range(200):
        schedule = ChaosSchedule(OmegaConf.structured(ChaosConfig(seed=seed)))
        if all(schedule.victim(kind, step, world) == rank for (kind, step), rank in wanted.items()):
            return seed
    raise AssertionError(f"no seed strikes {wanted}")


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """One process, 30 steps, uninterrupted: what every one-process fault below must end identical to."""
    run_dir = tmp_path_factory.mktemp("faults") / "ref"
    proc = train(run_dir)
    assert proc.returncode == 0, explain(proc)
    return run_dir


@pytest.fixture(scope="module")
def ref2(tmp_path_factory) -> Path:
    """Two ranks under torchrun, 40 steps, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("faults2") / "ref2"
    proc = run(torchrun_cmd(run_dir))
    assert proc.returncode == 0, explain(proc)
    return run_dir


# ----------------------------------------------------------------------------------------------
# nan: the guard and the in-process rollback


def test_nan_rolls_back_to_the_initial_state_and_to_a_checkpoint_and_ends_identical(ref, tmp_path):
    run_dir = tmp_path / "run"
    chaos = ["chaos.enabled=true", "chaos.nan_steps=[5,25]", "chaos.io_error_steps=[20]"]
    proc = train(run_dir, *chaos)
    assert proc.returncode == 0, explain(proc)
    assert_identical(ref, run_dir, STEPS)

    # The nan at 5 came before any checkpoint (the initial state); the one at 25 after the save at 20 failed.
    log = (run_dir / "train.log").read_text()
    assert "rollback.done step=5 kind=nan to_step=0 path=initial " in log, log[-3000:]
    assert f"rollback.done step=25 kind=nan to_step=10 path={run_dir / 'checkpoints' / 'step_00000010'} " in log
    assert log.count("rollback.done") == 2 and "ckpt.save_failed step=20 " in log
    assert "rollback" not in (ref / "train.log").read_text()  # the reference had none: the comparison means something
    assert rollbacks(run_dir) == [(0, 5, "nan", "initial"), (10, 25, "nan", "step_00000010")]
    # The records after each rollback's step were cut: the history is one timeline, each step once.
    steps = [r["step"] for r in read_history(run_dir)]
    assert steps == sorted(steps) and steps[0] == 0
    events = [json.loads(x) for x in (run_dir / "chaos_events.jsonl").read_text().splitlines()]
    assert sorted((e["kind"], e["step"]) for e in events) == [("io_error", 20), ("nan", 5), ("nan", 25)]

    faults = heartbeat(run_dir)["faults"]
    assert faults["rollbacks"] == 2 and faults["save_failures"] == 1, faults
    assert {k: faults["last_rollback"][k] for k in ("fault_step", "kind", "to_step")} == {
        "fault_step": 25,
        "kind": "nan",
        "to_step": 10,
    }
    assert faults["last_save_error"].startswith("step 20: checkpoint step 20 not saved")
    text = status(run_dir)
    assert text.returncode == 0, explain(text)
    row = next(x for x in text.stdout.splitlines() if x.startswith("faults:"))
    assert "2 rollback(s) (last: nan at step 25, back to step 10), 1 failed save(s)" in row, text.stdout
    js = json.loads(status(run_dir, "--json").stdout)
    assert js["faults"]["rollbacks"] == 2 and js["faults"]["last_rollback"]["to_step"] == 10 and js["hangs"] == []
    assert "faults:" not in status(ref).stdout and "faults" not in heartbeat(ref)


# ----------------------------------------------------------------------------------------------
# a real divergence: bounded, exit 65


DIVERGE = ("optimizer.lr=1e30", "optimizer.discr_lr=1e30", "optimizer.max_grad_norm=inf", "trainer.max_rollbacks=2")


def _assert_diverged(proc: subprocess.CompletedProcess, run_dir: Path, step: int, target: str) -> None:
    assert proc.returncode == EXIT_DIVERGED == 65, explain(proc)
    err = proc.stderr
    assert f"error: step {step}: non-finite " in err, err[-3000:]
    assert f"again after 2 rollback(s) to {target} " in err
    seen = re.search(r"\(values seen: (\{.*?\})\)", err)
    assert seen and "rank 0" in seen.group(1) and "'nan'" in seen.group(1), err[-3000:]
    log = (run_dir / "train.log").read_text()
    assert log.count("rollback.done") == 2, log[-3000:]  # bounded: no third attempt, no loop
    assert f"train.diverged exit=65: step {step}:" in log
    beat = heartbeat(run_dir)
    assert beat["status"] == "failed" and beat["faults"]["rollbacks"] == 2
    assert [(s, f) for s, f, _, _ in rollbacks(run_dir)] == [(step - 1, step)] * 2
    for ckpt in committed(run_dir / "checkpoints"):
        report = verify_files(ckpt)
        assert report.ok, report.errors
    assert temporaries(run_dir) == []


@pytest.mark.slow  # moved to keep the default suite under 15 minutes
def test_a_real_divergence_stops_with_exit_65_after_the_rollback_budget(tmp_path):
    # From the start: the only state to roll back to is the initial one.
    scratch = tmp_path / "scratch"
    proc = train(scratch, *DIVERGE, "optimizer.warmup_steps=0")
    _assert_diverged(proc, scratch, 1, "the initial state")
    assert committed(scratch / "checkpoints") == []

    # After a checkpoint: rolled back to it, twice, and it is left intact.
    run_dir = tmp_path / "run"
    first = train(run_dir, "trainer.max_steps=10")
    assert first.returncode == 0, explain(first)
    ckpt = final(run_dir)
    before = {p.relative_to(ckpt): p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    proc = train(run_dir, "resume_from=auto", "resume.allow_config_change=true", *DIVERGE)
    _assert_diverged(proc, run_dir, 11, str(ckpt))
    assert committed(run_dir / "checkpoints") == [ckpt]
    assert {p.relative_to(ckpt): p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before
    text = status(run_dir).stdout
    assert "2 rollback(s) (last: nan at step 11, back to step 10), 0 failed save(s)" in text, text


# ----------------------------------------------------------------------------------------------
# io_error: failed saves


def test_failed_saves_continue_by_default_and_the_run_ends_identical(ref, tmp_path):
    run_dir = tmp_path / "run"
    # seed 1: the save at 10 fails before the rename, the run's last one (30) after its files were written;
    # the nan at 15 then finds no checkpoint: the failed first save kept the initial state to roll back to.
    chaos = ("chaos.enabled=true", "chaos.seed=1", "chaos.io_error_steps=[10,30]", "chaos.nan_steps=[15]")
    proc = train(run_dir, *chaos)
    assert proc.returncode == 0, explain(proc)
    events = [json.loads(x) for x in (run_dir / "chaos_events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["step"], e.get("phase")) for e in events] == [
        ("io_error", 10, "before_rename"),
        ("nan", 15, None),
        ("io_error", 30, "files_written"),
    ]
    log = (run_dir / "train.log").read_text()
    assert "ckpt.save_failed step=10 attempt=1 failures=1 policy=continue " in log, log[-3000:]
    assert "rollback.done step=15 kind=nan to_step=0 path=initial " in log
    assert "ckpt.save_failed step=30 attempt=1 failures=2 policy=continue " in log  # the last save: retried at once
    assert "ckpt.save step=30 " in log
    assert "ckpt.save_failed" not in (ref / "train.log").read_text()
    assert temporaries(run_dir) == []
    assert [p.name for p in committed(run_dir / "checkpoints")] == ["step_00000020", "step_00000030"]
    assert rollbacks(run_dir) == [(0, 15, "nan", "initial")]
    assert_identical(ref, run_dir, STEPS)
    faults = heartbeat(run_dir)["faults"]
    assert (faults["rollbacks"], faults["save_failures"]) == (1, 2), faults
    assert faults["last_save_error"].startswith("step 30: checkpoint step 30 not saved: No space left on device")


def test_a_failed_save_stops_the_run_with_on_save_error_stop(tmp_path):
    run_dir = tmp_path / "run"
    # seed 1: the save at 20 fails with files partly written.
    chaos = ("chaos.enabled=true", "chaos.seed=1", "chaos.io_error_steps=[20]")
    proc = train(run_dir, *chaos, "checkpoint.on_save_error=stop")
    assert proc.returncode == 1, explain(proc)
    kept = run_dir / "checkpoints" / "step_00000010"
    assert "checkpoint step 20 not saved: No space left on device" in proc.stderr, proc.stderr[-3000:]
    assert f"the newest committed checkpoint, {kept}, is intact" in proc.stderr
    assert committed(run_dir / "checkpoints") == [kept]
    report = verify_files(kept)
    assert report.ok and report.step == 10, report.errors
    assert temporaries(run_dir) == []
    assert "train.failed SaveError: checkpoint step 20 not saved" in (run_dir / "train.log").read_text()
    assert heartbeat(run_dir)["status"] == "failed"


@pytest.mark.slow  # moved to keep the default suite under 15 minutes
def test_on_save_error_stop_holds_when_an_async_save_failure_surfaces_in_a_rollback(tmp_path):
    run_dir = tmp_path / "run"
    chaos = ("chaos.enabled=true", "chaos.io_error_steps=[20]", "chaos.nan_steps=[21]")
    proc = train(run_dir, *chaos, "checkpoint.async_save=true", "checkpoint.on_save_error=stop")
    assert proc.returncode == 1, explain(proc)
    assert "checkpoint step 20 not saved" in proc.stderr
    # Counted under the step that failed (it surfaced at 21), and in the final heartbeat.
    assert "ckpt.save_failed step=20 " in (run_dir / "train.log").read_text()
    assert heartbeat(run_dir)["faults"]["save_failures"] == 1


# ----------------------------------------------------------------------------------------------
# hang: the watchdog


def test_a_hung_step_exits_124_with_its_stacks_and_the_resumed_run_ends_identical(ref, tmp_path):
    run_dir = tmp_path / "run"
    over = ("chaos.enabled=true", "chaos.hang_steps=[15]", "trainer.hang_timeout_secs=3")
    t0 = time.monotonic()
    proc = train(run_dir, *over, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == EXIT_HUNG == 124, explain(proc)
    assert took < 90, took  # ended by the watchdog, not by the subprocess timeout
    hangs = sorted(p.name for p in (run_dir / "hangs").iterdir())
    assert hangs == ["0-15.txt"]
    stacks = (run_dir / "hangs" / "0-15.txt").read_text()
    assert stacks.startswith("hang at step 15 on rank 0: no progress for "), stacks[:300]
    # The main thread, blocked where chaos blocked it: inside the step's observer, under the loop.
    assert re.search(r"chaos/agent\.py\", line \d+ in on_step", stacks), stacks
    assert re.search(r"train/trainer\.py\", line \d+ in fit", stacks), stacks
    assert "in _fire" in stacks  # the watchdog's own thread, the one that wrote this
    log = (run_dir / "train.log").read_text()
    m = re.search(r"watchdog\.hang step=15 rank=0 secs=([\d.]+) last=step stacks=(\S+) exit=124", log)
    assert m, log[-3000:]
    assert 3 <= float(m.group(1)) < 30 and m.group(2) == str(run_dir / "hangs" / "0-15.txt")
    js = json.loads(status(run_dir, "--json").stdout)
    assert js["state"] == "stale" and js["hangs"] == ["0-15.txt"], js
    assert "hangs:" in status(run_dir).stdout

    # The hang fired once: the replayed step 15 goes through. A roomier watchdog for the replay (the key is
    # resume-safe): a 3 s one fired on a step slowed by other processes' load (seen once under a busy machine).
    proc = train(run_dir, *over[:2], "trainer.hang_timeout_secs=30", "resume_from=auto")
    assert proc.returncode == 0, explain(proc)
    assert_identical(ref, run_dir, STEPS)
    assert sorted(p.name for p in (run_dir / "hangs").iterdir()) == ["0-15.txt"]


class _Exit:
    """Stands in for ``os._exit``: records the code and lets the test see it."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


TIMEOUT = 0.3


def _dog(tmp_path: Path, exit: _Exit, step: int = 7, timeout: float = TIMEOUT) -> Watchdog:
    return Watchdog(timeout, tmp_path, rank=1, step=lambda: step, exit=exit)


def test_watchdog_fires_after_no_progress_writing_every_threads_stack(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="resilient_train.train.watchdog")
    exit = _Exit()
    dog = _dog(tmp_path, exit)
    t0 = time.monotonic()
    dog.start()
    try:
        assert exit.called.wait(10), "the watchdog never fired"
        waited = time.monotonic() - t0
    finally:
        dog.stop()
    assert exit.codes == [EXIT_HUNG]
    assert TIMEOUT <= waited < 5, waited
    text = (tmp_path / "hangs" / "1-7.txt").read_text()
    first = text.splitlines()[0]
    assert re.fullmatch(r"hang at step 7 on rank 1: no progress for [\d.]+ s after start", first), first
    assert "in test_watchdog_fires_after_no_progress_writing_every_threads_stack" in text  # the waiting main thread
    assert "in _fire" in text
    assert re.search(r"watchdog\.hang step=7 rank=1 secs=[\d.]+ last=start stacks=\S+1-7\.txt exit=124", caplog.text)


def test_watchdog_stays_quiet_while_beats_come_then_fires_when_they_stop(tmp_path):
    exit = _Exit()
    dog = _dog(tmp_path, exit).start()
    try:
        end = time.monotonic() + 4 * TIMEOUT
        while time.monotonic() < end:
            dog.beat("step")
            time.sleep(0.02)
        assert not exit.called.is_set() and not (tmp_path / "hangs").exists()
        assert exit.called.wait(10)  # the same watchdog, live all along
    finally:
        dog.stop()
    assert exit.codes == [EXIT_HUNG]
    assert "after step" in (tmp_path / "hangs" / "1-7.txt").read_text().splitlines()[0]


def test_watchdog_paused_keeps_it_quiet_and_restarts_the_clock(tmp_path):
    exit = _Exit()
    dog = _dog(tmp_path, exit).start()
    try:
        with dog.paused():
            with dog.paused():  # nested: still paused after the inner one ends
                time.sleep(2 * TIMEOUT)
            time.sleep(2 * TIMEOUT)
            assert not exit.called.is_set()
        resumed = time.monotonic()
        assert exit.called.wait(10)
        assert time.monotonic() - resumed >= TIMEOUT - 0.05  # a full timeout after the pause, not at once
    finally:
        dog.stop()
    assert exit.codes == [EXIT_HUNG]
    assert "after resumed" in (tmp_path / "hangs" / "1-7.txt").read_text().splitlines()[0]


def test_watchdog_off_or_stopped_never_fires(tmp_path):
    off, stopped = _Exit(), _Exit()
    dog = _dog(tmp_path, off, timeout=0).start()
    assert not dog.enabled and dog._thread is None
    early = _dog(tmp_path, stopped).start()
    early.stop()
    time.sleep(3 * TIMEOUT)
    assert not off.called.is_set() and not stopped.called.is_set()
    assert not (tmp_path / "hangs").exists()


def test_collective_timeout_follows_the_watchdog_unless_set():
    assert COLLECTIVE_MARGIN_SECS == 30.0
    assert collective_timeout(300, None) == 330.0
    assert collective_timeout(6, None) == 36.0
    assert collective_timeout(0, None) == 120.0  # watchdog off
    assert collective_timeout(10, 60) == 60.0


# ----------------------------------------------------------------------------------------------
# the parts on their own: budget, guard, digests


def test_rollback_budget_counts_each_step_on_its_own_and_names_the_divergence():
    budget = RollbackBudget(2)
    fault = Fault("nan", 7, "non-finite loss on rank 0", {"rank 0": {"loss": "nan"}})
    assert [budget.spend(fault, "initial"), budget.spend(fault, "initial")] == [1, 2]
    assert budget.spend(Fault("nan", 8, "x"), "ckpt") == 1  # another step has a budget of its own
    with pytest.raises(DivergedError, match=r"^step 7: non-finite loss on rank 0 again after 2 rollback\(s\) to ck"):
        budget.spend(fault, "ckpt")
    assert budget.total == 3 and budget.counts == {7: 2, 8: 1}
    with pytest.raises(DivergedError, match=r"trainer.max_rollbacks=0: no rollback to initial tried"):
        RollbackBudget(0).spend(fault, "initial")  # trainer.max_rollbacks=0: the first fault stops the run


def test_agree_finite_raises_a_fault_naming_the_values_and_replicas_need_ranks():
    g = Group()
    agree_finite(g, 3, {"loss": 0.5, "grad_norm": 1.0}, "generator loss")  # finite: nothing
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(Fault) as info:
            agree_finite(g, 3, {"loss": 0.5, "grad_norm": bad}, "generator loss or gradient norm")
        f = info.value
        assert (f.kind, f.step) == ("nan", 3)
        assert f.values == {"rank 0": {"loss": 0.5, "grad_norm": str(bad)}}
        assert str(f) == "nan at step 3: non-finite generator loss or gradient norm on rank 0"
    check_replicas(g, 3, {"w": torch.ones(3)})  # one process: nothing to compare with, nothing raised


def test_tensor_digests_see_one_flipped_bit_in_one_tensor():
    state = {"model": {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(4)}, "step": 3}
    before = tensor_digests(state)
    state["model"]["a"].view(torch.int32)[2] ^= 1 << 7
    after = tensor_digests(state)
    assert [k for k in before if before[k] != after[k]] == [k for k in before if k.endswith("a")]
    state["step"] = 4
    assert tensor_digests(state)["(values)"] != after["(values)"]


# ----------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (("trainer.dist_timeout_secs=0",), "trainer.dist_timeout_secs"),
        (("checkpoint.on_save_error=maybe",), "checkpoint.on_save_error"),
        (("chaos.enabled=true", "chaos.bitflip_steps=[3]"), "chaos.bitflip_"),
    ],
    ids=["dist_timeout_zero", "on_save_error", "bitflip_one_process"],
)
def test_refused_configurations_exit_2_naming_the_key(tmp_path, overrides, named):
    run_dir = tmp_path / "run"
    proc = train(run_dir, *overrides)
    assert proc.returncode == 2, explain(proc)
    assert named in proc.stderr, proc.stderr[-3000:]
    if "bitflip" in named:
        assert "ranks (torchrun) only" in proc.stderr
    assert not (run_dir / "history.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_dist_timeout_rule_accepts_equal_null_and_watchdog_off(caplog):
    base = ["+experiment=tiny"]
    for ok in (
        ["trainer.dist_timeout_secs=10", "trainer.hang_timeout_secs=10"],
        ["trainer.dist_timeout_secs=5", "trainer.hang_timeout_secs=0"],  # watchdog off: any collective timeout
        ["trainer.hang_timeout_secs=10"],  # null: hang + 30 s
        ["chaos.bitflip_steps=[3]"],  # chaos off: nothing fires, nothing to refuse
    ):
        validate_config(compose_cfg(base + ok))
    # Below the watchdog's: accepted (old checkpoints saved 120 s), and warned about where the timeout is set.
    validate_config(compose_cfg([*base, "trainer.dist_timeout_secs=9.5", "trainer.hang_timeout_secs=10"]))
    with caplog.at_level(logging.WARNING, logger="resilient_train.train.watchdog"):
        assert collective_timeout(10, 9.5) == 9.5
    assert "dist.timeout_below_watchdog dist_timeout_secs=9.5 hang_timeout_secs=10" in caplog.text
    with pytest.raises(ValueError, match="trainer.hang_timeout_secs"):
        validate_config(compose_cfg([*base, "trainer.hang_timeout_secs=-1"]))


# ----------------------------------------------------------------------------------------------
# two ranks under torchrun


@pytest.mark.slow  # with test_ranks' 2-rank chaos proof (also slow): every fault kind with ranks
def test_two_ranks_survive_nan_failed_save_bitflip_and_hang_and_end_identical(ref2, tmp_path):
    run_dir = tmp_path / "run"
    # Rank 1 gets the nans (4: before any checkpoint, 15), the failed save (its own files) and the bit flip;
    # rank 0 hangs; the other rank's watchdog sees it blocked in a collective.
    seed = seed_with_victims({("nan", 4): 1, ("nan", 15): 1, ("io_error", 20): 1, ("bitflip", 23): 1, ("hang", 33): 0})
    chaos = [
        "chaos.enabled=true",
        f"chaos.seed={seed}",
        "chaos.nan_steps=[4,15]",
        "chaos.io_error_steps=[20]",
        "chaos.bitflip_steps=[23]",
        "chaos.hang_steps=[33]",
    ]
    cmd = torchrun_cmd(run_dir, *chaos, "trainer.hang_timeout_secs=5", "resume_from=auto", max_restarts=3)
    proc = run(cmd, timeout=400)
    assert proc.returncode == 0, explain(proc)
    out = proc.stdout + proc.stderr
    assert_identical(ref2, run_dir, STEPS2, rank=1)
    manifest = read_manifest(final(run_dir))
    assert {f"ranks/{r}/state.safetensors" for r in (0, 1)} <= set(manifest["files"])
    for ckpt in committed(run_dir / "checkpoints"):
        assert verify_files(ckpt).ok
    assert temporaries(run_dir) == []

    # The bit flip: detected at the step-30 commit, naming rank 1 and the tensor chaos flipped.
    flips = [json.loads(x) for x in (run_dir / "chaos_events.rank1.jsonl").read_text().splitlines()]
    (flip,) = [e for e in flips if e["kind"] == "bitflip"]
    log = (run_dir / "train.log").read_text()
    m = re.search(r"rollback\.start step=30 kind=replica attempt=1/3 to=\S+step_00000010: (.*)", log)
    assert m, log[-4000:]
    assert "rank 1: " in m.group(1) and f"/model/{flip['tensor']}" in m.group(1), m.group(1)
    assert rollbacks(run_dir) == [
        (0, 4, "nan", "initial"),
        (10, 15, "nan", "step_00000010"),
        (10, 30, "replica", "step_00000010"),  # the save at 20 had failed
    ]
    # Rank 1's files failed at 20: both ranks count the failed save; nothing was committed at 20 then.
    assert out.count("ckpt.save_failed step=20 ") == 2, out[-4000:]
    # The hang: both watchdogs end their process with 124, torchrun restarts the group, which resumes.
    for r in (0, 1):
        assert f"watchdog.hang step=33 rank={r} " in out, out[-4000:]
        assert (run_dir / "hangs" / f"{r}-33.txt").is_file()
        assert f"dist.init rank={r} world_size=2 local_rank={r} backend=gloo restart=1 " in out
    assert "exitcode: 124" in out and "backend=gloo restart=2" not in out
    assert re.search(r"chaos/agent\.py\", line \d+ in on_step", (run_dir / "hangs" / "0-33.txt").read_text())


@pytest.mark.slow
def test_a_sigstopped_rank_is_reported_by_its_peers_watchdog_and_the_restarted_group_ends_identical(ref2, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    cmd = torchrun_cmd(run_dir, "trainer.hang_timeout_secs=6", "resume_from=auto", max_restarts=2)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=train_env(), start_new_session=True
        )
    victim = None
    try:
        wait_for(lambda: train_steps_logged(run_dir) >= 3 and rank_pid(run_dir, 1), "step 3", proc, log)
        victim = rank_pid(run_dir, 1)
        os.kill(victim, signal.SIGSTOP)  # alive, silent, holding its peer in a collective
        stopped = time.monotonic()
        wait_for(lambda: "watchdog.hang" in log.read_text(), "rank 0's watchdog", proc, log, timeout=60)
        waited = time.monotonic() - stopped
        assert proc.wait(timeout=240) == 0, log.read_text()[-4000:]
    finally:
        if victim is not None and pid_alive(victim):
            os.kill(victim, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert 6 <= waited < 20, waited  # the watchdog (6 s), well before the collective's timeout (36 s)
    text = log.read_text()
    m = re.search(r"watchdog\.hang step=(\d+) rank=0 secs=([\d.]+) ", text)
    assert m and int(m.group(1)) >= 3, text[-4000:]
    assert "train.failed" not in text  # not a collective's error: the watchdog reported first
    stacks = (run_dir / "hangs" / f"0-{m.group(1)}.txt").read_text()
    assert re.search(r"train/trainer\.py\", line \d+ in fit", stacks), stacks
    assert "exitcode: 124" in text
    for r in (0, 1):
        assert f"dist.init rank={r} world_size=2 local_rank={r} backend=gloo restart=1 " in text
    assert not pid_alive(victim)  # torchrun ended the stopped worker too
    assert compare_checkpoints(final(ref2), final(run_dir)) is None
    assert compare_histories(read_history(ref2), read_history(run_dir), STEPS2) is None
