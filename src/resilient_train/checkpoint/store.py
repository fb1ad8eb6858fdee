"""An object store for checkpoints: the few operations the remote commit needs, over obstore.

``checkpoint.remote=URL``: ``s3://bucket/prefix`` (AWS S3 and S3-compatible servers: MinIO, Ceph,
R2), ``gs://bucket/prefix``, ``az://account/container/prefix`` or ``file:///path`` (a mounted
share). Credentials, region and endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``; Google's and Azure's own
variables), and ``checkpoint.remote_options`` passes anything a URL cannot say (obstore's store
options, e.g. ``{endpoint: http://minio:9000, virtual_hosted_style_request: "false"}``). An
``http://`` endpoint is allowed when one is named.

Every call has a short timeout and few retries of its own (a store that hangs must not hold a
thread for minutes); the uploader retries whole checkpoints with its own backoff. Every failure is
a :class:`StoreError` whose one-line message starts with the object's URL (and names the S3
error code, e.g. ``NoSuchBucket`` or ``InvalidAccessKeyId``, when the server sent one) and whose
``kind`` says what happened: ``missing`` (no such object), ``denied`` (credentials, permissions,
no such bucket), ``unreachable`` (no connection, timeouts, 5xx) or ``other``. obstore is not
fork-safe: only the training process (and its threads) touches a store, never a data loader worker.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .manifest import CheckpointError

__all__ = ["Store", "StoreError", "is_remote_url", "SCHEMES"]

SCHEMES = ("s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "azure://", "file://")


def is_remote_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SCHEMES)


class StoreError(CheckpointError):
    """An operation on the object store failed; ``kind`` is missing, denied, unreachable or other."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _kind(exc: BaseException) -> str:
    from obstore import exceptions as e

    if isinstance(exc, (FileNotFoundError, e.NotFoundError)):
        return "missing"
    if isinstance(exc, (PermissionError, e.PermissionDeniedError, e.UnauthenticatedError)):
        return "denied"
    text = str(exc)
    if any(code in text for code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        return "denied"
    if any(w in text for w in ("error sending request", "connect", "timed out", "timeout", " 50", "Retry")):
        return "unreachable"
    return "other"


#: The error an S3 server names in its XML answer (the client's message cuts it off after the first line).
_S3_ERROR = re.compile(r"<Code>([^<]{1,100})</Code>\s*(?:<Message>([^<]{0,200})</Message>)?")


def _first_line(exc: BaseException) -> str:
    """The first line of the client's message, with the S3 error code and message when they come later."""
    text = str(exc).strip()
    lines = text.splitlines()
    first = (lines[0] if lines else type(exc).__name__)[:300]
    found = _S3_ERROR.search(text)
    if found and found.group(1) not in first:
        first += f" ({found.group(1)}" + (f": {found.group(2)}" if found.group(2) else "") + ")"
    return first


class Store:
    """``url``'s objects; keys are relative to the URL's path (``step_00000010/manifest.json``)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, *, timeout_secs: float = 30.0) -> None:
        from obstore.store import from_url

        if not is_remote_url(url):
            raise StoreError(f"{url}: not an object store URL (s3://, gs://, az://, file://)", "other")
        self.url = url.rstrip("/")
        self.options = dict(options or {})
        config = {str(k): str(v) for k, v in self.options.items()}
        endpoint = config.get("endpoint") or config.get("aws_endpoint") or os.environ.get("AWS_ENDPOINT_URL", "")
        client = {"timeout": f"{int(timeout_secs)}s", "connect_timeout": "5s"}
        if endpoint.startswith("http://"):
            client["allow_http"] = True
        retry = {
            "max_retries": 2,
            "retry_timeout": datetime.timedelta(seconds=timeout_secs),
            "backoff": {
                "init_backoff": datetime.timedelta(milliseconds=100),
                "max_backoff": datetime.timedelta(seconds=2),
                "base": 2,
            },
        }
        kwargs: dict[str, Any] = {"client_options": client, "retry_config": retry}
        if self.url.startswith("file://"):
            Path(self.url[len("file://") :]).mkdir(parents=True, exist_ok=True)
            kwargs = {}
        try:
            self._store = from_url(self.url + "/", config=config or None, **kwargs)
        except Exception as exc:  # a malformed URL or an unknown option
            raise StoreError(f"{self.url}: cannot open the store: {_first_line(exc)}", "other") from None

    def where(self, key: str = "") -> str:
        return f"{self.url}/{key}" if key else self.url

    def _fail(self, key: str, exc: BaseException) -> StoreError:
        return StoreError(f"{self.where(key)}: {_first_line(exc)}", _kind(exc))

    def put_file(self, key: str, path: Path) -> None:
        import obstore

        try:
            obstore.put(self._store, key, Path(path))
        except Exception as exc:
            raise self._fail(key, exc) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self._store, key, data)
        except Exception as exc:
            raise self._fail(key, exc) from None

    def get_bytes(self, key: str, limit: int) -> bytes:
        """An object of at most ``limit`` bytes (its size is checked before it is read)."""
        import obstore

        try:
            size = int(obstore.head(self._store, key)["size"])
            if size > limit:
                raise StoreError(f"{self.where(key)}: {size} bytes, more than the {limit} this reader takes", "other")
            return bytes(obstore.get(self._store, key).bytes())
        except StoreError:
            raise
        except Exception as exc:
            raise self._fail(key, exc) from None

    def get_file(self, key: str, dest: Path) -> int:
        """Stream an object into ``dest`` (created, fsync'd); its size in bytes."""
        import obstore

        written = 0
        try:
            with open(dest, "xb") as f:
                for chunk in obstore.get(self._store, key).stream():
                    f.write(chunk)
                    written += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and dest.parent.is_dir():
                raise self._fail(key, exc) from None
            raise
        except Exception as exc:
            raise self._fail(key, exc) from None
        return written

    def list(self, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix``: key -> size."""
        import obstore

        try:
            out = {}
            for chunk in obstore.list(self._store, prefix=prefix or None, chunk_size=1000):
                for meta in chunk:
                    out[str(meta["path"])] = int(meta["size"])
            return out
        except Exception as exc:
            raise self._fail(prefix, exc) from None

    def delete(self, keys: Iterable[str]) -> None:
        import obstore

        keys = list(keys)
        if not keys:
            return
        try:
            obstore.delete(self._store, keys)
        except Exception as exc:
            raise self._fail(keys[0], exc) from None

    def check_access(self) -> None:
        """List the prefix once: the bucket exists and the credentials may read it (or a StoreError)."""
        self.list()
