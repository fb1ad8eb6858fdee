"""The checkpoint manager: when to save, atomic commit, retention, the best pointer.

It knows nothing of MAGVIT: callers hand it a dict of state dicts (``{"model": ..., "optim":
...}``) and name the flat tensor groups that get their own safetensors file, plus the state this
rank owns (RNG, data position), written under ``ranks/<rank>/``.

With ranks, a save is one commit across processes (rank 0 is the only committer):

1. rank 0 makes a fresh temporary folder and tells the ranks its name;
2. every rank writes and fsyncs its own files there (rank 0 also the shared ones) and sends rank 0
   its vote: the files' sizes and hashes, a digest of the replicated state, its data position, or
   the error it hit;
3. rank 0 checks every vote (every rank present, replicated digests equal, positions equal),
   writes the manifest listing every rank's files, renames the folder, fsyncs the parent, and tells
   the ranks the verdict; a refused or failed commit raises on every rank.

Only rank 0 cleans leftovers, purges and moves the best pointer. A death before the rename
leaves only a temporary folder, ignored and removed at the next start; after it, a complete one.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dist import Group
from ..fsio import TMP_PREFIX, atomic_write, fsync_dir, write_durable
from . import hashing, tree
from .atomic import commit_dir, remove_dir_safely
from .files import FileWriter, iter_files, rank_files
from .layout import BEST_POINTER, SAVE_PHASES, TRASH_PREFIX, committed, read_best, rebuild_best, step_dir_name
from .manifest import MANIFEST, RANKS_DIR, CheckpointError, manifest_bytes

__all__ = ["CheckpointManager", "SAVE_PHASES", "SaveHook", "SaveError"]

log = logging.getLogger(__name__)


class SaveError(CheckpointError):
    """A save failed on the file system (disk full, read-only, quota); the message says what is intact."""


#: ``hook(phase, step, where)``: called at each save phase, maybe on the background save thread.
SaveHook = Callable[[str, int, Path], None]


class CheckpointManager:
    """Saves, lists, verifies and prunes the checkpoints under ``root``.

    Only one process may write under ``root`` (the trainer holds the run lock), so temporaries
    found at start-up are leftovers of a crash and safe to remove.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep_last: int = 3,
        async_save: bool = False,
        every_n_steps: int = 0,
        save_on_best: bool = False,
        hooks: Sequence[SaveHook] = (),
        group: Group | None = None,
    ) -> None:
        self.group = group or Group()
        if async_save and self.group.distributed:
            raise ValueError(
                "checkpoint.async_save=true is not supported with more than one rank (its collectives would "
                "share the training group from a background thread); set checkpoint.async_save=false"
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.every_n_steps = every_n_steps
        self.save_on_best = save_on_best
        self.hooks = tuple(hooks)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._snapshot = _Snapshot()
        self.last_saved: Path | None = None
        self.last_save_secs: float = 0.0

    @property
    def snapshot_bytes(self) -> int:
        """Memory held between async saves by the reused CPU copies of the state's tensors (0 when sync)."""
        return self._snapshot.nbytes

    # -- discovery --------------------------------------------------------------------------

    def committed(self) -> list[Path]:
        """Committed checkpoint directories, oldest first. Temporaries and set-aside ones are ignored."""
        return committed(self.root)

    def cleanup_temporaries(self) -> list[Path]:
        """Remove the leftovers of interrupted saves and deletions (only the run's writer calls this)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for p in sorted(self.root.iterdir()):
            if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                log.info("ckpt.cleanup path=%s reason=incomplete-leftover", p)
                removed.append(p)
        return removed

    def best(self) -> dict[str, Any] | None:
        return read_best(self.root)

    def set_best(self, step: int, metric: float, name: str = "val_loss") -> None:
        """Point ``best.json`` at the committed checkpoint of ``step`` (atomic replace)."""
        target = self.root / step_dir_name(step)
        if not target.is_dir():
            raise CheckpointError(f"{target}: cannot mark as best, no committed checkpoint there")
        atomic_write(self.root / BEST_POINTER, json.dumps({"step": step, "path": target.name, name: metric}).encode())
        log.info("ckpt.best step=%d path=%s %s=%.6g", step, target, name, metric)

    def repair_best(self, best_step: int | None, metric: float) -> None:
        """At a start, once accepted: point ``best.json`` at the resumed counters' best (a crash between a
        best checkpoint's commit and the pointer update leaves it stale), and rebuild a damaged one from
        the manifests; retention keeps what the pointer names, so a damaged one must not survive."""
        rebuild_best(self.root, expected=self.save_on_best)  # first: it also moves a folder named best.json aside
        if best_step is not None:
            self.reconcile_best(best_step, metric)

    def reconcile_best(self, best_step: int, metric: float, name: str = "val_loss") -> None:
        """After a resume: a crash between a best checkpoint's commit and the pointer update left it stale."""
        if best_step < 0:
            return
        pointer = self.best()
        if pointer is not None and pointer.get("step") == best_step:
            return
        if (self.root / step_dir_name(best_step)).is_dir():
            log.warning("ckpt.best_reconciled pointer=%s counters.best_step=%d", pointer, best_step)
            self.set_best(best_step, metric, name)

    # -- saving -----------------------------------------------------------------------------

    def should_save(self, step: int, *, last: bool, improved: bool, stopping: bool) -> bool:
        """Save at every ``every_n_steps``-th step, at the last step, on a new best (``save_on_best``), and
        when the run is stopping (a signal), so that a preempted run loses nothing."""
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        return periodic or last or stopping or (improved and self.save_on_best)

    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        tensor_groups: tuple[str, ...] = (),
        metadata: dict[str, Any] | None = None,
        on_commit: Callable[[Path], None] | None = None,
        rank_state: dict[str, Any] | None = None,
    ) -> None:
        """Save ``state`` (replicated: rank 0 writes it) and this rank's ``rank_state`` as checkpoint ``step``.

        Synchronous by default. With ``async_save`` the tensors are first copied to CPU memory
        (so training may change the originals at once), then encoded, hashed, written and
        committed on a background thread; at most one save is in flight, and the next ``save``
        or :meth:`wait` joins it and re-raises its error. The CPU copies go into buffers kept
        from the previous async save when the shapes match (no allocation, no page faults), so
        an async manager holds one extra copy of the tensors between saves.
        """
        self.wait()
        metadata = dict(metadata or {})
        if not self.async_save:
            self._write(step, state, rank_state, tensor_groups, metadata, on_commit, time.perf_counter())
            return
        t0 = time.perf_counter()
        snapshot, rank_snapshot = self._snapshot.copy((state, rank_state))
        log.info("ckpt.snapshot step=%d secs=%.3f", step, time.perf_counter() - t0)
        self._thread = threading.Thread(
            target=self._write_in_thread,
            args=(step, snapshot, rank_snapshot, tensor_groups, metadata, on_commit, t0),
            name=f"ckpt-save-{step}",
            daemon=True,
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is committed; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, SaveError):
                raise err
            raise CheckpointError(f"background checkpoint save failed: {err}") from err

    def _write_in_thread(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as exc:  # re-raised on the training thread by wait()
            self._error = exc

    def _phase(self, phase: str, step: int, where: Path) -> None:
        for hook in self.hooks:
            hook(phase, step, where)

    def _write(self, step: int, *args: Any) -> None:
        """Write and commit checkpoint ``step``; a file-system failure (disk full, read-only, quota)
        removes this save's temporary folder and raises :class:`SaveError`: the committed checkpoints
        are untouched, since nothing is renamed before every file is written."""
        try:
            self._write_commit(step, *args)
        except OSError as exc:
            self._discard_temporaries(step)
            newest = self.committed()
            kept = f"the newest committed checkpoint, {newest[-1]}, is intact" if newest else "no checkpoint was lost"
            raise SaveError(
                f"checkpoint step {step} not saved: {exc.strerror or exc}"
                + (f" ({exc.filename})" if exc.filename else "")
                + f"; {kept}. Free space or make {self.root} writable, then run again with resume_from=auto"
            ) from exc

    def _discard_temporaries(self, step: int) -> None:
        if not self.group.is_main or not self.root.is_dir():
            return
        for p in self.root.glob(f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _write_commit(
        self,
        step: int,
        state: dict[str, Any],
        rank_state: dict[str, Any] | None,
        tensor_groups: tuple[str, ...],
        metadata: dict[str, Any],
        on_commit: Callable[[Path], None] | None,
        t0: float,
    ) -> None:
        g = self.group
        final = self.root / step_dir_name(step)
        tmp_name = None
        if g.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp_name = f"{TMP_PREFIX}{final.name}-{os.getpid()}-{time.monotonic_ns()}"  # never reused
            (self.root / tmp_name).mkdir()
        tmp = self.root / g.broadcast(tmp_name)
        vote, failure = self._write_files(step, tmp, state, rank_state, tensor_groups)
        votes = g.gather(vote)
        verdict: dict[str, Any] = {}
        if g.is_main:
            try:
                entries = self._check_votes(step, votes)
                metadata = {**metadata, **g.describe()}
                if g.distributed:
                    metadata["replicated_digest"] = votes[0]["digest"]
                    fsync_dir(tmp / RANKS_DIR)
                # The manifest goes last: its presence inside the directory means every file it lists
                # is complete and fsync'd, and it carries each file's hash for later verification.
                write_durable(tmp / MANIFEST, manifest_bytes(step, entries, metadata))
                self._phase("before_rename", step, tmp)
                commit_dir(tmp, final)
                self._phase("after_rename", step, final)
                verdict = {"ok": True, "bytes": sum(e["size"] for e in entries.values())}
            except Exception as exc:
                if not g.distributed:
                    raise
                verdict = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        verdict = g.broadcast(verdict)
        if failure is not None:
            raise failure
        if not verdict["ok"]:
            raise CheckpointError(f"checkpoint step {step} not committed: {verdict['error']}")
        secs = time.perf_counter() - t0
        self.last_saved, self.last_save_secs = final, secs
        if not g.is_main:
            return
        log.info("ckpt.save step=%d path=%s secs=%.3f bytes=%d", step, final, secs, verdict["bytes"])
        if on_commit is not None:
            on_commit(final)
        self.purge()

    def _write_files(
        self,
        step: int,
        tmp: Path,
        state: dict[str, Any],
        rank_state: dict[str, Any] | None,
        tensor_groups: tuple[str, ...],
    ) -> tuple[dict[str, Any], BaseException | None]:
        """This rank's files, written and fsync'd: its vote for rank 0, and the error it hit (if any)."""
        g = self.group
        vote: dict[str, Any] = {"rank": g.rank}
        try:
            # The files are written, hashed and fsync'd on worker threads, each starting as soon as it
            # is planned. One file comes first and alone, so "files_partial" sees exactly one file;
            # entries() returns once every file is complete and fsync'd.
            payloads = iter_files(state, tensor_groups) if g.is_main else iter(())
            if rank_state is not None:
                (tmp / RANKS_DIR / str(g.rank)).mkdir(parents=True, exist_ok=True)
                payloads = itertools.chain(payloads, rank_files(rank_state, g.rank))
            with FileWriter(tmp) as writer:
                first = next(payloads, None)
                if first is not None:
                    writer.write_now(first)
                self._phase("files_partial", step, tmp)
                for payload in payloads:
                    writer.write(payload)
                vote["entries"] = writer.entries()
            if rank_state is not None:
                fsync_dir(tmp / RANKS_DIR / str(g.rank))
                vote["position"] = _position(rank_state)
            if g.distributed:
                vote["digest"] = replicated_digest(state)
            self._phase("files_written", step, tmp)
        except Exception as exc:
            if not g.distributed:
                raise
            return {"rank": g.rank, "error": f"{type(exc).__name__}: {exc}"}, exc
        return vote, None

    def _check_votes(self, step: int, votes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Rank 0: every rank wrote its files, and the ranks agree on the replicated state and position."""
        failed = [f"rank {v['rank']}: {v['error']}" for v in votes if "error" in v]
        if failed:
            raise CheckpointError("ranks failed to write their files: " + "; ".join(failed))
        if self.group.distributed:
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

    # -- retention --------------------------------------------------------------------------

    def purge(self) -> list[Path]:
        """Delete all but the ``keep_last`` newest committed checkpoints and the best one.

        Runs only after a new checkpoint is committed, so the newest valid checkpoint always
        survives: unlike torchtitan, which refuses ``keep_latest_k=1`` because the newest may still
        be being written, we never count a checkpoint until its rename has happened, which makes
        ``keep_last=1`` safe too. ``keep_last=0`` keeps everything.
        """
        if self.keep_last <= 0:
            return []
        # A step_ directory without a manifest was never committed by this protocol (damage, a partial
        # copy): it neither counts towards keep_last nor is deleted here; resume sets it aside.
        committed = [p for p in self.committed() if (p / MANIFEST).is_file()]
        keep = set(committed[-self.keep_last :])
        if self.last_saved is not None:
            keep.add(self.last_saved)  # the checkpoint just committed always survives its own purge
        best = self.best()
        if best and best.get("path"):
            keep.add(self.root / best["path"])
        removed = []
        for path in committed:
            if path not in keep:
                remove_dir_safely(path)
                log.info("ckpt.purge path=%s keep_last=%d", path, self.keep_last)
                removed.append(path)
        return removed


class _Snapshot:
    """CPU copies of a state's tensors for an async save, into buffers reused from the previous snapshot.

    Reuse is safe because a snapshot is only taken after the previous save has finished (``save``
    calls ``wait`` first), so nothing reads the old copies any more. Two costs are avoided: a fresh
    allocation pays a page fault on every page (and, with deterministic algorithms on, a NaN fill),
    and torch's multi-threaded ``copy_`` hands every tensor to its thread pool, which on a busy
    machine waits a scheduler tick per tensor. Contiguous CPU tensors are copied with one plain
    ``memmove`` each instead (it releases the GIL). GPU tensors are copied into page-locked buffers
    without waiting for each copy, then once for all of them.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._from_gpu = False

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def copy(self, state: Any) -> Any:
        old, self._buffers, self._from_gpu = self._buffers, [], False
        out = self._copy(state, old)
        if self._from_gpu:
            torch.cuda.synchronize()  # every copy has landed before the writer thread reads a buffer
        return out

    def _copy(self, obj: Any, old: list[torch.Tensor]) -> Any:
        if isinstance(obj, torch.Tensor):
            i = len(self._buffers)
            buf = old[i] if i < len(old) else None
            if buf is None or buf.dtype != obj.dtype or buf.shape != obj.shape:
                buf = _cpu_buffer(obj)
            if obj.is_cpu and obj.is_contiguous() and not (obj.is_conj() or obj.is_neg()):
                ctypes.memmove(buf.data_ptr(), obj.data_ptr(), buf.nbytes)
            elif obj.is_cuda:
                buf.copy_(obj.detach(), non_blocking=buf.is_pinned())
                self._from_gpu = True
            else:
                buf.copy_(obj.detach())
            self._buffers.append(buf)
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v, old) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._copy(v, old) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, old) for v in obj)
        return obj


def _cpu_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor shaped like ``like`` (never NaN-filled: it is overwritten)."""
    nbytes = like.numel() * like.element_size()
    if like.device.type == "cuda":  # page-locked: the copy from the GPU need not wait
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=True)
    if like.device.type != "cpu" or not nbytes:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu")
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(like.dtype).reshape(like.shape)


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
