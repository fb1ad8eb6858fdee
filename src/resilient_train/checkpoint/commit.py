"""One save committed across ranks, by rank 0 alone: the files, the votes, the manifest, the rename, the verdict.

1. rank 0 makes a fresh temporary folder and tells the ranks its name;
2. every rank writes and fsyncs its own files there (rank 0 also the shared ones) and sends rank 0
   its vote: the files' sizes and hashes, a digest of the replicated state
   (:func:`replicated_digest`), its data position, or the error it hit;
3. rank 0 checks every vote (every rank present, replicated digests equal, positions equal),
   writes the manifest listing every rank's files, renames the folder, fsyncs the parent, and tells
   the ranks the verdict; a refused or failed commit raises on every rank.

A death before the rename leaves only a temporary folder (named by :func:`temporary_prefix`),
ignored and removed at the next start; after it, a complete one. With one rank the same steps run
without collectives, and an error is raised where it happens. The save phases
(:data:`~resilient_train.checkpoint.layout.SAVE_PHASES`) are reported to ``phase`` as they pass.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..dist import Group
from ..fsio import TMP_PREFIX, fsync_dir, write_durable
from . import hashing, tree
from .atomic import commit_dir
from .files import FileWriter, iter_files, rank_files
from .layout import step_dir_name
from .manifest import MANIFEST, RANKS_DIR, CheckpointError, manifest_bytes

__all__ = ["commit_save", "replicated_digest", "temporary_prefix"]

#: ``phase(name, step, where)``: told each save phase as it passes.
Phase = Callable[[str, int, Path], None]


def temporary_prefix(step: int) -> str:
    """How this process's temporary folders for checkpoint ``step`` begin (a unique suffix follows)."""
    return f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}-"


def commit_save(
    group: Group,
    root: Path,
    step: int,
    state: dict[str, Any],
    *,
    rank_state: dict[str, Any] | None,
    tensor_groups: tuple[str, ...],
    metadata: dict[str, Any],
    phase: Phase,
) -> tuple[Path, int]:
    """Write checkpoint ``step`` under ``root`` on every rank and commit it: its folder and its size in bytes.

    ``state`` is replicated (rank 0 writes it), ``rank_state`` this rank's own. Raises on every rank
    when any rank failed to write or rank 0 refused or failed the commit.
    """
    final = root / step_dir_name(step)
    tmp_name = None
    if group.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp_name = f"{temporary_prefix(step)}{time.monotonic_ns()}"  # never reused
        (root / tmp_name).mkdir()
    tmp = root / group.broadcast(tmp_name)
    vote, failure = _write_files(group, step, tmp, state, rank_state, tensor_groups, phase)
    votes = group.gather(vote)
    verdict: dict[str, Any] = {}
    if group.is_main:
        verdict = _commit(group, step, tmp, final, votes, metadata, phase)
    verdict = group.broadcast(verdict)
    if failure is not None:
        raise failure
    if not verdict["ok"]:
        if verdict.get("io"):  # a rank's disk failed: every rank reports it as the file-system error it is
            raise OSError(errno.EIO, f"checkpoint step {step} not committed: {verdict['error']}")
        raise CheckpointError(f"checkpoint step {step} not committed: {verdict['error']}")
    return final, verdict["bytes"]


def _write_files(
    group: Group,
    step: int,
    tmp: Path,
    state: dict[str, Any],
    rank_state: dict[str, Any] | None,
    tensor_groups: tuple[str, ...],
    phase: Phase,
) -> tuple[dict[str, Any], BaseException | None]:
    """This rank's files, written and fsync'd: its vote for rank 0, and the error it hit (if any)."""
    vote: dict[str, Any] = {"rank": group.rank}
    try:
        # The files are written, hashed and fsync'd on worker threads, each starting as soon as it
        # is planned. One file comes first and alone, so "files_partial" sees exactly one file;
        # entries() returns once every file is complete and fsync'd.
        payloads = iter_files(state, tensor_groups) if group.is_main else iter(())
        if rank_state is not None:
            (tmp / RANKS_DIR / str(group.rank)).mkdir(parents=True, exist_ok=True)
            payloads = itertools.chain(payloads, rank_files(rank_state, group.rank))
        with FileWriter(tmp) as writer:
            first = next(payloads, None)
            if first is not None:
                writer.write_now(first)
            phase("files_partial", step, tmp)
            for payload in payloads:
                writer.write(payload)
            vote["entries"] = writer.entries()
        if rank_state is not None:
            fsync_dir(tmp / RANKS_DIR / str(group.rank))
            vote["position"] = _position(rank_state)
        if group.distributed:
            vote["digest"] = replicated_digest(state)
        phase("files_written", step, tmp)
    except Exception as exc:
        if not group.distributed:
            raise
        return {"rank": group.rank, "error": f"{type(exc).__name__}: {exc}", "io": isinstance(exc, OSError)}, exc
    return vote, None


def _commit(
    group: Group,
    step: int,
    tmp: Path,
    final: Path,
    votes: list[dict[str, Any]],
    metadata: dict[str, Any],
    phase: Phase,
) -> dict[str, Any]:
    """Rank 0: check the votes, write the manifest, rename ``tmp`` to ``final``; the verdict for the ranks."""
    try:
        entries = _check_votes(group, step, votes)
        metadata = {**metadata, **group.describe()}
        if group.distributed:
            metadata["replicated_digest"] = votes[0]["digest"]
            fsync_dir(tmp / RANKS_DIR)
        # The manifest goes last: its presence inside the directory means every file it lists
        # is complete and fsync'd, and it carries each file's hash for later verification.
        write_durable(tmp / MANIFEST, manifest_bytes(step, entries, metadata))
        phase("before_rename", step, tmp)
        commit_dir(tmp, final)
        phase("after_rename", step, final)
        return {"ok": True, "bytes": sum(e["size"] for e in entries.values())}
    except Exception as exc:
        if not group.distributed:
            raise
        io = isinstance(exc, OSError) or any(v.get("io") for v in votes)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "io": io}


def _check_votes(group: Group, step: int, votes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rank 0: every rank wrote its files, and the ranks agree on the replicated state and position."""
    failed = [f"rank {v['rank']}: {v['error']}" for v in votes if "error" in v]
    if failed:
        raise CheckpointError("ranks failed to write their files: " + "; ".join(failed))
    if group.distributed:
        digests = {v["rank"]: v["digest"] for v in votes}
        if len(set(digests.values())) > 1:
            odd = [r for r, d in digests.items() if d != digests[0]]
            raise CheckpointError(
                f"ranks {odd} hold replicated state (weights, optimizers, counters) that differs from "
                f"rank 0's at step {step}: the ranks have diverged (a bug); commit refused"
            )
        positions = {v["rank"]: v.get("position") for v in votes}
        if len({json.dumps(p, sort_keys=True) for p in positions.values()}) > 1:
            raise CheckpointError(f"ranks disagree on the data position at step {step}: {positions}")
    entries: dict[str, dict[str, Any]] = {}
    for v in votes:
        entries.update(v["entries"])
    return entries


def _position(rank_state: dict[str, Any]) -> Any:
    data = rank_state.get("data") if isinstance(rank_state, dict) else None
    return data if isinstance(data, dict) else None


def replicated_digest(state: dict[str, Any]) -> str:
    """A hash of the state every rank holds the same copy of (the environment aside: devices differ).

    The committer compares the ranks' digests: ranks whose weights or optimizer moments differ have
    diverged, and a checkpoint of rank 0's copy would hide it.
    """
    skeleton, tensors = tree.encode({k: v for k, v in state.items() if k != "env"})
    digest = hashing.new()
    digest.update(json.dumps(skeleton, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return hashing.entry_value(hashing.ALGORITHM, digest.hexdigest())
