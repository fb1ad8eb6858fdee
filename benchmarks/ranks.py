"""Two ranks under torchrun against one process, tiny, the same global batch (4 clips a step), in real processes.

ranks2_vs_1_steps_per_s  steps/s of 2 ranks (1 thread each, DDP over gloo) / steps/s of 1 process (2 threads);
                         on one machine both use the same 2 cores for the same arithmetic: 1.0 is parity
ranks2_vs_1_save_s       seconds of a checkpoint save (rank 0's ckpt.save line) at 2 ranks / at 1:
                         the commit round trip (broadcast, gather of the votes, verdict)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.jobs import BIG, TRAIN_CMD, train_env
from benchmarks.report import Result
from benchmarks.timing import median, say
from resilient_train.monitor import read_history


def _ranked_run(work: Path, name: str, nproc: int, steps: int) -> tuple[float, list[float]]:
    """tiny for ``steps`` steps, global batch 4: (steps/s after the first 3 steps, ckpt.save seconds)."""
    run_dir, log = work / name, work / f"{name}.log"
    per_rank = 2 // nproc
    args = [
        "+experiment=tiny",
        f"hydra.run.dir={run_dir}",
        "trainer.progress_bar=false",
        f"trainer.max_steps={steps}",
        f"data.batch_size={per_rank}",
        f"trainer.num_threads={2 // nproc}",
        "checkpoint.every_n_steps=5",
        "checkpoint.save_on_best=false",
        f"trainer.eval_every_n_steps={BIG}",
    ]
    if nproc == 1:
        cmd = [*TRAIN_CMD, *args]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd = [*launcher, "-m", "resilient_train.cli", *args]
    with open(log, "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=train_env(), timeout=900).returncode
    if rc != 0:
        raise RuntimeError(f"{name} exited {rc}:\n{log.read_text()[-3000:]}")
    times = [r["time"] for r in read_history(run_dir) if r.get("kind") == "train"][3:]
    saves = [
        float(line.rsplit("secs=", 1)[1].split()[0]) for line in log.read_text().splitlines() if "ckpt.save " in line
    ]
    shutil.rmtree(run_dir, ignore_errors=True)
    return (len(times) - 1) / (times[-1] - times[0]), saves


def bench_ranks(work: Path, pairs: int, steps: int) -> dict[str, Result]:
    work.mkdir(parents=True, exist_ok=True)
    one, two, save1, save2 = [], [], [], []
    for p in range(pairs):
        for nproc in (1, 2) if p % 2 == 0 else (2, 1):
            sps, saves = _ranked_run(work, f"n{nproc}-{p}", nproc, steps)
            (one if nproc == 1 else two).append(sps)
            (save1 if nproc == 1 else save2).extend(saves)
    say(f"  ranks done: 2 ranks {median(two):.2f} st/s, 1 process {median(one):.2f} st/s")
    steps_entry = {
        "ours_steps_per_s": median(two),
        "baseline_steps_per_s": median(one),
        "ours_samples": two,
        "baseline_samples": one,
        "ours": "torchrun --nproc-per-node 2: tiny, data.batch_size=1 per rank, 1 thread per rank",
        "baseline": "one process: tiny, data.batch_size=2, 2 threads",
        "parity": 1.0,
        "pair_ratios": [a / b for a, b in zip(two, one)],
    }
    save_entry = {
        "ours_s": median(save2),
        "baseline_s": median(save1),
        "ours_samples_s": save2,
        "baseline_samples_s": save1,
        "ours": "rank 0's ckpt.save seconds at 2 ranks (sync, ~0.5 MB)",
        "baseline": "ckpt.save seconds of one process",
    }
    return {
        "ranks2_vs_1_steps_per_s": Result(steps_entry),
        "ranks2_vs_1_save_s": Result(save_entry),
    }
