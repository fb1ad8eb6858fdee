"""Hostile data: a container with no decodable frame is unreadable (not short), a file changed under a running
run stops it naming the file, and a damaged clip-cache entry is decoded again, never used.

Real video files (PyAV), real train.py subprocesses; the damage is made with plain file operations here.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import run_train, start_train, train_steps_logged, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_train.checkpoint import committed, verify_files
from resilient_train.config import compose
from resilient_train.data import build_data, write_video
from resilient_train.data.clips import DIGEST_BYTES
from resilient_train.data.video import VideoReadError

EXIT_FAILED, EXIT_CONFIG_ERROR = 1, 2


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def garbage_gif(path) -> None:
    """A GIF header (16x16, no palette) followed by noise: the container opens, no frame decodes."""
    path.write_bytes(b"GIF89a\x10\x00\x10\x00\x80\x00\x00" + np.random.default_rng(1).bytes(3000))


@pytest.fixture
def folder(tmp_path):
    """train/ with three videos, val/ with one (the split the folder names)."""
    root = tmp_path / "videos"
    for split, n in (("train", 3), ("val", 1)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            write_video(root / split / f"v{i}.mkv", frames(12, seed=i + 10 * n), codec="ffv1", fps=10)
    return root


def data_cfg(folder, **over):
    cfg = compose(["+experiment=tiny", "data=folder", f"data.path={folder}"])
    for k, v in over.items():
        cfg.data[k] = v
    return cfg.data


def test_a_container_with_no_decodable_frame_is_refused_naming_it_or_skipped_as_unreadable(folder, tmp_path):
    garbage_gif(folder / "train" / "broken.gif")
    proc = run_train(tmp_path / "run", "data=folder", f"data.path={folder}", check=False)
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr[-3000:]
    assert (
        f"{folder / 'train' / 'broken.gif'}: cannot read this video (VideoReadError: no decodable frame" in proc.stderr
    )
    assert "data.skip_bad_files=true" in proc.stderr and "Traceback" not in proc.stderr

    train, val, fingerprint = build_data(data_cfg(folder, skip_bad_files=True), 0)
    assert [rel for rel, _ in fingerprint["skipped"]] == ["broken.gif"], fingerprint["skipped"]
    assert "no decodable frame" in fingerprint["skipped"][0][1]
    assert "broken.gif" not in [f.rel for f in train.files + val.files]


def test_a_file_truncated_while_the_run_reads_it_stops_the_run_naming_it(folder, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.log"
    args = ("data=folder", f"data.path={folder}", "data.num_workers=1")
    proc = start_train(run, *args, "trainer.max_steps=100000", "checkpoint.every_n_steps=2", log=log)
    try:
        wait_for(lambda: committed(run / "checkpoints"), "a first checkpoint", proc, log)
        wait_for(lambda: train_steps_logged(run) >= 3, "a few steps", proc, log)
        victim = folder / "train" / "v0.mkv"
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        assert proc.wait(timeout=120) == EXIT_FAILED
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert f"{victim}: changed since the run indexed it at start" in text and "Traceback" not in text, text[-3000:]
    assert all(verify_files(c).ok for c in committed(run / "checkpoints"))


def test_a_removed_file_is_named_and_a_damaged_cache_entry_is_decoded_again(folder, tmp_path, caplog):
    train, _, _ = build_data(data_cfg(folder, cache="disk", cache_dir=str(tmp_path / "cache")), 0)
    decoded = train.decode(0)
    assert torch.equal(train[0], decoded)  # written to the cache
    (entry,) = [p for p in (tmp_path / "cache").rglob("*.clip")]
    raw = bytearray(entry.read_bytes())
    raw[DIGEST_BYTES + 200] ^= 0x40  # one bit of the float data, the digest left as it was
    entry.write_bytes(bytes(raw))
    assert torch.equal(train[0], decoded) and "data.cache_bad" in caplog.text
    assert entry.read_bytes()[DIGEST_BYTES:] != bytes(raw[DIGEST_BYTES:])  # rewritten

    os.remove(train.files[train.clips[-1][0]].path)
    with pytest.raises(VideoReadError, match="cannot be read any more .* Restore it, or remove it"):
        train.decode(len(train) - 1)


def test_tokenize_names_a_broken_video_and_writes_nothing(tmp_path, folder, trained_run):
    import sys

    garbage_gif(folder / "train" / "broken.gif")
    tok, out = tmp_path / "tok", tmp_path / "codes"
    export = [sys.executable, "-m", "resilient_train.export", str(trained_run), "--out", str(tok)]
    assert subprocess.run(export, capture_output=True, timeout=300).returncode == 0
    cmd = [sys.executable, "-m", "resilient_train.tokenize", "--tokenizer", str(tok), str(folder), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr[-3000:]
    assert "broken.gif" in proc.stderr and "no decodable frame" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def damaged_file_property(folder, data) -> None:
    """A good video cut short, one with garbage after a valid start, or pure garbage, among good ones: the index
    either refuses naming the file or (skip_bad_files) leaves it out, and every clip decodes or names its file."""
    victim = folder / "train" / "damaged.mkv"
    good = (folder / "train" / "v0.mkv").read_bytes()
    how = data.draw(st.sampled_from(["cut", "garbage-after", "garbage"]))
    at = data.draw(st.integers(1, len(good) - 1))
    noise = data.draw(st.binary(min_size=1, max_size=4000))
    victim.write_bytes({"cut": good[:at], "garbage-after": good[:at] + noise, "garbage": noise}[how])
    try:
        build_data(data_cfg(folder), 0)
    except VideoReadError as exc:
        assert str(victim) in str(exc) and "data.skip_bad_files=true" in str(exc)
    train, _, fingerprint = build_data(data_cfg(folder, skip_bad_files=True), 0)
    for k in range(len(train)):
        try:
            assert train[k].shape == (3, 5, 16, 16)
        except VideoReadError as exc:
            assert str(victim) in str(exc), exc


FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "8")), **FUZZ)
@given(data=st.data())
def test_fuzzed_damaged_files_among_good_ones_are_named_or_skipped_never_a_traceback(folder, data):
    damaged_file_property(folder, data)


@pytest.mark.slow
@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_fuzzed_damaged_files_many_examples(folder, data):
    damaged_file_property(folder, data)
