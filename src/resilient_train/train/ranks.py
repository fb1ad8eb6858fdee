"""The tokenizer under DDP, and the gradient exchange on the last micro-batch only.

``find_unused_parameters``: the generator pass leaves no parameter unused, but the discriminator
pass uses the discriminator only (as magvit2-pytorch's own trainer). It also keeps the bucket
layout fixed: DDP rebuilds buckets in gradient-ready order only when it is off, so a resumed
process reduces in the same order as the uninterrupted one. The gradient penalty's
``autograd.grad`` is taken with respect to the frames, never the parameters, so it does not
trigger DDP's hooks; its effect reaches the parameters through the normal backward of the
discriminator loss.
"""

from __future__ import annotations

import contextlib

import torch

from ..dist import Group

__all__ = ["wrap_ddp", "sync_on_last"]


def wrap_ddp(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """DDP around ``model`` with ranks (all ranks together, after any restore); the model itself without."""
    if not group.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True, forward_sync_buffers=False)


def sync_on_last(net: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP averages gradients on the last micro-batch only (``no_sync`` before it)."""
    if last or not hasattr(net, "no_sync"):
        return contextlib.nullcontext()
    return net.no_sync()
