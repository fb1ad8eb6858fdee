"""The checkpoint manager: when to save, sync or async saves, retention, the best pointer, save hooks.

It knows nothing of MAGVIT: callers hand it a dict of state dicts (``{"model": ..., "optim":
...}``) and name the flat tensor groups that get their own safetensors file, plus the state this
rank owns (RNG, data position), written under ``ranks/<rank>/``.

Each save is written and committed by :func:`~.commit.commit_save` (with ranks, one commit across
processes, rank 0 the only committer: see :mod:`.commit`); an async save first copies the state to
CPU memory (:class:`~.snapshot.Snapshot`) and commits on a background thread. The hooks
(:data:`SaveHook`) are told every save phase. Only rank 0 cleans leftovers, purges and moves the
best pointer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..dist import Group
from ..fsio import TMP_PREFIX, atomic_write
from .atomic import remove_dir_safely
from .commit import commit_save, temporary_prefix
from .layout import BEST_POINTER, SAVE_PHASES, TRASH_PREFIX, committed, read_best, rebuild_best, step_dir_name
from .manifest import MANIFEST, CheckpointError
from .remote import remote_checkpoints
from .snapshot import Snapshot
from .store import Store, StoreError
from .uploader import Uploader

__all__ = ["CheckpointManager", "SAVE_PHASES", "SaveHook", "SaveError"]

log = logging.getLogger(__name__)


class SaveError(CheckpointError):
    """A save failed on the file system (disk full, read-only, quota); the message says what is intact.

    ``step``: the checkpoint that was not saved (an async save's failure surfaces at a later step)."""

    step: int | None = None


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
        remote: Store | None = None,
    ) -> None:
        """``remote``: the object store every committed checkpoint is also uploaded to (rank 0; see
        :mod:`.uploader`); local checkpoints are then purged only once their upload is confirmed."""
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
        self._snapshot = Snapshot()
        self.last_saved: Path | None = None
        self.uploader = (
            Uploader(remote, self.root, keep_last=keep_last, phase=self._phase)
            if remote is not None and self.group.is_main
            else None
        )
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

    def set_best(self, step: int, metric: float, name: str = "val_loss", weights: str | None = None) -> None:
        """Point ``best.json`` at the committed checkpoint of ``step`` (atomic replace); ``weights``: which ones
        the metric is of (``ema`` or ``model``)."""
        target = self.root / step_dir_name(step)
        if not target.is_dir():
            raise CheckpointError(f"{target}: cannot mark as best, no committed checkpoint there")
        pointer = {"step": step, "path": target.name, name: metric} | ({"weights": weights} if weights else {})
        atomic_write(self.root / BEST_POINTER, json.dumps(pointer).encode())
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
            err = SaveError(
                f"checkpoint step {step} not saved: {exc.strerror or exc}"
                + (f" ({exc.filename})" if exc.filename else "")
                + f"; {kept}. Free space or make {self.root} writable, then run again with resume_from=auto"
            )
            err.step = step
            raise err from exc

    def _discard_temporaries(self, step: int) -> None:
        if not self.group.is_main or not self.root.is_dir():
            return
        for p in self.root.glob(f"{temporary_prefix(step)}*"):
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
        final, nbytes = commit_save(
            self.group,
            self.root,
            step,
            state,
            rank_state=rank_state,
            tensor_groups=tensor_groups,
            metadata=metadata,
            phase=self._phase,
        )
        secs = time.perf_counter() - t0
        self.last_saved, self.last_save_secs = final, secs
        if not self.group.is_main:
            return
        log.info("ckpt.save step=%d path=%s secs=%.3f bytes=%d", step, final, secs, nbytes)
        if on_commit is not None:
            on_commit(final)
        if self.uploader is not None:
            self.uploader.submit(final)
        self.purge()

    # -- the object store -------------------------------------------------------------------

    def start_uploads(self) -> None:
        """At a start: checkpoints committed here but not on the store are uploaded (a kill during an
        upload, a store that was down); the ones already there count as confirmed."""
        if self.uploader is None:
            return
        try:
            there = {c.name for c in remote_checkpoints(self.uploader.store) if c.committed}
        except StoreError as exc:
            log.warning(
                "ckpt.remote_unlisted url=%s error=%s: every local checkpoint is queued", self.uploader.store.url, exc
            )
            there = set()
        self.uploader.adopt(there)
        for path in self.committed():
            if path.name not in there and (path / MANIFEST).is_file():
                self.uploader.submit(path)

    def upload_status(self) -> dict[str, Any] | None:
        return self.uploader.status() if self.uploader is not None else None

    def finish_uploads(self, timeout: float, *, finished_at: int | None = None) -> bool:
        """Wait up to ``timeout`` seconds for every committed checkpoint to reach the store; log whether it did.
        Once they all did, retention runs here too: the ones it had to keep only until they were uploaded
        (the store was down) go now, not at the next run's first save. ``finished_at``: the run ended at
        that step, and uploads that did not arrive are then a :class:`SaveError` (a stopped run only logs)."""
        if self.uploader is None:
            return True
        done = self.uploader.wait(timeout)
        st = self.uploader.status()
        if done:
            log.info("ckpt.uploads_done url=%s newest_step=%s", st["url"], st["newest_step"])
            self.purge()
        else:
            log.error(
                "ckpt.uploads_incomplete url=%s newest_step=%s backlog=%d last_error=%s: the local checkpoints are "
                "intact; run again with resume_from=auto to finish the upload",
                st["url"],
                st["newest_step"],
                st["backlog"],
                st["last_error"],
            )
            if finished_at is not None:
                raise SaveError(
                    f"training finished at step {finished_at}, but its checkpoints did not all reach {st['url']} "
                    "within checkpoint.upload_timeout_secs; the local ones are intact: run again with "
                    "resume_from=auto to finish the upload"
                )
        return done

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
            if path not in keep and self.uploader is not None and not self.uploader.confirmed(path.name):
                continue  # not on the store yet: with a node-local disk this is the only copy
            if path not in keep:
                remove_dir_safely(path)
                log.info("ckpt.purge path=%s keep_last=%d", path, self.keep_last)
                removed.append(path)
        return removed
