"""The manifest of a checkpoint: its format version, file names and error type, reading and writing it. Torch-free.

A checkpoint is a directory holding:

* ``<group>.safetensors`` for each flat tensor group named by the caller (e.g. ``model``, ``ema``),
* ``state.safetensors`` with every other tensor, and ``state.json`` with the rest of the state
  (nested dicts, lists, tuples, numbers, strings) where tensors are referenced by key
  (:mod:`.tree`),
* ``ranks/<r>/state.json`` and ``ranks/<r>/state.safetensors`` for the state each rank owns (its RNG
  streams and data position), written by rank ``r`` itself (format version 2; version 1 kept it in
  ``state.json`` and is still read),
* ``manifest.json``, written last (by rank 0): each file's size and hash (:mod:`.hashing`), the
  world size and backend, plus the caller's metadata.

Nothing in this package ever unpickles: tensors are read with safetensors
(:mod:`.safetensors_io`), everything else with ``json``. A file that is not what its name says (a
pickle planted as ``state.safetensors``, say) fails to parse and is refused before any of its
content is interpreted; :func:`refuse_pickle` then says so plainly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import hashing
from .layout import MANIFEST, MAX_MANIFEST_BYTES

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "RANKS_DIR",
    "rank_of",
    "MANIFEST",
    "STATE_JSON",
    "STATE_TENSORS",
    "CheckpointError",
    "NewerFormatError",
    "MAX_JSON_BYTES",
    "MAX_MANIFEST_BYTES",
    "refuse_pickle",
    "load_json",
    "read_manifest",
    "check_manifest",
    "manifest_bytes",
]

FORMAT_VERSION = 2
#: Versions this code reads: 1 (one process, per-rank state inside state.json) and 2 (per-rank files).
READABLE_VERSIONS = (1, 2)
RANKS_DIR = "ranks"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
#: The largest JSON file of a checkpoint read at all (its size is checked before a byte is read):
#: ``state.json`` holds the optimizer's hyperparameters and the data fingerprint (about 100 bytes
#: a video file), so even a million-file folder stays well below this.
MAX_JSON_BYTES = 256 << 20
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or unsafe; the message names the file."""


class NewerFormatError(CheckpointError):
    """The checkpoint was written by a newer format version than this program reads.

    Not damage: a reader must stop and say so, never set the checkpoint aside as corrupt and fall
    back to an older one (which would silently throw away the newer program's progress).
    """


def refuse_pickle(data: bytes, path: Path) -> None:
    """Raise a :class:`CheckpointError` that says so when ``data`` is a pickle (or a ``torch.save`` zip)."""
    if data[:2] in _PICKLE_MAGIC or data[:4] in _PICKLE_MAGIC:
        raise CheckpointError(
            f"{path}: holds a Python pickle (or a torch.save zip), not the expected format; refusing to "
            "unpickle it, since unpickling can run arbitrary code"
        )


def load_json(data: bytes, path: Path) -> Any:
    """Parse the JSON file ``path`` whose bytes are ``data``; :class:`CheckpointError` when it is not JSON."""
    try:
        return json.loads(data)
    # ValueError: also an integer of more digits than Python converts; RecursionError: nesting too deep.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        refuse_pickle(data, path)
        raise CheckpointError(f"{path}: malformed JSON ({exc})") from None


def read_json_file(path: Path, limit: int, expected: int | None = None) -> bytes:
    """The bytes of ``path``, its size checked before reading: against ``expected`` (the manifest's
    entry) when given, and against ``limit`` always, so a huge or sparse file is refused unread."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if expected is not None and size != expected:
            raise CheckpointError(f"{path}: size {size} bytes, manifest says {expected} (truncated or altered)")
        if size > limit:
            raise CheckpointError(f"{path}: {size} bytes, more than the {limit >> 20} MiB a checkpoint's JSON may be")
        data = f.read(limit + 1)
    if len(data) != size:
        raise CheckpointError(f"{path}: changed while being read ({size} bytes, then {len(data)})")
    return data


def rank_of(name: str) -> int | None:
    """The rank owning the listed file ``ranks/<r>/<file>``; ``None`` for a shared file; ``-1`` for a bad name."""
    if "/" not in name:
        return None
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != RANKS_DIR or not parts[1].isdigit() or str(int(parts[1])) != parts[1]:
        return -1
    if not parts[2] or parts[2].startswith("."):
        return -1
    return int(parts[1])


def _valid_size(entry: Any) -> bool:
    return isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest of the checkpoint folder ``ckpt``, checked for shape (its files are not read).

    Raises :class:`FileNotFoundError` when ``ckpt`` is not a folder, :class:`CheckpointError` otherwise.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt}")
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete and cannot be trusted")
    return check_manifest(load_json(read_json_file(path, MAX_MANIFEST_BYTES), path), path)


def check_manifest(manifest: Any, path: Path | str) -> dict[str, Any]:
    """``manifest`` (parsed from the file at ``path``, local or on a store) checked for shape, or a
    :class:`CheckpointError` naming ``path``."""
    # Long on purpose: each field of the manifest checked in turn, each with its own message.
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: malformed (expected a JSON object)")
    for key in ("format_version", "step", "files"):
        if key not in manifest:
            raise CheckpointError(f"{path}: malformed, lacks {key!r}")
    version = manifest["format_version"]
    if type(version) is int and version > FORMAT_VERSION:
        versions = manifest.get("versions")
        writer = versions.get("resilient_train") if isinstance(versions, dict) else None
        raise NewerFormatError(
            f"{path}: written in checkpoint format version {version}"
            + (f" (by resilient-train {writer})" if isinstance(writer, str) else "")
            + f", newer than this program reads ({', '.join(map(str, READABLE_VERSIONS))}; resilient-train "
            f"{_own_version()}); upgrade resilient-train to resume it. It was left where it is."
        )
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: malformed format_version {version!r} (this code reads {list(READABLE_VERSIONS)})"
        )
    if type(manifest["step"]) is not int or manifest["step"] < 0:
        raise CheckpointError(f"{path}: malformed step {manifest['step']!r} (expected an integer >= 0)")
    files = manifest["files"]
    if not isinstance(files, dict) or STATE_JSON not in files or STATE_TENSORS not in files:
        raise CheckpointError(f"{path}: malformed, 'files' must list {STATE_JSON} and {STATE_TENSORS}")
    world = manifest.get("world_size", 1)
    if type(world) is not int or world < 1:
        raise CheckpointError(f"{path}: malformed world_size {world!r}")
    ranks = set()
    for name, entry in files.items():
        rank = rank_of(name)
        if rank == -1 or name.startswith(".") or not _valid_size(entry):
            raise CheckpointError(f"{path}: malformed entry for {name!r}")
        if rank is not None:
            ranks.add(rank)
        try:
            hashing.parse_entry(entry)
        except hashing.EntryError as exc:
            raise CheckpointError(f"{path}: malformed entry for {name!r}: {exc}") from None
        if not name.endswith((".safetensors", ".json")):
            raise CheckpointError(f"{path}: lists {name!r}, a file type this loader refuses to read")
    if ranks:  # per-rank files: every rank of the world, each with both files, and no other rank
        for r in range(world):
            for base in (STATE_JSON, STATE_TENSORS):
                if f"{RANKS_DIR}/{r}/{base}" not in files:
                    raise CheckpointError(
                        f"{path}: world_size {world} but rank {r}'s {RANKS_DIR}/{r}/{base} is not listed"
                    )
        if ranks - set(range(world)):
            raise CheckpointError(f"{path}: lists files of ranks {sorted(ranks - set(range(world)))} >= world_size")
    return manifest


def _own_version() -> str:
    from .. import __version__

    return __version__


def manifest_bytes(step: int, entries: dict[str, dict[str, Any]], metadata: dict[str, Any]) -> bytes:
    """The manifest: format version, step, the caller's metadata and each file's ``{"size", "hash"}``."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        **metadata,
        "files": dict(sorted(entries.items())),
        "pid": os.getpid(),
    }
    return json.dumps(manifest, indent=1, sort_keys=True).encode()
