"""Ranks: the process group from torchrun's environment, and the few collectives the trainer needs.

A run started by ``python train.py`` is one process (world size 1): :class:`Group` then answers
every collective locally and nothing imports ``torch.distributed``'s networking. Under
``torchrun`` (TorchElastic) the group is built from the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``, ``TORCHELASTIC_RESTART_COUNT``):

* the backend follows the device: gloo for CPU, ``cpu:gloo,cuda:nccl`` for one GPU per rank
  (objects and small flags go over gloo, gradients over NCCL), gloo for ranks that share one GPU
  (``trainer.device=cuda:N``: NCCL refuses two ranks on one device); it is recorded in every checkpoint;
* the store is scoped to the restart attempt. torchrun keeps one store for the whole job, so after
  it restarted a killed worker, a plain ``init_process_group("gloo")`` found the dead attempt's
  addresses there and failed ("Gloo connectFullMesh ... Connection refused") or hung; a
  ``PrefixStore`` named after ``TORCHELASTIC_RESTART_COUNT`` makes every attempt meet afresh;
* the timeout is short (``trainer.dist_timeout_secs``): a peer that died mid-collective ends in
  an error, torchrun restarts the group, and the run resumes; it never hangs for gloo's default
  30 minutes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

__all__ = ["Group", "from_env", "world_size_from_env", "rank_from_env"]

log = logging.getLogger(__name__)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


@dataclass
class Group:
    """This process's place in the run and the collectives it uses; world size 1 needs no network."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    restart: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` has it, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (``None`` elsewhere)."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (one tiny all-reduce)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}


def backend_for(device: torch.device, shared_gpu: bool = False) -> str:
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" and not shared_gpu else "gloo"


def from_env(device: torch.device, timeout_secs: float, *, shared_gpu: bool = False) -> Group:
    """The group this process belongs to: torchrun's environment, or world size 1 without it.

    ``device``: this rank's, already resolved (:func:`.device.resolve_device`); ``shared_gpu``: the
    ranks of this machine train on one GPU.
    """
    world = world_size_from_env()
    if world <= 1:
        return Group()
    rank, local = rank_from_env(), int(os.environ.get("LOCAL_RANK", "0"))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {missing} are not set; start ranks with torchrun")
    backend = backend_for(device, shared_gpu)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=float(timeout_secs))
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = torch.distributed.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    else:  # started by hand with the env variables: rank 0 hosts the store
        store = torch.distributed.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    store = torch.distributed.PrefixStore(f"resilient_train/attempt_{restart}", store)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    log.info(
        "dist.init rank=%d world_size=%d local_rank=%d backend=%s restart=%d timeout_secs=%g",
        rank,
        world,
        local,
        backend,
        restart,
        timeout_secs,
    )
    return Group(rank=rank, world_size=world, local_rank=local, backend=backend, restart=restart)
