"""Chaos mode and the proof that a disturbed run ends bit-identical to an undisturbed one.

Owns: the fault schedule and the damage it does (:mod:`.schedule`), the agent inside the trainer
that carries it out (:mod:`.agent`: a step observer and a save hook, plus the tests' save hold and
the negative control), the orchestrator (:mod:`.orchestrator`: a trial's schedule, the reference
and the disturbed run, the command line; ``python -m resilient_train.chaos``,
``scripts/chaos_test.py``, ``make chaos-test``), its processes (:mod:`.launch`: the runs as real
processes, external kills and stops, restarts, a fresh run directory after a node loss), the local
S3 server of ``--remote`` (:mod:`.local_s3`), what each fault cost (:mod:`.costs`: detection,
recovery, steps redone, time to the first new step, goodput) and its report (:mod:`.report`: the
bitwise comparison of the two arms, where each node loss resumed, report.md, report.json, the plot).

May import: the base, ``checkpoint``, ``config``, ``monitor`` and the loop's observer interface
(``train.observers``) and exit codes (``train.watchdog``). The orchestrator runs the trainer as a
process; it never imports it.
"""

from .._imports import lazy

_LAZY = {
    "Chaos": "agent",
    "ChaosSchedule": "schedule",
    "EVENT_KINDS": "schedule",
    "EVENTS_FILE": "schedule",
    "read_events": "schedule",
    "corrupt_checkpoint": "schedule",
    "default_schedule": "orchestrator",
    "run_trial": "orchestrator",
    "TRAIN_CMD": "orchestrator",
    "main": "orchestrator",
    "compare_histories": "report",
}
__all__ = list(_LAZY)
__getattr__ = lazy(__name__, _LAZY)
