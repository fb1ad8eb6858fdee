"""Capture and restore every random number generator that can change the bits of a run.

Python ``random``, NumPy's global generator, torch CPU and every visible CUDA device. Unlike
Composer's reproducibility helpers, a mismatch is an error, never a warning: a resumed run that
silently draws different numbers is exactly the failure this project exists to rule out.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState", "seed_everything", "rank_seed", "RNGRestoreError"]

log = logging.getLogger(__name__)


class RNGRestoreError(RuntimeError):
    """The saved RNG state cannot be restored exactly on this machine."""


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed of its own for each rank's random stream (and, after a world-size change, each step)."""
    return int(np.random.SeedSequence([int(seed) % 2**64, 0x5A4B, int(rank), int(step)]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


class RNGState:
    """A ``Stateful`` view of the process-global generators.

    ``cuda_devices``: the CUDA devices whose generators belong to this process; ``None`` means every
    visible one (one process), a rank on a GPU passes its own device only.
    """

    def __init__(self, cuda_devices: list[int] | None = None) -> None:
        self.cuda_devices = cuda_devices

    def _devices(self) -> list[int]:
        if not torch.cuda.is_available():
            return []
        return list(range(torch.cuda.device_count())) if self.cuda_devices is None else list(self.cuda_devices)

    def state_dict(self) -> dict[str, Any]:
        version, mt, gauss = random.getstate()
        np_state = np.random.get_state(legacy=False)
        state: dict[str, Any] = {
            "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {
                "bit_generator": np_state["bit_generator"],
                "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                "pos": int(np_state["state"]["pos"]),
                "has_gauss": int(np_state["has_gauss"]),
                "gauss": float(np_state["gauss"]),
            },
            "torch": torch.get_rng_state(),
            "cuda": [],
        }
        state["cuda"] = [torch.cuda.get_rng_state(d).cpu() for d in self._devices()]
        return state

    def check(self, state: Any) -> None:
        """Raise :class:`RNGRestoreError` unless ``state`` can be restored exactly here (nothing is applied)."""
        if not isinstance(state, dict):
            raise RNGRestoreError(f"checkpoint RNG state is a {type(state).__name__}, not a mapping")
        missing = [k for k in ("python", "numpy", "torch", "cuda") if k not in state]
        if missing:
            raise RNGRestoreError(f"checkpoint RNG state lacks {missing}; cannot resume bit-exactly")
        n_saved = len(state["cuda"])
        n_here = len(self._devices())
        if n_saved != n_here:
            raise RNGRestoreError(
                f"checkpoint holds RNG state for {n_saved} CUDA device(s) but {n_here} are visible here; "
                "resume on a machine with the same devices (or set CUDA_VISIBLE_DEVICES to match)"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check(state)
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        np_ = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": np_["bit_generator"],
                "state": {"key": np_["key"].numpy().astype(np.uint32), "pos": int(np_["pos"])},
                "has_gauss": int(np_["has_gauss"]),
                "gauss": float(np_["gauss"]),
            }
        )
        torch.set_rng_state(state["torch"].to(torch.uint8))
        for device, s in zip(self._devices(), state["cuda"]):
            torch.cuda.set_rng_state(s.to(torch.uint8), device)
