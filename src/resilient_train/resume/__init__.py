"""The decision to resume, made before a trainer exists: what to resume from, and whether it may be.

Owns: what ``resume_from`` names (:mod:`.target`), the one validation of a checkpoint's content
shared with ``verify`` (:mod:`.checks`), the plan (:mod:`.plan`: the checkpoint read once, the
config to run with, the drift guard), every check of the checkpoint against this process (the
environment, the device, the world size, the data fingerprint) and the conversions they allow
(:mod:`.admit`), the run lock and the start's held log (:mod:`.lock`), and the take-over of the
run directory's timeline once the start is accepted (:mod:`.timeline`). The trainer only loads
the state it is handed.

May import: the base, ``checkpoint``, ``config``, ``monitor``, ``data``, ``tokenizer`` and the
loop's parts (``train.parts``, ``train.rng``, ``train.env``); not the loop itself (``train.trainer``).

The path of a resume, from the command line to the first batch (``python train.py resume_from=X
[overrides]``). A start is a transaction: steps 1-4 may refuse it (exit 2) and change nothing in
the run directory; only step 5 does, once every rank has accepted.

1. ``cli.argv.prepare_argv``: :func:`.target.resume_target` says what ``resume_from=PATH`` is (a
   checkpoint, a run directory, or, refused with a sentence, a file, a temporary or set-aside
   folder, another program's folder), and makes Hydra write into PATH's run directory.
2. Hydra composes the config (it writes no file); ``cli.start`` takes the run lock (:mod:`.lock`).
3. :func:`.plan.plan_resume`: the checkpoint, read and hashed once and validated as ``verify``
   does; the config to run with; the drift guard.
4. ``cli.start`` validates the config, fixes the process settings, resolves the device and builds
   the data, then :func:`.admit.admit` checks the checkpoint against this process (environment,
   device kind, world size, data fingerprint) and applies the conversions an allowed change
   needs. Only then is the trainer built, and ``Trainer.restore`` loads every ``Stateful`` part
   strictly and checks the step against the manifest: the one entry into the loop's module.
5. Accepted: ``train.log`` opens; leftovers are removed; :func:`.timeline.take_over_timeline` sets
   aside the failing checkpoints and this run's later ones and cuts ``history.jsonl`` back;
   ``best.json`` is repaired; ``config.yaml`` and ``.hydra/`` are written; ``train.start``.
6. ``Trainer.next_batch`` rebuilds the loader at the saved position and applies the saved RNG
   state right before the first batch.
"""

from .._imports import lazy

_LAZY = {
    "StartupError": "target",
    "resume_target": "target",
    "ConfigDriftError": "plan",
    "ResumePlan": "plan",
    "plan_resume": "plan",
    "plan_chosen": "plan",
    "config_diff": "plan",
    "check_added_keys": "plan",
    "CONFIG_GROUPS": "plan",
    "check_checkpoint": "checks",
    "take_over_timeline": "timeline",
}
__all__ = list(_LAZY)
__getattr__ = lazy(__name__, _LAZY)
