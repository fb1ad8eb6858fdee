"""On-disk format of one checkpoint directory, and safe, verified loading.

A checkpoint is a directory holding:

* ``<group>.safetensors`` for each flat tensor group named by the caller (e.g. ``model``, ``ema``),
* ``state.safetensors`` with every other tensor, and ``state.json`` with the rest of the state
  (nested dicts, lists, tuples, numbers, strings) where tensors are referenced by key,
* ``manifest.json``, written last: each file's size and SHA-256, plus the caller's metadata.

Nothing here ever unpickles: tensors are read with safetensors, everything else with ``json``.
A file that is not what its name says (a pickle planted as ``state.safetensors``, say) fails to
parse and is refused before any of its content is interpreted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _tensor_for_file(t: torch.Tensor, seen: dict[tuple[int, int, tuple], str]) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    # safetensors refuses tensors that share memory; give later aliases their own copy.
    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
    if t.numel() and key in seen:
        t = t.clone()
    elif t.numel():
        seen[key] = ""
    return t


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], seen: dict) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = _tensor_for_file(obj, seen)
        return {"__tensor__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors, seen) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"state key {k!r} at {path or '/'} must be str or int")
            items.append([k, _encode(v, f"{path}/{k}", tensors, seen)])
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]
    raise TypeError(f"cannot store {type(obj).__name__} at {path or '/'} in a checkpoint (tensors, numbers, "
                    "strings, lists, tuples and dicts only)")


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


def encode_state(state: dict[str, Any], tensor_groups: tuple[str, ...]) -> dict[str, bytes]:
    """Serialise ``state`` to ``{filename: bytes}`` (manifest excluded)."""
    files: dict[str, bytes] = {}
    rest: dict[str, Any] = {}
    for name, value in state.items():
        if name in tensor_groups and value is not None:
            seen: dict = {}
            if not all(isinstance(v, torch.Tensor) for v in value.values()):
                raise TypeError(f"tensor group {name!r} must map names to tensors")
            flat = {k: _tensor_for_file(v, seen) for k, v in value.items()}
            files[f"{name}.safetensors"] = safetensors.torch.save(flat)
        else:
            rest[name] = value
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(rest, "", tensors, {})
    files[STATE_TENSORS] = safetensors.torch.save(tensors)
    files[STATE_JSON] = json.dumps(skeleton, sort_keys=True).encode()
    return files


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


def _read_checked(ckpt: Path, name: str, entry: dict[str, Any]) -> bytes:
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
    data = path.read_bytes()
    if len(data) != entry["size"]:
        raise CheckpointError(f"{path}: size {len(data)} bytes, manifest says {entry['size']} (truncated or altered)")
    digest = sha256_bytes(data)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 mismatch (file {digest[:12]}…, manifest {entry['sha256'][:12]}…)")
    return data


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
        blobs = {name: _read_checked(ckpt, name, entry) for name, entry in manifest["files"].items()}
        report.bytes = sum(len(b) for b in blobs.values())
        decode_state(blobs, ckpt)
        report.ok = True
    except (CheckpointError, FileNotFoundError) as exc:
        report.errors.append(str(exc))
    return report


def load_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read, hash-check and decode a checkpoint: ``(state, manifest)``. Raises :class:`CheckpointError`."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    blobs = {name: _read_checked(ckpt, name, entry) for name, entry in manifest["files"].items()}
    return decode_state(blobs, ckpt), manifest


def file_entries(files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {name: {"size": len(data), "sha256": sha256_bytes(data)} for name, data in files.items()}


def manifest_bytes(step: int, files: dict[str, bytes], metadata: dict[str, Any]) -> bytes:
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        **metadata,
        "files": file_entries(files),
        "pid": os.getpid(),
    }
    return json.dumps(manifest, indent=1, sort_keys=True).encode()
