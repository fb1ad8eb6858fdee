"""Shared fixtures: Hydra-composed configs (as lightning-hydra-template's conftest) and real training runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from resilient_train.config import compose

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"


compose_cfg = compose  # the config exactly as ``train.py`` composes it, without running anything


def heartbeat_record(**over) -> dict:
    """A heartbeat.json record of a live run on this host (fields overridden by ``over``)."""
    import socket
    import time

    hb = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "step": 40,
        "epoch": 2,
        "max_steps": 100,
        "time": time.time(),
        "status": "running",
        "latest_checkpoint": None,
        "last_loss": 0.5,
    }
    return {**hb, **over}


def hold(phase: str, step: int | None = None) -> list[str]:
    """Overrides that park the checkpoint writer at ``phase`` (of ``step``'s save) so a test can SIGKILL it there."""
    return ["chaos.enabled=true", f"chaos.hold_phase={phase}" + (f"@{step}" if step is not None else "")]


@pytest.fixture
def cfg_tiny():
    return compose_cfg(["+experiment=tiny"])


@pytest.fixture
def cfg_magvit64():
    return compose_cfg(["+experiment=magvit64"])


def train_command(run_dir: Path | None, *overrides: str, experiment: str | None = "tiny") -> list[str]:
    """``python train.py [+experiment=E] [hydra.run.dir=RUN] trainer.progress_bar=false OVERRIDES``."""
    args = [sys.executable, str(TRAIN)]
    if experiment:
        args.append(f"+experiment={experiment}")
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return [*args, "trainer.progress_bar=false", *overrides]


def train_env(env: dict | None = None) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", **(env or {})}


def start_train(run_dir: Path, *overrides: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """The tiny experiment in the background, its output into ``log``; the caller waits or kills."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            train_command(run_dir, *overrides), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=train_env(env)
        )


def run_train(
    run_dir: Path,
    *overrides: str,
    experiment: str | None = "tiny",
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """``python train.py ...`` as a real subprocess writing into ``run_dir``."""
    args = train_command(run_dir, *overrides, experiment=experiment)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=train_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny run of 20 steps, shared (read-only) by tests that only inspect its outputs."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_train(run_dir, "trainer.max_steps=20")
    return run_dir


def wait_for(cond, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``cond`` until true; fail naming ``what`` (with the log's tail) if ``proc`` ends or time runs out."""
    import time

    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > end:
            pytest.fail(f"{what}: not seen (exit {proc.poll()})\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def train_steps_logged(run_dir: Path) -> int:
    """How many train records ``RUN/history.jsonl`` holds (0 before it exists)."""
    try:
        return sum(1 for x in (run_dir / "history.jsonl").read_text().splitlines() if '"train"' in x)
    except FileNotFoundError:
        return 0


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid in ``RUN/ranks/<rank>/heartbeat.json`` (None until that rank wrote one)."""
    import json

    try:
        return json.loads((run_dir / "ranks" / str(rank) / "heartbeat.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
