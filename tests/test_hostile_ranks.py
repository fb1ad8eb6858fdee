"""Ranks that disagree: a rank started with another override is refused at start-up, on every rank, naming the key;
a committed checkpoint whose rank-1 files are damaged is set aside, and rank 0 killed between every rank's confirmation
and the rename leaves the previous checkpoint intact: the resume from the one before is bit-identical in both.

Real ``torchrun`` processes on gloo, one thread each; rank 1's extra override is added by the shell each
worker runs in (``--no-python``), as a per-node launcher script would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import REPO, TRAIN, hold, rank_pid, train_env, wait_for

from resilient_train.checkpoint import committed
from resilient_train.verify import compare_checkpoints

EXIT_TORCHRUN_CHILD_FAILED, EXIT_CONFIG_ERROR = 1, 2


def torchrun_cmd(run, *overrides) -> list[str]:
    """2 ranks of tiny under torchrun (1 thread each), a checkpoint every 6 steps."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    args = [str(TRAIN), "+experiment=tiny", f"hydra.run.dir={run}", "trainer.progress_bar=false"]
    return [*cmd, *args, "trainer.num_threads=1", "checkpoint.every_n_steps=6", *overrides]


def torchrun(run, *overrides) -> str:
    proc = subprocess.run(
        torchrun_cmd(run, *overrides), capture_output=True, text=True, timeout=300, cwd=REPO, env=train_env()
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def test_a_rank_started_with_another_override_is_refused_on_every_rank_naming_the_key(tmp_path):
    run = tmp_path / "run"
    worker = (
        f"exec {sys.executable} {TRAIN} +experiment=tiny hydra.run.dir={run} trainer.progress_bar=false "
        'trainer.num_threads=1 $([ "$RANK" = 1 ] && echo optimizer.lr=0.002)'
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    proc = subprocess.run(
        [*cmd, "--no-python", "bash", "-c", worker],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=train_env(),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_TORCHRUN_CHILD_FAILED, out[-3000:]
    # Both workers refuse; torchrun may stop the second (SIGTERM, -15) before it exits on its own.
    codes = re.findall(r"exitcode\s*: (-?\d+)", out)
    assert str(EXIT_CONFIG_ERROR) in codes and set(codes) <= {str(EXIT_CONFIG_ERROR), "-15"}, out[-3000:]
    said = re.findall(r"error: the ranks were started with different configs: (rank \d: optimizer\.lr: .*?) there", out)
    assert set(said) <= {"rank 1: optimizer.lr: 0.001 on rank 0, 0.002", "rank 0: optimizer.lr: 0.002 on rank 1, 0.001"}
    assert said, out[-3000:]
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.rglob("*"))


@pytest.mark.slow
def test_a_damaged_private_file_of_rank_1_sets_the_checkpoint_aside_and_the_resume_is_bit_identical(tmp_path):
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    torchrun(straight, "trainer.max_steps=14")
    torchrun(damaged, "trainer.max_steps=12")
    private = damaged / "checkpoints" / "step_00000012" / "ranks" / "1" / "state.safetensors"
    raw = bytearray(private.read_bytes())
    raw[-5] ^= 0x01  # one bit of rank 1's own state (its RNG, its data position): not a shared file
    private.write_bytes(bytes(raw))
    out = torchrun(damaged, "resume_from=auto", "trainer.max_steps=14")
    assert "resume step=10" in out and "reason=corrupt" in out, out[-3000:]
    assert [p.name for p in (damaged / "checkpoints").iterdir() if ".corrupt-" in p.name][0].startswith("step_00000012")
    final = [committed(r / "checkpoints")[-1] for r in (straight, damaged)]
    assert final[0].name == final[1].name == "step_00000014"
    assert compare_checkpoints(*final) is None


@pytest.mark.slow
def test_rank_0_killed_after_every_rank_confirmed_its_files_but_before_the_rename(tmp_path):
    """Rank 0 parks in ``before_rename`` of step 12's save (every rank's vote gathered, the manifest written inside the
    temporary folder) and is SIGKILLed there: step 12 never appears, step 10 stays valid, and the resume ends identical
    to a run trained straight."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    torchrun(straight, "trainer.max_steps=14")
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            torchrun_cmd(killed, "trainer.max_steps=14", *hold("before_rename", 12)),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=train_env(),
        )
    try:
        wait_for(lambda: (killed / "checkpoints" / ".held-before_rename-12").exists(), "rank 0 parked", proc, log)
        os.kill(rank_pid(killed, 0), signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    root = killed / "checkpoints"
    assert [p.name for p in committed(root)] == ["step_00000006", "step_00000010"]  # 10: a new best
    (tmp,) = [p for p in root.iterdir() if p.name.startswith(".tmp-step_00000012")]
    assert (tmp / "manifest.json").is_file() and (tmp / "ranks" / "1").is_dir()  # what the kill left behind
    out = torchrun(killed, "resume_from=auto", "trainer.max_steps=14", "chaos.enabled=false")
    assert "resume step=10" in out
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the next start cleared it
    assert compare_checkpoints(committed(straight / "checkpoints")[-1], committed(root)[-1]) is None
