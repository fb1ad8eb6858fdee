"""Whether a verified checkpoint may continue in this process, checked before a trainer exists.

:func:`admit` compares the checkpoint with this process, in this order, and raises a
``StateError`` (exit 2) that names the difference and the way out, or returns the changes to
record in the next manifest:

1. the environment (torch, threads, CPU kernel, device kind, ...: :func:`..train.env.check_env`);
2. the device kind: after an allowed move (CPU <-> GPU) this rank's GPU stream starts afresh;
3. the world size: refused, or (``resume.allow_world_size_change``) this rank's data position is
   converted through the samples consumed and its random streams start afresh;
4. the data fingerprint: the same files elsewhere are accepted, different ones refused (or allowed).

The conversions are applied to ``loaded.state`` (this rank's RNG and position), which the trainer
then loads as it is; nothing here touches the process-global random generators.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..checkpoint import Loaded
from ..config import TrainConfig
from ..data import fingerprint_difference
from ..dist import Group
from ..train.env import check_env
from ..train.parts import StateError
from ..train.rng import RNGState, rank_seed, seed_everything

__all__ = ["admit"]

log = logging.getLogger(__name__)


def admit(
    loaded: Loaded,
    cfg: TrainConfig,
    *,
    env: dict[str, Any],
    device: torch.device,
    group: Group,
    fingerprint: dict[str, Any] | None,
) -> list[str]:
    """Every check of ``loaded`` against this process; the accepted changes (see the module docstring)."""
    changes = check_env(loaded.state.get("env"), env, allow=cfg.resume.allow_config_change)
    _convert_device_rng(loaded, cfg, env, device, group.rank)
    changes += _check_world_size(loaded, cfg, device, group)
    changes += _check_data(loaded, cfg, fingerprint)
    return changes


def _fresh_streams(seed: int, devices: list[int]) -> dict[str, Any]:
    """The RNG state :func:`seed_everything` with ``seed`` gives, without disturbing the generators in use."""
    current = RNGState(devices)
    before = current.state_dict()
    seed_everything(seed)
    fresh = current.state_dict()
    current.load_state_dict(before)
    return fresh


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index] if device.type == "cuda" else []


def _convert_device_rng(loaded: Loaded, cfg: TrainConfig, env: dict[str, Any], device: torch.device, rank: int) -> None:
    """After an allowed change of device kind: this device's random stream starts afresh (seeded from
    the run's seed, rank and step); the CPU streams carry over as they are."""
    saved = loaded.state.get("env")
    ranks = loaded.state.get("ranks")
    mine = ranks.get(str(rank)) if isinstance(ranks, dict) else None
    if not isinstance(saved, dict) or saved.get("device") == env["device"] or not isinstance(mine, dict):
        return
    if isinstance(mine.get("rng"), dict):
        fresh = _fresh_streams(rank_seed(cfg.seed, rank, loaded.step), _cuda_devices(device))
        mine["rng"] = {**mine["rng"], "cuda": fresh["cuda"]}
    log.warning(
        "resume.device_change from=%s to=%s step=%d: fresh random stream on %s (no bitwise continuity)",
        saved.get("device"),
        env["device"],
        loaded.step,
        device,
    )


def _check_world_size(loaded: Loaded, cfg: TrainConfig, device: torch.device, group: Group) -> list[str]:
    """Refuse a checkpoint of another world size, or (when allowed) carry it over and say so."""
    saved, here = loaded.manifest.get("world_size", 1), group.world_size
    if saved == here:
        return []
    if not cfg.resume.allow_world_size_change:
        raise StateError(
            f"{loaded.path} was written by {saved} rank(s) but this run has {here}: per-rank RNG streams and "
            f"data slices cannot carry over bit for bit. Start with {saved} rank(s) (torchrun --nproc-per-node "
            f"{saved}), or pass resume.allow_world_size_change=true to continue with exact weights and "
            "optimizer state but fresh per-rank random streams (recorded: no bitwise continuity)"
        )
    cfg_saved = loaded.state.get("config") or {}
    batch_saved = int(cfg_saved.get("data", {}).get("batch_size", cfg.data.batch_size))
    epoch, done = int(loaded.manifest.get("epoch", 0)), int(loaded.manifest.get("batch_in_epoch", 0))
    samples = done * batch_saved * saved  # samples consumed in the current epoch
    per_batch = cfg.data.batch_size * here
    if samples % per_batch:
        raise StateError(
            f"{loaded.path}: {samples} samples of epoch {epoch} consumed by {saved} rank(s) is not a whole number "
            f"of global batches of {per_batch} on {here} rank(s); resume on {saved} rank(s)"
        )
    step, rank = loaded.step, group.rank
    rng = _fresh_streams(rank_seed(cfg.seed, rank, step), _cuda_devices(device))  # applied before the first batch
    loaded.state["ranks"] = {str(rank): {"rng": rng, "data": {"epoch": epoch, "batch_in_epoch": samples // per_batch}}}
    note = (
        f"world_size: {saved} -> {here} at step {step} (resume.allow_world_size_change: data position "
        f"converted through {samples} samples consumed, fresh per-rank RNG streams; no bitwise continuity)"
    )
    log.warning("resume.world_size_change %s", note)
    return [note]


def _check_data(loaded: Loaded, cfg: TrainConfig, here: dict[str, Any] | None) -> list[str]:
    """The files the checkpoint was trained on, against the ones found now (wherever they are)."""
    saved = loaded.state.get("data_fingerprint")
    if here is None:
        return []
    if not isinstance(saved, dict):
        log.warning("resume.data_unchecked path=%s: the checkpoint holds no data fingerprint", loaded.path)
        return []
    diffs = fingerprint_difference(saved, here)
    old_path = (loaded.state.get("config") or {}).get("data", {}).get("path")
    if not diffs:
        if old_path != cfg.data.path:
            log.info(
                "resume.data_moved from=%s to=%s: the same files (fingerprint %s)",
                old_path,
                cfg.data.path,
                here["digest"][:12],
            )
        return []
    listed = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
    msg = f"the data under data.path={cfg.data.path} differs from the data {loaded.path} was trained on:\n  "
    if not cfg.resume.allow_config_change:
        raise StateError(
            msg + listed + "\nRestore those files, or pass resume.allow_config_change=true to train on the "
            "new data (recorded in the next checkpoint's manifest)."
        )
    log.warning("resume.data_change allowed by resume.allow_config_change: %s", "; ".join(diffs))
    return [f"data: {d}" for d in diffs]
