"""The move into subpackages changed no number and no file format, checked against the commit before it.

The code of ``PRE_MOVE`` (the last commit before the modules moved, taken from this repository's
history with ``git archive``) trains in real processes beside the current code: both train tiny
to step 60 from the same seed and their final checkpoints are compared bit for bit; and a
checkpoint the old code wrote at step 30 is resumed by the current code to 60 and must equal both.
Slow (about a minute): ``make test-slow``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_train, train_command, train_env

from resilient_train.checkpoint import committed
from resilient_train.verify import compare_checkpoints

pytestmark = pytest.mark.slow

#: The last commit before the modules moved into subpackages (issue "A house by concern").
PRE_MOVE = "ac25e70316a4024a747af950f8cf0d8d624cc7ce"


@pytest.fixture(scope="module")
def old_code(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.fail("git is needed to take the previous commit's code from the history")
    out = tmp_path_factory.mktemp("pre_move")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", PRE_MOVE, "src", "train.py"], capture_output=True, timeout=60
    )
    assert archive.returncode == 0, f"git archive {PRE_MOVE}: {archive.stderr.decode()[-500:]} (a shallow clone?)"
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True, timeout=60)
    return out


def run_old(old: Path, run_dir: Path, *overrides: str) -> None:
    args = train_command(run_dir, *overrides)
    args[1] = str(old / "train.py")
    env = train_env({"PYTHONPATH": str(old / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")})
    probe = subprocess.run(
        [sys.executable, "-c", "import resilient_train; print(resilient_train.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert probe.stdout.strip().startswith(str(old)), f"the old code is not the one imported: {probe.stdout}"
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=old, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def final(run: Path) -> Path:
    return committed(run / "checkpoints")[-1]


def test_the_same_weights_before_and_after_the_move_and_old_checkpoints_resume_bit_identical(old_code, tmp_path):
    steps = ("trainer.max_steps=60", "checkpoint.every_n_steps=30")
    run_old(old_code, tmp_path / "old60", *steps)
    # The EMA's warm-up (trainer.ema.warmup, default true) came later: the constant decay the old code had.
    run_train(tmp_path / "new60", *steps, "trainer.ema.warmup=false")
    assert final(tmp_path / "old60").name == final(tmp_path / "new60").name == "step_00000060"
    assert compare_checkpoints(final(tmp_path / "old60"), final(tmp_path / "new60")) is None

    run_old(old_code, tmp_path / "mixed", "trainer.max_steps=30", "checkpoint.every_n_steps=30")
    run_train(tmp_path / "mixed", "resume_from=auto", *steps)  # no override: an old checkpoint keeps its EMA
    assert compare_checkpoints(final(tmp_path / "mixed"), final(tmp_path / "new60")) is None
