"""Checkpoints on the object store at a start: the newest valid one brought into the run directory.

With ``checkpoint.remote`` set, ``resume_from=auto`` looks at the store too: a committed remote
checkpoint newer than every local one is downloaded into ``RUN/checkpoints`` (the same atomic
rename as a save), verified exactly as a local one (read and hashed once, content checked), and
handed to the plan; one that fails is marked on the store (``step_N.invalid``), its local copy
removed, and the next older one tried. ``resume_from=s3://bucket/prefix[/step_N]`` does the same
on a machine with no run directory at all.

What the store answers decides the start: credentials refused or no such bucket stop it with
exit 2 naming the URL; a store that cannot be reached stops it too, unless this run directory
holds committed checkpoints, which are then used (``resume.remote_unreachable`` in the log; their
uploads resume when the store is back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import Loaded, committed, parse_step, verify_content
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
) -> Loaded | None:
    """The newest committed checkpoint on ``store`` (or the one called ``name``) whose step is above
    ``newer_than``, downloaded into ``root`` and verified; ``None`` when there is none. Raises
    :class:`StartupError` when the store refuses or cannot be reached (see the module docstring)."""
    try:
        found = remote_checkpoints(store)
    except StoreError as exc:
        if exc.kind == "unreachable" and committed(root):
            log.warning("resume.remote_unreachable url=%s error=%s: using the local checkpoints", store.url, exc)
            return None
        raise _refusal(store, exc) from None
    if name is not None:
        chosen = [c for c in found if c.name == name]
        if not chosen or not chosen[0].committed:
            why = chosen[0].invalid or chosen[0].problem if chosen else "not on the store"
            raise StartupError(f"resume_from={store.where(name)}: cannot be resumed: {why}")
        candidates = chosen
    else:
        candidates = [c for c in found if c.committed and c.step > newer_than]
    for ck in reversed(candidates):
        loaded = _fetch_one(store, ck, root, check)
        if loaded is not None:
            return loaded
    if name is not None:
        raise StartupError(f"resume_from={store.where(name)}: failed verification (marked {name}.invalid on the store)")
    return None


def _fetch_one(store: Store, ck: RemoteCheckpoint, root: Path, check: Callable[[Loaded], list[str]]) -> Loaded | None:
    local = root / ck.name
    if local.exists():  # an older copy of the same step (a forked timeline): the store's is newer evidence
        remove_dir_safely(local)
    try:
        path = download(store, ck, root)
    except StoreError as exc:
        if exc.kind == "missing":  # deleted between the listing and the download (retention of a live run)
            log.warning("resume.remote_vanished url=%s", store.where(ck.name))
            return None
        raise _refusal(store, exc) from None
    loaded, problems = verify_content(path, check)
    if loaded is not None:
        log.info("resume.remote step=%d url=%s", ck.step, store.where(ck.name))
        return loaded
    mark_invalid(store, ck.name, "; ".join(problems[:3]))
    remove_dir_safely(path)
    return None

