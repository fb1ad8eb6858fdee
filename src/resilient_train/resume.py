"""The one resume path: from ``resume_from`` to a plan that holds the checkpoint, read once.

From the command line to the first batch (``python train.py resume_from=X [overrides]``). A start
is a transaction: steps 1-4 may refuse it (exit 2) and change nothing in the run directory; only
step 5 does, once every rank has accepted.

1. ``cli.prepare_argv``: :func:`resume_target` says what ``resume_from=PATH`` is (a checkpoint, a
   run directory, or, refused with a sentence, a file, a temporary or set-aside folder, another
   program's folder), and makes Hydra write into PATH's run directory.
2. Hydra composes the config (it writes no file: ``.hydra/`` and ``train.log`` wait for step 5);
   ``cli.start`` takes the run lock.
3. :func:`plan_resume` picks the checkpoint (``auto``: the newest valid one of this run; a path:
   that checkpoint, or the newest valid one of that run), reads and hashes it **once**, and
   validates its content exactly as ``verify`` does (:mod:`.checks`). With ``auto`` a failing
   checkpoint is passed over (and set aside in step 5); a path to one exits 2 naming the file and
   the field; a checkpoint of a newer format version stops the start. Then the command line is
   compared with the config saved in it: a change that would alter the result is refused unless
   ``resume.allow_config_change=true``. The plan holds the config to run with, the loaded
   checkpoint, the accepted changes and the checkpoints to set aside.
4. The trainer is built from ``plan.cfg`` and restores ``plan.loaded``: environment, every
   ``Stateful`` part strictly, the RNG structure checked (applied later), counters against the
   manifest.
5. Accepted: ``train.log`` opens; ``cli`` removes crash leftovers; :func:`take_over_timeline` sets
   aside the failing checkpoints and this run's later ones, and cuts ``history.jsonl`` back to the
   checkpoint's step (bad lines go to ``history.rejected.jsonl``); ``best.json`` is repaired;
   ``config.yaml`` and ``.hydra/`` are written; then ``train.start``.
6. ``Trainer.next_batch`` rebuilds the loader at the saved position and applies the saved RNG
   state right before the first batch.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .checkpoint import (
    MANIFEST,
    CheckpointError,
    Loaded,
    committed,
    load_checkpoint,
    move_aside,
    newest_valid,
    parse_step,
    verify_content,
)
from .checkpoint.layout import CHECKPOINTS_DIR, TMP_PREFIX, TRASH_PREFIX
from .checks import check_checkpoint
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
    "resume_target",
    "config_diff",
    "check_added_keys",
    "CONFIG_GROUPS",
]

log = logging.getLogger(__name__)

#: ``step_N.<reason>-<time>-<pid>``: a checkpoint folder set aside by ``move_aside``.
_SET_ASIDE = re.compile(r"^(step_\d{8})\.([a-z]+)-")

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


def resume_target(rf: str) -> tuple[Path | None, Path | None]:
    """``(run directory, checkpoint or None)`` that ``resume_from=rf`` names, or a :class:`StartupError`
    saying what ``rf`` is instead and what to pass. The run directory is ``None`` for a checkpoint
    copied out of its run (``hydra.run.dir`` must then say where the resumed run goes).

    Accepted: a committed checkpoint folder (``RUN/checkpoints/step_N``), a run directory, or its
    ``checkpoints`` folder. Refused, each with its own sentence: a file, an uncommitted temporary
    folder, a folder set aside as corrupt or superseded, and anything that is not this program's.
    """
    path = Path(rf).expanduser().resolve()
    where = f"resume_from={rf}"
    if not path.exists():
        raise StartupError(f"{where}: no such checkpoint or run directory: {path}")
    if not path.is_dir():
        holder = path.parent
        if (holder / MANIFEST).is_file():
            raise StartupError(
                f"{where} is a file inside the checkpoint {holder}; pass the folder: resume_from={holder}"
            )
        raise StartupError(
            f"{where} is a file, not a checkpoint: pass a checkpoint folder (RUN/checkpoints/step_N) or a run directory"
        )
    name = path.name
    if name.startswith(TMP_PREFIX) or name.startswith(TRASH_PREFIX):
        run = path.parent.parent
        raise StartupError(
            f"{where} is an uncommitted temporary folder left by an interrupted save or delete: no reader trusts it. "
            f"Pass the run directory (resume_from={run}) to resume from its newest committed checkpoint"
        )
    aside = _SET_ASIDE.match(name)
    if aside:
        step_name, reason = aside.group(1), aside.group(2)
        run = path.parent.parent
        if reason == "corrupt":
            raise StartupError(
                f"{where} was set aside as corrupt by an earlier start (train.log says why; "
                f"`python -m resilient_train.verify {path}` shows it). Pass the run directory (resume_from={run}) "
                "to resume from the newest valid checkpoint"
            )
        raise StartupError(
            f"{where} was set aside ({reason}) when a resume from an earlier step forked this run, so that "
            f"resume_from=auto cannot pick it. To go back to that timeline, copy it into a new run "
            f"(mkdir -p NEW/checkpoints && cp -r {path} NEW/checkpoints/{step_name}) and pass resume_from=NEW"
        )
    if parse_step(name) is not None and path.parent.name == CHECKPOINTS_DIR:
        return path.parent.parent, path
    if (path / MANIFEST).is_file():  # a committed checkpoint copied out of its run: no run directory to continue
        return None, path
    if name == CHECKPOINTS_DIR and committed(path):
        return path.parent, None
    if (path / CHECKPOINTS_DIR).is_dir():
        return path, None
    foreign = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".bin"))[:3]
    raise StartupError(
        f"{where} is neither a checkpoint (no {MANIFEST}) nor a run directory (no {CHECKPOINTS_DIR}/ folder)"
        + (f"; it holds {', '.join(foreign)}, which resilient-train never reads (pickles)" if foreign else "")
        + ": pass RUN or RUN/checkpoints/step_N of a resilient-train run"
    )


def _choose(rf: str, run_dir: Path) -> tuple[Loaded | None, list[Path]]:
    """The checkpoint ``resume_from`` names, loaded (``None`` for ``auto`` in a run with none yet), and
    the checkpoints of this run to set aside once the start is accepted."""
    if rf == "auto":
        loaded, failed = newest_valid(run_dir / CHECKPOINTS_DIR, check_checkpoint)
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
    loaded, failed = _choose(rf, run_dir)
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


def take_over_timeline(run_dir: Path, loaded: Loaded | None, invalid: list[Path] = ()) -> None:
    """Make this run directory's future start at the resumed step (called once the start is accepted).

    Checkpoints that failed validation are set aside as corrupt. Resuming from an older point (of
    this run or another) forks the timeline: later checkpoints here are set aside so that a later
    ``resume_from=auto`` cannot pick them up, and history records after the step are dropped.
    """
    for path in invalid:
        if path.is_dir():
            move_aside(path, "corrupt")
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
    others = (
        [rank_dir(run_dir, int(p.name)) for p in ranks.iterdir() if p.name.isascii() and p.name.isdigit()]
        if ranks.is_dir()
        else []
    )
    return sum(truncate_history(d, step) for d in [run_dir, *others])


def config_diff(old: Any, new: Any) -> list[str]:
    a, b = flatten(to_plain(old)), flatten(to_plain(new))
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]
