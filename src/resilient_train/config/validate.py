"""Value validation: every section's checks run over one config, every problem reported in one ``ValueError``."""

from __future__ import annotations

from typing import Any

from . import chaos, checkpoint, data, model, training
from .schema import check_top_level
from .values import Get, Need, check_at_least, check_real_ranges, show


class _Unreadable:
    """What :func:`validate_config` sees for a key it cannot read (missing, ``???``, a broken interpolation)."""

    def __init__(self, exc: BaseException) -> None:
        self.why = f"{type(exc).__name__}: {exc}".splitlines()[0]

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<unreadable: {self.why}>"


def validate_config(cfg: Any) -> None:
    """Check values a type cannot; raise one ``ValueError`` listing every bad key.

    Every key of the schema is either checked against its meaning here or is free (strings such as
    paths and names, booleans). Nothing but that one ``ValueError`` escapes, whatever the values
    (a config read back from a checkpoint is not type-checked by the schema).
    """
    from ..checkpoint.layout import HOOK_PHASES

    errors: list[str] = []

    def need(cond: bool, key: str, value: Any, why: str) -> None:
        if not cond:
            errors.append(f"{key}={show(value)!r}: {why}")

    def get(key: str) -> Any:
        node = cfg
        try:
            for part in key.split("."):
                node = node[part] if isinstance(node, dict) else getattr(node, part)
        except Exception as exc:  # a missing key, a ``???`` value, a broken interpolation
            return _Unreadable(exc)
        return node

    try:
        _check_sections(get, need, HOOK_PHASES)
    except Exception as exc:  # a backstop: every check is written not to raise
        errors.append(f"the configuration could not be checked completely ({type(exc).__name__}: {exc})")
    if errors:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))


def _check_sections(get: Get, need: Need, hook_phases: tuple[str, ...]) -> None:
    """Every section's checks, in the order their errors are listed.

    First the integer floors of all sections, then their real-number ranges, then each section's own
    checks in schema order. The one check across sections is the data's against the model (clip
    size, channels, frames for the ``compress_time`` layers): :func:`~.data.check_data` is told
    whether :func:`~.model.check_model` found the layers sound.
    """
    for section in (model, data, training, checkpoint, chaos):
        check_at_least(get, need, section.AT_LEAST)
    for section in (model, data, training, chaos, checkpoint):
        check_real_ranges(get, need, section.REAL_RANGES)
    check_top_level(get, need)
    layers_ok = model.check_model(get, need)
    data.check_data(get, need, model_layers_ok=layers_ok)
    training.check_optimizer(get, need)
    training.check_trainer(get, need)
    checkpoint.check_checkpoint(get, need)
    chaos.check_chaos(get, need, hook_phases)
