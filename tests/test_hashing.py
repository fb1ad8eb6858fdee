"""The manifest's per-file hash: XXH3-128 for new checkpoints, SHA-256 manifests of earlier ones still verified."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import xxhash

from resilient_train.checkpoint import hashing
from resilient_train.checkpoint.files import FileWriter, iter_files, load_checkpoint, verify_files
from resilient_train.checkpoint.manifest import MANIFEST, STATE_JSON, CheckpointError, manifest_bytes, read_manifest

FILES = ("model.safetensors", "state.safetensors", STATE_JSON)


def _state() -> dict:
    gen = torch.Generator().manual_seed(5)
    return {
        "model": {
            "big": torch.randn(700_000, generator=gen),  # several read chunks: the fast reader's hashing loop
            "small": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
            "count": torch.tensor(12),
        },
        "rng": {"torch": torch.randint(0, 256, (5056,), dtype=torch.uint8, generator=gen)},
        "trainer": {"step": 3, "lr": [0.1, 0.01], "name": "x"},
    }


def _write(ckpt: Path, state: dict) -> dict:
    ckpt.mkdir(parents=True)
    with FileWriter(ckpt) as writer:
        for payload in iter_files(state, ("model",)):
            writer.write(payload)
        entries = writer.entries()
    (ckpt / MANIFEST).write_bytes(manifest_bytes(3, entries, {}))
    return entries


def _edit_manifest(ckpt: Path, edit) -> None:
    manifest = json.loads((ckpt / MANIFEST).read_bytes())
    edit(manifest["files"])
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _to_sha256_format(ckpt: Path) -> None:
    """Rewrite the manifest as earlier versions wrote it: ``{"size", "sha256"}`` for every file."""

    def edit(files: dict) -> None:
        for name in files:
            data = (ckpt / name).read_bytes()
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    _edit_manifest(ckpt, edit)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The same state as a new-format checkpoint and as one in the earlier (SHA-256) format."""
    root = tmp_path_factory.mktemp("hashing")
    new = root / "new"
    _write(new, _state())
    old = root / "old"
    shutil.copytree(new, old)
    _to_sha256_format(old)
    return {"new": new, "old": old}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_same_state(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert a.flatten().view(torch.uint8).tolist() == b.flatten().view(torch.uint8).tolist()
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    else:
        assert a == b


def test_writer_records_xxh3_128_of_each_file(tmp_path):
    entries = _write(tmp_path / "ckpt", _state())
    assert sorted(entries) == sorted(FILES)
    for name, entry in entries.items():
        data = (tmp_path / "ckpt" / name).read_bytes()
        assert entry == {"size": len(data), "hash": "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()}, name
    listed = json.loads((tmp_path / "ckpt" / MANIFEST).read_bytes())["files"]
    assert listed == entries


def test_sha256_checkpoint_loads_bit_identical_to_the_new_format(checkpoints):
    old_files = json.loads((checkpoints["old"] / MANIFEST).read_bytes())["files"]
    assert all(set(e) == {"size", "sha256"} for e in old_files.values())
    new, old = load_checkpoint(checkpoints["new"]), load_checkpoint(checkpoints["old"])
    _assert_same_state(new.state, old.state)
    _assert_same_state(new.state, _state())
    assert new.nbytes == old.nbytes
    for which in ("new", "old"):
        report = verify_files(checkpoints[which])
        assert report.ok and not report.errors and report.step == 3, (which, report.errors)


def test_a_sha256_value_under_hash_is_verified_too(checkpoints, tmp_path):
    ckpt = _copy(checkpoints["old"], tmp_path / "c")

    def edit(files: dict) -> None:
        for entry in files.values():
            entry["hash"] = "sha256:" + entry.pop("sha256")

    _edit_manifest(ckpt, edit)
    assert verify_files(ckpt).ok
    (ckpt / STATE_JSON).write_bytes((ckpt / STATE_JSON).read_bytes().replace(b'"x"', b'"y"'))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_checkpoint(ckpt)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - len(data) // 3] ^= 0x04  # in the tensor data of a safetensors file
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


MISMATCH = {"new": "xxh3_128 mismatch", "old": "SHA-256 mismatch"}


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("fmt", ["new", "old"])
def test_flipped_byte_is_detected_naming_the_file(checkpoints, tmp_path, fmt, name):
    ckpt = _copy(checkpoints[fmt], tmp_path / "c")
    _flip(ckpt / name)
    report = verify_files(ckpt)
    assert not report.ok and len(report.errors) == 1
    assert report.errors[0].startswith(f"{ckpt / name}: {MISMATCH[fmt]} (file "), report.errors
    with pytest.raises(CheckpointError, match=MISMATCH[fmt]) as exc:
        load_checkpoint(ckpt)
    assert str(exc.value).startswith(f"{ckpt / name}: ")


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("fmt", ["new", "old"])
def test_truncation_is_detected_naming_the_file(checkpoints, tmp_path, fmt, name):
    ckpt = _copy(checkpoints[fmt], tmp_path / "c")
    _truncate(ckpt / name)
    report = verify_files(ckpt)
    assert not report.ok and len(report.errors) == 1
    assert report.errors[0].startswith(f"{ckpt / name}: size "), report.errors
    assert "truncated" in report.errors[0]
    with pytest.raises(CheckpointError, match="truncated") as exc:
        load_checkpoint(ckpt)
    assert str(exc.value).startswith(f"{ckpt / name}: ")


def test_truncated_file_listed_with_its_new_size_fails_the_hash(checkpoints, tmp_path):
    """A partial copy whose manifest entry was "fixed" up to the new size still fails: on the hash."""
    ckpt = _copy(checkpoints["new"], tmp_path / "c")
    path = ckpt / "model.safetensors"
    _truncate(path)
    _edit_manifest(ckpt, lambda files: files["model.safetensors"].update(size=path.stat().st_size))
    with pytest.raises(CheckpointError, match="xxh3_128 mismatch") as exc:
        load_checkpoint(ckpt)
    assert str(exc.value).startswith(f"{path}: ")


_BAD_ENTRIES = {
    "unknown_algorithm": ({"hash": "md5:" + "0" * 32}, "unknown hash algorithm 'md5'"),
    "no_algorithm": ({"hash": "0" * 32}, "not of the form"),
    "short_digest": ({"hash": "xxh3_128:" + "0" * 31}, "not 32 lowercase hex digits"),
    "long_digest": ({"hash": "xxh3_128:" + "0" * 64}, "not 32 lowercase hex digits"),
    "not_hex": ({"hash": "xxh3_128:" + "g" * 32}, "not 32 lowercase hex digits"),
    "upper_case": ({"hash": "xxh3_128:" + "A" * 32}, "not 32 lowercase hex digits"),
    "not_a_string": ({"hash": 7}, "not of the form"),
    "sha256_not_hex": ({"sha256": "z" * 64}, "SHA-256 digest is not 64 lowercase hex digits"),
    "sha256_short": ({"sha256": "0" * 63}, "SHA-256 digest is not 64 lowercase hex digits"),
    "sha256_not_a_string": ({"sha256": None}, "not a string"),
    "both": ({"hash": "xxh3_128:" + "0" * 32, "sha256": "0" * 64}, "exactly one of"),
    "neither": ({}, "exactly one of"),
}


@pytest.mark.parametrize("case", list(_BAD_ENTRIES))
def test_malformed_hash_entry_is_refused_naming_the_file(checkpoints, tmp_path, case):
    ckpt = _copy(checkpoints["new"], tmp_path / "c")
    fields, what = _BAD_ENTRIES[case]
    _edit_manifest(ckpt, lambda files: files.__setitem__("model.safetensors", {"size": 10, **fields}))
    prefix = f"{ckpt / MANIFEST}: malformed entry for 'model.safetensors': "
    with pytest.raises(CheckpointError) as exc:
        read_manifest(ckpt)
    assert str(exc.value).startswith(prefix) and what in str(exc.value), str(exc.value)
    report = verify_files(ckpt)
    assert not report.ok and report.errors == [str(exc.value)]
    with pytest.raises(CheckpointError, match="malformed entry for 'model.safetensors'"):
        load_checkpoint(ckpt)


def test_parse_entry():
    digest = "ab" * 16
    assert hashing.parse_entry({"size": 1, "hash": f"xxh3_128:{digest}"}) == ("xxh3_128", digest)
    assert hashing.parse_entry({"size": 1, "sha256": "cd" * 32}) == ("sha256", "cd" * 32)
    assert hashing.ALGORITHM == "xxh3_128"
    h = hashing.new()
    h.update(b"abc")
    assert h.hexdigest() == xxhash.xxh3_128(b"abc").hexdigest()
