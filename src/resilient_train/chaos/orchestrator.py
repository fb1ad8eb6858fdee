"""The chaos proof: an uninterrupted reference run against a run killed many times, bit for bit.

``python -m resilient_train.orchestrator`` (or ``python scripts/chaos_test.py``, ``make chaos-test``):

1. runs the experiment uninterrupted to N steps (the reference arm);
2. runs the same config with chaos on, restarting ``python -m resilient_train.cli ... resume_from=auto``
   after every death, until it reaches N or the restart budget runs out;
3. optionally SIGKILLs the chaos arm from outside at random moments (``--external-kill``);
4. compares the final checkpoints (every tensor and counter) and the per-step losses of both arms;
5. writes ``report.json``, ``report.md`` and ``loss.png`` and prints the report's path last.

With ``--nproc N`` both arms run under PyTorch's own launcher, ``torchrun --standalone
--nproc-per-node N`` (one thread per rank unless ``--set trainer.num_threads=...``): the chaos arm
is restarted by torchrun (``--max-restarts``) after every death, and relaunched by the
orchestrator (``resume_from=auto``) if torchrun gives up; each event strikes the rank the seeded
schedule picks (an external kill SIGKILLs one worker's pid, read from ``ranks/<r>/heartbeat.json``,
never torchrun). The comparison then covers every rank's files in the final checkpoints and every
rank's per-step losses.

The trainer is the installed package's (``python -m resilient_train.cli``), run in the caller's
working directory; everything is written under ``--out``, by default
``./outputs/chaos/<timestamp>`` relative to that working directory. Importing this module does
not import torch (the checkpoint comparison imports it when it runs).

This module owns a trial's schedule, the processes (both arms, the restarts, the external kills),
:func:`run_trial` and the command line (:func:`main`); comparing the arms and writing about them
is :mod:`.report`.

Exit 0 only when every trial's arms are identical.
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

from ..checkpoint.layout import CHECKPOINTS_DIR, committed
from ..fsio import atomic_write
from .report import DIFFERENCES, checkpoint_every, compare_arms, group_restarts, last_step, markdown, plot
from .schedule import read_events

__all__ = ["main", "run_trial", "default_schedule", "TRAIN_CMD"]

#: The trainer, as installed: run with the caller's working directory, never a path inside a source tree.
TRAIN_CMD = (sys.executable, "-m", "resilient_train.cli")


def default_schedule(seed: int, steps: int, every: int) -> dict[str, list[int]]:
    """Explicit event steps for one trial: two kills inside saves, a step kill, a SIGTERM, a corruption.

    Save kills land on checkpoint steps (a save must be under way for them to strike). The other three
    strike after the first checkpoint; in a run too short for that (fewer than three such steps), only
    the corruption must (it damages a committed checkpoint, and does nothing before there is one), and
    the step kill and SIGTERM may come earlier.
    """
    rng = random.Random(seed)
    save_steps = [s for s in range(every, steps, every)]
    plain = [s for s in range(2, steps) if s % every]
    chosen_saves = sorted(rng.sample(save_steps, min(2, len(save_steps))))
    late = [s for s in plain if s > every]
    if len(late) >= 3:
        step_kill, sigterm, corrupt = ([s] for s in rng.sample(late, 3))
    else:
        corrupt = late[-1:]
        two = rng.sample([s for s in plain if s not in corrupt], min(2, len(plain) - len(corrupt)))
        step_kill, sigterm = two[:1], two[1:]
    return {
        "save_kill_steps": chosen_saves,
        "step_kill_steps": step_kill,
        "sigterm_steps": sigterm,
        "corrupt_steps": corrupt,
    }


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


def _run(
    cmd: list[str],
    log_path: Path,
    *,
    kill_after: float | None = None,
    run_dir: Path | None = None,
    victim: int | None = None,
) -> tuple[int, bool]:
    """Run ``cmd``; with ``kill_after``, SIGKILL it from outside that many seconds after it trains a step.

    Waiting for progress first means a slow start (a loaded machine) cannot starve the run. With
    ``victim`` (a rank under torchrun) the kill strikes that rank's worker, not ``cmd`` itself, and
    the launcher goes on (it restarts the group).
    """
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if kill_after is None or run_dir is None:
            return proc.wait(), False
        start_step, deadline = last_step(run_dir), None
        while proc.poll() is None:
            if deadline is None and last_step(run_dir) != start_step:
                deadline = time.monotonic() + kill_after
            if deadline is not None and time.monotonic() >= deadline:
                if victim is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return proc.returncode, True
                pid = _worker_pid(run_dir, victim)
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pid = None
                if pid is not None:
                    log.write(f"\n# orchestrator: SIGKILL rank {victim} worker pid {pid}\n".encode())
                    log.flush()
                    return proc.wait(), True
                deadline = None  # that rank is between attempts: try again after the next step
                start_step = last_step(run_dir)
            time.sleep(0.05)
        return proc.returncode, False


def run_trial(args: argparse.Namespace, trial: int, out: Path) -> dict[str, Any]:
    """One trial under ``out/trial_<trial>``: the reference arm, the chaos arm restarted until it finishes,
    then both compared; the trial's entry in the report."""
    seed = args.seed + trial
    tdir = out / f"trial_{trial}"
    tdir.mkdir(parents=True, exist_ok=True)
    common = _common_overrides(args)
    ranked = args.nproc > 1
    ref_cmd = torchrun_command(args.nproc, 0) if ranked else list(TRAIN_CMD)
    chaos_cmd = torchrun_command(args.nproc, args.torchrun_restarts) if ranked else list(TRAIN_CMD)
    ref_dir, chaos_dir = tdir / "reference", tdir / "chaos"
    t0 = time.time()
    rc, _ = _run([*ref_cmd, *common, f"hydra.run.dir={ref_dir}"], tdir / "reference.log")
    ref_secs = time.time() - t0
    if rc != 0:
        return _failed(trial, args.steps, 0, f"reference run failed with exit {rc}; see {tdir / 'reference.log'}")

    chaos_args = _chaos_overrides(args, seed, ref_dir)
    cmd = [*chaos_cmd, *common, f"hydra.run.dir={chaos_dir}", "resume_from=auto", *chaos_args]
    t0 = time.time()
    arm = _run_chaos_arm(args, seed, cmd, tdir / "chaos.log", chaos_dir)
    if arm.error is not None:
        return _failed(trial, args.steps, arm.restarts, arm.error)
    chaos_secs = time.time() - t0

    events = _events(chaos_dir, arm.external)
    ref_ckpt = committed(ref_dir / CHECKPOINTS_DIR)[-1]
    chaos_ckpt = committed(chaos_dir / CHECKPOINTS_DIR)[-1]
    diffs = compare_arms(ref_dir, chaos_dir, ref_ckpt, chaos_ckpt, nproc=args.nproc, steps=args.steps)
    result = {
        "trial": trial,
        "seed": seed,
        "identical": all(diffs[k] is None for k in DIFFERENCES),
        "steps": args.steps,
        "restarts": arm.restarts + (group_restarts(tdir / "chaos.log") if ranked else 0),
        "nproc": args.nproc,
        "exit_codes": arm.exits,
        "events": events,
        **diffs,
        "reference": {"run_dir": str(ref_dir), "final": str(ref_ckpt), "secs": round(ref_secs, 1)},
        "chaos": {"run_dir": str(chaos_dir), "final": str(chaos_ckpt), "secs": round(chaos_secs, 1)},
    }
    plot(tdir / "loss.png", ref_dir, chaos_dir, result["events"], trial)
    return result


def _common_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides both arms run with."""
    common = [
        f"+experiment={args.experiment}",
        f"trainer.max_steps={args.steps}",
        "trainer.progress_bar=false",
        *args.set,
    ]
    if args.nproc > 1 and not any(s.startswith("trainer.num_threads=") for s in args.set):
        common.append("trainer.num_threads=1")  # ranks sharing a few cores: one thread each
    return common


def _chaos_overrides(args: argparse.Namespace, seed: int, ref_dir: Path) -> list[str]:
    """The chaos arm's own overrides: chaos on, with the rates or the default schedule, and the negative control."""
    chaos_args = ["chaos.enabled=true", f"chaos.seed={seed}"]
    if args.rates:
        chaos_args += ["chaos=default"]
    else:
        every = checkpoint_every(ref_dir)
        for key, steps in default_schedule(seed, args.steps, every).items():
            chaos_args.append(f"chaos.{key}=[{','.join(map(str, steps))}]")
    if args.skip_restore:
        chaos_args.append(f"chaos.skip_restore={args.skip_restore}")
    return chaos_args


@dataclass
class _ChaosArm:
    """What running the chaos arm came to: restarts, external kills, every exit code, or why it stopped short."""

    restarts: int = 0
    external: list[dict[str, Any]] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    error: str | None = None


def _run_chaos_arm(args: argparse.Namespace, seed: int, cmd: list[str], log_path: Path, run_dir: Path) -> _ChaosArm:
    """Run ``cmd`` until it exits 0, restarting it after every kill or preemption (within the budget) and
    SIGKILLing it from outside at random with ``--external-kill``."""
    ranked = args.nproc > 1
    ext_rng = random.Random(seed * 7919 + 1)
    arm = _ChaosArm()
    while True:
        kill_after = None
        if args.external_kill and len(arm.external) < args.external_kills:
            kill_after = ext_rng.uniform(0.0, args.external_max)
        victim = ext_rng.randrange(args.nproc) if ranked else None
        log_at = log_path.stat().st_size if log_path.exists() else 0
        rc, killed = _run(cmd, log_path, kill_after=kill_after, run_dir=run_dir, victim=victim)
        arm.exits.append(rc)
        if killed:
            step = last_step(run_dir)
            arm.external.append({"kind": "external_kill", "step": step, "time": time.time(), "rank": victim})
        if rc == 0:
            return arm
        arm.error = _no_restart(rc, ranked, log_path, log_at)
        if arm.error is not None:
            return arm
        arm.restarts += 1
        if arm.restarts > args.max_restarts:
            arm.error = f"restart budget ({args.max_restarts}) ran out before step {args.steps}"
            return arm


def _no_restart(rc: int, ranked: bool, log_path: Path, log_at: int) -> str | None:
    """Why the chaos arm must not be restarted after exiting with ``rc``; None after a kill or preemption."""
    # torchrun exits 1 once its restarts are spent, whatever its workers' codes were.
    allowed = (1,) if ranked else (75, -signal.SIGKILL, 128 + signal.SIGKILL, 130)
    if rc not in allowed:
        return f"chaos arm exited with {rc} (not a kill or preemption); see {log_path}"
    with open(log_path, "rb") as f:  # what this launch wrote
        f.seek(log_at)
        started = b"train.start " in f.read()
    if ranked and not started:  # every attempt of that launch was refused before training: stop here
        return f"torchrun gave up, no attempt started training; see {log_path}"
    return None


def _events(run_dir: Path, external: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chaos arm's events, as its trainer recorded them and as the external kills struck, by step."""
    keys = ("kind", "step", "phase", "how", "rank")
    events = [{k: v for k, v in e.items() if k in keys} for e in read_events(run_dir)] + [
        {k: v for k, v in e.items() if k in keys and v is not None} for e in external
    ]
    # An external kill may strike before the first step (no step recorded): it sorts first.
    return sorted(events, key=lambda e: e["step"] if e.get("step") is not None else -1)


def _failed(trial: int, steps: int, restarts: int, error: str) -> dict[str, Any]:
    """A trial that could not reach the comparison."""
    return {"trial": trial, "identical": False, "restarts": restarts, "steps": steps, "events": [], "error": error}


def main(argv: list[str] | None = None) -> int:
    # Long on purpose: one argument per option, then the trials in order: read top to bottom.
    p = argparse.ArgumentParser(
        prog="python -m resilient_train.orchestrator", description="Kill, resume, compare bit for bit."
    )
    p.add_argument("--experiment", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=None, help="default: outputs/chaos/<timestamp> under the working directory"
    )
    p.add_argument("--max-restarts", type=int, default=30)
    p.add_argument("--rates", action="store_true", help="use chaos=default rates instead of an explicit schedule")
    p.add_argument("--external-kill", action="store_true", help="also SIGKILL the trainer from outside at random")
    p.add_argument("--external-kills", type=int, default=3, help="external kills per trial (default 3)")
    p.add_argument(
        "--external-max",
        type=float,
        default=3.0,
        help="an external kill strikes uniformly within this many seconds after the restarted trainer's first new step",
    )
    p.add_argument(
        "--skip-restore",
        choices=["rng", "data"],
        default="",
        help="negative control: do not restore this state on resume; the proof must then fail",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for both arms")
    p.add_argument("--nproc", type=int, default=1, help="ranks per arm, under torchrun when > 1 (default 1)")
    p.add_argument(
        "--torchrun-restarts", type=int, default=10, help="torchrun --max-restarts for the chaos arm (default 10)"
    )
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error("--nproc must be >= 1")
    out = args.out or Path.cwd() / "outputs" / "chaos" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    trials = []
    for trial in range(args.trials):
        r = run_trial(args, trial, out)
        trials.append(r)
        problems = [r.get(k) for k in ("error", *DIFFERENCES)]
        print(
            f"trial {trial}: {'identical' if r['identical'] else 'DIFFERENT'} restarts={r['restarts']} "
            f"events={len(r['events'])}",
            *[f"\n  {p}" for p in problems if p],
            flush=True,
        )
    events = [dict(e, trial=t["trial"]) for t in trials for e in t["events"]]
    report = {
        "identical": all(t["identical"] for t in trials),
        "experiment": args.experiment,
        "nproc": args.nproc,
        "steps": args.steps,
        "restarts": sum(t["restarts"] for t in trials),
        "events": events,
        "first_diverging_step": next((t.get("first_diverging_step") for t in trials if not t["identical"]), None),
        "trials": trials,
    }
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    atomic_write(out / "report.md", markdown(report))
    if (out / "trial_0" / "loss.png").exists():
        shutil.copyfile(out / "trial_0" / "loss.png", out / "loss.png")
    print(out / "report.json")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
