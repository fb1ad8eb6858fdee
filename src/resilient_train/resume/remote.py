"""Checkpoints on the object store at a start: the newest valid one brought into the run directory.

With ``checkpoint.remote`` set, ``resume_from=auto`` looks at the store too: a committed remote
checkpoint newer than every local one is downloaded into ``RUN/checkpoints`` (the same atomic
rename as a save), verified exactly as a local one (read and hashed once, content checked), and
handed to the plan; one that fails is marked on the store (``step_N.invalid``), its local copy
removed, and the next older one tried; one marked by an earlier start is passed over without a
download (``resume.remote_skipped``). The run's best checkpoint (the resumed counters'
``best_step``), when it is another one on the store and not here, is downloaded too (its hashes
checked), so that ``best.json`` and retention, here and on the store, keep it.
``resume_from=s3://bucket/prefix[/step_N]`` does the same on a machine with no run directory at all.

What the store answers decides the start: credentials refused or no such bucket stop it with
exit 2 naming the URL; a store that cannot be reached (no connection, 5xx, timeouts: while listing
or during a download) stops it too, unless ``resume_from=auto`` and this run directory holds
committed checkpoints, which are then used (``resume.remote_unreachable`` in the log; their uploads
resume when the store is back). A store that will not take the ``.invalid`` marker (read-only
credentials) is logged (``resume.remote_mark_failed``); the start passes the checkpoint over anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import Loaded, committed, parse_step, verify_content, verify_files
from ..checkpoint.atomic import remove_dir_safely
from ..checkpoint.remote import RemoteCheckpoint, download, mark_invalid, remote_checkpoints
from ..checkpoint.store import Store, StoreError
from .target import StartupError

__all__ = ["open_store", "fetch_newest", "refuse_reused_prefix", "split_url"]

log = logging.getLogger(__name__)


def open_store(url: str, options: dict | None = None) -> Store:
    try:
        return Store(url, options)
    except StoreError as exc:
        raise StartupError(f"checkpoint.remote: {exc}") from None


def split_url(url: str) -> tuple[str, str | None]:
    """``s3://b/run/step_00000010`` -> (``s3://b/run``, ``step_00000010``); a run's prefix -> (it, None)."""
    url = url.rstrip("/")
    head, _, last = url.rpartition("/")
    return (head, last) if parse_step(last) is not None and "://" in head else (url, None)


def _refusal(store: Store, exc: StoreError) -> StartupError:
    if exc.kind == "denied":
        how = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the store's own credentials) and the bucket name"
    else:
        how = "check AWS_ENDPOINT_URL (or checkpoint.remote_options.endpoint) and the network, then start again"
    return StartupError(f"checkpoint store {store.url} cannot be used: {exc}; {how}")


def refuse_reused_prefix(store: Store) -> None:
    """A fresh run must not write into a prefix that already holds another run's checkpoints."""
    try:
        found = [c.name for c in remote_checkpoints(store) if c.committed]
    except StoreError as exc:
        raise _refusal(store, exc) from None
    if found:
        raise StartupError(
            f"{store.url} already holds checkpoints ({found[-1]}, ...); pass resume_from=auto to continue that run, "
            "or choose another checkpoint.remote"
        )


def fetch_newest(
    store: Store,
    root: Path,
    check: Callable[[Loaded], list[str]],
    *,
    name: str | None = None,
    newer_than: int = -1,
    fallback: bool = False,
) -> Loaded | None:
    """The newest committed checkpoint on ``store`` (or the one called ``name``) whose step is above
    ``newer_than``, downloaded into ``root`` and verified; ``None`` when there is none. Raises
    :class:`StartupError` when the store refuses or cannot be reached, unless ``fallback`` (``auto``) and
    ``root`` holds committed checkpoints: then ``None`` (see the module docstring)."""
    try:
        found = remote_checkpoints(store)
        candidates = _candidates(store, found, name, newer_than)
        for ck in reversed(candidates):
            loaded = _fetch_one(store, ck, root, check)
            if loaded is not None:
                _fetch_best(store, found, root, loaded)
                return loaded
    except StoreError as exc:
        if fallback and exc.kind == "unreachable" and committed(root):
            log.warning("resume.remote_unreachable url=%s error=%s: using the local checkpoints", store.url, exc)
            return None
        raise _refusal(store, exc) from None
    if name is not None:
        raise StartupError(f"resume_from={store.where(name)}: failed verification (marked {name}.invalid on the store)")
    return None


def _candidates(
    store: Store, found: list[RemoteCheckpoint], name: str | None, newer_than: int
) -> list[RemoteCheckpoint]:
    """The committed checkpoint called ``name``, or every committed one above ``newer_than`` (oldest first)."""
    if name is not None:
        chosen = [c for c in found if c.name == name]
        if not chosen or not chosen[0].committed:
            why = chosen[0].invalid or chosen[0].problem if chosen else "not on the store"
            raise StartupError(f"resume_from={store.where(name)}: cannot be resumed: {why}")
        return chosen
    for ck in found:
        if ck.invalid is not None and ck.step > newer_than:
            log.warning("resume.remote_skipped url=%s invalid: %s", store.where(ck.name), ck.invalid[:300])
    return [c for c in found if c.committed and c.step > newer_than]


def _fetch_one(store: Store, ck: RemoteCheckpoint, root: Path, check: Callable[[Loaded], list[str]]) -> Loaded | None:
    """``ck`` downloaded and verified; ``None`` when it vanished or failed (then marked invalid)."""
    local = root / ck.name
    if local.exists():  # an older copy of the same step (a forked timeline): the store's is newer evidence
        remove_dir_safely(local)
    try:
        path = download(store, ck, root)
    except StoreError as exc:
        if exc.kind == "missing":  # deleted between the listing and the download (retention of a live run)
            log.warning("resume.remote_vanished url=%s", store.where(ck.name))
            return None
        raise
    loaded, problems = verify_content(path, check)
    if loaded is not None:
        log.info("resume.remote step=%d url=%s", ck.step, store.where(ck.name))
        return loaded
    _mark_invalid(store, ck.name, problems)
    remove_dir_safely(path)
    return None


def _fetch_best(store: Store, found: list[RemoteCheckpoint], root: Path, loaded: Loaded) -> None:
    """The run's best checkpoint as well, when it is another committed one on the store and not in ``root``
    (see the module docstring); one that fails its hashes is marked invalid and removed, one that cannot be
    downloaded is logged and left: the start goes on without it."""
    best = (loaded.state.get("trainer") or {}).get("best_step")
    ck = next((c for c in found if c.step == best and c.committed), None)
    if ck is None or ck.step == loaded.step or (root / ck.name).exists():
        return
    try:
        path = download(store, ck, root)
    except StoreError as exc:  # the start does not need it
        log.warning("resume.remote_best_skipped url=%s error=%s", store.where(ck.name), exc)
        return
    report = verify_files(path)
    if not report.ok:
        _mark_invalid(store, ck.name, report.errors)
        remove_dir_safely(path)


def _mark_invalid(store: Store, name: str, problems: list[str]) -> None:
    """Mark ``name`` invalid on the store; a store that refuses the write (read-only credentials) or cannot
    be reached is logged: this start still passes the checkpoint over, and the next one checks it again."""
    try:
        mark_invalid(store, name, "; ".join(problems[:3]))
    except StoreError as exc:
        log.warning("resume.remote_mark_failed url=%s error=%s", store.where(name), exc)
