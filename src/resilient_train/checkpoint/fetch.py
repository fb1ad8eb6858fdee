"""A store's checkpoints as local folders, for the tools: ``verify``, ``status`` and ``export`` given a URL.

``s3://bucket/prefix`` names a run's checkpoints on a store, ``s3://bucket/prefix/step_N`` one of
them. :func:`fetched` downloads the committed ones named into a temporary folder (removed
afterwards) so that the tools run their usual local code on them; an uncommitted or marked one is
reported with its problem and never downloaded. Nothing on the store is changed: a tool only reads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .layout import parse_step
from .remote import RemoteCheckpoint, download, remote_checkpoints
from .store import Store

__all__ = ["split_url", "Fetched", "fetched", "remote_listing"]


def split_url(url: str) -> tuple[str, str | None]:
    """``s3://b/run/step_00000010`` -> (``s3://b/run``, ``step_00000010``); a run's prefix -> (it, None)."""
    url = url.rstrip("/")
    head, _, last = url.rpartition("/")
    return (head, last) if parse_step(last) is not None and "://" in head else (url, None)


@dataclass
class Fetched:
    """One checkpoint a URL names: ``path`` (a local copy) when committed, else ``problem``."""

    url: str
    remote: RemoteCheckpoint
    path: Path | None = None

    @property
    def problem(self) -> str | None:
        return None if self.path is not None else (self.remote.invalid or self.remote.problem)


def remote_listing(url: str) -> tuple[Store, list[RemoteCheckpoint]]:
    """The store a URL names and its checkpoints (just the named one for ``.../step_N``), oldest first."""
    prefix, name = split_url(url)
    store = Store(prefix)
    found = remote_checkpoints(store)
    return store, [c for c in found if name is None or c.name == name]


@contextmanager
def fetched(url: str, *, newest_only: bool = False) -> Iterator[list[Fetched]]:
    """Local copies of the checkpoints ``url`` names (``newest_only``: the newest committed one)."""
    store, found = remote_listing(url)
    if newest_only:
        found = [c for c in found if c.committed][-1:]
    with tempfile.TemporaryDirectory(prefix="resilient-train-fetch-") as tmp:
        out = []
        for ck in found:
            item = Fetched(url=store.where(ck.name), remote=ck)
            if ck.committed:
                item.path = download(store, ck, Path(tmp))
            out.append(item)
        yield out
