"""The files of one checkpoint folder: writing them concurrently, and reading them back verified.

Saving: :func:`iter_files` turns a state into the files to write (:mod:`.tree` splits it,
:mod:`.safetensors_io` lays out each safetensors file without copying), and :class:`FileWriter`
writes, hashes and fsyncs them concurrently (``os.writev``, ``os.fsync`` and ``readinto`` release
the GIL; the XXH3 hash, :mod:`.hashing`, does not, but takes little of it); the manager then writes
the manifest (:mod:`.manifest`).

Loading: :func:`load_checkpoint` reads every file the manifest lists once, a few at a time,
checking its size and hash as it reads, then decodes the state; :func:`verify_files` does the
same and reports instead of raising. Every full read goes through one function, which logs
``ckpt.read path=... bytes=... secs=...`` once when it succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import hashing, tree
from .layout import committed
from .manifest import (
    MANIFEST,
    MAX_JSON_BYTES,
    RANKS_DIR,
    STATE_JSON,
    STATE_TENSORS,
    CheckpointError,
    NewerFormatError,
    load_json,
    rank_of,
    read_json_file,
    read_manifest,
)
from .safetensors_io import Payload, load_safetensors, read_tensors, safetensors_payload, write_pieces

__all__ = [
    "IO_THREADS",
    "iter_files",
    "rank_files",
    "FileWriter",
    "Loaded",
    "load_checkpoint",
    "VerifyReport",
    "verify_files",
    "verify_content",
    "newest_valid",
]

log = logging.getLogger(__name__)

#: Threads that write (or read and hash) the files of one checkpoint at once.
IO_THREADS = max(2, min(4, os.cpu_count() or 2))


# ----------------------------------------------------------------------------------------------
# writing


def iter_files(state: dict[str, Any], tensor_groups: tuple[str, ...]) -> Iterator[Payload]:
    """The files of a checkpoint of ``state`` (manifest excluded), ready to write; nothing is copied.

    Built one at a time, so that writing can start before the last one is planned: one file per tensor
    group first (each needs no more than its own header, so the disk starts within a millisecond or
    two), then ``state.json`` and ``state.safetensors``, whose nested state takes longest to encode.
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
    for name, value in groups:
        yield safetensors_payload(f"{name}.safetensors", value)
    yield from _state_files(rest, "")


def rank_files(rank_state: dict[str, Any], rank: int) -> Iterator[Payload]:
    """The files of the state rank ``rank`` owns: ``ranks/<rank>/state.json`` then ``state.safetensors``."""
    yield from _state_files(rank_state, f"{RANKS_DIR}/{int(rank)}/")


def _state_files(state: dict[str, Any], prefix: str) -> Iterator[Payload]:
    skeleton, tensors = tree.encode(state)
    text = json.dumps(skeleton, sort_keys=True).encode()
    yield Payload(prefix + STATE_JSON, [text], len(text))
    yield safetensors_payload(prefix + STATE_TENSORS, tensors)


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # a new file, never an old one reused


def _write_new(path: Path, pieces: list[Any]) -> tuple[int, int]:
    """``(fd, size)``: ``path`` created and written; the descriptor is closed if writing fails."""
    fd = _create(path)
    try:
        return fd, write_pieces(fd, pieces)
    except BaseException:
        os.close(fd)
        raise


def _fsync_close(fd: int, size: int) -> int:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _write_file(path: Path, pieces: list[Any]) -> int:
    return _fsync_close(*_write_new(path, pieces))


def _hash_pieces(pieces: list[Any]) -> str:
    """The manifest's ``"hash"`` value of the file made of ``pieces``."""
    digest = hashing.new()
    for piece in pieces:
        digest.update(piece)  # XXH3 holds the GIL while it runs (see .hashing); the writes beside it do not
    return hashing.entry_value(hashing.ALGORITHM, digest.hexdigest())


class FileWriter:
    """Writes the files of one checkpoint directory concurrently; :meth:`entries` waits for them all.

    A file's hash is computed from the same memory its bytes are written from (nothing changes
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
        fd, size = _write_new(self.directory / payload.name, payload.pieces)
        self._start(payload, self._writers.submit(_fsync_close, fd, size))

    def write(self, payload: Payload) -> None:
        """Start writing, fsyncing and hashing the file; returns at once."""
        self._start(payload, self._writers.submit(_write_file, self.directory / payload.name, payload.pieces))

    def _start(self, payload: Payload, written: Future) -> None:
        self._jobs.append((payload, written, self._hashers.submit(_hash_pieces, payload.pieces)))

    def entries(self) -> dict[str, dict[str, Any]]:
        """Wait until every file is written, fsync'd and hashed: their manifest entries ``{"size", "hash"}``."""
        out = {}
        for payload, written, hashed in self._jobs:
            size = written.result()
            if size != payload.size:
                raise CheckpointError(f"{self.directory / payload.name}: wrote {size} bytes, expected {payload.size}")
            out[payload.name] = {"size": size, "hash": hashed.result()}
        return out

    def close(self) -> None:
        """Wait for every job (also after a failure, so that nothing is still writing when the caller goes on)."""
        self._writers.shutdown(wait=True)
        self._hashers.shutdown(wait=True)

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class Loaded:
    """A checkpoint read in full: every listed file's size and hash checked, the state decoded."""

    path: Path
    manifest: dict[str, Any]
    state: dict[str, Any]
    nbytes: int  # bytes read and hashed (the listed files; the manifest aside)

    @property
    def step(self) -> int:
        return self.manifest["step"]


class _ParseError(CheckpointError):
    """The file is intact (size and hash as listed) but not what its name says."""


def _read_checked(path: Path, entry: dict[str, Any]) -> bytes:
    """The whole file, its size checked against the manifest before it is read (JSON: and capped)."""
    if path.name.endswith(".json"):
        data = read_json_file(path, MAX_JSON_BYTES, entry["size"])
    else:
        _check_size(path, path.stat().st_size, entry)
        data = path.read_bytes()
        _check_size(path, len(data), entry)
    digest = hashing.new(hashing.parse_entry(entry)[0])
    digest.update(data)
    _check_hash(path, digest, entry)
    return data


def _check_size(path: Path, size: int, entry: dict[str, Any]) -> None:
    if size != entry["size"]:
        raise CheckpointError(f"{path}: size {size} bytes, manifest says {entry['size']} (truncated or altered)")


def _check_hash(path: Path, digest: Any, entry: dict[str, Any]) -> None:
    """``digest``: the hash object (of the entry's algorithm) that has seen every byte of the file."""
    algorithm, listed = hashing.parse_entry(entry)
    got = digest.hexdigest()
    if got != listed:
        name = hashing.label(algorithm)
        raise CheckpointError(f"{path}: {name} mismatch (file {got[:12]}…, manifest {listed[:12]}…)")


def _load_file(ckpt: Path, name: str, entry: dict[str, Any]) -> Any:
    """One listed file, its size and hash checked: tensors for ``.safetensors``, bytes otherwise."""
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
    if not name.endswith(".safetensors"):
        return _read_checked(path, entry)
    digest = hashing.new(hashing.parse_entry(entry)[0])
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        _check_size(path, size, entry)
        tensors = read_tensors(f, size, digest)
    if tensors is None:  # not for the fast path: hash first, then the safetensors library (and pickle check)
        data = _read_checked(path, entry)
        try:
            return load_safetensors(data, path)
        except CheckpointError as exc:
            raise _ParseError(str(exc)) from None
    _check_hash(path, digest, entry)
    return tensors


def _decode_state(ckpt: Path, prefix: str, results: dict[str, Any]) -> dict[str, Any]:
    where = ckpt / (prefix + STATE_JSON)
    state = tree.decode(load_json(results[prefix + STATE_JSON], where), results[prefix + STATE_TENSORS], str(where))
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: malformed state (expected a JSON object)")
    return state


def _read(ckpt: Path, manifest: dict[str, Any], rank: int | None = None) -> Loaded:
    """The one full read: every listed file (or, with ``rank``, the shared files and that rank's own)
    read once on a few threads, checked, then decoded; per-rank states land in ``state["ranks"]``."""
    start = time.perf_counter()
    files = manifest["files"]
    if rank is not None:
        files = {n: e for n, e in files.items() if rank_of(n) in (None, rank)}
    results: dict[str, Any] = {}

    def load(name: str) -> None:
        try:
            results[name] = _load_file(ckpt, name, files[name])
        except CheckpointError as exc:
            results[name] = exc
        except OSError as exc:  # unreadable (permissions, an I/O error): as damaged, naming the file
            results[name] = CheckpointError(f"{ckpt / name}: cannot be read: {exc}")

    with ThreadPoolExecutor(min(len(files), IO_THREADS), thread_name_prefix="ckpt-read") as pool:
        for f in [pool.submit(load, n) for n in sorted(files, key=lambda n: -files[n]["size"])]:
            f.result()
    # As when the files were read one by one in manifest order: integrity failures first, then content.
    errors = [results[n] for n in files if isinstance(results[n], CheckpointError)]
    if errors:
        raise next((e for e in errors if not isinstance(e, _ParseError)), errors[0])
    state: dict[str, Any] = {}
    for name in files:
        if name.endswith(".safetensors") and name != STATE_TENSORS and rank_of(name) is None:
            state[name[: -len(".safetensors")]] = results[name]
    state.update(_decode_state(ckpt, "", results))
    owners = sorted({r for n in files if (r := rank_of(n)) is not None})
    if owners:
        if not isinstance(state.get("ranks", {}), dict):
            raise CheckpointError(f"{ckpt / STATE_JSON}: 'ranks' is not a mapping")
        ranks = state.setdefault("ranks", {})
        for r in owners:
            ranks[str(r)] = _decode_state(ckpt, f"{RANKS_DIR}/{r}/", results)
    loaded = Loaded(path=ckpt, manifest=manifest, state=state, nbytes=sum(e["size"] for e in files.values()))
    log.info("ckpt.read path=%s bytes=%d secs=%.3f", ckpt, loaded.nbytes, time.perf_counter() - start)
    return loaded


def load_checkpoint(ckpt: Path, *, rank: int | None = None) -> Loaded:
    """Read, hash-check and decode a checkpoint (with ``rank``: the shared files and that rank's own only).

    Raises :class:`CheckpointError` (``FileNotFoundError`` when there is no such folder).
    """
    ckpt = Path(ckpt)
    return _read(ckpt, read_manifest(ckpt), rank)


@dataclass
class VerifyReport:
    path: Path
    ok: bool
    step: int | None = None
    errors: list[str] = field(default_factory=list)
    bytes: int = 0
    loaded: Loaded | None = field(default=None, repr=False)  # the checkpoint as read, when ok
    newer: bool = False  # written in a newer format version: not damage, never set aside


def verify_files(ckpt: Path) -> VerifyReport:
    """Manifest, presence, sizes, hashes and safe parsing of every file; never raises.

    When it passes, ``loaded`` holds what was read, so a caller need not read the files again.
    """
    ckpt = Path(ckpt)
    report = VerifyReport(path=ckpt, ok=False)
    try:
        manifest = read_manifest(ckpt)
        report.step = manifest["step"]
        report.loaded = _read(ckpt, manifest)
        report.bytes = report.loaded.nbytes
        report.ok = True
    except NewerFormatError as exc:
        report.errors.append(str(exc))
        report.newer = True
    except (CheckpointError, FileNotFoundError) as exc:
        report.errors.append(str(exc))
    except OSError as exc:  # a folder or file that cannot be read at all (permissions, I/O error)
        report.errors.append(f"{ckpt}: cannot be read: {exc}")
    return report


def verify_content(ckpt: Path, check: Callable[[Loaded], list[str]] | None = None) -> tuple[Loaded | None, list[str]]:
    """:func:`verify_files`, then ``check`` (which lists a loaded checkpoint's problems): ``(loaded, [])``
    or ``(None, problems)``. A checkpoint of a newer format version raises :class:`NewerFormatError`:
    it is not damage, and falling back past it would silently discard the newer program's progress."""
    report = verify_files(ckpt)
    if report.newer:
        raise NewerFormatError(report.errors[0])
    problems = report.errors if not report.ok else (check(report.loaded) if check else [])
    return (None, problems) if problems else (report.loaded, [])


def newest_valid(root: Path, check: Callable[[Loaded], list[str]] | None = None) -> tuple[Loaded | None, list[Path]]:
    """The newest committed checkpoint under ``root`` that passes :func:`verify_content`, read once, and
    the newer ones that failed (logged, left in place: the caller sets them aside once it may)."""
    failed = []
    for path in reversed(committed(root)):
        loaded, problems = verify_content(path, check)
        if loaded is not None:
            return loaded, failed
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        log.error("ckpt.invalid path=%s reason=%s", path, "; ".join(problems[:3]) + more)
        failed.append(path)
    return None, failed
