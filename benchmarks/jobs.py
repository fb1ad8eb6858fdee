"""What the benchmarks run: the trainer's command line and environment, the overrides that keep
checkpoints and evals out of a timed window, and the tensor groups of a checkpoint."""

from __future__ import annotations

import os
import sys

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
