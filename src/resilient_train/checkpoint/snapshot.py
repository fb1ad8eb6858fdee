"""CPU copies of a state for an async save: :class:`Snapshot`, into buffers kept from the previous one.

The checkpoint manager takes a snapshot before it hands a save to its background thread, so that
training may change the original tensors at once; the copies go into buffers reused between saves
(:func:`_cpu_buffer` makes a new one when a shape or dtype changed), pinned for GPU tensors.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

__all__ = ["Snapshot"]


class Snapshot:
    """CPU copies of a state's tensors for an async save, into buffers reused from the previous snapshot.

    Reuse is safe because a snapshot is only taken after the previous save has finished (``save``
    calls ``wait`` first), so nothing reads the old copies any more. Two costs are avoided: a fresh
    allocation pays a page fault on every page (and, with deterministic algorithms on, a NaN fill),
    and torch's multi-threaded ``copy_`` hands every tensor to its thread pool, which on a busy
    machine waits a scheduler tick per tensor. Contiguous CPU tensors are copied with one plain
    ``memmove`` each instead (it releases the GIL). GPU tensors are copied into page-locked buffers
    without waiting for each copy, then once for all of them.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._from_gpu = False

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def copy(self, state: Any) -> Any:
        old, self._buffers, self._from_gpu = self._buffers, [], False
        out = self._copy(state, old)
        if self._from_gpu:
            torch.cuda.synchronize()  # every copy has landed before the writer thread reads a buffer
        return out

    def _copy(self, obj: Any, old: list[torch.Tensor]) -> Any:
        if isinstance(obj, torch.Tensor):
            i = len(self._buffers)
            buf = old[i] if i < len(old) else None
            if buf is None or buf.dtype != obj.dtype or buf.shape != obj.shape:
                buf = _cpu_buffer(obj)
            if obj.is_cpu and obj.is_contiguous() and not (obj.is_conj() or obj.is_neg()):
                ctypes.memmove(buf.data_ptr(), obj.data_ptr(), buf.nbytes)
            elif obj.is_cuda:
                buf.copy_(obj.detach(), non_blocking=buf.is_pinned())
                self._from_gpu = True
            else:
                buf.copy_(obj.detach())
            self._buffers.append(buf)
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v, old) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._copy(v, old) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, old) for v in obj)
        return obj


def _cpu_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor shaped like ``like`` (never NaN-filled: it is overwritten)."""
    nbytes = like.numel() * like.element_size()
    if like.device.type == "cuda":  # page-locked: the copy from the GPU need not wait
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=True)
    if like.device.type != "cpu" or not nbytes:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu")
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(like.dtype).reshape(like.shape)
