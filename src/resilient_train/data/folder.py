"""Folders of real videos: the files under a folder, the train/val split, the datasets of ``data=folder``.

Owns :func:`build_folder_datasets` (``(train, val, fingerprint)`` for ``data=folder``, called by
:func:`~.loader.build_data`) and :func:`clips_of` (every clip of the files and folders a tool
names, no split). Every file is probed once at start-up (:func:`~.video.probe`: no decoding), or its
probe taken from the run's probe cache (:mod:`.probes`) when the file is the one probed before; a
file that cannot be read is refused by name, or skipped and recorded with
``data.skip_bad_files=true``; files shorter than one clip are skipped and counted. The clips are
:class:`~.clips.VideoClips`; the fingerprint of the files is :mod:`.fingerprint`.

Split: ``train/`` and ``val/`` subfolders when both exist; otherwise a file is validation when a
hash of its relative path falls below ``data.val_fraction`` (adding a file never moves another
between splits); ``data.val_path`` names a separate validation folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import xxhash

from .clips import Preprocessing, VideoClips
from .fingerprint import fingerprint
from .probes import Probe, ProbeCache
from .video import VideoFile, VideoReadError, content_hash, probe, short_error

__all__ = ["DEFAULT_EXTENSIONS", "build_folder_datasets", "clips_of", "in_val", "list_videos"]

# The name of the module these lines were logged from before the split: log lines and filters stay the same.
log = logging.getLogger("resilient_train.data.video")

DEFAULT_EXTENSIONS = (".mp4", ".webm", ".gif", ".mkv", ".mov", ".avi")


def list_videos(folder: str, extensions: Sequence[str]) -> list[str]:
    """Relative paths ("/" separators, sorted) of the files under ``folder`` with one of ``extensions``."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.lower().endswith(exts) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def in_val(rel: str, val_fraction: float) -> bool:
    """The hash split: a function of the relative path alone, so adding a file never moves another."""
    return xxhash.xxh3_64(rel.encode()).intdigest() / 2.0**64 < val_fraction


def _probe_one(path: str, probes: ProbeCache | None) -> tuple[int, str, Probe]:
    """``(size, digest, probe)`` of one file, the probe from ``probes`` when it holds this very file."""
    if probes is None:
        size = os.path.getsize(path)
        digest = content_hash(path, size)
        return size, digest, probe(path)
    st = os.stat(path)  # before hashing and probing: a file changed meanwhile does not match its entry next time
    digest = content_hash(path, st.st_size)
    found = probes.get(path, st.st_size, st.st_mtime_ns, digest)
    if found is None:
        found = probe(path)
        probes.put(path, st.st_size, st.st_mtime_ns, digest, found)
    return st.st_size, digest, found


def _probe_all(
    folder: str, rels: list[str], skip_bad: bool, probes: ProbeCache | None = None
) -> tuple[list[VideoFile], list[list[str]]]:
    files, bad = [], []
    for rel in rels:
        path = os.path.join(folder, rel)
        try:
            size, digest, (frames, fps, w, h, pts) = _probe_one(path, probes)
        except Exception as exc:  # PyAV raises its own errors for a damaged container
            why = short_error(exc).replace(path, rel)  # the fingerprint must not depend on where the data is
            if not skip_bad:
                raise VideoReadError(
                    f"{path}: cannot read this video ({why}); remove it, or pass data.skip_bad_files=true to skip it"
                ) from None
            log.warning("data.skip_bad_file path=%s error=%s", path, why)
            bad.append([rel, why])
            continue
        files.append(VideoFile(rel, path, size, digest, frames, fps, w, h, pts))
    return files, bad


def build_folder_datasets(d: Any, probes: ProbeCache | None = None) -> tuple[VideoClips, VideoClips, dict[str, Any]]:
    """``(train, val, fingerprint)`` for ``data=folder``; each problem is a ``ValueError`` naming the folder or file.

    ``probes``: the run's probe cache (:mod:`.probes`), read and filled here, never written (the caller saves it
    once the start is accepted); ``None`` probes every file."""
    # Long on purpose: the steps in order (list, split, probe, index, fingerprint), each with its refusal.
    root = str(d.path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.path={root}: no such folder")
    exts = [str(e) for e in d.extensions]
    prep = Preprocessing(
        num_frames=int(d.num_frames),
        frame_step=int(d.frame_step),
        clip_stride=int(d.clip_stride) or (int(d.num_frames) - 1) * int(d.frame_step) + 1,
        image_size=int(d.image_size),
        channels=int(d.channels),
    )
    val_root = str(d.val_path) if d.val_path else None
    if val_root is not None:
        if not os.path.isdir(val_root):
            raise FileNotFoundError(f"data.val_path={val_root}: no such folder")
        train_rels, val_rels, how = list_videos(root, exts), list_videos(val_root, exts), "data.val_path"
        train_dir, val_dir = root, val_root
    elif os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
        train_rels, val_rels, how = list_videos(train_dir, exts), list_videos(val_dir, exts), "train/ and val/"
    else:
        rels = list_videos(root, exts)
        train_dir = val_dir = root
        train_rels = [r for r in rels if not in_val(r, float(d.val_fraction))]
        val_rels = [r for r in rels if in_val(r, float(d.val_fraction))]
        how = f"hash of the path, val_fraction={d.val_fraction}"
    for rels, where in ((train_rels, train_dir), (val_rels, val_dir)):
        if not rels:
            raise ValueError(
                f"data.path={root}: no video files with extensions {exts} under {where} (searched recursively)"
                + (
                    ""
                    if where != root or val_root
                    else "; with few files, raise data.val_fraction or use train/ and val/ subfolders or data.val_path"
                )
            )
    train_files, train_bad = _probe_all(train_dir, train_rels, bool(d.skip_bad_files), probes)
    val_files, val_bad = _probe_all(val_dir, val_rels, bool(d.skip_bad_files), probes)
    cache_dir = str(d.cache_dir) if d.cache_dir else ""
    if str(d.cache) == "disk" and not cache_dir:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(base, "resilient_train", "clips")
    if str(d.cache) == "memory" and int(getattr(d, "num_workers", 0)) > 0:
        log.warning(
            "data.cache=memory with data.num_workers>0: each worker keeps its own cache for one epoch only; "
            "use data.cache=disk"
        )
    train = VideoClips(train_files, prep, cache=str(d.cache), cache_dir=cache_dir)
    val = VideoClips(val_files, prep, cache=str(d.cache), cache_dir=cache_dir)
    for name, ds, rels, bad in (("train", train, train_rels, train_bad), ("val", val, val_rels, val_bad)):
        short = sum(f.frames < prep.span for f in ds.files)
        log.info(
            "data.index split=%s %d files, %d clips (%d skipped: %d too short / %d unreadable) split_by=%s",
            name,
            len(rels),
            len(ds),
            short + len(bad),
            short,
            len(bad),
            how,
        )
        if not len(ds):
            raise ValueError(
                f"data.path={root}: the {name} split has no clip of {prep.num_frames} frames "
                f"(frame_step={prep.frame_step}: {prep.span} frames of a file) among {len(rels)} file(s): "
                + ("add longer videos, or lower data.num_frames / data.frame_step" if rels else "it has no files")
            )
    if probes is not None:
        log.info("data.probes cached=%d probed=%d path=%s", probes.cached, probes.probed, probes.path)
    return train, val, fingerprint(train_files, val_files, train_bad + val_bad, how, prep)


def clips_of(
    inputs: Sequence[str | os.PathLike], prep: Preprocessing, *, skip_bad: bool = False
) -> tuple[VideoClips, list[list[str]]]:
    """Every clip of the given video files and folders (searched recursively), no split: for tools
    (tokenize, evaluate) that take whatever the user names. Returns the clips and the skipped files."""
    files: list[VideoFile] = []
    bad: list[list[str]] = []
    for item in map(str, inputs):
        if os.path.isdir(item):
            found, skipped = _probe_all(item, list_videos(item, DEFAULT_EXTENSIONS), skip_bad)
        elif os.path.isfile(item):
            found, skipped = _probe_all(os.path.dirname(item) or ".", [os.path.basename(item)], skip_bad)
        else:
            raise FileNotFoundError(f"{item}: no such video file or folder")
        files += found
        bad += skipped
    clips = VideoClips(files, prep)
    if not len(clips):
        raise ValueError(f"no clip of {prep.span} frames in {[str(i) for i in inputs]}")
    return clips, bad
