"""The plan of a start: which checkpoint (read and verified once), the config to run with, the drift guard.

:func:`plan_resume` picks the checkpoint (``auto``: the newest valid one of this run; a path: that
checkpoint, or the newest valid one of that run), reads and hashes it **once**, and validates its
content exactly as ``verify`` does (:mod:`.checks`). With ``auto`` a failing checkpoint is passed
over (and set aside once the start is accepted); a path to one exits 2 naming the file and the
field; a checkpoint of a newer format version stops the start. Then the command line is compared
with the config saved in it: a change that would alter the result is refused unless
``resume.allow_config_change=true``. With ranks, rank 0 plans and the others follow its choice
(:func:`plan_chosen`).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..checkpoint import (
    CheckpointError,
    Loaded,
    committed,
    load_checkpoint,
    newest_valid,
    verify_content,
)
from ..checkpoint.layout import CHECKPOINTS_DIR, parse_step
from ..checkpoint.store import Store, is_remote_url
from ..config import LEGACY_VALUES, TrainConfig, flatten, is_resume_safe, saved_config, to_plain
from .checks import check_checkpoint
from .remote import fetch_newest, open_store, refuse_reused_prefix, split_url
from .target import StartupError, resume_target

__all__ = [
    "ConfigDriftError",
    "ResumePlan",
    "plan_resume",
    "plan_chosen",
    "config_diff",
    "check_added_keys",
    "CONFIG_GROUPS",
]

log = logging.getLogger(__name__)


CONFIG_GROUPS = {"experiment", "model", "data", "optimizer", "trainer", "checkpoint", "chaos"}


class ConfigDriftError(StartupError):
    """An override on resume would change the result."""


@dataclass
class ResumePlan:
    """What a start runs with: the config, the loaded checkpoint (``None``: fresh) and accepted changes."""

    cfg: DictConfig
    loaded: Loaded | None = None
    changes: list[str] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)  # this run's checkpoints that failed validation


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


def _choose(rf: str, run_dir: Path, store: Store | None) -> tuple[Loaded | None, list[Path]]:
    """The checkpoint ``resume_from`` names, loaded (``None`` for ``auto`` in a run with none yet), and
    the checkpoints of this run to set aside once the start is accepted. With an object store, a
    newer checkpoint there is downloaded first (:mod:`.remote`)."""
    root = run_dir / CHECKPOINTS_DIR
    if is_remote_url(rf):
        prefix, name = split_url(rf)
        loaded = fetch_newest(open_store(prefix, _options(store)), root, check_checkpoint, name=name)
        if loaded is None:
            raise StartupError(f"resume_from={rf}: no committed checkpoint on the store")
        return loaded, []
    if rf == "auto":
        if store is not None:
            newest = max((parse_step(p.name) for p in committed(root)), default=-1)
            fetched = fetch_newest(store, root, check_checkpoint, newer_than=newest, fallback=True)
            if fetched is not None:
                return fetched, []
        loaded, failed = newest_valid(root, check_checkpoint)
        if store is not None and failed:  # newer local ones are damaged: the store may hold good copies of them
            floor = loaded.step if loaded is not None else -1
            fetched = fetch_newest(store, root, check_checkpoint, newer_than=floor, fallback=True)
            if fetched is not None:  # its damaged local copy was replaced by the download
                return fetched, [p for p in failed if p.name != fetched.path.name and p.is_dir()]
        if loaded is None:
            log.info("resume.none run_dir=%s: no valid checkpoint yet, starting fresh", run_dir)
        return loaded, failed
    run, ckpt = resume_target(rf)
    if ckpt is not None:
        loaded, problems = verify_content(ckpt, check_checkpoint)
        if loaded is None:
            raise CheckpointError(f"resume_from={rf} cannot be resumed: " + "; ".join(problems))
        return loaded, []
    loaded, failed = newest_valid(run / CHECKPOINTS_DIR, check_checkpoint)
    if loaded is None:
        raise StartupError(f"resume_from={rf}: no valid checkpoint under {run / CHECKPOINTS_DIR}")
    return loaded, failed if run.resolve() == run_dir.resolve() else []


def _options(store: Store | None) -> dict | None:
    return store.options if store is not None else None


def plan_resume(cfg: DictConfig, overrides: list[str], run_dir: Path) -> ResumePlan:
    """Which checkpoint to resume from (read and verified once) and the config to run with.

    With ranks, rank 0 alone calls this (it verifies every rank's files and sets damaged
    checkpoints aside); the other ranks follow its choice with :func:`plan_chosen`.
    """
    rf = cfg.resume_from
    remote = cfg.checkpoint.remote
    store = open_store(remote, to_plain(cfg.checkpoint.remote_options)) if remote else None
    if rf is None:
        found = committed(run_dir / CHECKPOINTS_DIR)
        if found:
            raise StartupError(
                f"{run_dir} already holds checkpoints ({found[-1].name}, ...); pass resume_from=auto to "
                "continue that run, or choose another hydra.run.dir"
            )
        if store is not None:
            refuse_reused_prefix(store)  # also the access check: credentials, bucket, endpoint
        return ResumePlan(cfg)
    loaded, failed = _choose(rf, run_dir, store)
    plan = _plan(cfg, overrides, loaded)
    plan.set_aside = failed
    return plan


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
    saved = saved_config(loaded.state["config"])  # keys added to the schema since: their defaults
    if any(_group_override(o) for o in overrides):
        candidate = OmegaConf.create(to_plain(cfg))  # the command line names a full experiment: compare it all
        had, named = flatten(loaded.state["config"]), {o.lstrip("+~").partition("=")[0] for o in overrides}
        for key in LEGACY_VALUES:  # a key newer than the checkpoint: the behaviour it was written with, unless named
            if key not in had and key not in named:
                OmegaConf.update(candidate, key, OmegaConf.select(saved, key), force_add=True)
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


def config_diff(old: Any, new: Any) -> list[str]:
    a, b = flatten(to_plain(old)), flatten(to_plain(new))
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]
