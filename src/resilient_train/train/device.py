"""Which device this process trains on: ``trainer.device`` resolved against the machine.

``trainer.device`` is one of:

* ``auto`` (the default): this process's GPU when torch sees CUDA, else the CPU;
* ``cpu``;
* ``cuda``: this process's GPU, which is ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank);
* ``cuda:N``: GPU ``N`` for every rank of this machine (ranks then share it; their gradients go
  over gloo, since NCCL refuses two ranks on one GPU).

A device the machine lacks is a :class:`DeviceError` (a ``ValueError``: the CLI exits 2) raised at
start-up, before the data, the run lock or the model, whose message names ``trainer.device``,
says what the machine has, and gives the way out. Nothing here initialises CUDA on a machine
without it: ``torch.cuda.is_available()`` and ``torch.cuda.device_count()`` only ask the driver.
"""

from __future__ import annotations

import os

import torch

from ..config import DEVICE_SPEC

__all__ = ["DeviceError", "DEVICE_SPEC", "resolve_device", "describe_machine", "device_name", "shares_gpu", "indexed"]


class DeviceError(ValueError):
    """``trainer.device`` names a device this machine does not have; the message says what it has."""


def describe_machine() -> str:
    """One clause: what torch sees here (``no CUDA device (...)`` or ``1 CUDA device: cuda:0 NVIDIA H200``)."""
    if torch.version.cuda is None:
        return f"no CUDA device (torch {torch.__version__} is a CPU-only build)"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return (
            f"no CUDA device (torch {torch.__version__} was built for CUDA {torch.version.cuda}, but no GPU is "
            "visible: no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them)"
        )
    names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n))
    return f"{n} CUDA device{'s' if n > 1 else ''}: {names}"


def resolve_device(spec: str, *, local_rank: int | None = None, local_world_size: int | None = None) -> torch.device:
    """The device ``trainer.device=spec`` means for this process (``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``
    on this machine, from torchrun's environment unless given)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_world_size is None else local_world_size
    where = f"trainer.device={spec}"
    if not isinstance(spec, str) or DEVICE_SPEC.fullmatch(spec) is None:
        raise DeviceError(
            f"{where}: not a device; use auto (the default: the GPU when there is one), cpu, cuda or cuda:N"
        )
    if spec == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto" and n == 0:
        return torch.device("cpu")
    if n == 0:
        raise DeviceError(
            f"{where}: this machine has {describe_machine()}. Pass trainer.device=cpu to train on the CPU, or "
            "trainer.device=auto (the default) to take the GPU whenever there is one"
        )
    if spec in ("auto", "cuda"):
        if local_rank >= n:
            raise DeviceError(
                f"{where}: this is local rank {local_rank} of {local_world_size} on this machine, but it has "
                f"{describe_machine()}: one GPU per rank needs --nproc-per-node {n} at most. To let the ranks "
                "share one GPU (slower; gradients over gloo) pass trainer.device=cuda:0"
            )
        return torch.device("cuda", local_rank)
    index = int(spec.partition(":")[2])
    if index >= n:
        raise DeviceError(
            f"{where}: this machine has {describe_machine()}. Pass trainer.device=cuda:{n - 1} or lower, or "
            "trainer.device=cuda to take each rank's own GPU"
        )
    return torch.device("cuda", index)


def indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current device); any other device as it is."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shares_gpu(device: torch.device, spec: str) -> bool:
    """True when several ranks of this machine train on one GPU (an explicit ``cuda:N`` under torchrun)."""
    return device.type == "cuda" and spec.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1


def device_name(device: torch.device) -> str:
    """What the log's ``train.start`` line calls the device: the GPU's name, or the CPU's vector unit."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    return device.type
