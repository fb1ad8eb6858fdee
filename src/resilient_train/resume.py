"""The one resume path: from ``resume_from`` to a plan that holds the checkpoint, read once.

From the command line to the first batch (``python train.py resume_from=X [overrides]``):

1. ``cli.prepare_argv``: ``resume_from=PATH`` makes Hydra write into PATH's run directory.
2. Hydra composes the config; ``cli.start`` takes the run lock and removes crash leftovers.
3. :func:`plan_resume` picks the checkpoint (``auto``: the newest valid one of this run, newer
   invalid ones set aside; a path: that checkpoint, or the newest valid one of that run), reads and
   hashes it **once** (:func:`~resilient_train.checkpoint.load_checkpoint`), and compares the
   command line with the config saved in it: a change that would alter the result is refused
   unless ``resume.allow_config_change=true``. The plan holds the config to run with, the loaded
   checkpoint and the accepted changes.
4. The trainer is built from ``plan.cfg`` and restores ``plan.loaded``: environment, every
   ``Stateful`` part strictly, the RNG structure checked (applied later), counters against the
   manifest. Anything refused so far exits 2, before any step.
5. :func:`take_over_timeline`: later checkpoints of this run are set aside and ``history.jsonl``
   is cut back to the checkpoint's step; then ``train.start``.
6. ``Trainer.next_batch`` rebuilds the loader at the saved position and applies the saved RNG
   state right before the first batch.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .checkpoint import (
    CheckpointError,
    CheckpointManager,
    Loaded,
    committed,
    is_checkpoint_dir,
    load_checkpoint,
    move_aside,
    parse_step,
    verify_files,
)
from .checkpoint.layout import CHECKPOINTS_DIR
from .config import TrainConfig, flatten, is_resume_safe, to_plain
from .monitor import truncate_history
from .observers import rank_dir

__all__ = [
    "StartupError",
    "ConfigDriftError",
    "ResumePlan",
    "plan_resume",
    "plan_chosen",
    "take_over_timeline",
    "config_diff",
    "check_added_keys",
    "CONFIG_GROUPS",
]

log = logging.getLogger(__name__)

CONFIG_GROUPS = {"experiment", "model", "data", "optimizer", "trainer", "checkpoint", "chaos"}


class StartupError(ValueError):
    """A start refused for a reason the user can fix (the CLI exits 2); the message says how."""


class ConfigDriftError(StartupError):
    """An override on resume would change the result."""


@dataclass
class ResumePlan:
    """What a start runs with: the config, the loaded checkpoint (``None``: fresh) and accepted changes."""

    cfg: DictConfig
    loaded: Loaded | None = None
    changes: list[str] = field(default_factory=list)


def check_added_keys(overrides: list[str]) -> None:
    """Hydra accepts ``+trainer.max_step=5`` (a new key) silently; a key the schema lacks is a typo."""
    known = list(flatten(to_plain(OmegaConf.structured(TrainConfig))))
    bad = []
    for ov in overrides:
        key = ov.lstrip("+").partition("=")[0]
        if not ov.startswith("+") or key.startswith("hydra.") or "/" in key or key.split("@")[0] in CONFIG_GROUPS:
            continue
        if key not in known and not any(k.startswith(key + ".") for k in known):
            near = difflib.get_close_matches(key, known, n=1)
            bad.append(f"{ov}: the config has no key {key!r}" + (f" (did you mean {near[0]}?)" if near else ""))
    if bad:
        raise StartupError("unknown config key added with '+':\n  " + "\n  ".join(bad))


def _group_override(ov: str) -> bool:
    key = ov.lstrip("+~").partition("=")[0]
    return "." not in key and "/" not in key and key.split("@")[0] in CONFIG_GROUPS


def _choose(rf: str, run_dir: Path) -> Loaded | None:
    """The checkpoint ``resume_from`` names, loaded; ``None`` for ``auto`` in a run with none yet."""
    own = CheckpointManager(run_dir / CHECKPOINTS_DIR)
    if rf == "auto":
        loaded = own.latest_valid(move_aside_invalid=True)
        if loaded is None:
            log.info("resume.none run_dir=%s: no valid checkpoint yet, starting fresh", run_dir)
        return loaded
    path = Path(rf).expanduser().resolve()
    if not path.exists():
        raise StartupError(f"resume_from={rf}: no such checkpoint or run directory: {path}")
    if is_checkpoint_dir(path):
        report = verify_files(path)
        if not report.ok:
            raise CheckpointError(f"resume_from={rf} is not a valid checkpoint: {'; '.join(report.errors)}")
        return report.loaded
    loaded = CheckpointManager(path / CHECKPOINTS_DIR).latest_valid(move_aside_invalid=path == run_dir.resolve())
    if loaded is None:
        raise StartupError(f"resume_from={rf}: no valid checkpoint under {path / CHECKPOINTS_DIR}")
    return loaded


def plan_resume(cfg: DictConfig, overrides: list[str], run_dir: Path) -> ResumePlan:
    """Which checkpoint to resume from (read and verified once) and the config to run with.

    With ranks, rank 0 alone calls this (it verifies every rank's files and sets damaged
    checkpoints aside); the other ranks follow its choice with :func:`plan_chosen`.
    """
    rf = cfg.resume_from
    if rf is None:
        found = committed(run_dir / CHECKPOINTS_DIR)
        if found:
            raise StartupError(
                f"{run_dir} already holds checkpoints ({found[-1].name}, ...); pass resume_from=auto to "
                "continue that run, or choose another hydra.run.dir"
            )
        return ResumePlan(cfg)
    return _plan(cfg, overrides, _choose(rf, run_dir))


def plan_chosen(cfg: DictConfig, overrides: list[str], path: str | None, rank: int) -> ResumePlan:
    """A rank other than 0: the checkpoint rank 0 chose (``None``: fresh), reading only the shared
    files and this rank's own (each hash-checked)."""
    return _plan(cfg, overrides, load_checkpoint(Path(path), rank=rank) if path else None)


def _plan(cfg: DictConfig, overrides: list[str], loaded: Loaded | None) -> ResumePlan:
    rf = cfg.resume_from
    if loaded is None:
        return ResumePlan(cfg)
    if not isinstance(loaded.state.get("config"), dict):
        raise CheckpointError(f"{loaded.path / 'state.json'}: holds no config")
    saved = OmegaConf.create(loaded.state["config"])
    if any(_group_override(o) for o in overrides):
        candidate = OmegaConf.create(to_plain(cfg))  # the command line names a full experiment: compare it all
    else:
        candidate = OmegaConf.create(to_plain(saved))
        for ov in overrides:
            key = ov.lstrip("+").partition("=")[0]
            if key.startswith("hydra.") or key == "resume_from" or ov.startswith("~"):
                continue
            OmegaConf.update(candidate, key, OmegaConf.select(cfg, key), force_add=True)
    candidate.resume_from = rf
    refused = [c for c in config_diff(saved, candidate) if not is_resume_safe(c.split(":")[0])]
    if refused:
        if not cfg.resume.allow_config_change:
            raise ConfigDriftError(
                f"resuming from {loaded.path} with a config that would change the result:\n  "
                + "\n  ".join(refused)
                + "\nUndo these overrides, or pass resume.allow_config_change=true to accept the change "
                "(it is logged and recorded in the next checkpoint's manifest)."
            )
        log.warning("resume.config_change allowed by resume.allow_config_change: %s", "; ".join(refused))
    # Re-apply the schema so the resumed config is type-checked like a fresh one.
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), candidate)
    return ResumePlan(merged, loaded, refused)


def take_over_timeline(run_dir: Path, loaded: Loaded | None) -> None:
    """Make this run directory's future start at the resumed step (called once the start is accepted).

    Resuming from an older point (of this run or another) forks the timeline: later checkpoints
    here are set aside so that a later ``resume_from=auto`` cannot pick them up, and history
    records after the step are dropped.
    """
    found = committed(run_dir / CHECKPOINTS_DIR)
    if loaded is None:
        if not found:
            _truncate_histories(run_dir, 0)
        return
    for newer in found:
        if newer.resolve() != loaded.path.resolve() and parse_step(newer.name) > loaded.step:
            move_aside(newer, "superseded")
    dropped = _truncate_histories(run_dir, loaded.step)
    if dropped:
        log.info("resume.history_truncated records=%d after step=%d", dropped, loaded.step)


def _truncate_histories(run_dir: Path, step: int) -> int:
    """Cut ``history.jsonl`` and every rank's ``ranks/<r>/history.jsonl`` back to ``step``."""
    ranks = run_dir / "ranks"
    others = [rank_dir(run_dir, int(p.name)) for p in ranks.iterdir() if p.name.isdigit()] if ranks.is_dir() else []
    return sum(truncate_history(d, step) for d in [run_dir, *others])


def config_diff(old: Any, new: Any) -> list[str]:
    a, b = flatten(to_plain(old)), flatten(to_plain(new))
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]
