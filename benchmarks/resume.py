"""Resuming against starting fresh, in real processes (``resume_vs_fresh_start``): process start -> first
trained step of the magvit64 job (65.5 MB state) via ``python -m resilient_train.cli``, resuming / fresh."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.jobs import TRAIN_CMD, train_env
from benchmarks.report import Result
from benchmarks.timing import median, say, within_budget
from resilient_train.monitor import read_history

RESUME_EXPERIMENT = "magvit64"  # the state people resume (65.5 MB); tiny's 0.5 MB would hide the read


def train_args(run_dir: Path, *overrides: str) -> list[str]:
    return [
        *TRAIN_CMD,
        f"+experiment={RESUME_EXPERIMENT}",
        f"hydra.run.dir={run_dir}",
        "trainer.progress_bar=false",
        *overrides,
    ]


def time_to_step(run_dir: Path, args: list[str], want_step: int, log: Path, timeout: float = 300) -> float:
    """Seconds from Popen to the history record of ``want_step`` (its own timestamp); then kill the process."""
    t0 = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=train_env())
    try:
        while True:
            hit = [r for r in read_history(run_dir) if r.get("kind") == "train" and r.get("step", 0) >= want_step]
            if hit:
                return hit[0]["time"] - t0
            if proc.poll() is not None:
                raise RuntimeError(f"the trainer exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.time() - t0 > timeout:
                raise RuntimeError(f"no step {want_step} within {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def run_base(base: Path, steps: int) -> Path:
    """A run of ``steps`` steps in ``base`` (its final checkpoint committed): that checkpoint's folder."""
    proc = subprocess.run(
        train_args(base, f"trainer.max_steps={steps}"),
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"base run failed:\n{proc.stderr[-3000:]}")
    return base / "checkpoints" / f"step_{steps:08d}"


def bench_resume(work: Path, reps: int, budget_s: float, base_steps: int = 1) -> dict[str, Result]:
    base = work / "resume-base"
    ckpt = run_base(base, base_steps)
    fresh_t, resume_t, load_s, reads = [], [], [], []
    for r in within_budget(reps, budget_s, "resume"):
        for kind in ("fresh", "resume") if r % 2 == 0 else ("resume", "fresh"):
            run = work / f"{kind}-{r}"
            log = work / f"{kind}-{r}.log"
            if kind == "fresh":
                fresh_t.append(time_to_step(run, train_args(run, "trainer.max_steps=20"), 1, log))
            else:
                shutil.copytree(base, run)
                resume_t.append(
                    time_to_step(run, train_args(run, "resume_from=auto", "trainer.max_steps=20"), base_steps + 1, log)
                )
                lines = log.read_text().splitlines()
                reads.append(sum("ckpt.read " in line for line in lines))
                for line in lines:
                    if ("ckpt.read " in line or "ckpt.load " in line) and "secs=" in line:
                        load_s.append(float(line.rsplit("secs=", 1)[1].split()[0]))
            shutil.rmtree(run, ignore_errors=True)
    say(f"  resume done: resume {median(resume_t):.2f}s fresh {median(fresh_t):.2f}s")
    pair_ratios = [r / f for r, f in zip(resume_t, fresh_t)]  # adjacent runs: the same load on both
    entry = {
        "ours_s": median(resume_t),
        "baseline_s": median(fresh_t),
        "ours_samples_s": resume_t,
        "baseline_samples_s": fresh_t,
        "ours_bytes": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()),
        "ours": f"resilient_train.cli +experiment={RESUME_EXPERIMENT} resume_from=auto (checkpoint at step "
        f"{base_steps}): Popen -> step {base_steps + 1} recorded",
        "baseline": f"resilient_train.cli +experiment={RESUME_EXPERIMENT}, fresh run dir: Popen -> step 1 recorded",
        "checkpoint_read_and_load_s_in_log": sum(load_s) / len(resume_t) if load_s else None,
        "checkpoint_reads_per_resume": reads,
        "ratio_is": "median over adjacent (resume, fresh) pairs of resume seconds / fresh seconds",
        "pair_ratios": pair_ratios,
    }
    return {"resume_vs_fresh_start": Result(entry, ratio=median(pair_ratios))}
