"""Run-directory side files never block a run, and no content in them makes a reader raise (issue 14, item 4).

``history.jsonl``: a resume moves its bad lines to ``history.rejected.jsonl``; ``checkpoints/best.json``: rebuilt
from the committed checkpoints' manifests; ``heartbeat.json``: rewritten at start, and ``status`` only ever raises
``StatusError`` on it. Real files in ``tmp_path``, no training.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import heartbeat_record

from resilient_train import status as status_mod
from resilient_train.checkpoint.layout import (
    BEST_POINTER,
    MAX_MANIFEST_BYTES,
    MAX_POINTER_BYTES,
    check_best,
    read_best,
    rebuild_best,
)
from resilient_train.monitor import (
    REJECTED_HISTORY_FILE,
    HistoryWriter,
    finite_float,
    plot_loss,
    read_history,
    truncate_history,
)
from resilient_train.status import MAX_HEARTBEAT_BYTES, StatusError, format_status, run_status
from resilient_train.train.observers import HeartbeatObserver, RankHeartbeatObserver
from resilient_train.train.recovery import Recovery

MONITOR_LOG = "resilient_train.monitor"
LAYOUT_LOG = "resilient_train.checkpoint.layout"


@pytest.fixture(autouse=True)
def _no_hang():
    """Some side files here are FIFOs: a reader that opened one would block forever; fail the test instead."""

    def fail(signum: int, frame: object) -> None:
        raise TimeoutError("blocked for 30 s (a FIFO opened?)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _good(step: int) -> bytes:
    return json.dumps({"kind": "train", "step": step, "epoch": 0, "loss": 1.0 / step, "time": 0.0}).encode()


def _warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


# -- history.jsonl -------------------------------------------------------------------------------------------------

BAD_HISTORY_LINES = {
    "cut_json_in_the_middle": b'{"kind": "train", "step": 7, "lo',
    "step_string": b'{"kind": "train", "step": "x", "loss": 1.0}',
    "step_null": b'{"kind": "train", "step": null, "loss": 1.0}',
    "step_float": b'{"kind": "train", "step": 1.5, "loss": 1.0}',
    "step_float_integral": b'{"kind": "train", "step": 2.0, "loss": 1.0}',
    "step_negative": b'{"kind": "train", "step": -3, "loss": 1.0}',
    "step_true": b'{"kind": "train", "step": true, "loss": 1.0}',
    "step_nan": b'{"kind": "train", "step": NaN, "loss": 1.0}',
    "step_inf": b'{"kind": "train", "step": 1e999, "loss": 1.0}',
    "step_list": b'{"kind": "train", "step": [1], "loss": 1.0}',
    "step_missing": b'{"kind": "train", "loss": 1.0}',
    "step_too_many_digits": b'{"step": ' + b"9" * 5000 + b"}",
    "json_array": b"[1, 2, 3]",
    "json_string": b'"step"',
    "json_number": b"42",
    "invalid_utf8": b'\xff\xfe{"kind": "train", "step": 1}',
    "nested_too_deep": b"[" * 100_000,
    "nul_bytes": b"\x00\x00\x00\x00",
}


def _history_with(run: Path, bad: bytes) -> list[bytes]:
    """history.jsonl = good steps 1..3, the bad line (line 4), good steps 4..6; returns the good lines."""
    good = [_good(s) for s in range(1, 7)]
    run.mkdir(parents=True, exist_ok=True)
    (run / "history.jsonl").write_bytes(b"\n".join([*good[:3], bad, *good[3:]]) + b"\n")
    return good


@pytest.mark.parametrize("bad", list(BAD_HISTORY_LINES.values()), ids=list(BAD_HISTORY_LINES))
def test_truncate_history_moves_a_bad_line_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: bytes) -> None:
    run = tmp_path / "run"
    good = _history_with(run, bad)
    path, side = run / "history.jsonl", run / REJECTED_HISTORY_FILE

    with caplog.at_level(logging.DEBUG, logger=MONITOR_LOG):
        assert [r["step"] for r in read_history(run)] == [1, 2, 3, 4, 5, 6]  # skipped, never raised
    assert len([m for m in _warnings(caplog, MONITOR_LOG) if ":4: skipping bad line" in m]) == 1
    caplog.clear()

    with caplog.at_level(logging.DEBUG, logger=MONITOR_LOG):
        assert truncate_history(run, 4) == 2  # steps 5 and 6 are after the resumed step
    assert path.read_bytes() == b"".join(line + b"\n" for line in good[:4])  # good lines, byte for byte
    assert side.read_bytes() == bad + b"\n"  # exactly the raw bad line
    assert _warnings(caplog, MONITOR_LOG) == [f"history.rejected path={path} lines=1 first=4 moved_to={side}"]
    assert sorted(p.name for p in run.iterdir()) == ["history.jsonl", REJECTED_HISTORY_FILE]  # no temporary left

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=MONITOR_LOG):  # nothing left to move: nothing changes
        assert truncate_history(run, 4) == 0
    assert side.read_bytes() == bad + b"\n" and not _warnings(caplog, MONITOR_LOG)


def test_truncate_history_several_bad_lines_appends_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    path, side = run / "history.jsonl", run / REJECTED_HISTORY_FILE
    side.write_bytes(b"older rejected line without newline")  # an earlier append cut short
    lines = [
        _good(1),
        b"",  # blank lines are not data: dropped on rewrite, never moved
        b'{"step": "2"}',
        _good(2),
        b"\xc3\x28",
        b"   ",
        _good(3),
        b"[]",
        _good(4),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n" + b'{"kind": "train", "step": 5, "lo')  # + a write cut by a kill
    with caplog.at_level(logging.DEBUG, logger=MONITOR_LOG):
        assert truncate_history(run, 3) == 1  # step 4 (the cut step-5 fragment is not a record)
    assert path.read_bytes() == _good(1) + b"\n" + _good(2) + b"\n" + _good(3) + b"\n"
    assert side.read_bytes() == b'older rejected line without newline\n{"step": "2"}\n\xc3\x28\n[]\n'
    assert _warnings(caplog, MONITOR_LOG) == [f"history.rejected path={path} lines=3 first=3 moved_to={side}"]


def test_truncate_history_partial_last_line_is_dropped_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    path = run / "history.jsonl"
    path.write_bytes(_good(1) + b"\n" + _good(2) + b"\n" + b'{"kind": "train", "step": 3, "lo')
    with caplog.at_level(logging.DEBUG, logger=MONITOR_LOG):
        assert read_history(run) == [json.loads(_good(1)), json.loads(_good(2))]
        assert truncate_history(run, 10) == 0
    assert path.read_bytes() == _good(1) + b"\n" + _good(2) + b"\n"
    assert not (run / REJECTED_HISTORY_FILE).exists() and not _warnings(caplog, MONITOR_LOG)

    # A last line without a newline that *is* JSON but not a record cannot be a cut write: it is moved.
    path.write_bytes(_good(1) + b"\n" + b'{"step": null}')
    with caplog.at_level(logging.DEBUG, logger=MONITOR_LOG):
        assert truncate_history(run, 10) == 0
    assert path.read_bytes() == _good(1) + b"\n"
    assert (run / REJECTED_HISTORY_FILE).read_bytes() == b'{"step": null}\n'
    assert len(_warnings(caplog, MONITOR_LOG)) == 1

    # A complete record whose newline was cut is kept, and the file gets its newline.
    path.write_bytes(_good(1) + b"\n" + _good(2))
    assert truncate_history(run, 10) == 0
    assert path.read_bytes() == _good(1) + b"\n" + _good(2) + b"\n"


def test_truncate_history_keeps_bad_lines_when_the_side_file_cannot_be_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    good = _history_with(run, b'{"step": "x"}')
    (run / REJECTED_HISTORY_FILE).mkdir()  # not a file: cannot append to it
    with caplog.at_level(logging.DEBUG, logger=MONITOR_LOG):
        assert truncate_history(run, 4) == 2
    assert (run / "history.jsonl").read_bytes() == b"\n".join([*good[:3], b'{"step": "x"}', good[3]]) + b"\n"
    (msg,) = _warnings(caplog, MONITOR_LOG)
    assert msg.startswith(f"history.rejected_kept path={run / 'history.jsonl'} lines=1 first=4 error=cannot write")


def test_truncate_history_sets_aside_a_folder_under_the_name(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "history.jsonl").mkdir(parents=True)
    (run / "history.jsonl" / "inside").write_text("kept")
    assert truncate_history(run, 5) == 0
    (aside,) = [p for p in run.iterdir() if p.name.startswith("history.jsonl.unreadable-")]
    assert (aside / "inside").read_text() == "kept"
    assert not (run / "history.jsonl").exists()
    with HistoryWriter(run) as h:  # the resumed run can write its history again
        h.write({"kind": "train", "step": 6, "loss": 0.5})
    assert [r["step"] for r in read_history(run)] == [6]

    (run / "history.jsonl").unlink()
    (run / "history.jsonl").mkdir()  # and a writer meeting a folder there (no resume before it) sets it aside too
    with HistoryWriter(run) as h:
        h.write({"kind": "train", "step": 1, "loss": 0.5})
    assert [r["step"] for r in read_history(run)] == [1]
    assert len([p for p in run.iterdir() if p.name.startswith("history.jsonl.unreadable-")]) == 2


def test_plot_loss_and_series_ignore_hostile_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    recs = [
        {"kind": "train", "step": 1, "loss": 1.0},
        {"kind": "train", "step": 2, "loss": 2**2000},  # beyond float
        {"kind": "train", "step": 3, "loss": 1e308},  # beyond what an axis can span
        {"kind": "train", "step": 2**60, "loss": 0.5},
        {"kind": ["train"], "step": 4, "loss": 0.5},
        {"kind": "eval", "step": 4, "val_loss": "0.3", "psnr": [1], "codebook_usage": {"a": 1}},
        {"kind": "eval", "step": 5, "val_loss": 0.4, "psnr": -1e308, "codebook_usage": True},
    ]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert plot_loss(run).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert finite_float(2**2000) is None

    (run / "history.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 2**2000}) + "\n")
    with pytest.raises(ValueError, match="no finite train loss"):
        plot_loss(run)


# -- checkpoints/best.json -----------------------------------------------------------------------------------------

REBUILT = {"step": 20, "path": "step_00000020", "val_loss": 0.25}


def _checkpoints(tmp_path: Path) -> Path:
    """checkpoints/ with fake committed checkpoints (a manifest.json only): step 20 has the lowest val_loss
    (30 ties with it, later), 40 has none, and some damaged manifests would win if they were believed."""
    root = tmp_path / "run" / "checkpoints"
    manifests: dict[int, bytes] = {
        1: json.dumps({"step": True, "val_loss": 0.001}).encode(),  # True == 1, but not a step
        5: json.dumps({"step": 5, "val_loss": "0.01"}).encode(),
        10: json.dumps({"step": 10, "val_loss": 0.5}).encode(),
        20: json.dumps({"step": 20, "val_loss": 0.25}).encode(),
        30: json.dumps({"step": 30, "val_loss": 0.25}).encode(),
        40: json.dumps({"step": 40, "val_loss": None}).encode(),
        50: json.dumps({"step": 99, "val_loss": 0.01}).encode(),  # not its folder's step
        60: b"\x00garbage",
        70: b'{"step": 70, "val_loss": NaN}',
        80: b"[" * 100_000,
    }
    for step, data in manifests.items():
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_bytes(data)
    huge = root / "step_00000090" / "manifest.json"  # over the cap: refused unread
    huge.parent.mkdir()
    with open(huge, "wb") as f:
        f.write(json.dumps({"step": 90, "val_loss": 0.0}).encode())
        f.truncate(MAX_MANIFEST_BYTES + 1)
    fifo = root / "step_00000095" / "manifest.json"  # reading it would block forever
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    (root / "step_00000100").mkdir()  # no manifest: not committed
    (root / ".tmp-step_00000110").mkdir()
    (root / ".tmp-step_00000110" / "manifest.json").write_text(json.dumps({"step": 110, "val_loss": 0.0}))
    return root


def _write_pointer(root: Path, data: bytes | dict | None) -> None:
    path = root / BEST_POINTER
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    if data is None:  # a folder where the file belongs
        path.mkdir()
        (path / "x").write_text("x")
    elif data == b"HUGE":
        with open(path, "wb") as f:
            f.write(json.dumps(REBUILT).encode())
            f.truncate(MAX_POINTER_BYTES + 1)
    else:
        path.write_bytes(data)


DAMAGED_POINTERS = {
    "garbage_bytes": (b"\x00\xff\xfegarbage", "unreadable: not UTF-8"),
    "empty": (b"", "unreadable: not JSON"),
    "truncated_json": (b'{"step": 20, "pa', "unreadable: not JSON"),
    "json_array": (b"[]", "not a JSON object (a JSON list)"),
    "json_null": (b"null", "not a JSON object (a JSON NoneType)"),
    "nested_too_deep": (b"[" * 100_000, "unreadable: not JSON (nested too deep)"),
    "too_large": (b"HUGE", f"over the {MAX_POINTER_BYTES}-byte limit"),
    "a_folder": (None, "unreadable: not a regular file"),
    "step_string": ({"step": "20", "path": "step_00000020", "val_loss": 0.25}, "step '20' is not a non-negative"),
    "step_true": ({"step": True, "path": "step_00000001", "val_loss": 0.25}, "step True is not a non-negative"),
    "step_negative": ({"step": -1, "path": "step_-0000001", "val_loss": 0.25}, "step -1 is not a non-negative"),
    "step_float": ({"step": 20.0, "path": "step_00000020", "val_loss": 0.25}, "step 20.0 is not a non-negative"),
    "path_mismatch": ({"step": 20, "path": "step_00000010", "val_loss": 0.25}, "path 'step_00000010' is not"),
    "path_traversal": ({"step": 20, "path": "../../etc", "val_loss": 0.25}, "path '../../etc' is not"),
    "missing_folder": ({"step": 60000, "path": "step_00060000", "val_loss": 0.1}, "is not a committed checkpoint"),
    "folder_without_manifest": (
        {"step": 100, "path": "step_00000100", "val_loss": 0.1},
        "step_00000100 is not a committed checkpoint",
    ),
    "val_loss_string_nan": ({"step": 20, "path": "step_00000020", "val_loss": "nan"}, "val_loss 'nan' is not"),
    "val_loss_nan": (b'{"step": 20, "path": "step_00000020", "val_loss": NaN}', "val_loss nan is not a finite"),
    "val_loss_missing": ({"step": 20, "path": "step_00000020"}, "val_loss None is not a finite number"),
}


@pytest.mark.parametrize(("data", "why"), list(DAMAGED_POINTERS.values()), ids=list(DAMAGED_POINTERS))
def test_rebuild_best_from_manifests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, data: bytes | dict | None, why: str
) -> None:
    root = _checkpoints(tmp_path)
    _write_pointer(root, data)
    problem = check_best(root)
    assert problem is not None and why in problem

    with caplog.at_level(logging.DEBUG, logger=LAYOUT_LOG):
        assert rebuild_best(root) == REBUILT
    assert (root / BEST_POINTER).read_bytes() == json.dumps(REBUILT).encode()  # as CheckpointManager.set_best
    rebuilt = [m for m in _warnings(caplog, LAYOUT_LOG) if m.startswith("ckpt.best_rebuilt")]
    assert rebuilt == [f"ckpt.best_rebuilt was={problem!r} step=20 path=step_00000020 val_loss=0.25"]
    skipped = [m for m in _warnings(caplog, LAYOUT_LOG) if m.startswith("ckpt.best_rebuild_skip")]
    # damage is logged: steps 1 and 50 (step), 60 and 80 (JSON), 90 (size), 95 (FIFO); a manifest without a
    # finite val_loss (5, 40, 70) or a folder without one (100) is simply no candidate
    assert len(skipped) == 6, skipped
    assert any("step_00000090" in m and f"over the {MAX_MANIFEST_BYTES}-byte limit" in m for m in skipped)
    assert any("step_00000095" in m and "not a regular file" in m for m in skipped)
    assert check_best(root) is None and read_best(root) == REBUILT
    if data is None:  # the folder under the name was set aside, not deleted
        (aside,) = [p for p in root.iterdir() if p.name.startswith("best.json.damaged-")]
        assert (aside / "x").read_text() == "x"


@pytest.mark.parametrize(
    ("data", "why"),
    [v for k, v in DAMAGED_POINTERS.items() if k not in ("missing_folder", "folder_without_manifest")],
    ids=[k for k in DAMAGED_POINTERS if k not in ("missing_folder", "folder_without_manifest")],
)
def test_read_best_refuses_a_malformed_pointer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, data: bytes | dict | None, why: str
) -> None:
    """Every reader (retention, status, export, the orchestrator) gets ``None``, never a pointer it could trip on."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    _write_pointer(root, data)
    with caplog.at_level(logging.DEBUG, logger=LAYOUT_LOG):
        assert read_best(root) is None
    (msg,) = _warnings(caplog, LAYOUT_LOG)
    assert (
        msg.startswith(f"ckpt.best_pointer_unreadable path={root / BEST_POINTER} error=") and why.split(": ")[-1] in msg
    )


def test_rebuild_best_leaves_a_valid_pointer_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _checkpoints(tmp_path)
    valid = json.dumps({"step": 10, "path": "step_00000010", "val_loss": 0.5}).encode()  # valid, not the lowest
    (root / BEST_POINTER).write_bytes(valid)
    with caplog.at_level(logging.DEBUG, logger=LAYOUT_LOG):
        assert rebuild_best(root, expected=True) == {"step": 10, "path": "step_00000010", "val_loss": 0.5}
    assert (root / BEST_POINTER).read_bytes() == valid and not _warnings(caplog, LAYOUT_LOG)


def test_rebuild_best_when_absent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _checkpoints(tmp_path)
    assert check_best(root) is None and check_best(root, expected=True) == "missing"
    assert rebuild_best(root) is None and not (root / BEST_POINTER).exists()  # not expected: nothing to do
    with caplog.at_level(logging.DEBUG, logger=LAYOUT_LOG):
        assert rebuild_best(root, expected=True) == REBUILT
    assert (root / BEST_POINTER).read_bytes() == json.dumps(REBUILT).encode()
    assert "ckpt.best_rebuilt was='missing' step=20 path=step_00000020 val_loss=0.25" in _warnings(caplog, LAYOUT_LOG)
    assert rebuild_best(tmp_path / "nowhere", expected=True) is None  # no checkpoints folder at all


def test_rebuild_best_removes_a_damaged_pointer_when_no_manifest_has_a_val_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "manifest.json").write_text(json.dumps({"step": step, "val_loss": None}))
    (root / BEST_POINTER).write_bytes(b"{oops")
    with caplog.at_level(logging.DEBUG, logger=LAYOUT_LOG):
        assert rebuild_best(root) is None
    assert not (root / BEST_POINTER).exists()
    (msg,) = _warnings(caplog, LAYOUT_LOG)
    assert msg.startswith("ckpt.best_removed was='unreadable: not JSON") and "no checkpoint records a val_loss" in msg
    assert sorted(p.name for p in root.iterdir()) == ["step_00000010", "step_00000020"]  # no temporary left
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LAYOUT_LOG):
        assert rebuild_best(root, expected=True) is None  # absent and nothing to rebuild from: quiet
    assert not _warnings(caplog, LAYOUT_LOG)


# -- heartbeat.json ------------------------------------------------------------------------------------------------


def _heartbeat(**over: object) -> dict:
    return heartbeat_record(**over)


def _write_hb(path: Path, data: bytes | dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        path.mkdir()
    elif data == b"FIFO":
        os.mkfifo(path)
    elif data == b"HUGE":
        with open(path, "wb") as f:
            f.write(json.dumps(_heartbeat()).encode())
            f.truncate(MAX_HEARTBEAT_BYTES + 1)
    else:
        path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())


UNREADABLE_HEARTBEATS = {
    "garbage": (b"\x00\xff garbage", "not UTF-8"),
    "empty": (b"", "not JSON"),
    "truncated": (b'{"pid": 12', "not JSON"),
    "nested_too_deep": (b"[" * 100_000, "nested too deep"),
    "too_large": (b"HUGE", f"over the {MAX_HEARTBEAT_BYTES}-byte limit"),
    "a_folder": (None, "not a regular file"),
    "a_fifo": (b"FIFO", "not a regular file"),
    "json_array": (b"[]", "is not a JSON object"),
    "json_null": (b"null", "is not a JSON object"),
    "json_string": (b'"running"', "is not a JSON object"),
}


@pytest.mark.parametrize(("data", "why"), list(UNREADABLE_HEARTBEATS.values()), ids=list(UNREADABLE_HEARTBEATS))
def test_status_unreadable_heartbeat_is_a_status_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, data: bytes | None, why: str
) -> None:
    run = tmp_path / "run"
    _write_hb(run / "heartbeat.json", data)
    with pytest.raises(StatusError, match=why):
        run_status(run)
    assert status_mod.main([str(run)]) == 2  # the command: one error line, exit 2, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: ") and why in err and "Traceback" not in err


# (heartbeat fields, expected fields of run_status's result)
HOSTILE_HEARTBEATS = {
    "wrong_types_everywhere": (
        {
            "pid": 1.5,
            "host": 5,
            "step": "x",
            "epoch": True,
            "max_steps": -1,
            "time": "yesterday",
            "status": 3,
            "latest_checkpoint": ["step_00000010"],
            "last_loss": "0.5",
        },
        {
            "state": "stale",
            "reason": "unknown heartbeat status 3",
            "pid": None,
            "host": None,
            "pid_alive": None,
            "step": None,
            "epoch": None,
            "max_steps": None,
            "heartbeat_status": None,
            "heartbeat_time": None,
            "heartbeat_age_secs": None,
            "latest_checkpoint": None,
            "last_train_loss": None,
        },
    ),
    "status_running_no_pid_no_time": (
        {"pid": "123", "time": None, "status": "running"},
        {"state": "stale", "reason": "heartbeat has no pid; heartbeat has no time", "pid": None},
    ),
    "pid_beyond_c_int": (
        {"pid": 2**80},
        {"state": "stale", "reason": f"pid {2**80} is gone", "pid": 2**80, "pid_alive": False},
    ),
    "pid_true": ({"pid": True}, {"state": "stale", "reason": "heartbeat has no pid", "pid": None}),
    "pid_zero": ({"pid": 0}, {"state": "stale", "reason": "heartbeat has no pid", "pid": None}),
    "time_infinite": (
        b'{"pid": %d, "time": Infinity, "status": "running"}' % os.getpid(),
        {"state": "stale", "reason": "heartbeat has no time", "heartbeat_time": None},
    ),
    "time_too_large_an_int": ({"time": 10**400}, {"state": "stale", "reason": "heartbeat has no time"}),
    "status_huge_string": ({"status": "x" * 100_000}, {"state": "stale", "heartbeat_status": "x" * 100_000}),
    "step_nan_float": (
        b'{"pid": %d, "time": %f, "status": "finished", "step": NaN, "last_loss": NaN}' % (os.getpid(), time.time()),
        {"state": "finished", "step": None, "last_train_loss": None, "exit_code": 0},
    ),
}


@pytest.mark.parametrize(("fields", "expected"), list(HOSTILE_HEARTBEATS.values()), ids=list(HOSTILE_HEARTBEATS))
def test_status_hostile_heartbeat_fields_read_as_unknown(tmp_path: Path, fields: dict | bytes, expected: dict) -> None:
    run = tmp_path / "run"
    _write_hb(run / "heartbeat.json", fields if isinstance(fields, bytes) else _heartbeat(**fields))
    # a hostile history and best pointer too: skipped, never raised
    (run / "history.jsonl").write_bytes(
        b'{"kind": "train", "step": "7", "loss": 1}\n[1]\n\xff\n'
        b'{"kind": "train", "step": 3, "loss": "high"}\n{"kind": "eval", "step": 3, "val_loss": 1e999, "psnr": []}\n'
    )
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / BEST_POINTER).write_text('{"step": 1, "path": 5, "val_loss": "x"}')
    s = run_status(run)
    for key, value in expected.items():
        if key == "reason":
            assert s[key] is not None and s[key].startswith(value), s[key]
        else:
            assert s[key] == value, (key, s[key])
    assert s["last_train_step"] == 3 and s["last_train_loss"] is None  # the only record with a valid step
    assert s["last_val_step"] == 3 and s["last_val_loss"] is None and s["last_eval_metrics"] == {"psnr": None}
    assert s["best_checkpoint"] is None
    json.dumps(s, allow_nan=False)  # strict JSON out: no NaN, nothing unserialisable
    assert "state:" in format_status(s)
    assert status_mod.main([str(run), "--json"]) == s["exit_code"]


def test_status_hostile_rank_heartbeats(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_hb(run / "heartbeat.json", _heartbeat())
    ranks = run / "ranks"
    _write_hb(
        ranks / "0" / "heartbeat.json", {"rank": 0, "pid": os.getpid(), "step": 4, "restart": 0, "status": "running"}
    )
    _write_hb(ranks / "1" / "heartbeat.json", {"rank": "1", "pid": 2**80, "step": 1.5, "restart": None, "status": 7})
    _write_hb(ranks / "2" / "heartbeat.json", b"HUGE")
    _write_hb(ranks / "3" / "heartbeat.json", b"FIFO")
    _write_hb(ranks / "4" / "heartbeat.json", b"[]")
    _write_hb(ranks / "5" / "heartbeat.json", None)
    (ranks / "\u00b2").mkdir()  # "²".isdigit() is True, int("²") raises
    (ranks / "x").mkdir()
    s = run_status(run)
    assert s["ranks"] == [
        {"rank": 0, "pid": os.getpid(), "step": 4, "restart": 0, "status": "running", "pid_alive": True},
        {"rank": None, "pid": 2**80, "step": None, "restart": None, "status": None, "pid_alive": False},
    ]
    text = format_status(s)
    assert "rank 0:" in text and "rank None:" in text and f"pid {2**80} (gone)" in text


# -- heartbeat written at start ------------------------------------------------------------------------------------


def _fake_trainer(run: Path, step: int, epoch: int) -> SimpleNamespace:
    return SimpleNamespace(
        run_dir=run,
        counters=SimpleNamespace(step=step),
        position=SimpleNamespace(epoch=epoch),
        ckpt=SimpleNamespace(last_saved=None, upload_status=lambda: None),
        recovery=Recovery(max_rollbacks=3, on_save_error="continue"),
    )


@pytest.mark.parametrize(
    "damage", [b"\x00garbage", b"[]", b'{"status": 3}', None], ids=["garbage", "array", "types", "folder"]
)
def test_heartbeat_observer_rewrites_a_damaged_heartbeat_at_start(tmp_path: Path, damage: bytes | None) -> None:
    run = tmp_path / "run"
    _write_hb(run / "heartbeat.json", damage)
    obs = HeartbeatObserver(interval_secs=3600, max_steps=100)
    obs.on_start(_fake_trainer(run, 40, 3))
    beat = json.loads((run / "heartbeat.json").read_text())
    assert {k: beat[k] for k in ("pid", "step", "epoch", "max_steps", "status", "latest_checkpoint", "last_loss")} == {
        "pid": os.getpid(),
        "step": 40,
        "epoch": 3,
        "max_steps": 100,
        "status": "running",
        "latest_checkpoint": None,
        "last_loss": None,
    }
    s = run_status(run)
    assert (s["state"], s["step"], s["epoch"], s["pid_alive"]) == ("running", 40, 3, True)
    obs.on_end(_fake_trainer(run, 40, 3), "stopped")
    assert json.loads((run / "heartbeat.json").read_text())["status"] == "stopped"


def test_rank_heartbeat_replaces_a_folder_under_its_name(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_hb(run / "ranks" / "1" / "heartbeat.json", None)
    obs = RankHeartbeatObserver(interval_secs=3600, rank=1, restart=2)
    obs.on_start(_fake_trainer(run, 7, 0))
    beat = json.loads((run / "ranks" / "1" / "heartbeat.json").read_text())
    assert {k: beat[k] for k in ("rank", "pid", "step", "restart", "status")} == {
        "rank": 1,
        "pid": os.getpid(),
        "step": 7,
        "restart": 2,
        "status": "running",
    }


def test_oversized_side_files_are_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """best.json, manifests and heartbeats over their cap are refused on their size alone, never opened."""
    from resilient_train.checkpoint import layout

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"opened {args[0]}")

    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000010").mkdir(parents=True)
    with open(root / "step_00000010" / "manifest.json", "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    _write_pointer(root, b"HUGE")
    _write_hb(tmp_path / "run" / "heartbeat.json", b"HUGE")
    monkeypatch.setattr(layout, "open", no_open, raising=False)
    assert check_best(root) == f"unreadable: {MAX_POINTER_BYTES + 1} bytes, over the {MAX_POINTER_BYTES}-byte limit"
    assert rebuild_best(root) is None and not (root / BEST_POINTER).exists()  # no manifest readable: removed
    with pytest.raises(StatusError, match=f"{MAX_HEARTBEAT_BYTES + 1} bytes, over the"):
        run_status(tmp_path / "run")
