"""What the benchmarks run: the trainer's command line and environment, the overrides that keep
checkpoints and evals out of a timed window, the tensor groups of a checkpoint, and a trainer process run
until its history shows what a measurement waits for (:func:`run_until`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resilient_train.monitor import read_history

#: The trainer, as installed, run in the caller's working directory (never a path inside a source tree).
TRAIN_CMD = (sys.executable, "-m", "resilient_train.cli")
TENSOR_GROUPS = ("model", "ema")
BIG = 10**9  # "never" for every_n_steps / eval_every_n_steps

# Runs inside the window only: fit's final eval + checkpoint at max_steps happen after the last step.
LOOP_OVERRIDES = [
    f"checkpoint.every_n_steps={BIG}",
    f"trainer.eval_every_n_steps={BIG}",
    "trainer.progress_bar=false",
    "checkpoint.save_on_best=false",
    "trainer.eval_batches=1",
    "trainer.num_samples=0",
]


def train_env() -> dict[str, str]:
    """The environment of a trainer subprocess: unbuffered output, Hydra's full tracebacks."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}


def run_until(
    run_dir: Path, args: list[str], found: Callable[[list[dict[str, Any]]], Any], log: Path, what: str, timeout: float
) -> tuple[Any, float]:
    """Run the trainer ``args`` (output to ``log``) until ``found(history of run_dir)`` returns something, then kill
    it: that and the wall time of the Popen. A trainer that exits first, or ``timeout``, raises naming ``what``."""
    t0 = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=train_env())
    try:
        while True:
            hit = found(read_history(run_dir))
            if hit:
                return hit, t0
            if proc.poll() is not None:
                raise RuntimeError(f"the trainer exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.time() - t0 > timeout:
                raise RuntimeError(f"no {what} within {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
