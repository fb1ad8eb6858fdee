"""Ranks that disagree: a rank started with another override is refused at start-up, on every rank, naming the key.

Real ``torchrun`` processes on gloo, one thread each; rank 1's extra override is added by the shell each
worker runs in (``--no-python``), as a per-node launcher script would.
"""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO, TRAIN, train_env

EXIT_TORCHRUN_CHILD_FAILED, EXIT_CONFIG_ERROR = 1, 2


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
