"""The probe cache beside the run (issue 25, item 1): a restart takes each video's probe from ``RUN/data_probes.json``
when the file is the one probed (size, mtime, content hash), probes it again otherwise, and never trusts a
damaged cache nor lets it break a start.

Real video files (PyAV, ffv1) and real cache files in ``tmp_path``; which files were probed is read from the
``data.probes`` log line and shown by doctoring a trusted entry. One real ``train.py`` start and resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import compose_cfg, run_train

from resilient_train.cli.start import REFUSALS, start
from resilient_train.data import build_data, build_folder_datasets, write_video
from resilient_train.data.probes import FORMAT, PROBES_FILE, ProbeCache
from resilient_train.data.video import VideoReadError
from resilient_train.resume.lock import RunLock

LENGTHS = {"train/a.mkv": 12, "train/b.mkv": 15, "train/sub/c.mkv": 20, "val/v.mkv": 11}


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def write(path: Path, n: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames(n, seed), codec="ffv1", fps=10)


@pytest.fixture
def folder(tmp_path) -> Path:
    """train/ (three videos, one in a subfolder) and val/ (one): the split the folder names."""
    root = tmp_path / "videos"
    for i, (rel, n) in enumerate(LENGTHS.items()):
        write(root / rel, n, seed=i)
    return root


def cfg(folder: Path, **over) -> SimpleNamespace:
    base = dict(
        name="folder",
        path=str(folder),
        num_frames=5,
        image_size=16,
        channels=3,
        batch_size=1,
        num_workers=0,
        frame_step=1,
        clip_stride=0,
        val_fraction=0.0,
        val_path=None,
        cache="none",
        cache_dir=None,
        skip_bad_files=False,
        extensions=[".mkv"],
    )
    return SimpleNamespace(**{**base, **over})


def counts(text: str) -> tuple[int, int]:
    """``(cached, probed)`` of the last ``data.probes`` line."""
    found = re.findall(r"data\.probes cached=(\d+) probed=(\d+) path=", text)
    assert found, f"no data.probes line in:\n{text[-3000:]}"
    return int(found[-1][0]), int(found[-1][1])


def build(folder: Path, run: Path, caplog, **over):
    """One start's data index against ``run``'s cache, as a new process would (a fresh ProbeCache):
    ``(train, val, fingerprint, (cached, probed), cache)``."""
    caplog.clear()
    probes = ProbeCache.in_run(run)
    with caplog.at_level(logging.INFO):
        train, val, fp = build_folder_datasets(cfg(folder, **over), probes)
    return train, val, fp, counts(caplog.text), probes


def uncached(folder: Path, **over):
    return build_folder_datasets(cfg(folder, **over))


@pytest.fixture
def run(tmp_path) -> Path:
    (tmp_path / "run").mkdir()
    return tmp_path / "run"


def read_doc(run: Path) -> dict:
    return json.loads((run / PROBES_FILE).read_text())


def entry(run: Path, path: Path) -> dict:
    return read_doc(run)["entries"][os.path.realpath(path)]


def write_doc(run: Path, doc: dict) -> None:
    (run / PROBES_FILE).write_text(json.dumps(doc))


def test_a_second_start_takes_every_probe_from_the_cache_and_builds_the_same_index(folder, run, caplog):
    train, val, fp, seen, probes = build(folder, run, caplog)
    assert seen == (0, len(LENGTHS))
    assert not (run / PROBES_FILE).exists(), "building the index must never write the cache (the caller does)"
    assert probes.save() and (run / PROBES_FILE).is_file()
    doc = read_doc(run)
    assert (doc["format"], sorted(doc["entries"])) == (FORMAT, sorted(os.path.realpath(folder / r) for r in LENGTHS))

    train2, val2, fp2, seen, probes = build(folder, run, caplog)
    assert seen == (len(LENGTHS), 0)
    assert fp2 == fp == uncached(folder)[2]  # the fingerprint does not depend on where the probes came from
    assert (train2.files, val2.files, train2.clips) == (train.files, val.files, train.clips)
    before = (run / PROBES_FILE).stat().st_mtime_ns, (run / PROBES_FILE).read_bytes()
    assert not probes.save(), "nothing changed: the cache is not rewritten"
    assert ((run / PROBES_FILE).stat().st_mtime_ns, (run / PROBES_FILE).read_bytes()) == before

    # The probes really come from the file: a doctored entry (its identity intact) is believed.
    doc = read_doc(run)
    e = doc["entries"][os.path.realpath(folder / "train/sub/c.mkv")]
    e["frames"], e["pts"] = 6, e["pts"][:6]
    write_doc(run, doc)
    train3, _, fp3, seen, _ = build(folder, run, caplog)
    assert seen == (len(LENGTHS), 0)
    assert {f.rel: f.frames for f in train3.files}["sub/c.mkv"] == 6 and fp3 != fp


def test_a_file_replaced_under_the_same_name_is_probed_again(folder, run, caplog):
    _, _, _, _, probes = build(folder, run, caplog)
    probes.save()
    victim = folder / "train/b.mkv"
    write(victim, 30, seed=77)  # another video of the same name: other size, other content
    st = victim.stat()
    # The size and mtime made to match the new file: only the content hash tells them apart.
    doc = read_doc(run)
    doc["entries"][os.path.realpath(victim)].update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    write_doc(run, doc)

    train, val, fp, seen, probes = build(folder, run, caplog)
    assert seen == (len(LENGTHS) - 1, 1)
    assert {f.rel: f.frames for f in train.files}["b.mkv"] == 30
    assert fp == uncached(folder)[2]
    assert probes.save() and entry(run, victim)["frames"] == 30  # the entry replaced
    assert build(folder, run, caplog)[3] == (len(LENGTHS), 0)


def test_a_file_touched_with_the_same_content_is_probed_again(folder, run, caplog):
    _, _, fp, _, probes = build(folder, run, caplog)
    probes.save()
    victim = folder / "val/v.mkv"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    _, _, fp2, seen, probes = build(folder, run, caplog)
    assert seen == (len(LENGTHS) - 1, 1) and fp2 == fp  # same bytes: same fingerprint
    assert probes.save() and entry(run, victim)["mtime_ns"] == st.st_mtime_ns + 5_000_000_000
    assert build(folder, run, caplog)[3] == (len(LENGTHS), 0)


def test_a_symlinked_folder_shares_the_entries_of_the_real_files(folder, run, caplog, tmp_path):
    build(folder, run, caplog)[4].save()
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    assert build(link, run, caplog)[3] == (len(LENGTHS), 0)


def _set(path: str, value):
    """Damage: set one field of the entry of ``train/a.mkv`` (``path`` is its field) to ``value``."""

    def damage(doc: dict, key: str) -> bytes:
        doc["entries"][key][path] = value
        return json.dumps(doc).encode()

    return damage


def _doc(fn):
    def damage(doc: dict, key: str) -> bytes:
        fn(doc, key)
        return json.dumps(doc).encode()

    return damage


DAMAGE = {
    "garbage bytes": lambda doc, key: bytes(range(256)) * 4,
    "empty": lambda doc, key: b"",
    "truncated JSON": lambda doc, key: json.dumps(doc).encode()[:200],
    "not UTF-8": lambda doc, key: b'{"format": 1, "pyav": "\xff"}',
    "a JSON list": lambda doc, key: b"[1, 2, 3]",
    "NaN": lambda doc, key: json.dumps(doc).replace('"fps": 10.0', '"fps": NaN').encode(),
    "newer format": _doc(lambda doc, key: doc.update(format=FORMAT + 1)),
    "format as a string": _doc(lambda doc, key: doc.update(format=str(FORMAT))),
    "another PyAV": _doc(lambda doc, key: doc.update(pyav="0.0.1")),
    "an extra top-level field": _doc(lambda doc, key: doc.update(extra=1)),
    "entries a list": _doc(lambda doc, key: doc.update(entries=list(doc["entries"]))),
    "a relative key": _doc(lambda doc, key: doc["entries"].update({"a.mkv": doc["entries"][key]})),
    "a missing field": _doc(lambda doc, key: doc["entries"][key].pop("width")),
    "an extra field": _doc(lambda doc, key: doc["entries"][key].update(note="x")),
    "size negative": _set("size", -1),
    "size a bool": _set("size", True),
    "size a float": _set("size", 1234.0),
    "mtime a string": _set("mtime_ns", "1700000000"),
    "frames zero": _set("frames", 0),
    "frames a string": _set("frames", "12"),
    "width negative": _set("width", -16),
    "fps a string": _set("fps", "10"),
    "fps negative": _set("fps", -10.0),
    "fps a huge int": _set("fps", 10**400),
    "fps an int": _set("fps", 10),
    "size over 64 bits": _set("size", 1 << 64),
    "digest short": _set("digest", "abc"),
    "digest upper case": _set("digest", "A" * 32),
    "pts a string": _set("pts", "0,1,2"),
    "frames/pts mismatch": _doc(lambda doc, key: doc["entries"][key]["pts"].pop()),
    "pts with a float": _doc(lambda doc, key: doc["entries"][key]["pts"].__setitem__(3, 3.0)),
    "pts with a bool": _doc(lambda doc, key: doc["entries"][key]["pts"].__setitem__(1, True)),
    "pts repeated": _doc(lambda doc, key: doc["entries"][key]["pts"].__setitem__(2, doc["entries"][key]["pts"][1])),
    "entry not an object": _doc(lambda doc, key: doc["entries"].update({key: [1, 2]})),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_cache_is_ignored_whole_with_a_warning_and_rewritten(folder, run, caplog, damage):
    _, _, fp, _, probes = build(folder, run, caplog)
    probes.save()
    key = os.path.realpath(folder / "train/a.mkv")
    (run / PROBES_FILE).write_bytes(DAMAGE[damage](read_doc(run), key))

    train, val, fp2, seen, probes = build(folder, run, caplog)
    bad = [r for r in caplog.records if r.getMessage().startswith("data.probe_cache_bad ")]
    assert len(bad) == 1 and bad[0].levelno == logging.WARNING, caplog.text
    assert f"path={run / PROBES_FILE} reason=" in bad[0].getMessage()
    assert seen == (0, len(LENGTHS)), "nothing of a damaged cache is trusted"
    plain_train, plain_val, plain_fp = uncached(folder)
    assert fp2 == fp == plain_fp and (train.files, val.files) == (plain_train.files, plain_val.files)
    assert probes.save(), "a damaged cache is rewritten"
    doc = read_doc(run)
    assert doc["format"] == FORMAT and len(doc["entries"]) == len(LENGTHS)
    assert build(folder, run, caplog)[3] == (len(LENGTHS), 0) and "probe_cache_bad" not in caplog.text


def test_a_folder_in_place_of_the_cache_is_ignored_and_a_failed_write_is_logged_not_raised(folder, run, caplog):
    (run / PROBES_FILE).mkdir()
    *_, seen, probes = build(folder, run, caplog)
    assert seen == (0, len(LENGTHS)) and "data.probe_cache_bad" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert not probes.save()
    assert "data.probe_cache_unwritten" in caplog.text and (run / PROBES_FILE).is_dir()


def test_an_unreadable_file_is_not_cached_and_a_failed_build_writes_nothing(folder, run, caplog):
    (folder / "train/broken.mkv").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(500))  # an EBML header and nothing
    *_, seen, probes = build(folder, run, caplog, skip_bad_files=True)
    assert seen == (0, len(LENGTHS) + 1)
    assert probes.save() and os.path.realpath(folder / "train/broken.mkv") not in read_doc(run)["entries"]
    assert build(folder, run, caplog, skip_bad_files=True)[3] == (len(LENGTHS), 1)  # probed again, every start

    (run / PROBES_FILE).unlink()
    with pytest.raises(VideoReadError, match="broken.mkv"):
        build_folder_datasets(cfg(folder), ProbeCache.in_run(run))
    assert not (run / PROBES_FILE).exists()


def test_a_start_refused_after_the_data_index_leaves_no_cache(folder, tmp_path, caplog):
    """In process, as ``train.py`` would start: the data is indexed (and probed), then the start is refused (no full
    batch); the run directory gets no ``data_probes.json``."""
    run = tmp_path / "run"
    overrides = ["data=folder", f"data.path={folder}", "data.batch_size=1000", "chaos.enabled=false"]
    lock = RunLock(run)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(REFUSALS, match="fewer than one global batch"):
            start(compose_cfg(["+experiment=tiny", *overrides]), run, overrides, lock)
    finally:
        lock.release()
    assert counts(caplog.text) == (0, len(LENGTHS))
    assert not (run / PROBES_FILE).exists()


def test_synthetic_data_never_touches_the_cache(run):
    probes = ProbeCache.in_run(run)
    build_data(SimpleNamespace(name="synthetic", num_frames=5, image_size=16, train_size=4, val_size=2), 0, probes)
    assert not probes.changed and not probes.save() and not (run / PROBES_FILE).exists()


def test_train_py_resume_takes_every_probe_from_the_cache(folder, tmp_path):
    """End to end: a start probes every file and leaves ``data_probes.json``; the resume probes none."""
    run = tmp_path / "run"
    args = ("data=folder", f"data.path={folder}", "checkpoint.every_n_steps=2")
    first = run_train(run, *args, "trainer.max_steps=2")
    assert counts(first.stdout + first.stderr) == (0, len(LENGTHS))
    assert len(read_doc(run)["entries"]) == len(LENGTHS)
    second = run_train(run, *args, "resume_from=auto", "trainer.max_steps=4")
    text = second.stdout + second.stderr
    assert counts(text) == (len(LENGTHS), 0) and "resume.timing" in text and "probe_cache_bad" not in text
