"""The chaos proof's processes: a trainer command run (and killed from outside), the torchrun launcher,
and the chaos arm restarted after every death until it finishes.

Owns: :func:`run_command` (one launch, its output appended to a log, with an optional external
SIGKILL, or with ranks a SIGSTOP, that waits for the trainer's first new step), :func:`torchrun_command`, and
:func:`run_chaos_arm` (the restart loop, its budget and which exits may be restarted). After a
node loss (``chaos.node_loss``: the trainer deleted its run directory and killed itself) the
restart gets an empty run directory, as a replacement machine would: anything a dying process
wrote there after the deletion is removed first.

Nothing here imports the trainer or torch: every trainer is a process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.watchdog import EXIT_HUNG
from .report import last_step
from .schedule import read_events

__all__ = ["TRAIN_CMD", "ChaosArm", "run_chaos_arm", "run_command", "torchrun_command"]

#: The trainer, as installed: run with the caller's working directory, never a path inside a source tree.
TRAIN_CMD = (sys.executable, "-m", "resilient_train.cli")


def torchrun_command(nproc: int, max_restarts: int) -> list[str]:
    """PyTorch's launcher running our trainer module on ``nproc`` local ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "resilient_train.cli",
    ]


def _worker_pid(run_dir: Path, rank: int) -> int | None:
    try:
        beat = json.loads((run_dir / "ranks" / str(rank) / "heartbeat.json").read_text())
        return int(beat["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_command(
    cmd: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    kill_after: float | None = None,
    run_dir: Path | None = None,
    victim: int | None = None,
    stop: bool = False,
) -> tuple[int, dict[str, Any] | None]:
    """Run ``cmd`` (with ``env`` added to this environment); with ``kill_after``, SIGKILL it from outside
    that many seconds after it trains a step. The exit status, and the ``time`` and last ``step`` at which the
    external kill struck (None: it did not).

    Waiting for progress first means a slow start (a loaded machine) cannot starve the run. With
    ``victim`` (a rank under torchrun) the kill strikes that rank's worker, not ``cmd`` itself, and
    the launcher goes on (it restarts the group). With ``stop`` the victim is frozen (SIGSTOP)
    instead: once a peer's watchdog has reported the hang in the log (``watchdog.hang``), the frozen
    worker is SIGKILLed, as torchrun would after its stop timeout, and the group restarts.
    """
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        if kill_after is None or run_dir is None:
            return proc.wait(), None
        start_step, deadline = last_step(run_dir), None
        while proc.poll() is None:
            if deadline is None and last_step(run_dir) != start_step:
                deadline = time.monotonic() + kill_after
            if deadline is not None and time.monotonic() >= deadline:
                if victim is None:
                    proc.send_signal(signal.SIGKILL)
                    struck = {"time": time.time(), "step": last_step(run_dir)}
                    proc.wait()
                    return proc.returncode, struck
                pid = _worker_pid(run_dir, victim)
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGSTOP if stop else signal.SIGKILL)
                    except ProcessLookupError:
                        pid = None
                if pid is not None:
                    what, struck = "SIGSTOP" if stop else "SIGKILL", {"time": time.time(), "step": last_step(run_dir)}
                    log.write(f"\n# orchestrator: {what} rank {victim} worker pid {pid}\n".encode())
                    log.flush()
                    if stop:
                        _reap_when_seen(proc, pid, log_path)
                    return proc.wait(), struck
                deadline = None  # that rank is between attempts: try again after the next step
                start_step = last_step(run_dir)
            time.sleep(0.05)
        return proc.returncode, None


def _reap_when_seen(proc: subprocess.Popen, pid: int, log_path: Path) -> None:
    """After a SIGSTOP: wait until a peer's watchdog reports the hang, then SIGKILL the frozen worker."""
    start = log_path.stat().st_size
    while proc.poll() is None:
        with open(log_path, "rb") as f:
            f.seek(start)
            if b"watchdog.hang " in f.read():
                break
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class ChaosArm:
    """What running the chaos arm came to: restarts, external kills, every exit code, or why it stopped short."""

    restarts: int = 0
    external: list[dict[str, Any]] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    node_losses: int = 0
    error: str | None = None


def run_chaos_arm(
    args: argparse.Namespace,
    seed: int,
    cmd: list[str],
    log_path: Path,
    run_dir: Path,
    *,
    events_dir: Path,
    env: dict[str, str] | None = None,
) -> ChaosArm:
    """Run ``cmd`` until it exits 0, restarting it after every kill, preemption or node loss (within the
    budget) and SIGKILLing it from outside at random with ``--external-kill``."""
    ranked = args.nproc > 1
    ext_rng = random.Random(seed * 7919 + 1)
    arm = ChaosArm()
    while True:
        kill_after = None
        stops = sum(1 for e in arm.external if e["kind"] == "external_stop")
        stop = ranked and stops < args.external_stops
        if stop or (args.external_kill and len(arm.external) - stops < args.external_kills):
            kill_after = ext_rng.uniform(0.0, args.external_max)
        victim = ext_rng.randrange(args.nproc) if ranked else None
        log_at = log_path.stat().st_size if log_path.exists() else 0
        rc, struck = run_command(
            cmd, log_path, env=env, kill_after=kill_after, run_dir=run_dir, victim=victim, stop=stop
        )
        arm.exits.append(rc)
        if struck is not None:
            arm.external.append({"kind": "external_stop" if stop else "external_kill", **struck, "rank": victim})
        if _node_lost(arm, events_dir) and not ranked and rc != 0:
            _replace_lost_node(run_dir, log_path)  # torchrun restarts its group in place, with what is there
        if rc == 0:
            return arm
        arm.error = _no_restart(rc, ranked, log_path, log_at)
        if arm.error is not None:
            return arm
        arm.restarts += 1
        if arm.restarts > args.max_restarts:
            arm.error = f"restart budget ({args.max_restarts}) ran out before step {args.steps}"
            return arm


def _node_lost(arm: ChaosArm, events_dir: Path) -> bool:
    """Whether a node loss was recorded since the last look (and count it)."""
    lost = sum(1 for e in read_events(events_dir) if e.get("kind") == "node_loss")
    new, arm.node_losses = lost > arm.node_losses, lost
    return new


def _replace_lost_node(run_dir: Path, log_path: Path) -> None:
    """After a node loss the next start gets an empty run directory, as a new machine would.

    The trainer deleted the directory before it killed itself; whatever reappeared there before the
    kill landed (a thread still writing) is removed and named in the log.
    """
    if run_dir.exists():
        left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
        shutil.rmtree(run_dir)
        with open(log_path, "a") as log:
            log.write(f"\n# orchestrator: node lost; removed what was written after the loss: {left[:10]}\n")


def _no_restart(rc: int, ranked: bool, log_path: Path, log_at: int) -> str | None:
    """Why the chaos arm must not be restarted after exiting with ``rc``; None after a kill or preemption."""
    # torchrun exits 1 once its restarts are spent, whatever its workers' codes were.
    allowed = (1,) if ranked else (75, EXIT_HUNG, -signal.SIGKILL, 128 + signal.SIGKILL, 130)
    if rc not in allowed:
        return f"chaos arm exited with {rc} (not a kill or preemption); see {log_path}"
    with open(log_path, "rb") as f:  # what this launch wrote
        f.seek(log_at)
        started = b"train.start " in f.read()
    if ranked and not started:  # every attempt of that launch was refused before training: stop here
        return f"torchrun gave up, no attempt started training; see {log_path}"
    return None
