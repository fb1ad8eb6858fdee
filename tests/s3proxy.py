"""A switchable HTTP proxy in front of an S3 server, for the faults the server itself cannot produce.

A thread of the test process listens on ``127.0.0.1:PORT`` and forwards every request to the
target (moto's server) unchanged. :meth:`S3Proxy.set` switches what it does with the next request:

* ``pass``: forward it and relay the answer;
* ``503``: answer ``503 Service Unavailable`` (S3's ``SlowDown``), the request never reaches the server;
* ``403``: answer ``403 Forbidden`` (``AccessDenied``);
* ``stall``: read the request and never answer (the connection is dropped, unanswered, once the mode
  changes or the proxy stops, so that no thread outlives the test);
* ``refuse``: the listening socket is closed (a connection attempt is refused) and every open
  connection is dropped; the next mode binds the same port again.

The mode is checked per request, so a client's pooled keep-alive connection obeys a switch too;
``set(mode, only=...)`` strikes only the requests ``only(method, path)`` accepts (the rest pass).
``counts`` records how many requests each mode handled (a proof that the client went through it).
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["S3Proxy", "MODES"]

MODES = ("pass", "503", "403", "stall", "refuse")

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate (s3proxy)."),
    "403": (403, "AccessDenied", "Access Denied (s3proxy)."),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], proxy: S3Proxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a connection the proxy dropped on purpose (refuse) or the client gave up on (its timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._closed(self.connection)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the blank line
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        mode, only = proxy.mode, proxy.only
        if only is not None and not only(self.command, self.path):
            mode = "pass"
        proxy._count(mode)
        if mode in ("refuse", "stall"):
            if mode == "stall":
                proxy._changed.wait_for_change("stall")
            self.close_connection = True  # dropped without an answer
            return
        if mode in _ERRORS:
            status, code, message = _ERRORS[mode]
            xml = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            )
            self._answer(status, [("Content-Type", "application/xml")], xml.encode())
            return
        conn = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            drop = {"transfer-encoding", "content-length", "connection"}
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in drop]
            self._answer(resp.status, kept, data, length=resp.getheader("Content-Length"))
        finally:
            conn.close()

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes, length: str | None = None) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        # A HEAD answer carries the object's length but no body.
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _Change:
    """A condition the stalled handlers wait on: the mode left ``stall`` or the proxy stopped."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.mode = "pass"

    def set(self, mode: str) -> None:
        with self.cond:
            self.mode = mode
            self.cond.notify_all()

    def wait_for_change(self, mode: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.mode != mode)


class S3Proxy:
    """``with S3Proxy(target_port) as proxy:`` ``proxy.endpoint`` for ``AWS_ENDPOINT_URL``; ``proxy.set(mode)``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host, self.target_port = target_host, target_port
        self.port = 0
        self.mode = "pass"
        self.only: Callable[[str, str], bool] | None = None
        self.counts: Counter[str] = Counter()
        self._changed = _Change()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Proxy:
        self._listen()
        return self

    def set(self, mode: str, only: Callable[[str, str], bool] | None = None) -> None:
        """Switch what the next request gets (see the module docstring)."""
        if mode not in MODES or (only is not None and mode == "refuse"):
            raise ValueError(f"mode must be one of {MODES} (refuse strikes every request), not {mode!r}")
        with self._lock:
            old, self.mode, self.only = self.mode, mode, only
        self._changed.set(mode)
        if mode == "refuse" and old != "refuse":
            self._unlisten()
        elif mode != "refuse" and old == "refuse":
            self._listen()

    def stop(self) -> None:
        self._changed.set("stopped")
        self._unlisten()

    def _listen(self) -> None:
        self._server = _Server(("127.0.0.1", self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3proxy", daemon=True)
        self._thread.start()

    def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()  # from now on a connection attempt is refused
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # and the connections already open are dropped
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _count(self, mode: str) -> None:
        with self._lock:
            self.counts[mode] += 1

    def __enter__(self) -> S3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
