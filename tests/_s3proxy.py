"""An HTTP proxy in front of the test S3 server, on 127.0.0.1: it counts, throttles and holds requests.

Requests pass through unchanged (the Host header too, so SigV4 signatures still hold), which
lets the tests observe the real wire: which requests were sent, with which Range header, how
many body bytes went each way. It can also answer 503 SlowDown, or hold a matching upload
part-way through its body until the test releases it (to kill the writer mid-upload, to read
the store during an upload, or to make two uploads race at the server).
"""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Seen:
    """One request as it passed: method, path, Range header, and body bytes each way."""

    method: str
    path: str
    range: str | None
    sent: int
    received: int
    status: int


@dataclass
class Hold:
    """Holds uploads whose path matches until ``release`` is set (or ``count`` of them arrived)."""

    matches: Callable[[str, str], bool]
    count: int = 1  # release on its own once this many are held (a rendezvous), unless manual
    manual: bool = False
    drop_rest: bool = False  # after the release, cut the server off with half the body: a writer that died
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    held: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Proxy:
    """A threading HTTP/1.1 proxy to ``upstream``; start with ``start()``, stop with ``stop()``."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.seen: list[Seen] = []
        self.throttle_remaining = 0
        self.hold: Hold | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward_body(self, upstream: http.client.HTTPConnection | None) -> int:
                """Streams the request body to ``upstream`` (None: read and drop it); returns its size.

                A held upload has its first half sent on to the server before the hold, so the
                server really is mid-upload while the test kills the writer or reads the store.
                """
                length = self.headers.get("Content-Length")
                if length is None and self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raise ConnectionError("chunked uploads are not relayed by this proxy")
                size = int(length or 0)
                hold = proxy.hold
                first = size // 2 if hold is not None and size > 1 and hold.matches(self.command, self.path) else size
                for part, wait in ((first, first < size), (size - first, False)):
                    data = self.rfile.read(part)
                    if upstream is not None and data:
                        upstream.send(data)
                    if len(data) < part:
                        raise ConnectionError("the client went away mid-upload")
                    if wait:
                        assert hold is not None
                        proxy._wait(hold)
                        if hold.drop_rest:
                            raise ConnectionError("the writer died mid-upload")
                return size

            def _relay(self) -> None:
                with proxy._lock:
                    throttled = proxy.throttle_remaining > 0
                    if throttled:
                        proxy.throttle_remaining -= 1
                if throttled:
                    try:
                        sent = self._forward_body(None)
                    except (ConnectionError, OSError):
                        self.close_connection = True
                        return
                    self._answer(503, {"Content-Type": "application/xml"}, SLOW_DOWN, sent)
                    return
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for key, value in self.headers.items():
                        if key.lower() != "expect":  # the proxy answers 100-continue itself
                            connection.putheader(key, value)
                    connection.endheaders()
                    try:
                        sent = self._forward_body(connection)
                    except (ConnectionError, OSError):
                        self.close_connection = True  # the upstream connection closes with a partial body
                        return
                    response = connection.getresponse()
                    payload = response.read()
                    out = {k: v for k, v in response.getheaders() if k.lower() not in ("transfer-encoding",)}
                    if self.command != "HEAD":  # a HEAD's Content-Length is the object's size: keep it
                        out["Content-Length"] = str(len(payload))
                    self._answer(response.status, out, payload, sent)
                finally:
                    connection.close()

            def _answer(self, status: int, headers: dict[str, str], payload: bytes, sent: int) -> None:
                with proxy._lock:
                    seen = Seen(self.command, self.path, self.headers.get("Range"), sent, len(payload), status)
                    proxy.seen.append(seen)
                self.send_response_only(status)
                headers.setdefault("Content-Length", str(len(payload)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    try:
                        self.wfile.write(payload)
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True  # the client was killed; nothing to tell it

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _wait(self, hold: Hold) -> None:
        with hold.lock:
            hold.held += 1
            if hold.held >= hold.count:
                hold.arrived.set()
                if not hold.manual:
                    hold.release.set()
        hold.release.wait(timeout=60)

    def start(self) -> Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.release.set()
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()
            self.throttle_remaining = 0
            self.hold = None

    def wire_bytes(self) -> tuple[int, int]:
        """Body bytes sent to the server and received from it, over every request seen."""
        with self._lock:
            return sum(s.sent for s in self.seen), sum(s.received for s in self.seen)
