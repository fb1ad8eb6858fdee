"""End to end: ``train.py`` as a user runs it, and what the run directory then holds."""

from __future__ import annotations

import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import REPO, run_train

from resilient_train.checkpoint import CheckpointManager, load_checkpoint
from resilient_train.monitor import read_history


def test_tiny_run_produces_everything_a_user_watches(trained_run):
    run = trained_run
    hist = read_history(run)
    train = [r for r in hist if r["kind"] == "train"]
    evals = [r for r in hist if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["step"] for r in evals] == [10, 20]
    assert all(np.isfinite(r["loss"]) and r["discr_loss"] is not None for r in train)
    beat = json.loads((run / "heartbeat.json").read_text())
    assert beat["status"] == "finished" and beat["step"] == 20
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000010.png", "step_00000020.png"]
    assert (run / "train.log").read_text().count("ckpt.save step=") >= 2
    assert [p.name for p in CheckpointManager(run / "checkpoints").committed()] == ["step_00000010", "step_00000020"]


def test_status_command_reports_finished_run(trained_run):
    proc = subprocess.run(
        [sys.executable, "-m", "resilient_train.status", str(trained_run), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["state"] == "finished" and status["step"] == 20


def test_warmup_reaches_the_real_base_lr_and_discriminator_steps_once(trained_run):
    # magvit2-pytorch's own trainer leaves the LR at lr / warmup_steps and steps the
    # discriminator optimizer twice per step; neither may happen here.
    lr = {r["step"]: r["lr"] for r in read_history(trained_run) if r["kind"] == "train"}
    base, warmup = 1.0e-3, 5
    assert lr[1] == pytest.approx(base * 2 / warmup, rel=1e-12)
    assert lr[warmup] == pytest.approx(base, rel=1e-12)
    assert lr[20] < base
    loaded = load_checkpoint(trained_run / "checkpoints" / "step_00000020")
    state, manifest = loaded.state, loaded.manifest
    for key in ("optim_gen", "optim_discr"):
        steps = {float(s["step"]) for s in state[key]["state"].values()}
        assert steps == {20.0}, (key, steps)
    assert state["sched_gen"]["last_epoch"] == 20 and state["sched_discr"]["last_epoch"] == 20
    assert manifest["step"] == state["trainer"]["step"] == 20
    assert state["env"]["num_threads"] == 2


def test_progress_bar_is_shown(tmp_path):
    proc = run_train(
        tmp_path / "run", "trainer.max_steps=3", "trainer.progress_bar=true", "trainer.eval_every_n_steps=3"
    )
    assert "3/3" in proc.stderr and "step/s" in proc.stderr


def _write_gif(path, seed, frames=6, size=20):
    rng = np.random.default_rng(seed)
    video = (rng.random((frames, size, size + 4, 3)) * 255).astype(np.uint8)
    iio.imwrite(path, video, extension=".gif", loop=0, duration=50)


def test_trains_on_a_folder_of_real_videos(tmp_path):
    data = tmp_path / "videos"
    for i in range(4):
        (data / ("val" if i == 3 else "train")).mkdir(parents=True, exist_ok=True)
        _write_gif(data / ("val" if i == 3 else "train") / f"clip{i}.gif", i, frames=11)
    run = tmp_path / "run"
    proc = run_train(
        run,
        "data=folder",
        f"data.path={data}",
        "trainer.max_steps=4",
        "trainer.eval_every_n_steps=2",
        "checkpoint.every_n_steps=2",
    )
    assert [r["step"] for r in read_history(run) if r["kind"] == "eval"] == [2, 4]
    # Clips from the whole of each 11-frame video: two of 5 frames each.
    assert "split=train 3 files, 6 clips (0 skipped: 0 too short / 0 unreadable)" in proc.stdout + proc.stderr


def test_folder_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_train(tmp_path / "run", "data=folder", f"data.path={empty}", "trainer.max_steps=2", check=False)
    assert proc.returncode == 2
    assert str(empty) in proc.stderr
    proc = run_train(tmp_path / "run2", "data=folder", "trainer.max_steps=2", check=False)
    assert proc.returncode == 2 and "data.path" in proc.stderr + proc.stdout


def test_train_py_works_from_another_working_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "+experiment=tiny", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "experiment: tiny" in proc.stdout
