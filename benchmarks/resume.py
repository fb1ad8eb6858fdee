"""Resuming against starting fresh, in real processes (``resume_vs_fresh_start``): process start -> first
trained step of the magvit64 job (65.5 MB state) via ``python -m resilient_train.cli``, resuming / fresh.

``resume_vs_floor``: the same resume / the floor, a bare ``python -c`` that imports torch and magvit2-pytorch and
builds the same model (what any restart must pay; the first step's own seconds are not in it). Beside it, the
median of each phase of the resumes' ``resume.timing`` lines (:mod:`resilient_train.startup`) and
``before_first_step_vs_floor``: the resume up to its first step, over the floor (a magvit64 step on 2 CPU cores,
about 2 s, is most of what separates the two). ``resume_vs_floor_with_step``: the same resume / that floor
followed by one training step written plainly, the least any restart can do before its first new step.
``rollback_vs_restart`` (:mod:`benchmarks.recovery`): its runs are one more arm of the same rotation."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.jobs import TRAIN_CMD, run_until, train_env
from benchmarks.recovery import rollback_result, time_rollback
from benchmarks.report import Result
from benchmarks.timing import median, say, within_budget

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

    def found(hist: list[dict]) -> list[dict]:
        return [r for r in hist if r.get("kind") == "train" and r.get("step", 0) >= want_step]

    hit, t0 = run_until(run_dir, args, found, log, f"step {want_step}", timeout)
    return hit[0]["time"] - t0


def run_base(base: Path, steps: int, *overrides: str) -> Path:
    """A run of ``steps`` steps in ``base`` (its final checkpoint committed): that checkpoint's folder."""
    proc = subprocess.run(
        train_args(base, f"trainer.max_steps={steps}", *overrides),
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"base run failed:\n{proc.stderr[-3000:]}")
    return base / "checkpoints" / f"step_{steps:08d}"


def floor_command() -> list[str]:
    """``python -c``: import torch and magvit2-pytorch, build the job's model (its kwargs as Python literals)."""
    from resilient_train.config import compose, typed
    from resilient_train.tokenizer.model import model_kwargs

    kwargs = model_kwargs(typed(compose([f"+experiment={RESUME_EXPERIMENT}"])).model)
    code = f"from math import inf\nimport torch, magvit2_pytorch\nmagvit2_pytorch.VideoTokenizer(**{kwargs!r})"
    return [sys.executable, "-c", code]


def floor_step_command() -> list[str]:
    """The floor with the step: the same imports and model, then one training step of the job written plainly
    (generator loss, backward, AdamW; the discriminator's loss, backward, AdamW) on a random clip of its shape."""
    from resilient_train.config import compose, typed
    from resilient_train.tokenizer.model import model_kwargs

    cfg = typed(compose([f"+experiment={RESUME_EXPERIMENT}"]))
    d, m = cfg.data, cfg.model
    shape = (int(d.batch_size), int(d.channels), int(d.num_frames), int(d.image_size), int(d.image_size))
    vcff = bool(m.video_contains_first_frame)
    code = "\n".join(
        [
            "from math import inf",
            "import torch, magvit2_pytorch",
            f"torch.set_num_threads({int(cfg.trainer.num_threads)})",
            f"m = magvit2_pytorch.VideoTokenizer(**{model_kwargs(m)!r})",
            f"v = torch.rand{shape!r}",
            f"loss, _ = m(v, return_loss=True, video_contains_first_frame={vcff})",
            "loss.backward()",
            "torch.optim.AdamW(m.parameters()).step()",
            f"d, _ = m(v, return_discr_loss=True, apply_gradient_penalty=False, video_contains_first_frame={vcff})"
            if m.use_gan
            else "d = None",
            "d is None or (d.backward(), torch.optim.AdamW(m.discr_parameters()).step())",
        ]
    )
    return [sys.executable, "-c", code]


def time_floor(cmd: list[str]) -> float:
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True, env=train_env())
    return time.time() - t0


def phases_of(log: Path) -> dict[str, float]:
    """The spans of the ``resume.timing`` line in a trainer's log."""
    (line,) = [x for x in log.read_text().splitlines() if " resume.timing " in x]
    return {k: float(v) for k, v in (w.split("=", 1) for w in line.split(" resume.timing ", 1)[1].split()[:-1])}


def bench_resume(work: Path, reps: int, budget_s: float, base_steps: int = 1) -> dict[str, Result]:
    base = work / "resume-base"
    ckpt = run_base(base, base_steps)
    floors = {"floor": floor_command(), "floor_step": floor_step_command()}
    kinds = ("fresh", "resume", "floor", "floor_step", "rollback")
    t: dict[str, list[float]] = {k: [] for k in kinds if k != "rollback"}
    load_s, reads, phases, rollbacks = [], [], [], []
    for r in within_budget(reps, budget_s, "resume"):
        for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
            run = work / f"{kind}-{r}"
            log = work / f"{kind}-{r}.log"
            if kind in floors:
                t[kind].append(time_floor(floors[kind]))
            elif kind == "fresh":
                t[kind].append(time_to_step(run, train_args(run, "trainer.max_steps=20"), 1, log))
            elif kind == "rollback":
                args = train_args(run, "resume_from=auto", "trainer.max_steps=20")
                rollbacks.append(time_rollback(base, run, args, base_steps + 1, log))
            else:
                shutil.copytree(base, run)
                t[kind].append(
                    time_to_step(run, train_args(run, "resume_from=auto", "trainer.max_steps=20"), base_steps + 1, log)
                )
                phases.append(phases_of(log))
                lines = log.read_text().splitlines()
                reads.append(sum("ckpt.read " in line for line in lines))
                for line in lines:
                    if ("ckpt.read " in line or "ckpt.load " in line) and "secs=" in line:
                        load_s.append(float(line.rsplit("secs=", 1)[1].split()[0]))
            shutil.rmtree(run, ignore_errors=True)
    resume_t, fresh_t, floor_t, step_t = t["resume"], t["fresh"], t["floor"], t["floor_step"]
    rolled = median([x["fault_to_new_step_s"] for x in rollbacks])
    say(
        f"  resume done: resume {median(resume_t):.2f}s fresh {median(fresh_t):.2f}s floor {median(floor_t):.2f}s "
        f"floor with a step {median(step_t):.2f}s; rollback {rolled:.2f}s"
    )
    phase_medians = {k: median([p[k] for p in phases if k in p]) for k in phases[0]}
    before_step = median([p["total"] - p["first_step"] for p in phases])  # the floor holds no training step
    say("  resume phases (median s): " + " ".join(f"{k}={v:.2f}" for k, v in phase_medians.items()))
    say(f"  resume before its first step: {before_step:.2f}s (floor {median(floor_t):.2f}s)")
    ours = (
        f"resilient_train.cli +experiment={RESUME_EXPERIMENT} resume_from=auto (checkpoint at step "
        f"{base_steps}): Popen -> step {base_steps + 1} recorded"
    )
    entry = {
        "ours_s": median(resume_t),
        "baseline_s": median(fresh_t),
        "ours_samples_s": resume_t,
        "baseline_samples_s": fresh_t,
        "ours_bytes": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()),
        "ours": ours,
        "baseline": f"resilient_train.cli +experiment={RESUME_EXPERIMENT}, fresh run dir: Popen -> step 1 recorded",
        "checkpoint_read_and_load_s_in_log": sum(load_s) / len(resume_t) if load_s else None,
        "checkpoint_reads_per_resume": reads,
        "ratio_is": "median over adjacent (resume, fresh) pairs of resume seconds / fresh seconds",
    }
    floor_entry = {
        "ours_s": median(resume_t),
        "baseline_s": median(floor_t),
        "ours_samples_s": resume_t,
        "baseline_samples_s": floor_t,
        "ours": ours,
        "baseline": f"python -c 'import torch, magvit2_pytorch; VideoTokenizer(**{RESUME_EXPERIMENT} kwargs)': "
        "Popen -> exit",
        "phases_median_s": phase_medians,
        "ours_before_first_step_s": before_step,
        "before_first_step_vs_floor": before_step / median(floor_t),
        "phases_samples_s": phases,
        "ratio_is": "median over adjacent (resume, floor) pairs of resume seconds / floor seconds",
    }
    step_entry = {
        **{k: floor_entry[k] for k in ("ours_s", "ours_samples_s", "ours")},
        "baseline_s": median(step_t),
        "baseline_samples_s": step_t,
        "baseline": "the floor, then one training step of the job written plainly (generator and discriminator "
        "losses, backward, AdamW) on a random clip: Popen -> exit",
        "ratio_is": "median over adjacent (resume, floor with a step) pairs of their seconds",
    }
    return {
        "resume_vs_fresh_start": Result(entry),
        "resume_vs_floor": Result(floor_entry),
        "resume_vs_floor_with_step": Result(step_entry),
        "rollback_vs_restart": rollback_result(
            rollbacks,
            resume_t,
            f"in-process rollback: a NaN injected at step {base_steps + 1} of the resumed run (chaos.nan_steps); "
            "from the fault to the end of that step computed again",
            "the restart above: Popen -> first new step",
        ),
    }
