from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import heartbeat_record
from PIL import Image

from resilient_train.fsio import atomic_write
from resilient_train.monitor import (
    SAMPLE_GRID_GAP,
    Heartbeat,
    HistoryWriter,
    finite_float,
    plot_loss,
    read_history,
    save_sample_grid,
    truncate_history,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _status(run: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resilient_train.status", str(run), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _field(stdout: str, key: str) -> str:
    """Value of the ``key:`` line of the human status output."""
    for line in stdout.splitlines():
        if line.startswith(key + ":"):
            return line[len(key) + 1 :].strip()
    raise AssertionError(f"no {key!r} line in:\n{stdout}")


def _write_heartbeat(run: Path, **over) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "heartbeat.json").write_text(json.dumps(heartbeat_record(**over)))


def _write_history(run: Path, n: int = 20) -> None:
    with HistoryWriter(run) as h:
        for step in range(1, n + 1):
            h.write(
                {
                    "kind": "train",
                    "step": step,
                    "epoch": step // 10,
                    "loss": 1.0 / step,
                    "recon_loss": 0.5 / step,
                    "discr_loss": None,
                    "lr": 1e-4,
                    "time": time.time(),
                }
            )
            if step % 5 == 0:
                h.write({"kind": "eval", "step": step, "epoch": step // 10, "val_loss": 1.2 / step, "time": 0.0})


def _assert_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert len(data) > 0
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        assert im.size[0] > 0 and im.size[1] > 0
        return im.size


# -- atomic writes ---------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, "first\n")
    atomic_write(target, b'{"a": 1}\n')
    atomic_write(target, "ü-unicode\n", durable=False)
    assert target.read_text(encoding="utf-8") == "ü-unicode\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_finite_float() -> None:
    assert finite_float(3) == 3.0 and isinstance(finite_float(3), float)
    assert finite_float(0.25) == 0.25
    for bad in (True, False, None, "1.0", float("nan"), float("inf"), -float("inf"), [1.0]):
        assert finite_float(bad) is None, bad


# -- heartbeat ---------------------------------------------------------------------------------------------------------


def test_heartbeat_interval_force_and_close(tmp_path: Path) -> None:
    run = tmp_path / "run"
    hb = Heartbeat(run, interval_secs=0.3, max_steps=100)
    path = run / "heartbeat.json"

    assert hb.beat(step=1, epoch=0, latest_checkpoint=None, last_loss=2.0) is True  # first beat always writes
    first = json.loads(path.read_text())
    assert first["step"] == 1 and first["status"] == "running" and first["pid"] == os.getpid()
    assert first["max_steps"] == 100 and first["last_loss"] == 2.0 and first["host"] == socket.gethostname()
    assert abs(first["time"] - time.time()) < 5

    assert hb.beat(step=2, epoch=0, latest_checkpoint=None, last_loss=1.5) is False  # within the interval
    assert json.loads(path.read_text())["step"] == 1

    assert hb.beat(step=3, epoch=0, latest_checkpoint="step_00000003", last_loss=1.0, force=True) is True
    forced = json.loads(path.read_text())
    assert forced["step"] == 3 and forced["latest_checkpoint"] == "step_00000003"

    assert hb.beat(step=4, epoch=1, latest_checkpoint="step_00000003", last_loss=0.9) is False
    time.sleep(0.35)
    assert hb.beat(step=5, epoch=1, latest_checkpoint="step_00000003", last_loss=float("nan")) is True
    after = json.loads(path.read_text())
    assert after["step"] == 5 and after["epoch"] == 1 and after["last_loss"] is None  # NaN is not JSON

    hb.close("finished")
    final = json.loads(path.read_text())
    assert final["status"] == "finished" and final["step"] == 5
    with pytest.raises(ValueError):
        hb.close("exploded")
    assert sorted(p.name for p in run.iterdir()) == ["heartbeat.json"]


# -- history ---------------------------------------------------------------------------------------------------------


def test_read_history_skips_truncated_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _write_history(run, n=5)
    path = run / "history.jsonl"
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="resilient_train.monitor"):
        recs = read_history(run)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [5]
    assert not caplog.records  # a truncated last line is expected, not worth a warning

    # A new writer (the resumed run) terminates the partial line; the old fragment is now a middle line: warned.
    with HistoryWriter(run) as h:
        h.write({"kind": "train", "step": 6, "epoch": 0, "loss": 0.1, "time": 0.0})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="resilient_train.monitor"):
        recs = read_history(run)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert any("skipping bad line (not JSON" in r.getMessage() for r in caplog.records)

    assert read_history(tmp_path / "nowhere") == []


def test_truncate_history_drops_later_steps_and_a_partial_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert truncate_history(run, 3) == 0 and not run.exists()  # no history: nothing to do, nothing created

    _write_history(run, n=10)  # train 1..10, eval 5 and 10
    path = run / "history.jsonl"
    before = path.read_bytes()
    assert truncate_history(run, 10) == 0
    assert path.read_bytes() == before  # nothing to drop: the file is left as it is

    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 11, "lo')  # killed mid-write
    assert truncate_history(run, 10) == 0  # no whole record dropped, but the partial line goes
    assert path.read_bytes() == before

    assert truncate_history(run, 4) == 8  # train 5..10 and eval 5, 10
    recs = read_history(run)
    assert [(r["kind"], r["step"]) for r in recs] == [("train", s) for s in range(1, 5)]
    assert path.read_bytes().endswith(b"\n")
    assert sorted(p.name for p in run.iterdir()) == ["history.jsonl"]  # no temporary left
    assert truncate_history(path, 0) == 4 and read_history(run) == []  # the file's own path works too


# -- plots -----------------------------------------------------------------------------------------------------------


def test_plot_loss_png_with_and_without_marks(tmp_path: Path) -> None:
    run = tmp_path / "myrun"
    _write_history(run)
    out = plot_loss(run)
    assert out == run / "loss.png"
    _assert_png(out)

    marked = plot_loss(run, tmp_path / "plots" / "marked.png", marks=[(7, "kill"), (13, "kill"), (15, "resume")])
    assert marked == tmp_path / "plots" / "marked.png"
    _assert_png(marked)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp files left


def test_plot_loss_empty_history_raises(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    (run / "history.jsonl").write_text("")
    with pytest.raises(ValueError, match="history.jsonl"):
        plot_loss(run)
    with pytest.raises(ValueError, match="history.jsonl"):
        plot_loss(tmp_path / "no_such_run")


@pytest.mark.parametrize(("b", "c", "t", "h", "w"), [(2, 3, 4, 16, 24), (1, 1, 3, 64, 32), (3, 3, 2, 80, 80)])
def test_save_sample_grid_layout(tmp_path: Path, b: int, c: int, t: int, h: int, w: int) -> None:
    torch.manual_seed(0)
    inputs = torch.rand(b, c, t, h, w) * 1.4 - 0.2  # out of range on purpose: must be clamped
    recons = torch.zeros(b, c, t, h, w)
    out = save_sample_grid(inputs, recons, tmp_path / "deep" / "dir" / "grid.png")
    width, height = _assert_png(out)

    scale = max(1, -(-64 // h))
    fh, fw, gap = h * scale, w * scale, SAMPLE_GRID_GAP
    assert height == 2 * b * fh + (2 * b - 1) * gap
    assert width == t * fw + (t - 1) * gap

    with Image.open(out) as im:
        arr = np.asarray(im.convert("RGB"))
    # row 1 (first clip's reconstructions) is black, gaps are white, the input row is not black
    assert int(arr[fh + gap : 2 * fh + gap, :fw].max()) == 0
    assert int(arr[fh : fh + gap].min()) == 255
    assert int(arr[:fh, :fw].max()) > 0


def test_save_sample_grid_rejects_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_sample_grid(torch.rand(1, 3, 2, 8, 8), torch.rand(1, 3, 3, 8, 8), tmp_path / "x.png")


# -- status command ----------------------------------------------------------------------------------------------------


def test_status_running_then_stale_when_pid_dies(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_history(run)
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000020").mkdir()
    (run / "checkpoints" / ".tmp-step_00000030").mkdir()
    (run / "checkpoints" / "step_30").mkdir()
    (run / "checkpoints" / "best.json").write_text(json.dumps({"step": 10, "path": "step_00000010", "val_loss": 0.1}))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_heartbeat(run, pid=child.pid, step=20, latest_checkpoint=None)
        res = _status(run)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _field(res.stdout, "state") == "running"
        assert _field(res.stdout, "step") == "20/100"
        assert _field(res.stdout, "latest ckpt") == "step_00000020"  # newest step dir; temp / odd names ignored
        assert _field(res.stdout, "best ckpt").startswith("step_00000010")  # best.json
        assert _field(res.stdout, "pid").startswith(str(child.pid))

        js = _status(run, "--json")
        assert js.returncode == 0, js.stderr
        data = json.loads(js.stdout)
        assert data["state"] == "running" and data["step"] == 20 and data["epoch"] == 2
        assert data["latest_checkpoint"] == "step_00000020"
        assert data["best_checkpoint"]["path"] == "step_00000010"
        assert data["last_train_step"] == 20 and data["last_train_loss"] == pytest.approx(1 / 20)
        assert data["last_val_step"] == 20 and data["last_val_loss"] == pytest.approx(1.2 / 20)
    finally:
        child.kill()
        child.wait(timeout=10)

    res = _status(run)
    assert res.returncode == 1, res.stdout + res.stderr
    state = _field(res.stdout, "state")
    assert state.startswith("stale") and f"pid {child.pid}" in state


def test_status_stale_by_age(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_heartbeat(run, time=time.time() - 300, latest_checkpoint="step_00000040")  # our own pid: alive
    res = _status(run, "--stale-after", "60")
    assert res.returncode == 1, res.stdout + res.stderr
    state = _field(res.stdout, "state")
    assert state.startswith("stale") and "old" in state and "pid" not in state
    assert _field(res.stdout, "latest ckpt") == "step_00000040"
    # the same heartbeat is fresh enough under a longer limit
    assert _status(run, "--stale-after", "600").returncode == 0


@pytest.mark.parametrize(("status", "code"), [("finished", 0), ("stopped", 1), ("failed", 1)])
def test_status_final_states(tmp_path: Path, status: str, code: int) -> None:
    run = tmp_path / "run"
    _write_heartbeat(run, pid=2**22 + 12345, time=time.time() - 10_000, status=status)  # dead pid, old: irrelevant
    res = _status(run, "--json")
    assert res.returncode == code, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert data["state"] == status and data["step"] == 40 and data["epoch"] == 2
    assert data["last_train_loss"] == 0.5  # no history: falls back to the heartbeat's last_loss


def test_status_missing_dir_and_missing_heartbeat(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    res = _status(missing)
    assert res.returncode == 2
    assert str(missing) in res.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    res = _status(empty, "--json")
    assert res.returncode == 2
    assert "no heartbeat" in res.stderr and "run directory" in res.stderr
