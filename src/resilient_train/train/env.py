"""What determines the bits of a run on this machine: process settings, and the environment a checkpoint records.

:func:`configure_process` fixes the thread count and the deterministic kernels before anything
is built; :func:`capture_env` records what a resume must match (``ENV_KEYS``);
:func:`check_env` compares a checkpoint's environment with this process's and names every
difference, with the way out.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

import torch

from .. import DETERMINISM_ENV, __version__
from ..config import TrainerConfig
from .parts import StateError

__all__ = ["ENV_KEYS", "configure_process", "capture_env", "env_differences", "check_env", "package_versions"]

log = logging.getLogger(__name__)


#: Environment keys that must match between a checkpoint and the process resuming it. ``device`` is
#: the kind (``cpu``, ``cuda``), ``cuda_devices`` the number of CUDA generators each process saves
#: (1 on a GPU, 0 on the CPU).
ENV_KEYS = ("torch", "num_threads", "cpu_capability", "device", "cuda_devices", "machine", "determinism_env")


def capture_env(device: torch.device) -> dict[str, Any]:
    """What determines the bits of a run on this machine (call after the thread count is set)."""
    env = {
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device.type,
        "cuda_devices": int(device.type == "cuda"),
        "machine": platform.machine(),
        "determinism_env": {k: os.environ.get(k) for k in DETERMINISM_ENV},
    }
    if device.type == "cuda":
        env["cuda_name"] = torch.cuda.get_device_name(device)
    return env


def env_differences(saved: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """``key: saved -> here`` for every environment key that would change the bits."""
    return [f"{k}: {saved.get(k)!r} -> {here.get(k)!r}" for k in ENV_KEYS if saved.get(k) != here.get(k)]


def check_env(saved: Any, here: dict[str, Any], *, allow: bool) -> list[str]:
    """Refuse a checkpoint written where the bits would differ; with ``allow``, the changes to record."""
    diffs = env_differences(saved if isinstance(saved, dict) else {}, here)
    if not diffs:
        return []
    msg = "the environment differs from the checkpoint's, so the bits cannot match: " + "; ".join(diffs)
    was, now = (saved or {}).get("device") if isinstance(saved, dict) else None, here.get("device")
    if not allow and was != now:
        raise StateError(
            f"{msg}. The checkpoint was trained on {was} and this process would train on {now}: weights, "
            "optimizer state, counters and data position would load exactly, but the next steps would not be "
            f"bit-identical to a run that stayed on {was} (bitwise continuity holds on one kind of device). "
            f"Pass trainer.device={was} to continue bit-exactly, or resume.allow_config_change=true to continue "
            f"on {now} (recorded in the next checkpoint's manifest)."
        )
    if not allow:
        raise StateError(msg + ". Set resume.allow_config_change=true to continue anyway.")
    log.warning("resume.env_change %s (allowed by resume.allow_config_change)", msg)
    return [f"env.{d}" for d in diffs]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"resilient_train": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("magvit2-pytorch", "vector-quantize-pytorch", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def configure_process(t: TrainerConfig) -> None:
    """Process-wide settings the bits depend on: thread count and deterministic kernels.

    ``trainer.deterministic=false`` switches them off again (in a process that trained with them on)
    and lets cuDNN pick its fastest convolution per shape (``cudnn.benchmark``).
    """
    torch.set_num_threads(t.num_threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(t.deterministic)
    torch.backends.cudnn.benchmark = not t.deterministic
