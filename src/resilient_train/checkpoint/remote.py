"""The commit protocol on a store without rename (Orbax's marker written last, Composer's pointer after every file).

A checkpoint is committed locally first (temporary folder, fsync, manifest, rename), then uploaded:

* **upload**: every file the manifest lists, then (once each is confirmed on the store with the
  size the manifest records) the manifest itself, last. The transport is checked by the store
  (S3 checksums where the client sends them); the content is checked by the manifest's hashes when
  the checkpoint is downloaded and read (:func:`..files.load_checkpoint`). An upload first deletes
  any manifest and ``.invalid`` marker of its name (one request): a folder already there (one marked
  invalid, an older copy of the step) is uncommitted while its files are replaced, never a mix.
* **committed on the store** iff ``step_N/manifest.json`` is there, names only files that are there
  with the recorded size, and no ``step_N.invalid`` marker exists. A kill during an upload leaves
  files without a manifest: uncommitted, never read, redone by the next start.
* **download** into ``RUN/checkpoints/.tmp-download-step_N-<pid>`` (manifest last), then the
  same atomic rename as a save; the caller then verifies it like any local checkpoint. One that
  fails is marked on the store (``step_N.invalid``, with the reason) so later starts skip it; it
  is never deleted there.
* **retention** deletes a checkpoint's manifest first, then its files: a half-deleted checkpoint is
  uncommitted, never "corrupt".
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsio import TMP_PREFIX, fsync_dir
from .atomic import commit_dir, remove_dir_safely
from .layout import MANIFEST, MAX_MANIFEST_BYTES, UPLOAD_PHASE, parse_step
from .manifest import CheckpointError, check_manifest, load_json, read_manifest
from .store import Store, StoreError

__all__ = [
    "RemoteCheckpoint",
    "upload",
    "remote_checkpoints",
    "download",
    "mark_invalid",
    "purge_remote",
    "INVALID_SUFFIX",
]

log = logging.getLogger(__name__)

INVALID_SUFFIX = ".invalid"
DOWNLOAD_PREFIX = f"{TMP_PREFIX}download-"


@dataclass
class RemoteCheckpoint:
    """A checkpoint folder on the store: committed (manifest and every file there) or not, and why."""

    name: str
    step: int
    committed: bool
    manifest: dict[str, Any] | None = None
    problem: str | None = None
    invalid: str | None = None  # the reason an earlier start marked it invalid


def upload(store: Store, ckpt: Path, *, phase: Callable[[str, int, Path], None] | None = None) -> int:
    """Upload the committed checkpoint folder ``ckpt``: every file, then the manifest; the bytes sent.

    ``phase("uploading", step, ckpt)`` is called once the files are on the store and before the
    manifest (a chaos kill or a test's hold strikes there: files without a manifest).
    """
    t0 = time.perf_counter()
    manifest = read_manifest(ckpt)
    name, step = ckpt.name, manifest["step"]
    files = manifest["files"]
    _delete_if_there(store, [f"{name}/{MANIFEST}", f"{name}{INVALID_SUFFIX}"])  # a re-upload: uncommitted first
    for rel in sorted(files):
        store.put_file(f"{name}/{rel}", ckpt / rel)
    there = store.list(f"{name}/")
    wrong = [rel for rel, e in files.items() if there.get(f"{name}/{rel}") != e["size"]]
    if wrong:
        raise StoreError(f"{store.where(name)}: after the upload {wrong[:3]} are missing or of another size", "other")
    if phase is not None:
        phase(UPLOAD_PHASE, step, ckpt)
    store.put_file(f"{name}/{MANIFEST}", ckpt / MANIFEST)
    nbytes = sum(e["size"] for e in files.values()) + (ckpt / MANIFEST).stat().st_size
    log.info("ckpt.upload step=%d url=%s secs=%.3f bytes=%d", step, store.where(name), time.perf_counter() - t0, nbytes)
    return nbytes


def _delete_if_there(store: Store, keys: list[str]) -> None:
    """Delete ``keys``, those that are there: S3 takes a delete of nothing (one request for all); a
    ``file://`` store refuses it, and is then asked key by key."""
    try:
        store.delete(keys)
    except StoreError as exc:
        if exc.kind != "missing":
            raise
        for key in keys:
            try:
                store.delete([key])
            except StoreError as one:
                if one.kind != "missing":
                    raise


def remote_checkpoints(store: Store, objects: dict[str, int] | None = None) -> list[RemoteCheckpoint]:
    """Every checkpoint folder on the store, oldest first, with whether it is committed (one listing)."""
    objects = store.list() if objects is None else objects
    names = sorted({k.split("/", 1)[0] for k in objects if "/" in k and parse_step(k.split("/", 1)[0]) is not None})
    out = []
    for name in names:
        step = parse_step(name)
        ck = RemoteCheckpoint(name=name, step=step, committed=False)
        if f"{name}{INVALID_SUFFIX}" in objects:
            ck.invalid = store.get_bytes(f"{name}{INVALID_SUFFIX}", 1 << 16).decode(errors="replace")[:500]
        if f"{name}/{MANIFEST}" not in objects:
            ck.problem = "no manifest (an upload that did not finish)"
            out.append(ck)
            continue
        try:
            where = store.where(f"{name}/{MANIFEST}")
            ck.manifest = check_manifest(
                load_json(store.get_bytes(f"{name}/{MANIFEST}", MAX_MANIFEST_BYTES), where), where
            )
        except CheckpointError as exc:
            ck.problem = str(exc)
            out.append(ck)
            continue
        missing = [rel for rel, e in ck.manifest["files"].items() if objects.get(f"{name}/{rel}") != e["size"]]
        if ck.manifest["step"] != step:
            ck.problem = f"its manifest says step {ck.manifest['step']}"
        elif missing:
            ck.problem = f"{len(missing)} file(s) missing or of another size: {missing[:3]}"
        else:
            ck.committed = ck.invalid is None
        out.append(ck)
    return out


def download(store: Store, ck: RemoteCheckpoint, root: Path) -> Path:
    """``ck`` as ``root/<name>``, committed by the same rename as a save (files first, manifest last)."""
    if not ck.committed or ck.manifest is None:
        raise CheckpointError(f"{store.where(ck.name)}: not a committed checkpoint ({ck.problem or ck.invalid})")
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{DOWNLOAD_PREFIX}{ck.name}-{os.getpid()}"
    if tmp.exists():
        remove_dir_safely(tmp)
    tmp.mkdir()
    nbytes = 0
    try:
        for rel in sorted(ck.manifest["files"]):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            nbytes += store.get_file(f"{ck.name}/{rel}", dest)
        nbytes += store.get_file(f"{ck.name}/{MANIFEST}", tmp / MANIFEST)
        for d in {(tmp / rel).parent for rel in ck.manifest["files"]}:
            fsync_dir(d)
        commit_dir(tmp, root / ck.name)
    except BaseException:
        remove_dir_safely(tmp)
        raise
    log.info(
        "ckpt.download step=%d url=%s secs=%.3f bytes=%d",
        ck.step,
        store.where(ck.name),
        time.perf_counter() - t0,
        nbytes,
    )
    return root / ck.name


def mark_invalid(store: Store, name: str, reason: str) -> None:
    """Mark a remote checkpoint so later starts skip it (it stays on the store for a person to look at)."""
    record = {"reason": reason[:2000], "time": time.time(), "pid": os.getpid()}
    store.put_bytes(f"{name}{INVALID_SUFFIX}", json.dumps(record).encode())
    log.error("ckpt.remote_invalid url=%s reason=%s", store.where(name), reason[:300])


def purge_remote(store: Store, keep: set[str]) -> list[str]:
    """Delete the committed checkpoints on the store that are not in ``keep``: manifest first, then files."""
    removed = []
    objects = store.list()
    for ck in remote_checkpoints(store, objects):
        if not ck.committed or ck.name in keep:
            continue
        store.delete([f"{ck.name}/{MANIFEST}"])
        store.delete(sorted(k for k in objects if k.startswith(f"{ck.name}/") and not k.endswith(f"/{MANIFEST}")))
        log.info("ckpt.remote_purge url=%s", store.where(ck.name))
        removed.append(ck.name)
    return removed
