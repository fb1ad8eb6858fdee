"""The ``chaos`` section: the faults a run injects into itself (kills, SIGTERMs, corruption, node loss, hangs,
non-finite values, bit flips, failing saves), its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .values import AtLeast, Get, Need, RealRange, finite, int_ge, plain_list

#: The event kinds: each has a ``chaos.<kind>_rate`` and a ``chaos.<kind>_steps`` key (the schedule's order).
EVENT_KINDS = ("step_kill", "save_kill", "sigterm", "corrupt", "node_loss", "hang", "nan", "bitflip", "io_error")


@dataclass
class ChaosConfig:
    enabled: bool = False
    seed: int = 0
    # Per-step probabilities of each event kind.
    step_kill_rate: float = 0.0
    save_kill_rate: float = 0.0
    sigterm_rate: float = 0.0
    corrupt_rate: float = 0.0
    node_loss_rate: float = 0.0
    hang_rate: float = 0.0
    nan_rate: float = 0.0
    bitflip_rate: float = 0.0
    io_error_rate: float = 0.0
    # Explicit steps, in addition to the rates.
    step_kill_steps: list[int] = field(default_factory=list)
    save_kill_steps: list[int] = field(default_factory=list)
    sigterm_steps: list[int] = field(default_factory=list)
    corrupt_steps: list[int] = field(default_factory=list)
    # A node loss deletes the whole run directory, then SIGKILLs the trainer (the machine and its disk are gone).
    node_loss_steps: list[int] = field(default_factory=list)
    # The victim rank stops making progress inside the step (blocked, the GIL released); the watchdog ends it.
    hang_steps: list[int] = field(default_factory=list)
    # A NaN enters the victim rank's gradients once; the guard rolls back in-process.
    nan_steps: list[int] = field(default_factory=list)
    # One bit of one parameter of the victim rank flips in memory (with ranks; one process cannot detect it).
    bitflip_steps: list[int] = field(default_factory=list)
    # The save at that step fails with EIO or ENOSPC at a seeded phase (the write, before the rename).
    io_error_steps: list[int] = field(default_factory=list)
    # Where the events are recorded ("" = the run directory); a node loss needs a folder outside the run directory.
    events_dir: str = ""
    # Negative control: on resume, drop one restored part ("", "rng", "data", "scaler") so the proof must fail.
    skip_restore: str = ""
    # For tests: park the checkpoint writer at a save phase, or the uploader at "uploading" ("<phase>" or
    # "<phase>@<step>"), to SIGKILL it there.
    hold_phase: str = ""


# ----------------------------------------------------------------------------------------------
# validation

AT_LEAST: tuple[AtLeast, ...] = (AtLeast("chaos.seed", 0),)

REAL_RANGES: tuple[RealRange, ...] = tuple(
    RealRange(f"chaos.{kind}_rate", 0, True, 1, True, "must be a probability in [0, 1]") for kind in EVENT_KINDS
)


def check_chaos(get: Get, need: Need, hook_phases: tuple[str, ...]) -> None:
    """The chaos checks beyond :data:`AT_LEAST` and :data:`REAL_RANGES`; ``hold_phase`` names one of
    ``hook_phases`` (the save's phases and the upload's)."""
    for kind in EVENT_KINDS:
        key = f"chaos.{kind}_steps"
        steps = plain_list(get(key))
        need(
            steps is not None and all(int_ge(s, 1) for s in steps),
            key,
            steps if steps is not None else get(key),
            "must be a list of steps, each an integer >= 1",
        )
    skip = get("chaos.skip_restore")
    need(skip in ("", "rng", "data", "scaler"), "chaos.skip_restore", skip, "must be '', 'rng', 'data' or 'scaler'")
    hold = get("chaos.hold_phase")
    hold_phase, at, hold_step = (hold if isinstance(hold, str) else "?").partition("@")
    need(
        (hold_phase == "" and not at) or (hold_phase in hook_phases and (not at or hold_step.isdigit())),
        "chaos.hold_phase",
        hold,
        f"must be '' or one of {list(hook_phases)}, optionally followed by @STEP",
    )
    events_dir = get("chaos.events_dir")
    need(isinstance(events_dir, str), "chaos.events_dir", events_dir, "must be a path ('' = the run directory)")
    rate = get("chaos.node_loss_rate")
    node_loss = bool(plain_list(get("chaos.node_loss_steps"))) or (finite(rate) and rate > 0)
    need(
        not (get("chaos.enabled") is True and node_loss) or bool(events_dir),
        "chaos.events_dir",
        events_dir,
        "must name a folder outside the run directory when a node loss is scheduled (chaos.node_loss_*): "
        "the node loss deletes the run directory, and its events with it",
    )
