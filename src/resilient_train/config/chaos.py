"""The ``chaos`` section: the faults a run injects into itself (kills, SIGTERMs, corruption), and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .values import AtLeast, Get, Need, RealRange, int_ge, plain_list


@dataclass
class ChaosConfig:
    enabled: bool = False
    seed: int = 0
    # Per-step probabilities of each event kind.
    step_kill_rate: float = 0.0
    save_kill_rate: float = 0.0
    sigterm_rate: float = 0.0
    corrupt_rate: float = 0.0
    # Explicit steps, in addition to the rates.
    step_kill_steps: list[int] = field(default_factory=list)
    save_kill_steps: list[int] = field(default_factory=list)
    sigterm_steps: list[int] = field(default_factory=list)
    corrupt_steps: list[int] = field(default_factory=list)
    # Negative control: on resume, drop one restored part ("", "rng", "data") so the proof must fail.
    skip_restore: str = ""
    # For tests: park the checkpoint writer at a save phase ("<phase>" or "<phase>@<step>") to SIGKILL it there.
    hold_phase: str = ""


# ----------------------------------------------------------------------------------------------
# validation

AT_LEAST: tuple[AtLeast, ...] = (AtLeast("chaos.seed", 0),)

REAL_RANGES: tuple[RealRange, ...] = (
    RealRange("chaos.step_kill_rate", 0, True, 1, True, "must be a probability in [0, 1]"),
    RealRange("chaos.save_kill_rate", 0, True, 1, True, "must be a probability in [0, 1]"),
    RealRange("chaos.sigterm_rate", 0, True, 1, True, "must be a probability in [0, 1]"),
    RealRange("chaos.corrupt_rate", 0, True, 1, True, "must be a probability in [0, 1]"),
)


def check_chaos(get: Get, need: Need, save_phases: tuple[str, ...]) -> None:
    """The chaos checks beyond :data:`AT_LEAST` and :data:`REAL_RANGES`; ``hold_phase`` names one of ``save_phases``."""
    for kind in ("step_kill", "save_kill", "sigterm", "corrupt"):
        key = f"chaos.{kind}_steps"
        steps = plain_list(get(key))
        need(
            steps is not None and all(int_ge(s, 1) for s in steps),
            key,
            steps if steps is not None else get(key),
            "must be a list of steps, each an integer >= 1",
        )
    skip = get("chaos.skip_restore")
    need(skip in ("", "rng", "data"), "chaos.skip_restore", skip, "must be '', 'rng' or 'data'")
    hold = get("chaos.hold_phase")
    hold_phase, at, hold_step = (hold if isinstance(hold, str) else "?").partition("@")
    need(
        (hold_phase == "" and not at) or (hold_phase in save_phases and (not at or hold_step.isdigit())),
        "chaos.hold_phase",
        hold,
        f"must be '' or one of {list(save_phases)}, optionally followed by @STEP",
    )
