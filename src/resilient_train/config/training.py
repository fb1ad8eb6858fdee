"""The ``optimizer`` and ``trainer`` sections: the update rule and the loop's settings, and their checks."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .values import AtLeast, Get, Need, RealRange, finite, is_int, not_nan, plain_list


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    discr_lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 100
    # Length of the cosine schedule in optimizer steps; independent of trainer.max_steps so that a
    # run stopped at 40 and continued to 80 matches one trained straight to 80.
    schedule_steps: int = 10000
    min_lr_ratio: float = 0.1


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.999
    update_every: int = 1
    # The decay of update n (0-based) is min(decay, (1 + n) / (10 + n)): the average starts at the weights being
    # trained, not at the random initial ones (train.parts.EMA). false: the constant decay of checkpoints written
    # before it existed (they resume with it).
    warmup: bool = True


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    grad_accum_steps: int = 1
    num_threads: int = 2
    # auto: this process's GPU when torch sees CUDA (LOCAL_RANK's under torchrun), else the CPU; or cpu, cuda, cuda:N.
    device: str = "auto"
    deterministic: bool = True
    # 32 (float32), bf16-mixed or 16-mixed (autocast for the forward passes and losses; weights and optimizer
    # state in float32; 16-mixed adds a gradient scaler per optimizer, saved in every checkpoint).
    precision: str = "32"
    # torch.compile of the generator's encoder and decoder layers (train.compiled); keys and checkpoints unchanged.
    compile: bool = False
    eval_every_n_steps: int = 100
    eval_batches: int = 2
    log_every_n_steps: int = 1
    num_samples: int = 2
    heartbeat_secs: float = 10.0
    progress_bar: bool = True
    # A process with no progress (a step, a save phase) for this long writes every thread's stack to
    # RUN/hangs/, logs watchdog.hang and exits 124 so that it is restarted; 0 switches the watchdog off.
    hang_timeout_secs: float = 300.0
    # With ranks (torchrun): how long a collective waits for a peer before failing (then torchrun restarts);
    # null: hang_timeout_secs + 30 s, so that the watchdog reports a frozen peer first, with stacks.
    dist_timeout_secs: float | None = None
    # A non-finite loss or gradient norm (or replicas apart) rolls back in-process to the newest checkpoint;
    # a fault back at the same step after this many rollbacks is a divergence: the run stops with exit 65.
    max_rollbacks: int = 3
    # With ranks: compare the replicated state's digests every N steps (0: only before every commit).
    replica_check_every_n_steps: int = 0
    ema: EMAConfig = field(default_factory=EMAConfig)


#: ``trainer.precision``'s choices (the dtypes live in ``train.precision``, which this layer may not import).
PRECISIONS = ("32", "bf16-mixed", "16-mixed")

#: What ``trainer.device`` may say (resolved against the machine by :mod:`resilient_train.train.device`).
DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


# ----------------------------------------------------------------------------------------------
# validation

AT_LEAST: tuple[AtLeast, ...] = (
    AtLeast("optimizer.warmup_steps", 0),
    AtLeast("trainer.max_steps", 1),
    AtLeast("trainer.grad_accum_steps", 1),
    AtLeast("trainer.num_threads", 1),
    AtLeast("trainer.eval_every_n_steps", 1),
    AtLeast("trainer.eval_batches", 1, " (the validation loss is a mean over these batches)"),
    AtLeast("trainer.log_every_n_steps", 1),
    AtLeast("trainer.num_samples", 0, " (0: no sample images)"),
    AtLeast("trainer.ema.update_every", 1),
    AtLeast("trainer.max_rollbacks", 0, " (0: the first fault stops the run)"),
    AtLeast("trainer.replica_check_every_n_steps", 0, " (0: only before every commit)"),
)

REAL_RANGES: tuple[RealRange, ...] = (
    RealRange("optimizer.lr", 0, False, math.inf, False, "must be a finite number > 0"),
    RealRange("optimizer.discr_lr", 0, False, math.inf, False, "must be a finite number > 0"),
    RealRange("optimizer.weight_decay", 0, True, math.inf, False, "must be a finite number >= 0"),
    RealRange("optimizer.min_lr_ratio", 0, True, 1, True, "must be a number in [0, 1]"),
    RealRange("trainer.heartbeat_secs", 0, True, math.inf, False, "must be a finite number >= 0"),
    RealRange("trainer.hang_timeout_secs", 0, True, math.inf, False, "must be a finite number >= 0 (0: off)"),
    RealRange("trainer.ema.decay", 0, False, 1, False, "must be a number in (0, 1)"),
)


def check_optimizer(get: Get, need: Need) -> None:
    """The optimizer's checks beyond :data:`AT_LEAST` and :data:`REAL_RANGES`."""
    betas = plain_list(get("optimizer.betas"))
    need(
        betas is not None and len(betas) == 2 and all(finite(b) and 0 <= b < 1 for b in betas),
        "optimizer.betas",
        betas if betas is not None else get("optimizer.betas"),
        "must be two numbers, each in [0, 1) (Adam's moment decay rates)",
    )
    mgn = get("optimizer.max_grad_norm")
    need(not_nan(mgn) and mgn > 0, "optimizer.max_grad_norm", mgn, "must be a number > 0 (inf: no clipping)")
    warmup, schedule = get("optimizer.warmup_steps"), get("optimizer.schedule_steps")
    need(
        is_int(schedule) and (not is_int(warmup) or schedule > warmup),
        "optimizer.schedule_steps",
        schedule,
        f"must be an integer > optimizer.warmup_steps ({warmup!r})",
    )


def check_trainer(get: Get, need: Need) -> None:
    """The trainer's checks beyond :data:`AT_LEAST` and :data:`REAL_RANGES`."""
    precision = get("trainer.precision")
    need(
        precision in PRECISIONS,
        "trainer.precision",
        precision,
        f"must be one of {list(PRECISIONS)} (float32; bfloat16 or float16 autocast with float32 weights)",
    )
    # Not refused when below the watchdog's (checkpoints written before the watchdog existed say 120): warned at start.
    dist = get("trainer.dist_timeout_secs")
    need(
        dist is None or (finite(dist) and dist > 0),
        "trainer.dist_timeout_secs",
        dist,
        "must be null (trainer.hang_timeout_secs + 30 s) or a finite number > 0",
    )
    device = get("trainer.device")
    need(
        isinstance(device, str) and DEVICE_SPEC.fullmatch(device) is not None,
        "trainer.device",
        device,
        "must be 'auto' (the GPU when there is one), 'cpu', 'cuda' or 'cuda:N'",
    )
