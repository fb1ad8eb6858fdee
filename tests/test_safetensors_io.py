"""Unit tests of the zero-copy safetensors writer and the hashed fast reader, against the real ``safetensors``.

Both ways, never mocking the library: our files load with ``safetensors.torch`` and the library's
files load with our reader, bit for bit (compared as bytes, so NaN payloads and -0.0 count), for
every dtype the fast paths handle, for 0-d, empty, non-contiguous and storage-sharing tensors; and
the writer survives short and interrupted ``writev`` calls. The last tests go through the
checkpoint files API (:mod:`resilient_train.checkpoint.files`) over the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import xxhash

from resilient_train.checkpoint import safetensors_io
from resilient_train.checkpoint.files import FileWriter, iter_files, load_checkpoint, verify_files
from resilient_train.checkpoint.manifest import MANIFEST, STATE_JSON, CheckpointError, manifest_bytes
from resilient_train.checkpoint.safetensors_io import (
    _ST_DTYPES,
    read_tensors,
    safetensors_payload,
    write_pieces,
)

DTYPES = list(_ST_DTYPES)
# Bit patterns the float types must carry through unchanged: a signalling NaN, a negative quiet NaN
# with a payload, and -0.0 (allclose, or even torch.equal, would not tell them apart).
_SPECIAL_BITS = {
    torch.float64: (0x7FF0000000000001, 0xFFF80000DEADBEEF, 0x8000000000000000),
    torch.float32: (0x7F800001, 0xFFC0BEEF, 0x80000000),
    torch.float16: (0x7C01, 0xFE5A, 0x8000),
    torch.bfloat16: (0x7F81, 0xFFC5, 0x8000),
}


# ----------------------------------------------------------------------------------------------
# helpers


def _raw(t: torch.Tensor) -> bytes:
    """The tensor's elements as the bytes safetensors stores (little-endian, row-major)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    assert got.dtype == want.dtype, name
    assert tuple(got.shape) == tuple(want.shape), name
    assert _raw(got) == _raw(want), name


def _assert_all_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        _assert_same(got[k], want[k], k)


def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (for floats: NaNs with payloads, infinities, subnormals too)."""
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    n = math.prod(shape) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)


def _special(dtype: torch.dtype) -> torch.Tensor:
    data = b"".join(v.to_bytes(dtype.itemsize, "little") for v in _SPECIAL_BITS[dtype])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)


def _zoo(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every awkward case for one dtype, several of them sharing memory."""
    gen = torch.Generator().manual_seed(seed)
    base = _random(dtype, (6, 8), gen)
    shared = _random(dtype, (5,), gen)
    zoo = {
        "plain": _random(dtype, (3, 5), gen),
        "big": _random(dtype, ((1 << 20) // dtype.itemsize + 3,), gen),  # more than one read chunk
        "scalar": _random(dtype, (), gen),
        "empty": _random(dtype, (0, 4), gen),
        "empty_1d": _random(dtype, (0,), gen),
        "base": base,
        "transposed": base.t(),  # non-contiguous
        "strided": base[::2, 1::3],  # non-contiguous, sliced with a step
        "row": base[1],  # a contiguous view into base, at an offset
        "rows": base[2:5],
        "alias_a": shared,  # the same tensor under two names
        "alias_b": shared,
    }
    assert not zoo["transposed"].is_contiguous() and not zoo["strided"].is_contiguous()
    assert zoo["row"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    if dtype in _SPECIAL_BITS:
        zoo["special"] = _special(dtype)
    return zoo


def _separate(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``safetensors.torch.save_file`` accepts: contiguous tensors, none sharing memory."""
    return {k: t.contiguous().clone() for k, t in tensors.items()}


def _write_payload(path: Path, payload: safetensors_io.Payload) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        return write_pieces(fd, payload.pieces)
    finally:
        os.close(fd)


def _fast_read(path: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        tensors = read_tensors(f, os.fstat(f.fileno()).st_size, digest)
    return tensors, digest.hexdigest()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _write_checkpoint(ckpt: Path, state: dict, groups: tuple[str, ...] = ("model",)) -> dict:
    """A checkpoint folder the way the manager writes one (files, then the manifest): its entries."""
    ckpt.mkdir(parents=True)
    with FileWriter(ckpt) as writer:
        for i, payload in enumerate(iter_files(state, groups)):
            (writer.write_now if i % 2 else writer.write)(payload)  # both ways of writing
        entries = writer.entries()
    (ckpt / MANIFEST).write_bytes(manifest_bytes(7, entries, {"val_loss": 0.5}))
    return entries


def _state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w = _random(torch.float32, (4, 6), gen)
    return {
        "model": {"w": w, "w_t": w.t(), "b": _random(torch.bfloat16, (3,), gen), "n": _random(torch.int64, (), gen)},
        "trainer": {"step": 7, "loss": float("nan"), "pair": (1, "x"), "ids": {3: "three"}},
        "rng": {"torch": _random(torch.uint8, (40,), gen), "mask": _random(torch.bool, (2, 3), gen)[:, ::2]},
        "empty": torch.empty(0, 3, dtype=torch.float16),
    }


# ----------------------------------------------------------------------------------------------
# our writer -> the safetensors library


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_our_files_load_with_safetensors_bit_for_bit(tmp_path, dtype):
    tensors = _zoo(dtype)
    payload = safetensors_payload("x.safetensors", tensors)
    assert isinstance(payload.pieces[1], memoryview)  # the fast path: header, then views of tensor memory
    path = tmp_path / "x.safetensors"
    assert _write_payload(path, payload) == payload.size == path.stat().st_size
    _assert_all_same(safetensors.torch.load_file(path), tensors)
    _assert_all_same(safetensors.torch.load(path.read_bytes()), tensors)


def test_payload_pieces_are_the_tensors_own_memory():
    t = torch.zeros(1000, dtype=torch.float32)
    payload = safetensors_payload("x.safetensors", {"t": t})
    t.fill_(1.5)  # no copy was taken: the piece shows the change
    assert bytes(payload.pieces[1]) == _raw(torch.full((1000,), 1.5))


def test_mixed_dtypes_in_one_file_both_ways(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {f"{i}_{str(dt)[6:]}": _random(dt, (3, 7), gen) for i, dt in enumerate(DTYPES)}
    tensors["odd"] = _random(torch.int8, (5,), gen)  # an odd byte count between wider tensors
    ours = tmp_path / "ours.safetensors"
    _write_payload(ours, safetensors_payload("ours", tensors))
    _assert_all_same(safetensors.torch.load_file(ours), tensors)
    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, theirs)
    got, digest = _fast_read(theirs)
    assert got is not None
    _assert_all_same(got, tensors)
    assert digest == hashlib.sha256(theirs.read_bytes()).hexdigest()


def test_file_writer_writes_what_the_library_reads_and_hashes_the_file(tmp_path):
    state = _state()
    entries = _write_checkpoint(tmp_path / "ckpt", state)
    assert sorted(entries) == ["model.safetensors", "state.json", "state.safetensors"]
    for name, entry in entries.items():
        data = (tmp_path / "ckpt" / name).read_bytes()
        assert entry == {"size": len(data), "hash": "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()}, name
    _assert_all_same(safetensors.torch.load_file(tmp_path / "ckpt" / "model.safetensors"), state["model"])
    rest = safetensors.torch.load_file(tmp_path / "ckpt" / "state.safetensors")
    _assert_all_same(
        rest, {"/rng/torch": state["rng"]["torch"], "/rng/mask": state["rng"]["mask"], "/empty": state["empty"]}
    )


# ----------------------------------------------------------------------------------------------
# the safetensors library -> our reader


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_library_files_load_with_our_fast_reader_bit_for_bit(tmp_path, dtype):
    tensors = _separate(_zoo(dtype, seed=1))
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    got, digest = _fast_read(path)
    assert got is not None, "the fast reader gave up on a file the library wrote"
    _assert_all_same(got, tensors)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_tensor_read_has_a_storage_of_its_own_that_torch_rng_accepts(tmp_path):
    """The reader makes every tensor over its bytes of one buffer, yet each starts its own storage: a slice
    of the buffer (storage offset > 0) makes ``torch.set_rng_state`` read a neighbour's bytes (measured:
    "Invalid mt19937 state", and a segfault after an in-process rollback)."""
    rng = torch.get_rng_state()
    tensors = {"a_before": torch.arange(7, dtype=torch.uint8), "rng": rng, "z_after": torch.ones(3, dtype=torch.uint8)}
    path = tmp_path / "rng.safetensors"
    _write_payload(path, safetensors_payload("rng.safetensors", tensors))
    got, _ = _fast_read(path)
    assert got is not None
    _assert_all_same(got, tensors)
    for name, t in got.items():
        assert t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size(), name

    def applied(state: torch.Tensor) -> bool:
        """Whether torch.set_rng_state(state) sets the generator to exactly ``rng`` (the global one is restored)."""
        before = torch.get_rng_state()
        try:
            torch.set_rng_state(state)
            return torch.equal(torch.get_rng_state(), rng)
        except RuntimeError:  # the bytes it read are not an mt19937 state
            return False
        finally:
            torch.set_rng_state(before)

    assert applied(got["rng"])
    # The control: the same bytes as a slice of the whole file's buffer. torch reads the storage from its start
    # (the file's header), so it either refuses them ("Invalid mt19937 state") or sets another state.
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    start = len(path.read_bytes()) - rng.numel() - 3
    assert torch.equal(data[start : start + rng.numel()], rng)
    assert not applied(data[start : start + rng.numel()])


@pytest.mark.parametrize("dtype", list(_SPECIAL_BITS), ids=str)
def test_nan_payloads_and_negative_zero_survive_both_ways(tmp_path, dtype):
    special = _special(dtype)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    _write_payload(ours, safetensors_payload("x", {"s": special}))
    safetensors.torch.save_file({"s": special}, theirs)
    want = b"".join(v.to_bytes(dtype.itemsize, "little") for v in _SPECIAL_BITS[dtype])
    assert _raw(safetensors.torch.load_file(ours)["s"]) == want
    got, _ = _fast_read(theirs)
    assert got is not None and _raw(got["s"]) == want
    got, _ = _fast_read(ours)
    assert got is not None and _raw(got["s"]) == want


# ----------------------------------------------------------------------------------------------
# short and interrupted writes


def _pieces() -> tuple[list, bytes]:
    head = b"0123456789abc"  # 13 bytes: every later piece boundary is at an odd offset
    body = bytes(range(256)) * 4099 + b"!"  # ~1 MiB: more than any pipe buffer
    tail = memoryview(bytearray(b"xyz"))
    return [head, memoryview(body), tail], head + body + b"xyz"


def _drain(fd: int, out: bytearray) -> None:
    while chunk := os.read(fd, 1 << 16):
        out += chunk


def _recording_writev(monkeypatch) -> list[tuple[int, int]]:
    """Wrap the real ``os.writev`` only to record ``(bytes asked, bytes written)`` of each call."""
    calls: list[tuple[int, int]] = []
    real = os.writev

    def writev(fd, buffers):
        asked = sum(memoryview(b).nbytes for b in buffers)
        n = real(fd, buffers)
        calls.append((asked, n))
        return n

    monkeypatch.setattr(os, "writev", writev)
    return calls


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_write_pieces_resumes_inside_a_piece_after_real_short_writes(monkeypatch):
    """Real short writes, no fault injection: ``writev`` into a blocking pipe nobody reads blocks once
    the pipe is full; a signal (SIGUSR1 with a no-op handler, sent to this thread) then makes the
    kernel return the count written so far. The reader starts only after that, so the writer has to
    resume inside the big piece. ``os.writev`` is wrapped only to record what it returned."""
    pieces, expected = _pieces()
    calls = _recording_writev(monkeypatch)
    r, w = os.pipe()
    received = bytearray()
    done = threading.Event()
    main = threading.get_ident()

    def short_seen() -> bool:
        return any(n < asked for asked, n in calls)

    def reader() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        deadline = time.monotonic() + 30
        while not short_seen() and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        _drain(r, received)

    def kicker() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        deadline = time.monotonic() + 30
        while not short_seen() and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
            signal.pthread_kill(main, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    threads = [threading.Thread(target=reader), threading.Thread(target=kicker)]
    try:
        for t in threads:
            t.start()
        written = write_pieces(w, pieces)
    finally:
        done.set()
        os.close(w)
        for t in threads:
            t.join(60)
        signal.signal(signal.SIGUSR1, old)
        os.close(r)
    assert written == len(expected)
    assert bytes(received) == expected
    first_short = next(i for i, (asked, n) in enumerate(calls) if n < asked)
    asked, n = calls[first_short]
    assert 13 < n < len(expected) - 3, calls  # it stopped inside the big piece
    # Each call asks for exactly what the ones before it left.
    assert [a for a, _ in calls] == [len(expected) - sum(n for _, n in calls[:i]) for i in range(len(calls))]


@pytest.mark.parametrize("limits", [[1], [13], [14, 1], [12, 5, 100000], [len(_pieces()[1]) - 1]], ids=str)
def test_write_pieces_resumes_after_injected_short_writes(tmp_path, monkeypatch, limits):
    """Fault injection: a wrapper passes the real ``os.writev`` only the first ``limit`` bytes of the
    buffers it is given (once per entry of ``limits``), so the write is short at chosen offsets:
    inside a piece, at a piece boundary, one byte from the end."""
    pieces, expected = _pieces()
    real = os.writev
    todo = list(limits)

    def writev(fd, buffers):
        if not todo:
            return real(fd, buffers)
        left, cut = todo.pop(0), []
        for b in buffers:
            v = memoryview(b)[:left]
            if v.nbytes:
                cut.append(v)
            left -= v.nbytes
        return real(fd, cut)

    monkeypatch.setattr(os, "writev", writev)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        assert write_pieces(fd, pieces) == len(expected)
    finally:
        os.close(fd)
    assert not todo and path.read_bytes() == expected


def test_write_pieces_batches_more_buffers_than_iov_max(tmp_path, monkeypatch):
    calls = _recording_writev(monkeypatch)
    pieces = [bytes([i % 251]) * (i % 7 + 1) for i in range(2500)]  # more than _IOV_MAX buffers
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        assert write_pieces(fd, pieces) == sum(map(len, pieces))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces)
    assert len(calls) == 3


class _Interrupted(Exception):
    pass


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_exception_from_a_signal_handler_during_a_blocked_writev_propagates():
    """Real signal, no fault injection: ``writev`` blocks on a full pipe until SIGUSR1 arrives, whose
    handler raises; the exception leaves :func:`write_pieces`, and what reached the pipe is a prefix."""
    pieces, expected = _pieces()
    r, w = os.pipe()
    received = bytearray()
    done = threading.Event()
    main = threading.get_ident()

    def kicker() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        deadline = time.monotonic() + 30
        while not done.wait(0.05) and time.monotonic() < deadline:
            signal.pthread_kill(main, signal.SIGUSR1)

    def interrupt(*_):
        if not done.is_set():  # once: later signals (already on their way) do nothing
            done.set()
            raise _Interrupted

    old = signal.signal(signal.SIGUSR1, interrupt)
    thread = threading.Thread(target=kicker)
    try:
        with pytest.raises(_Interrupted):
            thread.start()
            write_pieces(w, pieces)
    finally:
        done.set()
        thread.join(60)
        signal.signal(signal.SIGUSR1, old)
        os.close(w)
        _drain(r, received)
        os.close(r)
    assert 0 < len(received) < len(expected) and bytes(received) == expected[: len(received)]


def _failing_writev(monkeypatch) -> None:
    """Fault injection: the first call really writes 5 bytes, the second raises (as a signal handler could)."""
    real = os.writev
    calls = []

    def writev(fd, buffers):
        calls.append(fd)
        if len(calls) == 1:
            return real(fd, [memoryview(buffers[0])[:5]])
        raise _Interrupted

    monkeypatch.setattr(os, "writev", writev)


def test_interrupted_write_now_propagates_and_closes_the_file(tmp_path, monkeypatch):
    payload = safetensors_payload("x.safetensors", {"t": torch.arange(100, dtype=torch.float32)})
    with FileWriter(tmp_path) as writer:
        before = _open_fds()
        _failing_writev(monkeypatch)
        with pytest.raises(_Interrupted):
            writer.write_now(payload)
        assert _open_fds() == before
    assert (tmp_path / "x.safetensors").read_bytes() == bytes(payload.pieces[0][:5])


def test_interrupted_background_write_surfaces_in_entries_and_closes_the_file(tmp_path, monkeypatch):
    payload = safetensors_payload("x.safetensors", {"t": torch.arange(100, dtype=torch.float32)})
    before = _open_fds()
    _failing_writev(monkeypatch)
    with FileWriter(tmp_path) as writer:
        writer.write(payload)
        with pytest.raises(_Interrupted):
            writer.entries()
    assert _open_fds() == before


# ----------------------------------------------------------------------------------------------
# the fallback path: the safetensors library writes (and reads) the whole file


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn, torch.uint16], ids=str)
def test_dtype_outside_the_table_goes_through_the_library(tmp_path, dtype):
    assert dtype not in _ST_DTYPES
    gen = torch.Generator().manual_seed(5)
    odd = _random(dtype, (3, 4), gen)
    tensors = {"odd": odd, "odd_t": odd.t(), "alias": odd, "f": _random(torch.float32, (5,), gen)}
    payload = safetensors_payload("x.safetensors", tensors)
    assert len(payload.pieces) == 1 and isinstance(payload.pieces[0], bytes)  # the library's own bytes
    path = tmp_path / "x.safetensors"
    assert _write_payload(path, payload) == payload.size == path.stat().st_size
    _assert_all_same(safetensors.torch.load_file(path), tensors)
    assert _fast_read(path)[0] is None  # our reader leaves it to the library too


def test_without_the_fast_path_files_are_written_and_read_by_the_library(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "_FAST", False)
    tensors = _zoo(torch.float32)
    payload = safetensors_payload("x.safetensors", tensors)
    assert len(payload.pieces) == 1 and isinstance(payload.pieces[0], bytes)
    _write_payload(tmp_path / "x.safetensors", payload)
    _assert_all_same(safetensors.torch.load_file(tmp_path / "x.safetensors"), tensors)
    assert _fast_read(tmp_path / "x.safetensors")[0] is None
    state = _state()
    _write_checkpoint(tmp_path / "ckpt", state)
    loaded = load_checkpoint(tmp_path / "ckpt")
    _assert_all_same(loaded.state["model"], state["model"])
    _assert_same(loaded.state["rng"]["mask"], state["rng"]["mask"])


# ----------------------------------------------------------------------------------------------
# the files API over these files


def _read_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "resilient_train.checkpoint.files"]


def test_load_and_verify_read_each_checkpoint_once_and_log_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="resilient_train.checkpoint.files")
    state = _state()
    entries = _write_checkpoint(tmp_path / "ckpt", state)
    nbytes = sum(e["size"] for e in entries.values())

    loaded = load_checkpoint(tmp_path / "ckpt")
    assert (loaded.path, loaded.step, loaded.nbytes) == (tmp_path / "ckpt", 7, nbytes)
    assert loaded.manifest["val_loss"] == 0.5 and loaded.manifest["files"] == entries
    _assert_all_same(loaded.state["model"], state["model"])
    _assert_all_same(loaded.state["rng"], state["rng"])
    _assert_same(loaded.state["empty"], state["empty"])
    trainer = loaded.state["trainer"]
    assert math.isnan(trainer.pop("loss")) and trainer == {"step": 7, "pair": (1, "x"), "ids": {3: "three"}}
    lines = _read_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith(f"ckpt.read path={tmp_path / 'ckpt'} bytes={nbytes} secs=")

    report = verify_files(tmp_path / "ckpt")
    assert report.ok and report.step == 7 and report.bytes == nbytes and not report.errors
    assert report.loaded is not None and report.loaded.nbytes == nbytes
    _assert_all_same(report.loaded.state["model"], state["model"])
    assert len(_read_lines(caplog)) == 2 and "loaded=" not in repr(report)


_HOSTILE_STATE_JSON = {
    "float_of_a_list": b'{"a": {"__float__": [1]}}',
    "dict_of_an_int": b'{"a": {"__dict__": 5}}',
    "unhashable_tensor_key": b'{"a": {"__tensor__": ["x"]}}',
    "dict_items_not_pairs": b'{"a": {"__dict__": [[1, 2, 3]]}}',
    "top_level_list": b"[1, 2]",
    "nested_too_deep": b"[" * 200_000 + b"]" * 200_000,
}


@pytest.mark.parametrize("content", list(_HOSTILE_STATE_JSON))
def test_hostile_state_json_is_a_checkpoint_error_and_verify_never_raises(tmp_path, caplog, content):
    caplog.set_level(logging.INFO, logger="resilient_train.checkpoint.files")
    ckpt = tmp_path / "ckpt"
    _write_checkpoint(ckpt, _state())
    data = _HOSTILE_STATE_JSON[content]
    (ckpt / STATE_JSON).write_bytes(data)  # and the manifest agrees, as an attacker would make it
    manifest = json.loads((ckpt / MANIFEST).read_bytes())
    manifest["files"][STATE_JSON] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))

    report = verify_files(ckpt)
    assert not report.ok and report.loaded is None and report.step == 7
    assert len(report.errors) == 1 and report.errors[0].startswith(f"{ckpt / STATE_JSON}: malformed")
    with pytest.raises(CheckpointError, match="malformed") as exc:
        load_checkpoint(ckpt)
    assert str(exc.value).startswith(f"{ckpt / STATE_JSON}: ")
    assert _read_lines(caplog) == []  # no ckpt.read line for a read that failed
