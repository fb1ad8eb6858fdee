"""Checkpoints that are verified to work: real model, real files, real ``train.py`` subprocesses, real SIGKILL.

Every test reads a checkpoint written by an actual training run (or by :class:`CheckpointManager`
itself), damages a *copy* of it where needed, and checks what the loader, ``verify_files``, the
``python -m resilient_train.verify`` command and ``train.py`` do with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO, hold, run_train, start_train
from omegaconf import OmegaConf

from resilient_train.checkpoint import (
    MANIFEST,
    SAVE_PHASES,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    newest_valid,
    read_manifest,
    step_dir_name,
    verify_files,
)
from resilient_train.monitor import read_history
from resilient_train.tokenizer.model import build_model
from resilient_train.verify import compare_checkpoints, compare_states
from resilient_train.verify import main as verify_main

STEP10, STEP20 = step_dir_name(10), step_dir_name(20)


# ----------------------------------------------------------------------------------------------
# helpers


def _verify_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resilient_train.verify", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_file_and_manifest(ckpt: Path, name: str, data: bytes) -> None:
    """Replace ``name`` by ``data`` and make the manifest agree (size and SHA-256), as an attacker would."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _fixed_video(model_cfg, num_frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    size = int(model_cfg.image_size)
    return torch.rand(1, int(model_cfg.channels), num_frames, size, size, generator=g)


@torch.no_grad()
def _encode(model: torch.nn.Module, video: torch.Tensor, vcff: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    quantized, codes = model.encode(video, quantize=True, video_contains_first_frame=vcff)
    return quantized, codes


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (``torch.equal`` on floats would call -0.0 == 0.0 and NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    as_int = _INT_OF_SIZE[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def _build(model_cfg: dict, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(OmegaConf.create(model_cfg))


@pytest.fixture(scope="module")
def ten_step_run(tmp_path_factory) -> Path:
    """A finished 10-step tiny run (read-only): the prefix for the kill tests, the twin for --compare."""
    run_dir = tmp_path_factory.mktemp("ten") / "run"
    run_train(run_dir, "trainer.max_steps=10")
    return run_dir


# ----------------------------------------------------------------------------------------------
# 1. a trained checkpoint loads, rebuilds the model, and survives save -> load bit for bit


def test_trained_checkpoint_loads_rebuilds_model_and_roundtrips_bit_exactly(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / STEP20
    report = verify_files(ckpt)
    assert report.ok and report.loaded is not None and report.loaded.step == 20
    loaded = load_checkpoint(ckpt)
    assert loaded.path == ckpt and loaded.nbytes == report.bytes == report.loaded.nbytes
    state, manifest = loaded.state, loaded.manifest

    # Everything needed for an exact resume is there.
    for key in (
        "model",
        "ema",
        "optim_gen",
        "optim_discr",
        "sched_gen",
        "sched_discr",
        "trainer",
        "ranks",
        "config",
        "env",
    ):
        assert key in state, key
    cfg = state["config"]
    step = manifest["step"]
    assert step == 20 == state["trainer"]["step"]
    assert set(state["trainer"]) >= {"step", "samples_seen", "best_val_loss", "best_step"}
    per_step = int(cfg["trainer"]["grad_accum_steps"]) * int(cfg["data"]["batch_size"])
    assert state["trainer"]["samples_seen"] == step * per_step
    for opt in ("optim_gen", "optim_discr"):
        per_param = state[opt]["state"]
        n_params = sum(len(g["params"]) for g in state[opt]["param_groups"])
        assert 0 < len(per_param) <= n_params, opt  # (a parameter that never gets a gradient has no state)
        assert {int(s["step"].item()) for s in per_param.values()} == {step}, opt
    assert state["sched_gen"]["last_epoch"] == state["sched_discr"]["last_epoch"] == step
    rank = state["ranks"]["0"]
    assert set(rank["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert rank["rng"]["python"]["state"].numel() == 625 and rank["rng"]["numpy"]["key"].numel() == 624
    assert rank["rng"]["torch"].dtype == torch.uint8 and rank["rng"]["torch"].numel() > 0
    assert isinstance(rank["rng"]["cuda"], list)
    data = rank["data"]
    batches_per_epoch = int(cfg["data"]["train_size"]) // int(cfg["data"]["batch_size"])
    assert data["epoch"] * batches_per_epoch + data["batch_in_epoch"] == step * int(cfg["trainer"]["grad_accum_steps"])
    assert (manifest["epoch"], manifest["batch_in_epoch"]) == (data["epoch"], data["batch_in_epoch"])
    env = state["env"]
    assert env["torch"] == torch.__version__
    assert env["num_threads"] == int(cfg["trainer"]["num_threads"])
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    # The model, rebuilt from the saved config alone, takes the weights strictly and encodes.
    mcfg = OmegaConf.create(cfg["model"])
    vcff = bool(mcfg.video_contains_first_frame)
    video = _fixed_video(mcfg, int(cfg["data"]["num_frames"]))
    untrained_q, _ = _encode(_build(cfg["model"], seed=0), video, vcff)
    model = _build(cfg["model"], seed=0)
    model.load_state_dict(state["model"], strict=True)
    q1, codes1 = _encode(model, video, vcff)
    assert torch.isfinite(q1).all() and codes1.numel() > 0
    assert not _same_bits(q1, untrained_q), "the loaded weights made no difference to the encoding"
    ema_model = model.copy_for_eval()
    ema_model.load_state_dict(state["ema"], strict=True)

    # Save the loaded state again with a CheckpointManager, reload it, and encode again.
    mgr = CheckpointManager(tmp_path / "again", keep_last=0)
    mgr.save(step, state, tensor_groups=("model", "ema"), metadata={"val_loss": manifest["val_loss"]})
    again = load_checkpoint(tmp_path / "again" / STEP20)
    state2, manifest2 = again.state, again.manifest
    assert manifest2["step"] == step and manifest2["val_loss"] == manifest["val_loss"]
    assert compare_states(state, state2) is None
    for group in ("model", "ema"):
        assert state2[group].keys() == state[group].keys()
        assert all(_same_bits(state[group][k], state2[group][k]) for k in state[group]), group
    model2 = _build(cfg["model"], seed=1)  # different initial weights: only the load can make them equal
    model2.load_state_dict(state2["model"], strict=True)
    q2, codes2 = _encode(model2, video, vcff)
    assert _same_bits(q1, q2) and _same_bits(codes1, codes2)


# ----------------------------------------------------------------------------------------------
# 2. every kind of damage is detected, naming the file


def _truncate(ckpt: Path) -> Path:
    p = ckpt / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _flip_byte(ckpt: Path) -> Path:
    p = ckpt / "ema.safetensors"
    data = bytearray(p.read_bytes())
    header = int.from_bytes(data[:8], "little")
    pos = 8 + header + (len(data) - 8 - header) // 2  # inside the tensor data, not the header
    data[pos] ^= 0x10
    p.write_bytes(bytes(data))
    return p


def _delete(ckpt: Path) -> Path:
    p = ckpt / "state.safetensors"
    p.unlink()
    return p


def _empty(ckpt: Path) -> Path:
    p = ckpt / "state.json"
    p.write_bytes(b"")
    return p


def _delete_manifest(ckpt: Path) -> Path:
    p = ckpt / MANIFEST
    p.unlink()
    return p


def _malform_manifest(ckpt: Path) -> Path:
    p = ckpt / MANIFEST
    p.write_text(p.read_text()[:-20])  # cut mid-object: invalid JSON
    return p


def _wrong_size_in_manifest(ckpt: Path) -> Path:
    p = ckpt / MANIFEST
    manifest = json.loads(p.read_text())
    manifest["files"]["state.safetensors"]["size"] += 1
    p.write_text(json.dumps(manifest))
    return ckpt / "state.safetensors"


CORRUPTIONS = {
    "truncated": (_truncate, "truncated"),
    "flipped_byte": (_flip_byte, "xxh3_128 mismatch"),
    "missing_file": (_delete, "missing"),
    "empty_file": (_empty, "size 0 bytes"),
    "manifest_missing": (_delete_manifest, "missing"),
    "manifest_malformed": (_malform_manifest, "malformed JSON"),
    "manifest_wrong_size": (_wrong_size_in_manifest, "manifest says"),
}


@pytest.fixture(scope="module")
def corrupted(trained_run, tmp_path_factory) -> tuple[dict, Path, dict]:
    """One damaged copy of step 20 per kind of damage, plus an intact copy, and one real run of the
    verify command over all of them (``--json``; one subprocess instead of eight keeps the file fast)."""
    root = tmp_path_factory.mktemp("corrupt") / "run" / "checkpoints"
    cases = {}
    for i, (how, (damage, what)) in enumerate(CORRUPTIONS.items(), start=1):
        ckpt = _copy_ckpt(trained_run / "checkpoints" / STEP20, root / step_dir_name(i))
        assert verify_files(ckpt).ok  # the copy itself is sound
        cases[how] = (ckpt, damage(ckpt), what)
    intact = _copy_ckpt(trained_run / "checkpoints" / STEP20, root / step_dir_name(99))
    proc = _verify_cli(root.parent, "--json", "--no-model")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = {Path(r["path"]).name: r for r in json.loads(proc.stdout)["checkpoints"]}
    assert len(results) == len(CORRUPTIONS) + 1
    assert results[intact.name]["ok"] and not results[intact.name]["errors"]  # the command can say OK
    return cases, intact, results


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corruption_is_detected_naming_the_file(corrupted, capsys, how):
    cases, _, cli_results = corrupted
    ckpt, named, what = cases[how]

    report = verify_files(ckpt)
    assert not report.ok
    assert len(report.errors) == 1 and str(named) in report.errors[0] and what in report.errors[0], report.errors
    with pytest.raises(CheckpointError, match=what) as exc:
        load_checkpoint(ckpt)
    assert str(named) in str(exc.value)

    # The verify command (as a subprocess, over the whole directory) marks this one invalid, naming the file.
    entry = cli_results[ckpt.name]
    assert not entry["ok"] and any(str(named) in e for e in entry["errors"]), entry
    # ... and on this checkpoint alone it exits 1 with the file in its table (same entry point, in-process).
    assert verify_main([str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and str(named) in out, out


# ----------------------------------------------------------------------------------------------
# 3. SIGKILL of a real training process inside a checkpoint write, at every phase


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited {proc.returncode} before reaching {path.name}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear within {timeout}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


# The first and last phases in the default suite; the two between them in the slow suite (suite time).
@pytest.mark.parametrize(
    "phase",
    [p if p in (SAVE_PHASES[0], SAVE_PHASES[-1]) else pytest.param(p, marks=pytest.mark.slow) for p in SAVE_PHASES],
)
def test_sigkill_during_checkpoint_write_never_exposes_a_partial_checkpoint(trained_run, ten_step_run, tmp_path, phase):
    run = tmp_path / "run"
    shutil.copytree(ten_step_run, run)
    root = run / "checkpoints"
    log = tmp_path / "held.log"
    proc = start_train(run, "resume_from=auto", "trainer.max_steps=20", *hold(phase, 20), log=log)
    try:
        _wait_for(root / f".held-{phase}-20", proc, log)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Only complete checkpoints carry a step_ name, and each one verifies.
    mgr = CheckpointManager(root)
    committed = [p.name for p in mgr.committed()]
    expected = [STEP10, STEP20] if phase == "after_rename" else [STEP10]
    assert committed == expected, sorted(p.name for p in root.iterdir())
    for p in mgr.committed():
        report = verify_files(p)
        assert report.ok, report.errors
    assert newest_valid(root)[0].path == root / expected[-1]
    temps = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    if phase == "after_rename":
        assert temps == []
        # Killed between the commit and the best-pointer update: the pointer is stale (resume repairs it).
        assert mgr.best()["step"] == 10
    else:
        assert [t.name.split("-")[1] for t in temps] == [STEP20], temps
        written = {str(f.relative_to(temps[0])) for f in temps[0].rglob("*") if f.is_file()}
        assert (MANIFEST in written) == (phase == "before_rename"), written
        # state.json, state.safetensors, model, ema, and this rank's ranks/0/state.{json,safetensors}
        assert len(written) == (1 if phase == "files_partial" else 6 if phase == "files_written" else 7), written

    # Resume: the leftovers are cleaned up and the run finishes with valid checkpoints.
    proc2 = run_train(run, "resume_from=auto", "trainer.max_steps=20")
    output = proc2.stdout + proc2.stderr
    leftovers = [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert leftovers == []
    assert ("ckpt.cleanup" in output) == (phase != "after_rename"), output[-4000:]
    assert [p.name for p in mgr.committed()] == [STEP10, STEP20]
    assert all(verify_files(p).ok for p in mgr.committed())
    assert mgr.best() is not None and mgr.best()["step"] == 20
    # ... and step 20 is bit for bit the one an uninterrupted run wrote.
    assert compare_checkpoints(trained_run / "checkpoints" / STEP20, root / STEP20) is None


# ----------------------------------------------------------------------------------------------
# 4. a pickle planted in a checkpoint is refused, never executed


class _TouchOnUnpickle:
    """Unpickling this creates ``marker``: proof that a loader executed attacker-chosen code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _torch_zip(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_malicious_payload_is_live(tmp_path):
    """Control for the tests below: these payloads really do run code when deserialised unsafely."""
    for i, (dump, load) in enumerate(
        [(pickle.dumps, pickle.loads), (_torch_zip, lambda b: torch.load(io.BytesIO(b), weights_only=False))]
    ):
        marker = tmp_path / f"control-{i}"
        load(dump(_TouchOnUnpickle(marker)))
        assert marker.exists()


@pytest.mark.parametrize("fmt", ["pickle", "torch_zip"])
@pytest.mark.parametrize("target", ["state.safetensors", "model.safetensors"])
def test_planted_pickle_with_matching_hash_is_refused_in_process(trained_run, tmp_path, target, fmt):
    marker = tmp_path / "pwned"
    ckpt = _copy_ckpt(trained_run / "checkpoints" / STEP20, tmp_path / "run" / "checkpoints" / STEP20)
    payload = _TouchOnUnpickle(marker)
    _rewrite_file_and_manifest(ckpt, target, pickle.dumps(payload) if fmt == "pickle" else _torch_zip(payload))
    read_manifest(ckpt)  # hashes and sizes agree: only the content is hostile

    with pytest.raises(CheckpointError, match="pickle") as exc:
        load_checkpoint(ckpt)
    assert str(ckpt / target) in str(exc.value)
    report = verify_files(ckpt)
    assert not report.ok and str(ckpt / target) in report.errors[0]
    assert not marker.exists()


@pytest.mark.parametrize("target", [pytest.param("state.safetensors", marks=pytest.mark.slow), "model.safetensors"])
def test_planted_pickle_is_refused_by_verify_cli_and_train(trained_run, tmp_path, target):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / STEP20
    _rewrite_file_and_manifest(ckpt, target, pickle.dumps(_TouchOnUnpickle(marker)))

    proc = _verify_cli(ckpt)
    assert proc.returncode == 1 and str(ckpt / target) in proc.stdout and "pickle" in proc.stdout, proc.stdout
    assert not marker.exists()

    proc = run_train(run, f"resume_from={ckpt}", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert str(ckpt / target) in proc.stderr and "pickle" in proc.stderr, output[-4000:]
    assert "train.start" not in output  # refused before any training
    assert not marker.exists()
    assert [p.name for p in CheckpointManager(run / "checkpoints").committed()] == [STEP10, STEP20]


@pytest.mark.parametrize("extra", ["evil.pt", "evil.safetensors"])
def test_manifest_listing_an_extra_payload_file_is_refused(trained_run, tmp_path, extra):
    marker = tmp_path / "pwned"
    ckpt = _copy_ckpt(trained_run / "checkpoints" / STEP20, tmp_path / STEP20)
    _rewrite_file_and_manifest(ckpt, extra, pickle.dumps(_TouchOnUnpickle(marker)))
    assert extra in json.loads((ckpt / MANIFEST).read_text())["files"]

    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    assert extra in str(exc.value)
    report = verify_files(ckpt)
    assert not report.ok and extra in report.errors[0]
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# 5. retention: keep_last newest + the best, never the newest, no leftovers


@pytest.fixture(scope="module")
def run60(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("r60") / "run"
    proc = run_train(
        run_dir,
        "trainer.max_steps=60",
        "checkpoint.every_n_steps=5",
        "checkpoint.keep_last=2",
        "trainer.eval_every_n_steps=10",
    )
    return run_dir, proc.stdout + proc.stderr


def _best_eval(run_dir: Path) -> dict:
    evals = [r for r in read_history(run_dir) if r["kind"] == "eval"]
    assert evals
    return min(evals, key=lambda r: r["val_loss"])


def test_retention_keeps_two_newest_and_best(run60):
    run, output = run60
    root = run / "checkpoints"
    mgr = CheckpointManager(root)
    assert [r["step"] for r in read_history(run) if r["kind"] == "eval"] == [10, 20, 30, 40, 50, 60]
    best_rec = _best_eval(run)
    expected = {step_dir_name(55), step_dir_name(60), step_dir_name(best_rec["step"])}
    assert sorted(p.name for p in root.iterdir()) == sorted(expected | {"best.json"})  # no temp/trash/aside dirs
    saved = list(range(5, 61, 5))
    assert output.count("ckpt.save step=") == len(saved)
    assert output.count("ckpt.purge path=") == len(saved) - len(expected)
    for p in mgr.committed():
        assert verify_files(p).ok, p

    best = mgr.best()
    assert best["step"] == best_rec["step"] and best["path"] == step_dir_name(best_rec["step"])
    assert best["val_loss"] == best_rec["val_loss"]
    assert read_manifest(root / best["path"])["val_loss"] == best_rec["val_loss"]


def test_retention_keep_last_1_keeps_newest_and_best(run60, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run60[0], run)
    run_train(run, "resume_from=auto", "trainer.max_steps=65", "checkpoint.keep_last=1")
    root = run / "checkpoints"
    mgr = CheckpointManager(root)
    best = mgr.best()
    assert best["step"] == _best_eval(run)["step"]
    assert sorted(p.name for p in root.iterdir()) == sorted({step_dir_name(65), best["path"], "best.json"})
    assert newest_valid(root)[0].path == root / step_dir_name(65)


def _small_state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "trainer": {"step": step}, "note": "x"}


def _steps(mgr: CheckpointManager) -> list[int]:
    return [int(p.name[5:]) for p in mgr.committed()]


def test_manager_purge_unit(tmp_path):
    # keep_last=2: the two newest survive every save, plus the best pointer's target.
    mgr = CheckpointManager(tmp_path / "a", keep_last=2)
    for step in range(1, 7):
        on_commit = (lambda p, s=step: mgr.set_best(s, 0.5)) if step == 2 else None
        mgr.save(step, _small_state(step), tensor_groups=("model",), on_commit=on_commit)
        assert step in _steps(mgr) and verify_files(mgr.root / step_dir_name(step)).ok
    assert _steps(mgr) == [2, 5, 6]
    state = load_checkpoint(mgr.root / step_dir_name(6)).state
    assert torch.equal(state["model"]["w"], torch.full((4,), 6.0)) and state["trainer"]["step"] == 6

    # keep_last=1: only the newest (just saved) remains.
    mgr1 = CheckpointManager(tmp_path / "b", keep_last=1)
    for step in range(1, 4):
        mgr1.save(step, _small_state(step), tensor_groups=("model",))
        assert _steps(mgr1) == [step]

    # keep_last=0 keeps everything.
    mgr0 = CheckpointManager(tmp_path / "c", keep_last=0)
    for step in range(1, 5):
        mgr0.save(step, _small_state(step), tensor_groups=("model",))
    assert _steps(mgr0) == [1, 2, 3, 4]


def test_manager_incomplete_dirs_do_not_count(tmp_path):
    root = tmp_path / "ckpts"
    mgr = CheckpointManager(root, keep_last=1)
    mgr.save(1, _small_state(1), tensor_groups=("model",))
    # Leftovers of crashes and damage, at higher steps than anything committed so far.
    tmp = root / ".tmp-step_00000099-123-456"
    trash = root / ".trash-step_00000098-123"
    aside = root / "step_00000097.corrupt-20260101-000000-123"
    incomplete = root / step_dir_name(96)  # a step_ name but no manifest: never committed by us
    for d in (tmp, trash, aside, incomplete):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    assert _steps(mgr) == [1, 96]

    mgr.save(2, _small_state(2), tensor_groups=("model",))
    mgr.save(3, _small_state(3), tensor_groups=("model",))
    # The newest valid checkpoint survived, and leftovers neither counted nor were deleted by purge.
    assert (root / step_dir_name(3)).is_dir() and verify_files(root / step_dir_name(3)).ok
    assert not (root / step_dir_name(2)).exists()
    assert all(d.is_dir() for d in (tmp, trash, aside, incomplete))
    assert newest_valid(root)[0].path == root / step_dir_name(3)

    removed = mgr.cleanup_temporaries()
    assert sorted(removed) == sorted([tmp, trash])
    assert aside.is_dir() and incomplete.is_dir()

    # Even a complete checkpoint with a higher step (another timeline) never gets the one just saved purged.
    CheckpointManager(root, keep_last=0).save(50, _small_state(50), tensor_groups=("model",))
    mgr.save(4, _small_state(4), tensor_groups=("model",))
    assert (root / step_dir_name(4)).is_dir() and verify_files(root / step_dir_name(4)).ok
    assert not (root / step_dir_name(3)).exists()


# ----------------------------------------------------------------------------------------------
# 6. verify --compare


def test_compare_identical_runs_and_differences(trained_run, ten_step_run, tmp_path):
    a = trained_run / "checkpoints" / STEP10
    b = ten_step_run / "checkpoints" / STEP10
    proc = _verify_cli(b, "--compare", a)
    assert proc.returncode == 0 and proc.stdout.strip() == "identical", proc.stdout + proc.stderr

    proc = _verify_cli(a, "--compare", trained_run / "checkpoints" / STEP20)
    assert proc.returncode == 1 and "step" in proc.stdout and "10 vs 20" in proc.stdout, proc.stdout

    # One element of one tensor changed (hashes updated, so only the comparison can see it).
    changed = _copy_ckpt(a, tmp_path / STEP10)
    tensors = safetensors.torch.load_file(changed / "model.safetensors")
    key = sorted(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)[0]
    flat = tensors[key].view(-1)
    flat[flat.numel() // 2] += 1.0
    _rewrite_file_and_manifest(changed, "model.safetensors", safetensors.torch.save(tensors))
    assert verify_files(changed).ok
    proc = _verify_cli(a, "--compare", changed)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"/model/{key}:" in proc.stdout, proc.stdout
    assert f"1 of {tensors[key].numel()} elements differ" in proc.stdout, proc.stdout
