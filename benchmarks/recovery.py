"""Recovering without a new process, and what faults cost a whole run.

  rollback_vs_restart        magvit64, a NaN injected at the first step after a resume: seconds from the fault
                             (the ``chaos.nan`` line) to the end of the step computed again after the in-process
                             rollback / seconds from a restart's Popen to its first new step (``resume_vs_floor``'s
                             resumes, the same checkpoint). Reported: how much a rollback saves over a restart.
  goodput_chaos_vs_reference ``python -m resilient_train.chaos`` (tiny, its default schedule of faults): the
                             uninterrupted arm's wall time / the disturbed arm's; beside it useful steps / steps
                             computed, and per kind of fault the mean time from the fault to the first new step.

The rollback runs are one arm of :func:`benchmarks.resume.bench_resume`'s rotation (:func:`time_rollback`), so
they meet the same load as the restarts they are compared with.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.jobs import run_until, train_env
from benchmarks.report import Result
from benchmarks.timing import median, say


def _stamp(line: str) -> float:
    """The wall time of a trainer log line (``[2026-12-06 00:16:40,665][...]``)."""
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def time_rollback(base: Path, run: Path, args: list[str], fault_step: int, log: Path, timeout: float = 300) -> dict:
    """Resume a copy of ``base`` with a NaN injected at ``fault_step``; once that step is computed again after the
    rollback, kill the process. ``fault_to_new_step_s``: from the fault to the redone step's history record;
    ``rollback_s``: the rollback's own ``secs=`` (read, verify, restore)."""
    shutil.copytree(base, run)

    def found(hist: list[dict]) -> list[dict]:
        back = [i for i, r in enumerate(hist) if r.get("kind") == "rollback"]
        after = hist[back[0] :] if back else []
        return [r for r in after if r.get("kind") == "train" and r["step"] == fault_step]

    cmd = [*args, "chaos.enabled=true", f"chaos.nan_steps=[{fault_step}]"]
    redone, _ = run_until(run, cmd, found, log, f"rollback and step {fault_step} again", timeout)
    lines = log.read_text().splitlines()
    (fault,) = [x for x in lines if " chaos.nan " in x]
    (done,) = [x for x in lines if " rollback.done " in x]
    return {
        "fault_to_new_step_s": redone[0]["time"] - _stamp(fault),
        "rollback_s": float(done.rsplit("secs=", 1)[1].split()[0]),
    }


def rollback_result(rollbacks: list[dict], restarts: list[float], ours: str, baseline: str) -> Result:
    secs = [r["fault_to_new_step_s"] for r in rollbacks]
    entry = {
        "ours_s": median(secs),
        "baseline_s": median(restarts),
        "ours_samples_s": secs,
        "baseline_samples_s": restarts[: len(secs)],
        "rollback_only_s": median([r["rollback_s"] for r in rollbacks]),
        "ours": ours,
        "baseline": baseline,
        "ratio_is": "median over adjacent (rollback, restart) pairs of their seconds to the first new step",
        "pair_ratios": [a / b for a, b in zip(secs, restarts)],
    }
    return Result(entry)


def bench_goodput(work: Path, quick: bool) -> dict[str, Result]:
    """One chaos trial as ``make chaos-test`` runs it (fewer steps with ``--quick``): its goodput and costs."""
    out = work / "chaos"
    options = ["--steps", "20", "--kinds", "step_kill,nan"] if quick else []
    cmd = [sys.executable, "-m", "resilient_train.chaos", "--out", str(out), *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=train_env(), timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the chaos trial failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    (trial,) = report["trials"]
    good = trial["goodput"]
    say(
        f"  goodput: time {good['time']:.3f} (reference {trial['reference']['secs']}s, "
        f"chaos {trial['chaos']['secs']}s), steps {good['steps']:.3f}, {len(trial['events'])} events"
    )
    for kind, c in report["by_kind"].items():
        secs = "-" if c["to_new_step_secs"] is None else f"{c['to_new_step_secs']}s"
        say(f"    {kind}: {c['count']}x, fault -> first new step {secs}, {c['redone']} steps redone")
    entry: dict[str, Any] = {
        "ours_s": trial["chaos"]["secs"],
        "baseline_s": trial["reference"]["secs"],
        "ours": f"python -m resilient_train.chaos {' '.join(options) or '(its defaults)'}: the arm with "
        f"{len(trial['events'])} faults, restarted and rolled back until done",
        "baseline": "the same run, undisturbed",
        "identical": report["identical"],
        "goodput_steps": good["steps"],
        "steps_redone": good["steps_redone"],
        "steps": report["steps"],
        "by_kind": report["by_kind"],
        "ratio_is": "reference wall time / chaos wall time (goodput in time); one trial, so one pair",
        "pair_ratios": [good["time"]],
    }
    shutil.rmtree(out, ignore_errors=True)
    return {"goodput_chaos_vs_reference": Result(entry)}
