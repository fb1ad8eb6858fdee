"""A local S3-protocol server for the remote proof and the tests: moto's server over real HTTP on 127.0.0.1.

``moto[server]`` (in the ``dev`` extra) runs as its own process on a free port; a bucket is made
with a plain HTTP ``PUT``. Clients reach it exactly as they reach AWS: through the standard
environment (:meth:`LocalS3.env`: ``AWS_ENDPOINT_URL`` and test credentials), with no patching of
any client library.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["LocalS3", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalS3:
    """``with LocalS3(log_dir) as s3:`` a running server with ``s3.bucket``; ``s3.env()`` for clients."""

    def __init__(self, log_dir: str | os.PathLike, bucket: str = "resilient-train") -> None:
        self.log_dir, self.bucket = Path(log_dir), bucket
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self, timeout: float = 60.0) -> LocalS3:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise RuntimeError("the local S3 server needs moto[server]: pip install -e '.[dev]'") from None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        with open(self.log_dir / "moto.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(
                    urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT"), timeout=5
                )
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"moto's server did not start on {self.endpoint} (see {self.log_dir / 'moto.log'})"
                    )
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
