"""On-disk format of one checkpoint directory, and safe, verified loading.

A checkpoint is a directory holding:

* ``<group>.safetensors`` for each flat tensor group named by the caller (e.g. ``model``, ``ema``),
* ``state.safetensors`` with every other tensor, and ``state.json`` with the rest of the state
  (nested dicts, lists, tuples, numbers, strings) where tensors are referenced by key,
* ``manifest.json``, written last: each file's size and SHA-256, plus the caller's metadata.

Nothing here ever unpickles: tensors are read with safetensors, everything else with ``json``.
A file that is not what its name says (a pickle planted as ``state.safetensors``, say) fails to
parse and is refused before any of its content is interpreted.

Speed (see ``scripts/bench.py``): saving never builds a file in memory. A safetensors file is
written with ``writev`` as its header followed by each tensor's own memory (a zero-copy view of a
contiguous CPU tensor), and its SHA-256 is computed from that same memory on another thread, so
nothing is copied, joined or read back; the files are written, hashed and fsync'd concurrently
(``os.writev``, ``os.fsync``, ``readinto`` and SHA-256 all release the GIL). Loading reads each
tensor straight into its own buffer, hashing as it reads, a few files at a time. The files are
plain safetensors, readable by ``safetensors.torch.load`` and by earlier versions of this module;
a file the fast path does not fully understand is read the original way (whole file, hash,
safetensors library), which also gives the original error messages.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "CheckpointError",
    "encode_state",
    "decode_state",
    "read_manifest",
    "load_checkpoint",
    "iter_files",
    "plan_files",
    "FileWriter",
    "verify_files",
    "VerifyReport",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or unsafe; the message names the file."""


# ----------------------------------------------------------------------------------------------
# encoding: nested state <-> (tensors, JSON skeleton)


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
_SMALL = 1 << 16  # tensors smaller than this are read together with their neighbours
_IOV_MAX = 1024  # buffers per writev (Linux's IOV_MAX)
_MAX_IOV_BYTES = 1 << 30  # bytes per buffer (some systems refuse a writev of 2 GiB or more)
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header
#: Threads that write (or read and hash) the files of one checkpoint at once.
IO_THREADS = max(2, min(4, os.cpu_count() or 2))


def _tensor_for_file(t: torch.Tensor, seen: dict[tuple[int, int, tuple], str]) -> torch.Tensor:
    t = _cpu_contiguous(t)
    # safetensors refuses tensors that share memory; give later aliases their own copy.
    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
    if t.numel() and key in seen:
        t = t.clone()
    elif t.numel():
        seen[key] = ""
    return t


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"state key {k!r} at {path or '/'} must be str or int")
            items.append([k, _encode(v, f"{path}/{k}", tensors)])
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    raise TypeError(
        f"cannot store {type(obj).__name__} at {path or '/'} in a checkpoint (tensors, numbers, "
        "strings, lists, tuples and dicts only)"
    )


@dataclass
class Payload:
    """One file of a checkpoint, as the pieces to write in order (never joined in memory)."""

    name: str
    pieces: list[Any]  # bytes-like: the header, then views of tensor memory
    size: int
    keep: list[Any] = field(default_factory=list)  # the tensors whose memory the views show


def _memory(t: torch.Tensor, nbytes: int) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them (``t`` must outlive the view)."""
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")


def _safetensors_payload(name: str, tensors: dict[str, torch.Tensor]) -> Payload:
    """A safetensors file: 8-byte header length, JSON header padded to 8 bytes, then each tensor's memory."""
    flat = {}
    for k, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous() or t.is_neg():
            t = _cpu_contiguous(t).resolve_neg()
        flat[k] = t
    if not _FAST or any(t.dtype not in _ST_DTYPES for t in flat.values()):
        seen: dict = {}
        data = safetensors.torch.save({k: _tensor_for_file(t, seen) for k, t in flat.items()})
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


def iter_files(state: dict[str, Any], tensor_groups: tuple[str, ...]) -> Iterator[Payload]:
    """The files of a checkpoint of ``state`` (manifest excluded), ready to write; nothing is copied.

    Built one at a time, so that writing can start before the last one is planned: ``state.json``
    (the smallest) first, then ``state.safetensors``, then one file per tensor group.
    """
    groups: list[tuple[str, dict[str, torch.Tensor]]] = []
    rest: dict[str, Any] = {}
    for name, value in state.items():
        if name in tensor_groups and value is not None:
            if not all(isinstance(v, torch.Tensor) for v in value.values()):
                raise TypeError(f"tensor group {name!r} must map names to tensors")
            groups.append((name, value))
        else:
            rest[name] = value
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(rest, "", tensors)
    text = json.dumps(skeleton, sort_keys=True).encode()
    yield Payload(STATE_JSON, [text], len(text))
    yield _safetensors_payload(STATE_TENSORS, tensors)
    for name, value in groups:
        yield _safetensors_payload(f"{name}.safetensors", value)


def plan_files(state: dict[str, Any], tensor_groups: tuple[str, ...]) -> list[Payload]:
    """All of :func:`iter_files` at once."""
    return list(iter_files(state, tensor_groups))


def encode_state(state: dict[str, Any], tensor_groups: tuple[str, ...]) -> dict[str, bytes]:
    """Serialise ``state`` to ``{filename: bytes}`` (manifest excluded)."""
    return {p.name: b"".join(p.pieces) for p in plan_files(state, tensor_groups)}


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # a new file, never an old one reused


def _write_pieces(fd: int, pieces: list[Any]) -> int:
    """Write the pieces with as few syscalls as possible: the bytes written."""
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


def _fsync_close(fd: int, size: int) -> int:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _write_file(path: Path, pieces: list[Any]) -> int:
    fd = _create(path)
    try:
        size = _write_pieces(fd, pieces)
    except BaseException:
        os.close(fd)
        raise
    return _fsync_close(fd, size)


def _hash_pieces(pieces: list[Any]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)  # releases the GIL for all but tiny pieces
    return digest.hexdigest()


class FileWriter:
    """Writes the files of one checkpoint directory concurrently; :meth:`entries` waits for them all.

    A file's SHA-256 is computed from the same memory its bytes are written from (nothing changes
    that memory during a save: a sync save blocks training, an async one writes a snapshot), so
    writing and hashing are independent jobs: each file is written and fsync'd on a thread of its
    own (so the disk starts early and the fsyncs overlap) while ``IO_THREADS`` threads hash. The
    result is the same as writing, hashing and fsyncing the files one after the other.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._writers = ThreadPoolExecutor(8, thread_name_prefix="ckpt-write")
        self._hashers = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="ckpt-hash")
        self._jobs: list[tuple[Payload, Future, Future]] = []

    def write_now(self, payload: Payload) -> None:
        """Create and write the file before returning (its fsync and hash still run in the background)."""
        fd = _create(self.directory / payload.name)
        try:
            size = _write_pieces(fd, payload.pieces)
        except BaseException:
            os.close(fd)
            raise
        self._start(payload, self._writers.submit(_fsync_close, fd, size))

    def write(self, payload: Payload) -> None:
        """Start writing, fsyncing and hashing the file; returns at once."""
        self._start(payload, self._writers.submit(_write_file, self.directory / payload.name, payload.pieces))

    def _start(self, payload: Payload, written: Future) -> None:
        self._jobs.append((payload, written, self._hashers.submit(_hash_pieces, payload.pieces)))

    def entries(self) -> dict[str, dict[str, Any]]:
        """Wait until every file is written, fsync'd and hashed: their manifest entries ``{"size", "sha256"}``."""
        out = {}
        for payload, written, hashed in self._jobs:
            size = written.result()
            if size != payload.size:
                raise CheckpointError(f"{self.directory / payload.name}: wrote {size} bytes, expected {payload.size}")
            out[payload.name] = {"size": size, "sha256": hashed.result()}
        return out

    def close(self) -> None:
        """Wait for every job (also after a failure, so that nothing is still writing when the caller goes on)."""
        self._writers.shutdown(wait=True)
        self._hashers.shutdown(wait=True)

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"{where}: refers to tensor {key!r}, which {STATE_TENSORS} does not hold")
            return tensors[key]
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors, where) for k, v in obj["__dict__"]}
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    return obj


def decode_state(blobs: dict[str, bytes], where: Path) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name, data in blobs.items():
        if name.endswith(".safetensors") and name != STATE_TENSORS:
            state[name[: -len(".safetensors")]] = _load_safetensors(data, where / name)
    tensors = _load_safetensors(blobs[STATE_TENSORS], where / STATE_TENSORS)
    skeleton = _load_json(blobs[STATE_JSON], where / STATE_JSON)
    state.update(_decode(skeleton, tensors, str(where / STATE_JSON)))
    return state


def _refuse_pickle(data: bytes, path: Path) -> None:
    if data[:2] in _PICKLE_MAGIC or data[:4] in _PICKLE_MAGIC:
        raise CheckpointError(
            f"{path}: holds a Python pickle (or a torch.save zip), not the expected format; refusing to "
            "unpickle it, since unpickling can run arbitrary code"
        )


def _load_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError on malformed headers
        _refuse_pickle(data, path)  # a clearer message when it is a pickle
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def _load_json(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _refuse_pickle(data, path)
        raise CheckpointError(f"{path}: malformed JSON ({exc})") from None


# ----------------------------------------------------------------------------------------------
# manifest and verification


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(ckpt: Path) -> dict[str, Any]:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt}")
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete and cannot be trusted")
    manifest = _load_json(path.read_bytes(), path)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: malformed (expected a JSON object)")
    for key in ("format_version", "step", "files"):
        if key not in manifest:
            raise CheckpointError(f"{path}: malformed, lacks {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {manifest['format_version']} is not supported (this code reads {FORMAT_VERSION})"
        )
    files = manifest["files"]
    if not isinstance(files, dict) or STATE_JSON not in files or STATE_TENSORS not in files:
        raise CheckpointError(f"{path}: malformed, 'files' must list {STATE_JSON} and {STATE_TENSORS}")
    for name, entry in files.items():
        if "/" in name or name.startswith(".") or not isinstance(entry, dict) or {"size", "sha256"} - set(entry):
            raise CheckpointError(f"{path}: malformed entry for {name!r}")
        if not name.endswith((".safetensors", ".json")):
            raise CheckpointError(f"{path}: lists {name!r}, a file type this loader refuses to read")
    return manifest


def _size_error(path: Path, size: int, entry: dict[str, Any]) -> CheckpointError:
    return CheckpointError(f"{path}: size {size} bytes, manifest says {entry['size']} (truncated or altered)")


def _hash_error(path: Path, digest: str, entry: dict[str, Any]) -> CheckpointError:
    return CheckpointError(f"{path}: SHA-256 mismatch (file {digest[:12]}…, manifest {entry['sha256'][:12]}…)")


def _read_checked(ckpt: Path, name: str, entry: dict[str, Any]) -> bytes:
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
    data = path.read_bytes()
    if len(data) != entry["size"]:
        raise _size_error(path, len(data), entry)
    digest = sha256_bytes(data)
    if digest != entry["sha256"]:
        raise _hash_error(path, digest, entry)
    return data


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
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                return None
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            return None
        dtype = _ST_CODES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offsets = info["shape"], info["data_offsets"]
        if dtype is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return None
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            return None
        begin, end = offsets
        if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * dtype.itemsize:
            return None
        entries.append((begin, end, key, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    pos = 0
    for begin, end, *_ in entries:  # the data must be covered exactly, without gaps or overlaps
        if begin != pos:
            return None
        pos = end
    return entries if pos == data_len else None


def _as_tensor(buf: np.ndarray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not buf.size:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(buf).view(dtype).reshape(shape)


def _read_tensors(f: Any, size: int, digest: Any) -> dict[str, torch.Tensor] | None:
    """Read a safetensors file straight into one buffer per tensor, hashing as it reads.

    ``None`` when the header is not one this reader handles (the caller then reads the file the
    original way, which also produces the original error messages for damaged files).
    """
    if size < 8:
        return None
    head = _read_exact(f, 8, digest)
    n = int.from_bytes(head, "little")
    if n > min(size - 8, _MAX_HEADER):
        return None
    entries = _parse_header(_read_exact(f, n, digest), size - 8 - n)
    if entries is None:
        return None
    tensors: dict[str, torch.Tensor] = {}
    i = 0
    while i < len(entries):
        begin, end, key, dtype, shape = entries[i]
        if end - begin >= _SMALL:
            buf = np.empty(end - begin, dtype=np.uint8)
            _readinto_hashing(f, memoryview(buf), digest)
            tensors[key] = _as_tensor(buf, dtype, shape)
            i += 1
            continue
        j = i  # a run of small tensors: one read, then each gets its own copy
        while j < len(entries) and entries[j][1] - entries[j][0] < _SMALL and entries[j][1] - begin <= _CHUNK:
            j += 1
        stop = entries[j - 1][1]
        run = np.empty(stop - begin, dtype=np.uint8)
        _readinto_hashing(f, memoryview(run), digest)
        for b, e, k, dt, sh in entries[i:j]:
            tensors[k] = _as_tensor(run[b - begin : e - begin].copy(), dt, sh)
        i = j
    return tensors


class _ParseError(CheckpointError):
    """The file is intact (size and hash as listed) but not what its name says."""


def _load_file(ckpt: Path, name: str, entry: dict[str, Any]) -> Any:
    """One listed file, its size and hash checked: tensors for ``.safetensors``, bytes otherwise."""
    path = ckpt / name
    if not name.endswith(".safetensors") or not _FAST:
        return _read_checked(ckpt, name, entry)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size != entry["size"]:
            raise _size_error(path, size, entry)
        try:
            tensors = _read_tensors(f, size, digest)
            if tensors is not None and f.read(1):
                raise _Truncated  # the file grew while being read
        except _Truncated:
            tensors = None
    if tensors is None:
        data = _read_checked(ckpt, name, entry)  # hash first, then the safetensors library (and pickle check)
        try:
            return _load_safetensors(data, path)
        except CheckpointError as exc:
            raise _ParseError(str(exc)) from None
    if digest.hexdigest() != entry["sha256"]:
        raise _hash_error(path, digest.hexdigest(), entry)
    return tensors


def _load_verified(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """``(state, manifest, bytes)``: every listed file read on a few threads, checked, then decoded."""
    manifest = read_manifest(ckpt)
    files = manifest["files"]
    by_size = sorted(files, key=lambda n: -files[n]["size"] if isinstance(files[n]["size"], int) else 0)
    results: dict[str, Any] = {}

    def load(name: str) -> None:
        try:
            results[name] = _load_file(ckpt, name, files[name])
        except CheckpointError as exc:
            results[name] = exc

    with ThreadPoolExecutor(min(len(by_size), IO_THREADS), thread_name_prefix="ckpt-read") as pool:
        for f in [pool.submit(load, n) for n in by_size]:
            f.result()
    # As when the files were read one by one in manifest order: integrity failures first, then content.
    errors = [results[n] for n in files if isinstance(results[n], CheckpointError)]
    if errors:
        raise next((e for e in errors if not isinstance(e, _ParseError)), errors[0])
    state: dict[str, Any] = {}
    for name in files:
        if name.endswith(".safetensors") and name != STATE_TENSORS:
            state[name[: -len(".safetensors")]] = results[name]
    skeleton = _load_json(results[STATE_JSON], ckpt / STATE_JSON)
    state.update(_decode(skeleton, results[STATE_TENSORS], str(ckpt / STATE_JSON)))
    return state, manifest, sum(e["size"] for e in files.values())


@dataclass
class VerifyReport:
    path: Path
    ok: bool
    step: int | None = None
    errors: list[str] = field(default_factory=list)
    bytes: int = 0


def verify_files(ckpt: Path) -> VerifyReport:
    """Manifest, presence, sizes, hashes and safe parsing of every file; never raises."""
    ckpt = Path(ckpt)
    report = VerifyReport(path=ckpt, ok=False)
    try:
        manifest = read_manifest(ckpt)
        report.step = manifest["step"]
        _, _, report.bytes = _load_verified(ckpt)
        report.ok = True
    except (CheckpointError, FileNotFoundError) as exc:
        report.errors.append(str(exc))
    return report


def load_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read, hash-check and decode a checkpoint: ``(state, manifest)``. Raises :class:`CheckpointError`."""
    state, manifest, _ = _load_verified(Path(ckpt))
    return state, manifest


def file_entries(files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {name: {"size": len(data), "sha256": sha256_bytes(data)} for name, data in files.items()}


def manifest_bytes(step: int, files: dict[str, bytes], metadata: dict[str, Any]) -> bytes:
    return manifest_from_entries(step, file_entries(files), metadata)


def manifest_from_entries(step: int, entries: dict[str, dict[str, Any]], metadata: dict[str, Any]) -> bytes:
    """The manifest: format version, step, the caller's metadata and each file's ``{"size", "sha256"}``."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        **metadata,
        "files": dict(sorted(entries.items())),
        "pid": os.getpid(),
    }
    return json.dumps(manifest, indent=1, sort_keys=True).encode()
