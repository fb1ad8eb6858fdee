"""``python train.py [overrides]``: Hydra entry point, resume resolution, config-drift guard, run lock.

Exit status: 0 finished; 75 stopped by SIGTERM/SIGINT after committing a checkpoint (run the
same command with ``resume_from=auto`` to continue); 2 bad configuration, bad resume path or
refused config drift; 1 any other error; 130 a second SIGINT (immediate exit).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError, CheckpointManager, move_aside, parse_step, read_manifest, verify_files
from .config import CONFIG_DIR, flatten, is_resume_safe, register_configs, to_plain, validate_config

__all__ = ["main", "resolve_resume", "ConfigDriftError", "RunLock", "EXIT_CONFIG_ERROR", "checkpoint_config"]

log = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
CONFIG_GROUPS = {"experiment", "model", "data", "optimizer", "trainer", "checkpoint", "chaos"}


class ConfigDriftError(ValueError):
    """An override on resume would change the result."""


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``.

    The kernel drops the lock when its holder dies, so a lock left by a dead (even SIGKILLed)
    process is simply taken over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"run directory {self.path.parent} is in use by another training process (pid {holder}); "
                "wait for it to exit or choose another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "manifest.json").exists() or path.name.startswith("step_")


def run_dir_of(path: Path) -> Path:
    """The run directory holding a checkpoint (``RUN/checkpoints/step_N``) or the run directory itself."""
    path = path.resolve()
    return path.parent.parent if _is_checkpoint_dir(path) else path


def _argv_value(argv: list[str], key: str) -> str | None:
    for a in argv:
        k, sep, v = a.lstrip("+").partition("=")
        if sep and k == key:
            return v
    return None


def prepare_argv(argv: list[str]) -> list[str]:
    """Before Hydra runs: make ``resume_from=PATH`` write into PATH's run directory.

    Unless the user chose ``hydra.run.dir``, the resumed run continues in the original run
    directory; Hydra's ``.hydra`` snapshot is not rewritten there (the config that applies is the
    checkpoint's, recorded in every manifest).
    """
    rf = _argv_value(argv, "resume_from")
    if rf is None or rf in ("auto", "null", "None", ""):
        return argv
    path = Path(rf).expanduser()
    if not path.exists():
        print(f"error: resume_from={rf}: no such checkpoint or run directory: {path.resolve()}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR)
    if _argv_value(argv, "hydra.run.dir") is None:
        argv = [*argv, f"hydra.run.dir={run_dir_of(path)}", "hydra.output_subdir=null"]
    return argv


def checkpoint_config(ckpt: Path) -> dict[str, Any]:
    """The fully resolved config stored in a (verified) checkpoint."""
    report = verify_files(ckpt)
    if not report.ok:
        raise CheckpointError("; ".join(report.errors))
    data = json.loads((ckpt / "state.json").read_text())
    if "config" not in data:
        raise CheckpointError(f"{ckpt / 'state.json'}: holds no config")
    return data["config"]


def _group_override(ov: str) -> bool:
    key = ov.lstrip("+~").partition("=")[0]
    return "." not in key and "/" not in key and key.split("@")[0] in CONFIG_GROUPS


def resolve_resume(cfg: DictConfig, overrides: list[str], run_dir: Path) -> tuple[DictConfig, Path | None, list[str]]:
    """Which checkpoint to resume from, and the config to run with. Returns ``(cfg, ckpt, changes)``."""
    rf = cfg.resume_from
    if rf is None:
        return cfg, None, []
    own = CheckpointManager(run_dir / "checkpoints")
    if rf == "auto":
        ckpt = own.latest_valid(move_aside_invalid=True)
        if ckpt is None:
            log.info("resume.none run_dir=%s: no valid checkpoint yet, starting fresh", run_dir)
            return cfg, None, []
    else:
        path = Path(rf).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"resume_from={rf}: no such checkpoint or run directory: {path}")
        if _is_checkpoint_dir(path):
            report = verify_files(path)
            if not report.ok:
                raise CheckpointError(f"resume_from={rf} is not a valid checkpoint: {'; '.join(report.errors)}")
            ckpt = path
        else:
            mgr = CheckpointManager(path / "checkpoints")
            ckpt = mgr.latest_valid(move_aside_invalid=path == run_dir.resolve())
            if ckpt is None:
                raise FileNotFoundError(f"resume_from={rf}: no valid checkpoint under {path / 'checkpoints'}")
    saved = OmegaConf.create(checkpoint_config(ckpt))
    if any(_group_override(o) for o in overrides):
        candidate = OmegaConf.create(to_plain(cfg))  # the command line names a full experiment: compare it all
    else:
        candidate = OmegaConf.create(to_plain(saved))
        for ov in overrides:
            key, _, value = ov.lstrip("+").partition("=")
            if key.startswith("hydra.") or key == "resume_from" or ov.startswith("~"):
                continue
            OmegaConf.update(candidate, key, OmegaConf.select(cfg, key), force_add=True)
    candidate.resume_from = rf
    changes = config_diff(saved, candidate)
    refused = [c for c in changes if not is_resume_safe(c.split(":")[0])]
    if refused:
        if not cfg.resume.allow_config_change:
            raise ConfigDriftError(
                f"resuming from {ckpt} with a config that would change the result:\n  "
                + "\n  ".join(refused)
                + "\nUndo these overrides, or pass resume.allow_config_change=true to accept the change "
                "(it is logged and recorded in the next checkpoint's manifest)."
            )
        log.warning("resume.config_change allowed by resume.allow_config_change: %s", "; ".join(refused))
    # Re-apply the schema so the resumed config is type-checked like a fresh one.
    merged = OmegaConf.merge(OmegaConf.structured(_schema()), candidate)
    return merged, ckpt, refused


def _schema():
    from .config import TrainConfig

    return TrainConfig


def config_diff(old: Any, new: Any) -> list[str]:
    a, b = flatten(to_plain(old)), flatten(to_plain(new))
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> int:
    from .trainer import Trainer, truncate_history

    if cfg.resume_from is None:
        validate_config(cfg)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        mgr = CheckpointManager(run_dir / "checkpoints")
        mgr.cleanup_temporaries()
        if cfg.resume_from is None and mgr.committed():
            raise ValueError(
                f"{run_dir} already holds checkpoints ({mgr.committed()[-1].name}, ...); pass resume_from=auto to "
                "continue that run, or choose another hydra.run.dir"
            )
        cfg, ckpt, changes = resolve_resume(cfg, overrides, run_dir)
        validate_config(cfg)
        if ckpt is not None:
            step = read_manifest(ckpt)["step"]
            # Resuming from an older point (of this run or another) forks the timeline: later
            # checkpoints in this run directory must not be picked up by a later resume_from=auto.
            for newer in [p for p in mgr.committed() if p != ckpt and parse_step(p.name) > step]:
                move_aside(newer, "superseded")
            dropped = truncate_history(run_dir, step)
            if dropped:
                log.info("resume.history_truncated records=%d after step=%d", dropped, step)
        elif ckpt is None and (run_dir / "history.jsonl").exists() and not mgr.committed():
            truncate_history(run_dir, 0)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        trainer = Trainer(cfg, run_dir, config_changes=changes)
        log.info(
            "train.start run_dir=%s experiment=%s max_steps=%d resume=%s threads=%d",
            run_dir,
            cfg.experiment,
            cfg.trainer.max_steps,
            ckpt,
            cfg.trainer.num_threads,
        )
        return trainer.fit(ckpt)
    finally:
        lock.release()


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    try:
        code = run(cfg, run_dir, overrides)
    except (ValueError, FileNotFoundError, CheckpointError, KeyError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    except RuntimeError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(code)


def main() -> None:
    # magvit2-pytorch and its dependencies emit deprecation warnings from torch on import; they are
    # not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|magvit2_pytorch|vector_quantize)")
    sys.argv = [sys.argv[0], *prepare_argv(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
