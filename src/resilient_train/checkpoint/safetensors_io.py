"""Safetensors files without copies: the zero-copy writer and the hashed fast reader.

Writing never builds a file in memory: a file is its header followed by each tensor's own memory
(a zero-copy view of a contiguous CPU tensor), handed to ``os.writev`` (:func:`write_pieces`), and
its hash can be computed from that same memory, so nothing is copied, joined or read back.
Reading (:func:`read_tensors`) goes straight into one buffer per file, hashing as it reads; each
tensor is made over its bytes, in a storage of its own.

The files are plain safetensors, readable by ``safetensors.torch.load`` and by earlier versions of
this package. Tensors of a type outside :data:`_ST_DTYPES`, or a big-endian machine, send the whole
file through the safetensors library instead; a file the fast reader does not fully understand is
read the original way (:func:`load_safetensors`: whole file, safetensors library), which also
gives the original error messages. See ``benchmarks/hash_throughput.py`` (``make bench``) for the speed.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from .manifest import CheckpointError, refuse_pickle

__all__ = ["Payload", "safetensors_payload", "write_pieces", "load_safetensors", "read_tensors"]

# Element types the fast paths read and write themselves (safetensors codes); a tensor of any
# other type sends its whole file through the safetensors library instead.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_CODES = {code: dtype for dtype, code in _ST_DTYPES.items()}
_FAST = sys.byteorder == "little"  # safetensors is little-endian: raw tensor memory is the file's bytes
_CHUNK = 1 << 20  # read granularity: a chunk hashed right after it is read is still in the CPU cache
_IOV_MAX = 1024  # buffers per writev (Linux's IOV_MAX)
_MAX_IOV_BYTES = 1 << 30  # bytes per buffer (some systems refuse a writev of 2 GiB or more)
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


# ----------------------------------------------------------------------------------------------
# writing


@dataclass
class Payload:
    """One file of a checkpoint, as the pieces to write in order (never joined in memory)."""

    name: str
    pieces: list[Any]  # bytes-like: the header, then views of tensor memory
    size: int
    keep: list[Any] = field(default_factory=list)  # the tensors whose memory the views show


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def _tensor_for_library(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    t = _cpu_contiguous(t)
    # safetensors refuses tensors that share a storage (aliases, or views of one tensor): later ones get a copy.
    if t.numel():
        key = t.untyped_storage().data_ptr()
        if key in seen:
            t = t.clone()
        seen.add(key)
    return t


def _memory(t: torch.Tensor, nbytes: int) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them (``t`` must outlive the view)."""
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")


def safetensors_payload(name: str, tensors: dict[str, torch.Tensor]) -> Payload:
    """A safetensors file: 8-byte header length, JSON header padded to 8 bytes, then each tensor's memory."""
    flat = {}
    for k, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous() or t.is_neg():
            t = _cpu_contiguous(t).resolve_neg()
        flat[k] = t
    if not _FAST or any(t.dtype not in _ST_DTYPES for t in flat.values()):
        seen: set[int] = set()
        data = safetensors.torch.save({k: _tensor_for_library(t, seen) for k, t in flat.items()})
        return Payload(name, [data], len(data))
    # Widest elements first: every tensor then starts at a multiple of its element size.
    header: dict[str, Any] = {}
    pieces: list[Any] = []
    offset = 0
    for k in sorted(flat, key=lambda k: (-flat[k].element_size(), k)):
        t = flat[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        if n:
            pieces.append(_memory(t, n))
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    head = struct.pack("<Q", len(head)) + head
    return Payload(name, [head, *pieces], len(head) + offset, keep=list(flat.values()))


def write_pieces(fd: int, pieces: list[Any]) -> int:
    """Write the pieces to ``fd`` in order with as few syscalls as possible: the bytes written.

    A short write (``os.writev`` may write less than asked) resumes inside the piece it stopped in.
    """
    views = []
    for piece in pieces:
        view = memoryview(piece).cast("B")
        views += [view[o : o + _MAX_IOV_BYTES] for o in range(0, view.nbytes, _MAX_IOV_BYTES)]
    size = i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        if not n:
            raise OSError(f"writev wrote nothing to {fd}")
        size += n
        while n:  # skip what went out; after a short write, resume inside the piece it stopped in
            if n >= views[i].nbytes:
                n -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
    return size


# ----------------------------------------------------------------------------------------------
# reading


def load_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a whole file's bytes, through the safetensors library; :class:`CheckpointError` if invalid."""
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError on malformed headers
        refuse_pickle(data, path)  # a clearer message when it is a pickle
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


class _Truncated(Exception):
    """The file ended before the bytes its header (or size) promised."""


def _readinto_hashing(f: Any, view: memoryview, digest: Any) -> None:
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos : pos + _CHUNK])
        if not n:
            raise _Truncated
        digest.update(view[pos : pos + n])
        pos += n


def _read_exact(f: Any, n: int, digest: Any) -> bytes:
    buf = bytearray(n)
    _readinto_hashing(f, memoryview(buf), digest)
    return bytes(buf)


def _parse_header(raw: bytes, data_len: int) -> list[tuple[int, int, str, torch.dtype, list[int]]] | None:
    """The tensors of a safetensors header, ``(begin, end, name, dtype, shape)`` by offset, when it is one
    this module reads itself and describes exactly ``data_len`` bytes of data; ``None`` otherwise."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            if type(info) is not dict or not all(type(v) is str for v in info.values()):
                return None
            continue
        if type(info) is not dict or len(info) != 3:
            return None
        try:
            dtype, shape, (begin, end) = _ST_CODES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):  # a missing key, an unknown or unhashable dtype, not 2 offsets
            return None
        if type(shape) is not list or type(begin) is not int or type(end) is not int:
            return None
        if not all(type(d) is int and d >= 0 for d in shape) or not 0 <= begin <= end <= data_len:
            return None
        if end - begin != math.prod(shape) * dtype.itemsize:
            return None
        entries.append((begin, end, key, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    pos = 0
    for begin, end, *_ in entries:  # the data must be covered exactly, without gaps or overlaps
        if begin != pos:
            return None
        pos = end
    return entries if pos == data_len else None


def _tensors(data: np.ndarray, entries: list[tuple[int, int, str, torch.dtype, list[int]]]) -> dict[str, torch.Tensor]:
    """Each entry's tensor over its bytes of ``data`` (the file's data section), without a copy.

    Each tensor gets a storage of its own that starts at its first byte (``storage_offset() == 0``,
    exactly its bytes): some of torch's consumers read a storage from its start whatever the
    offset (``torch.set_rng_state`` and ``Generator.set_state`` do, measured on torch 2.14), so a
    slice of one big tensor would hand them a neighbour's bytes. A tensor not starting at a multiple
    of its element size (a file from another writer; this package's writer aligns every tensor) is
    copied instead.
    """
    out = {}
    for begin, end, key, dtype, shape in entries:
        if begin == end:
            out[key] = torch.empty(shape, dtype=dtype)
        elif begin % dtype.itemsize:
            out[key] = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin).clone()
            out[key] = out[key].view(dtype).view(shape)
        else:
            n = (end - begin) // dtype.itemsize
            out[key] = torch.frombuffer(data, dtype=dtype, count=n, offset=begin).view(shape)
    return out


def read_tensors(f: Any, size: int, digest: Any) -> dict[str, torch.Tensor] | None:
    """Read the safetensors file open (unbuffered) as ``f``, ``size`` bytes long, feeding every byte to
    ``digest`` (a hash object with ``update``, :mod:`.hashing`) as it goes.

    The data goes straight into one buffer allocated for the whole file (numpy backs a large one with
    huge pages, so it is page-faulted in a few hundred faults, not one per 4 KiB), and each tensor
    is made over its bytes (:func:`_tensors`): nothing is copied after the read, and the buffer lives
    as long as any of the file's tensors does.

    ``None`` when the file is not one this reader handles, is shorter or longer than ``size``, or
    this machine is big-endian: the caller then reads the file the original way
    (:func:`load_safetensors`, with a fresh hash), which also produces the original error messages
    for damaged files.
    """
    if not _FAST or size < 8:
        return None
    try:
        head = _read_exact(f, 8, digest)
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            return None
        entries = _parse_header(_read_exact(f, n, digest), size - 8 - n)
        if entries is None:
            return None
        data = np.empty(size - 8 - n, dtype=np.uint8)
        _readinto_hashing(f, memoryview(data), digest)
    except _Truncated:
        return None
    if f.read(1):  # the file grew while being read
        return None
    return _tensors(data, entries)
