"""Resume is bit-exact: real ``train.py`` subprocesses, compared run against run with zero tolerance.

The pattern is Composer's checkpoint-resumption test: run A goes straight to N steps; run B stops
part-way (by ``max_steps``, SIGTERM, SIGKILL or a corrupt checkpoint) and is resumed to N. The two
final checkpoints must be identical bit for bit (:func:`compare_checkpoints`), and B's
``history.jsonl`` must hold every train step 1..N exactly once with the same loss, recon_loss,
discr_loss, grad_norm and lr as A's. Nothing is compared against stored numbers.

Reference runs are module-scoped and shared; tests that resume work on copies of them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import hold, run_train, start_train, train_command, train_env

from resilient_train.checkpoint import CheckpointManager, read_manifest, step_dir_name, verify_files
from resilient_train.monitor import read_history
from resilient_train.verify import compare_checkpoints, verify_checkpoint

EXIT_PREEMPTED, EXIT_ABORTED, EXIT_CONFIG_ERROR = 75, 130, 2
STEPS_PER_EPOCH = 24  # tiny: 48 train clips, batch 1, grad_accum_steps 2


# ----------------------------------------------------------------------------------------------
# helpers


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / step_dir_name(step)


def committed(run: Path) -> list[str]:
    return [p.name for p in CheckpointManager(run / "checkpoints").committed()]


def records(run: Path, kind: str) -> list[dict]:
    """History records of one kind, wall-clock time dropped (everything else must match exactly)."""
    return [{k: v for k, v in r.items() if k != "time"} for r in read_history(run) if r.get("kind") == kind]


def last_train_step(run: Path) -> int:
    return max((r["step"] for r in records(run, "train")), default=0)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def assert_same_training(ref: Path, other: Path, steps: int, *, skip_evals: tuple[int, ...] = ()) -> None:
    """Checkpoints of ``steps`` bit-identical; ``other``'s history holds train steps 1..steps exactly once,
    every field equal to the reference's (the reference may have gone further)."""
    diff = compare_checkpoints(ckpt(ref, steps), ckpt(other, steps))
    assert diff is None, f"checkpoints of step {steps} differ: {diff}"
    want = [r for r in records(ref, "train") if r["step"] <= steps]
    got = records(other, "train")
    assert [r["step"] for r in got] == list(range(1, steps + 1)), "each train step must be logged exactly once"
    assert [r["step"] for r in want] == list(range(1, steps + 1))
    for a, b in zip(want, got):
        for field in ("epoch", "loss", "recon_loss", "discr_loss", "grad_norm", "lr"):
            assert a[field] == b[field], f"step {a['step']}: {field} {a[field]!r} (reference) vs {b[field]!r}"
        assert a == b
    want_evals = [r for r in records(ref, "eval") if r["step"] <= steps]
    assert want_evals == [r for r in records(other, "eval") if r["step"] not in skip_evals]


def train_raw(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` with nothing added (no ``+experiment``, no ``hydra.run.dir``)."""
    args = train_command(None, *args, experiment=None)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=train_env(env))


class Runs:
    """Background ``train.py`` processes (same command line as ``run_train``); killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{run_dir.name}.{len(self.procs)}.out"
        proc = start_train(run_dir, *overrides, log=log, env=env)
        self.procs.append((proc, log))
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return next(log for p, log in self.procs if p is proc).read_text()

    def wait_until(self, proc: subprocess.Popen, cond, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if proc.poll() is not None:
                pytest.fail(f"train.py exited {proc.returncode} before {what}:\n{self.log(proc)[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.log(proc)[-4000:]}")
            time.sleep(0.02)

    def finish(self, proc: subprocess.Popen, timeout: float = 300) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"train.py did not exit within {timeout}s:\n{self.log(proc)[-4000:]}")

    def kill_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def runs():
    r = Runs()
    yield r
    r.kill_all()


def rewrite_json_in_checkpoint(ckpt_dir: Path, name: str, edit) -> None:
    """Edit one JSON file of a checkpoint and update its size and SHA-256 in the manifest (so it still verifies)."""
    path = ckpt_dir / name
    data = json.loads(path.read_text())
    edit(data)
    raw = json.dumps(data, sort_keys=True).encode()
    path.write_bytes(raw)
    manifest_path = ckpt_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# shared reference runs (read-only: tests copy them before resuming)


@pytest.fixture(scope="module")
def ref30(tmp_path_factory) -> Path:
    """Run A: straight to 30 steps (crosses the epoch end at step 24)."""
    run = tmp_path_factory.mktemp("ref30") / "run"
    run_train(run, "trainer.max_steps=30")
    return run


@pytest.fixture(scope="module")
def half10(tmp_path_factory) -> Path:
    """Run B's first leg: straight to 10 steps (a checkpoint and eval step)."""
    run = tmp_path_factory.mktemp("half10") / "run"
    run_train(run, "trainer.max_steps=10")
    assert committed(run) == [step_dir_name(10)]
    return run


# ----------------------------------------------------------------------------------------------
# 1. continuous vs stop-and-resume


def test_resume_from_run_dir_alone_matches_continuous_run(ref30, half10, tmp_path):
    run = copy_run(half10, tmp_path / "run")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # Only resume_from=RUN and the new max_steps: the config comes from the checkpoint, and the
    # output goes into RUN (no +experiment, no hydra.run.dir).
    proc = train_raw(f"resume_from={run}", "trainer.max_steps=30", cwd=cwd)
    assert proc.returncode == 0, output(proc)[-4000:]
    assert list(cwd.iterdir()) == [], "resume_from=RUN must write into RUN, not a new Hydra output dir"
    assert f"resume step=10 epoch=0 batch_in_epoch=20 path={ckpt(run, 10)}" in output(proc)
    # The chosen checkpoint is read and hashed once: every full read logs one ckpt.read line.
    reads = [line for line in output(proc).splitlines() if "ckpt.read " in line]
    assert len(reads) == 1 and f"path={ckpt(run, 10)} " in reads[0], reads
    assert records(run, "train")[-1]["epoch"] == 1  # crossed the epoch end (step 24)
    assert_same_training(ref30, run, 30)
    assert json.loads((run / "heartbeat.json").read_text())["status"] == "finished"


# ----------------------------------------------------------------------------------------------
# 2. mid-epoch resume from a checkpoint that is not an eval step, and resume at the epoch end


@pytest.fixture(scope="module")
def every5_to24(tmp_path_factory) -> Path:
    """Stopped exactly at the end of epoch 0 (step 24, with the final eval of max_steps); keeps every checkpoint."""
    run = tmp_path_factory.mktemp("every5_to24") / "run"
    run_train(run, "trainer.max_steps=24", "checkpoint.every_n_steps=5", "checkpoint.keep_last=0")
    assert committed(run) == [step_dir_name(s) for s in (5, 10, 15, 20, 24)]
    assert [r["step"] for r in records(run, "eval")] == [10, 20, 24]
    return run


def test_mid_epoch_resume_from_non_eval_checkpoint(every5_to24, ref30, tmp_path):
    run = copy_run(every5_to24, tmp_path / "run")
    manifest = read_manifest(ckpt(run, 15))
    assert (manifest["epoch"], manifest["batch_in_epoch"], manifest["val_loss"]) == (0, 30, None)
    proc = run_train(run, f"resume_from={ckpt(run, 15)}", "trainer.max_steps=30", experiment=None)
    # Resuming from an older checkpoint forks the timeline: the newer ones are set aside (never
    # deleted) and their history records dropped, so each step is logged exactly once.
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    for step in (20, 24):
        assert any(n.startswith(f"{step_dir_name(step)}.superseded-") for n in names), names
    assert "resume.history_truncated" in output(proc)
    # The reference saved every 10 steps: checkpoint.* is resume-safe because saving more often
    # cannot change the bits, so this also proves that.
    assert_same_training(ref30, run, 30)


@pytest.mark.slow  # extra coverage; keeps the default suite under 15 minutes
def test_resume_at_epoch_boundary_after_final_eval(every5_to24, ref30, tmp_path):
    # Step 24 = 48 batches = exactly one epoch, and the first leg evaluated there (max_steps)
    # while the continuous run did not: evaluation must not disturb the training state.
    run = copy_run(every5_to24, tmp_path / "run")
    manifest = read_manifest(ckpt(run, 24))
    assert (manifest["epoch"], manifest["batch_in_epoch"]) == (0, 2 * STEPS_PER_EPOCH)
    proc = run_train(run, f"resume_from={run}", "trainer.max_steps=30", experiment=None)
    assert "resume step=24 epoch=0 batch_in_epoch=48 " in output(proc)
    assert_same_training(ref30, run, 30, skip_evals=(24,))


# ----------------------------------------------------------------------------------------------
# 3. data loader workers


@pytest.mark.slow  # extra coverage; keeps the default suite under 15 minutes
def test_num_workers_split_matches_continuous_without_workers(ref30, tmp_path):
    # Both legs load with 2 worker processes (start offset, epoch rollover at step 24); the result
    # must equal the continuous run without workers: data.num_workers is resume-safe because it
    # cannot change the bits.
    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=10", "data.num_workers=2")
    proc = run_train(run, "trainer.max_steps=30", "data.num_workers=2", "resume_from=auto")
    assert "resume step=10 " in output(proc)
    assert_same_training(ref30, run, 30)


# ----------------------------------------------------------------------------------------------
# 4. SIGTERM


def test_sigterm_saves_where_it_stopped_and_resume_matches(ref30, runs, tmp_path):
    run = tmp_path / "run"
    proc = runs.start(run, "trainer.max_steps=30")
    runs.wait_until(proc, lambda: last_train_step(run) >= 12, "step 12")
    proc.send_signal(signal.SIGTERM)
    rc = runs.finish(proc)
    log = runs.log(proc)
    assert rc == EXIT_PREEMPTED, log[-4000:]
    stopped = last_train_step(run)
    assert 12 <= stopped < 30
    assert "signal.SIGTERM" in log
    beat = json.loads((run / "heartbeat.json").read_text())
    assert (beat["status"], beat["step"]) == ("stopped", stopped)
    assert committed(run)[-1] == step_dir_name(stopped)
    result = verify_checkpoint(ckpt(run, stopped))
    assert result["ok"], result["errors"]
    # The same command with resume_from=auto continues and ends where the uninterrupted run ends.
    proc2 = run_train(run, "trainer.max_steps=30", "resume_from=auto")
    assert f"resume step={stopped} " in output(proc2)
    assert_same_training(ref30, run, 30)


# ----------------------------------------------------------------------------------------------
# 5. corrupt newest checkpoint


def test_corrupt_newest_checkpoint_is_set_aside_and_resume_uses_previous(trained_run, ref30, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    assert committed(run) == [step_dir_name(10), step_dir_name(20)]
    model = ckpt(run, 20) / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))

    # An explicit resume from the corrupt checkpoint is refused, naming the file, and moves nothing.
    proc = run_train(run, f"resume_from={ckpt(run, 20)}", "trainer.max_steps=30", experiment=None, check=False)
    assert proc.returncode == EXIT_CONFIG_ERROR, output(proc)[-4000:]
    assert str(model) in proc.stderr and "xxh3_128 mismatch" in proc.stderr
    assert committed(run) == [step_dir_name(10), step_dir_name(20)]

    # resume_from=auto logs the invalid one, renames it aside and resumes from step 10.
    proc = run_train(run, "resume_from=auto", "trainer.max_steps=30")
    out = output(proc)
    assert f"ckpt.invalid path={ckpt(run, 20)}" in out and "model.safetensors" in out
    assert "resume step=10 " in out
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(f"{step_dir_name(20)}.corrupt-")]
    assert len(aside) == 1, "the corrupt checkpoint is kept (renamed), never deleted"
    assert (aside[0] / "model.safetensors").read_bytes() == bytes(data)
    assert not verify_files(aside[0]).ok
    assert_same_training(ref30, run, 30)


# ----------------------------------------------------------------------------------------------
# 6. config drift guard


def test_config_drift_is_refused_before_training(half10, ref30, tmp_path):
    run = copy_run(half10, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("history.jsonl", "config.yaml", "heartbeat.json")}

    proc = run_train(run, f"resume_from={run}", "optimizer.lr=0.5", experiment=None, check=False)
    assert proc.returncode == EXIT_CONFIG_ERROR, output(proc)[-4000:]
    assert "optimizer.lr: 0.001 -> 0.5" in proc.stderr
    assert committed(run) == [step_dir_name(10)]
    assert {name: (run / name).read_bytes() for name in before} == before, "a refused resume changes nothing"

    # The same change on the full experiment command line (compared key by key) is refused too.
    proc = run_train(run, "resume_from=auto", "optimizer.lr=0.5", check=False)
    assert proc.returncode == EXIT_CONFIG_ERROR, output(proc)[-4000:]
    assert "optimizer.lr: 0.001 -> 0.5" in proc.stderr
    assert committed(run) == [step_dir_name(10)]

    # Resume-safe changes alone are allowed, here with the very same +experiment=tiny line plus
    # resume_from=auto (test 1 does it with resume_from=RUN alone and a new trainer.max_steps).
    run_train(run, "resume_from=auto", "trainer.max_steps=12", "checkpoint.keep_last=5")
    assert [r["step"] for r in records(run, "train")] == list(range(1, 13))
    assert records(run, "train") == records(ref30, "train")[:12]
    assert read_manifest(ckpt(run, 12))["config_changes"] == []


def test_allowed_config_change_is_recorded(half10, ref30, tmp_path):
    run = copy_run(half10, tmp_path / "run")
    proc = run_train(
        run,
        f"resume_from={run}",
        "optimizer.lr=0.5",
        "resume.allow_config_change=true",
        "trainer.max_steps=12",
        experiment=None,
    )
    assert "resume.config_change allowed" in output(proc)
    assert read_manifest(ckpt(run, 12))["config_changes"] == ["optimizer.lr: 0.001 -> 0.5"]
    # The change took effect: same schedule, 500 times the base LR.
    lr = {r["step"]: r["lr"] for r in records(run, "train")}
    ref_lr = {r["step"]: r["lr"] for r in records(ref30, "train")}
    assert lr[10] == ref_lr[10]
    assert lr[11] == pytest.approx(500 * ref_lr[11], rel=1e-12)


# ----------------------------------------------------------------------------------------------
# 7. fresh start


def test_resume_auto_in_empty_dir_starts_fresh_and_plain_start_on_checkpoints_is_refused(tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, "resume_from=auto", "trainer.max_steps=2")
    assert "no valid checkpoint yet, starting fresh" in output(proc)
    assert committed(run) == [step_dir_name(2)]
    history = (run / "history.jsonl").read_bytes()

    proc = run_train(run, "trainer.max_steps=4", check=False)
    assert proc.returncode == EXIT_CONFIG_ERROR, output(proc)[-4000:]
    assert "already holds checkpoints" in proc.stderr and "resume_from=auto" in proc.stderr
    assert committed(run) == [step_dir_name(2)]
    assert (run / "history.jsonl").read_bytes() == history


# ----------------------------------------------------------------------------------------------
# 8. one writer per run directory


def test_second_writer_is_refused_and_lock_is_taken_over_after_sigkill(ref30, runs, tmp_path):
    run = tmp_path / "run"
    # The first writer parks inside the save of step 20 (step 10 is committed), holding the lock.
    proc = runs.start(run, "trainer.max_steps=30", *hold("files_written", 20))
    held = run / "checkpoints" / ".held-files_written-20"
    runs.wait_until(proc, lambda: held.exists() and (run / "heartbeat.json").exists(), "the held save at step 20")
    assert json.loads((run / "heartbeat.json").read_text())["pid"] == proc.pid
    temporaries = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-"))
    assert temporaries

    second = run_train(run, "trainer.max_steps=30", "resume_from=auto", check=False)
    assert second.returncode == EXIT_CONFIG_ERROR, output(second)[-4000:]
    assert f"pid {proc.pid}" in second.stderr and "in use by another training process" in second.stderr
    assert proc.poll() is None, "the first writer must be unaffected"
    # The refused process touched nothing: the first writer's temporary directory is still there.
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")) == temporaries

    proc.kill()
    assert runs.finish(proc) == -signal.SIGKILL
    proc3 = run_train(run, "trainer.max_steps=20", "resume_from=auto")
    assert "resume step=10 " in output(proc3)
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    assert_same_training(ref30, run, 20)


# ----------------------------------------------------------------------------------------------
# 9. second SIGINT


@pytest.mark.slow  # moved to keep the default suite under 15 minutes
def test_second_sigint_exits_at_once_leaving_committed_checkpoints_valid(half10, runs, tmp_path):
    run = tmp_path / "run"
    # Every save parks at "files_written", so the second Ctrl-C lands while the first one's
    # checkpoint is still being written.
    proc = runs.start(run, "trainer.max_steps=30", *hold("files_written"))
    runs.wait_until(proc, lambda: last_train_step(run) >= 3, "step 3")
    proc.send_signal(signal.SIGINT)
    runs.wait_until(proc, lambda: any((run / "checkpoints").glob(".held-files_written-*")), "the save after SIGINT")
    proc.send_signal(signal.SIGINT)
    rc = runs.finish(proc)
    log = runs.log(proc)
    assert rc == EXIT_ABORTED, log[-4000:]
    assert "signal.SIGINT" in log and "second SIGINT: exiting immediately" in log
    ckpts = CheckpointManager(run / "checkpoints")
    assert ckpts.committed() == [], "the interrupted save was never committed"
    assert any(p.name.startswith(".tmp-") for p in ckpts.root.iterdir())
    for path in ckpts.committed():
        report = verify_files(path)
        assert report.ok, report.errors

    # The run directory stays usable: resume_from=auto cleans up, starts fresh, logs each step once.
    proc2 = run_train(run, "trainer.max_steps=10", "resume_from=auto")
    assert "starting fresh" in output(proc2)
    assert not any(p.name.startswith(".tmp-") for p in ckpts.root.iterdir())
    assert_same_training(half10, run, 10)


@pytest.mark.slow  # extra coverage; keeps the default suite under 15 minutes
def test_quick_double_sigint_leaves_every_committed_checkpoint_valid(runs, tmp_path):
    run = tmp_path / "run"
    proc = runs.start(run, "trainer.max_steps=200", "checkpoint.every_n_steps=2")
    runs.wait_until(proc, lambda: last_train_step(run) >= 3, "step 3")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    rc = runs.finish(proc)
    assert rc in (EXIT_ABORTED, EXIT_PREEMPTED), runs.log(proc)[-4000:]
    paths = CheckpointManager(run / "checkpoints").committed()
    assert paths
    for path in paths:
        report = verify_files(path)
        assert report.ok, report.errors


# ----------------------------------------------------------------------------------------------
# 10. state that cannot be restored exactly is an error


def test_missing_rng_key_is_an_error(half10, tmp_path):
    run = tmp_path / "run"
    target = ckpt(run, 10)
    shutil.copytree(ckpt(half10, 10), target)
    rewrite_json_in_checkpoint(target, "ranks/0/state.json", lambda s: s["rng"].pop("torch"))
    assert verify_files(target).ok, "the edited checkpoint must still pass the file checks"

    proc = run_train(run, f"resume_from={target}", "trainer.max_steps=12", experiment=None, check=False)
    assert proc.returncode == EXIT_CONFIG_ERROR, output(proc)[-4000:]
    assert f"{target}/ranks/0/state.json: rng: not a mapping of python, numpy, torch and cuda states" in proc.stderr
    assert records(run, "train") == [], "no step may run with unrestored RNG state"
    assert committed(run) == [step_dir_name(10)]


@pytest.mark.slow  # moved to keep the default suite under 15 minutes
def test_thread_count_change_is_refused_unless_allowed_then_recorded(half10, tmp_path):
    run = copy_run(half10, tmp_path / "run")
    proc = run_train(
        run, f"resume_from={run}", "trainer.num_threads=1", "trainer.max_steps=12", experiment=None, check=False
    )
    assert proc.returncode == EXIT_CONFIG_ERROR, output(proc)[-4000:]
    assert "trainer.num_threads: 2 -> 1" in proc.stderr
    assert committed(run) == [step_dir_name(10)]

    proc = run_train(
        run,
        f"resume_from={run}",
        "trainer.num_threads=1",
        "trainer.max_steps=12",
        "resume.allow_config_change=true",
        experiment=None,
    )
    assert "resume.env_change" in output(proc)
    changes = read_manifest(ckpt(run, 12))["config_changes"]
    assert changes == ["trainer.num_threads: 2 -> 1", "env.num_threads: 2 -> 1"]


@pytest.mark.slow  # extra coverage; keeps the default suite under 15 minutes
def test_environment_mismatch_is_refused(half10, tmp_path):
    # Same config, different determinism environment (recorded in every checkpoint). With
    # resume.allow_config_change=true it is accepted and recorded instead: see the thread-count test.
    run = copy_run(half10, tmp_path / "run")
    env = {"MKL_CBWR": "AUTO"}
    proc = run_train(run, f"resume_from={run}", "trainer.max_steps=12", experiment=None, env=env, check=False)
    assert proc.returncode == EXIT_CONFIG_ERROR, output(proc)[-4000:]
    assert "the environment differs" in proc.stderr and "determinism_env" in proc.stderr
    assert "MKL_CBWR" in proc.stderr
    assert committed(run) == [step_dir_name(10)] and records(run, "train") == records(half10, "train")
