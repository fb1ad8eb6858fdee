"""The training loop and what it is made of.

Owns: :class:`~.trainer.Trainer` (the loop over a mapping of named ``Stateful`` parts), the parts
themselves (:mod:`.parts`: counters, data position, per-rank state, EMA, LR schedule), the random
streams (:mod:`.rng`), what determines a run's bits on this machine (:mod:`.env`), the device
(:mod:`.device`), DDP and the collective stop (:mod:`.ranks`), one optimizer step (:mod:`.step`), mixed
precision and the fp16 scalers (:mod:`.precision`), the
guards and the faults they raise (:mod:`.faults`: finite values, equal replicas), recovery without a new
process (:mod:`.recovery`: in-process rollback, failed saves), the hang watchdog (:mod:`.watchdog`),
and the step observers that watch the loop (:mod:`.observers`: history, heartbeat, progress bar;
:mod:`.tblog`: TensorBoard).

May import: the base (``fsio``, ``dist``), ``checkpoint``, ``config``, ``monitor``, ``data`` and
``tokenizer``. Never ``resume``, ``chaos`` or the command-line tools: they hand the trainer what it
needs (a checked plan, observers, save hooks).
"""

from .._imports import lazy

_LAZY = {
    "Trainer": "trainer",
    "EXIT_FINISHED": "trainer",
    "EXIT_PREEMPTED": "trainer",
    "EXIT_ABORTED": "trainer",
    "TENSOR_GROUPS": "trainer",
    "REQUIRED_PARTS": "trainer",
    "default_observers": "trainer",
    "configure_process": "env",
    "capture_env": "env",
    "check_env": "env",
    "env_differences": "env",
    "package_versions": "env",
    "Observer": "observers",
    "HistoryObserver": "observers",
    "HeartbeatObserver": "observers",
    "RankHeartbeatObserver": "observers",
    "ProgressObserver": "observers",
    "rank_dir": "observers",
    "EMA": "parts",
    "TrainCounters": "parts",
    "DataPosition": "parts",
    "RankState": "parts",
    "StateError": "parts",
    "warmup_cosine": "parts",
    "apply_hyperparameters": "parts",
    "RNGState": "rng",
    "seed_everything": "rng",
    "rank_seed": "rng",
    "DeviceError": "device",
    "resolve_device": "device",
}
__all__ = list(_LAZY)
__getattr__ = lazy(__name__, _LAZY)
