"""A fault-injecting HTTP/1.1 proxy between an S3 client and a real S3 server.

The client under test is pointed at :attr:`S3FaultProxy.url` (``AWS_ENDPOINT_URL``); every
request is forwarded to the real server unchanged (Host header and signature included),
unless a rule programmed by the test matches it:

    proxy.fail("PUT", r"/layers/w/", Fault.SLOW_DOWN, times=2)   # the next 2 such PUTs get 503
    proxy.fail("GET", r"[?&]list-type=2", Fault.INTERNAL)        # every LIST gets 500, until clear()
    proxy.count("PUT", r"/manifests/")                            # requests seen, faulted or not

Rules match a method (or ``"*"``) and a regular expression searched in the request target
(path and query, percent-decoded). Faults:

* ``SLOW_DOWN`` / ``INTERNAL``: an S3 error reply (503 SlowDown / 500 InternalError XML),
  the request is not forwarded;
* ``RESET``: the connection is reset (TCP RST) without forwarding;
* ``HANG``: no reply for ``hang_s`` seconds (longer than the client's read timeout), then
  the connection closes; not forwarded;
* ``FORWARD_THEN_RESET``: forwarded, the server's reply is read and thrown away, and the
  client's connection is reset: the request took effect but the client cannot know.
* ``CORRUPT``: forwarded with one byte of a plain (not chunked) body flipped, as a faulty
  NIC or middlebox would; the server's reply goes back to the client.

Request bodies are read by Content-Length or as chunked encoding (passed on byte for
byte), ``Expect: 100-continue`` is answered at once, and client connections are kept alive
across requests. Each request goes to the server on a fresh connection, so a fault never
leaves a half-used upstream connection behind.
"""

from __future__ import annotations

import dataclasses
import enum
import http.client
import re
import socket
import socketserver
import struct
import threading
import urllib.parse
from types import TracebackType

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}


class Fault(str, enum.Enum):
    SLOW_DOWN = "503 SlowDown"
    INTERNAL = "500 InternalError"
    RESET = "reset"
    HANG = "hang"
    FORWARD_THEN_RESET = "forward-then-reset"
    CORRUPT = "corrupt"


_ERRORS = {
    Fault.SLOW_DOWN: (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    Fault.INTERNAL: (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


@dataclasses.dataclass
class Rule:
    method: str
    target: re.Pattern[str]
    fault: Fault
    remaining: int | None  # None: every matching request, until cleared
    applied: int = 0

    def matches(self, method: str, target: str) -> bool:
        return (self.method in ("*", method)) and self.target.search(target) is not None


@dataclasses.dataclass(frozen=True)
class Seen:
    method: str
    target: str
    fault: Fault | None


class _Request:
    """One parsed request: line, headers in order, body exactly as received."""

    def __init__(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class _ClientGone(Exception):
    pass


def _read_request(rfile, wfile) -> _Request | None:  # noqa: ANN001 - socket files
    line = rfile.readline(65537)
    if not line or not line.strip():
        return None
    try:
        method, target, _ = line.decode("latin-1").split(" ", 2)
    except ValueError:
        raise _ClientGone(f"malformed request line {line!r}") from None
    headers: list[tuple[str, str]] = []
    while True:
        raw = rfile.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    request = _Request(method, target, headers, b"")
    if (request.header("expect") or "").lower() == "100-continue":
        wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        wfile.flush()
    if "chunked" in (request.header("transfer-encoding") or "").lower():
        request.body = _read_chunked_raw(rfile)
    else:
        length = int(request.header("content-length") or 0)
        request.body = rfile.read(length)
        if len(request.body) != length:
            raise _ClientGone("client closed the connection mid-body")
    return request


def _read_chunked_raw(rfile) -> bytes:  # noqa: ANN001
    """A chunked body with its framing and trailers, byte for byte, to forward unchanged."""
    out = bytearray()
    while True:
        size_line = rfile.readline(65537)
        if not size_line:
            raise _ClientGone("client closed the connection mid-body")
        out += size_line
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = rfile.readline(65537)
                out += trailer
                if trailer in (b"\r\n", b"\n", b""):
                    return bytes(out)
        out += rfile.read(size + 2)  # data and its CRLF


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection, add=True)

    def handle(self) -> None:
        proxy = self.server.proxy
        try:
            while True:
                request = _read_request(self.rfile, self.wfile)
                if request is None:
                    return
                fault = proxy._decide(request.method, urllib.parse.unquote(request.target))
                if fault is None:
                    self._reply(*proxy._forward(request), head=request.method == "HEAD")
                elif fault in _ERRORS:
                    self._error(request, fault)
                elif fault is Fault.CORRUPT:
                    if request.body and "chunked" not in (request.header("transfer-encoding") or "").lower():
                        middle = len(request.body) // 2
                        request.body = request.body[:middle] + bytes([request.body[middle] ^ 0x01]) + request.body[middle + 1:]
                    self._reply(*proxy._forward(request), head=request.method == "HEAD")
                elif fault is Fault.FORWARD_THEN_RESET:
                    proxy._forward(request)
                    self._reset()
                    return
                elif fault is Fault.RESET:
                    self._reset()
                    return
                else:  # HANG: silence past the client's read timeout (cut short when the proxy stops)
                    proxy._stopped.wait(proxy.hang_s)
                    return
                if (request.header("connection") or "").lower() == "close":
                    return
        except (_ClientGone, OSError, ValueError):
            return

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass  # the connection was reset on purpose, or by the client
        self.server.proxy._track(self.connection, add=False)

    def _reply(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, head: bool) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        for name, value in headers:
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or lowered == "transfer-encoding" or (lowered == "content-length" and not head):
                continue
            lines.append(f"{name}: {value}")
        if not head:
            lines.append(f"Content-Length: {len(body)}")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            self.wfile.write(body)
        self.wfile.flush()

    def _error(self, request: _Request, fault: Fault) -> None:
        status, reason, code, message = _ERRORS[fault]
        resource = urllib.parse.urlsplit(request.target).path
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               f"<Resource>{resource}</Resource><RequestId>lv-fault-proxy</RequestId></Error>").encode()
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", "lv-fault-proxy")]
        if request.method == "HEAD":
            headers.append(("Content-Length", "0"))
        self._reply(status, reason, headers, xml, head=request.method == "HEAD")

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the client sees a TCP reset, not an orderly end."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: S3FaultProxy


class S3FaultProxy:
    """See the module docstring. Use as a context manager, or start()/stop()."""

    def __init__(self, upstream: str, hang_s: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// endpoint, got {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.hang_s = hang_s
        self._rules: list[Rule] = []
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "proxy not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- the test's controls ------------------------------------------------------------------

    def fail(self, method: str, target: str, fault: Fault, times: int | None = None) -> Rule:
        """Fault the next ``times`` matching requests (``None``: all of them, until :meth:`clear`)."""
        rule = Rule(method.upper(), re.compile(target), Fault(fault), times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def count(self, method: str, target: str, faulted: bool | None = None) -> int:
        """Requests seen that match; ``faulted`` True/False counts only faulted / forwarded ones."""
        pattern = re.compile(target)
        with self._lock:
            return sum(1 for s in self._seen if method.upper() in ("*", s.method) and pattern.search(s.target)
                       and (faulted is None or (s.fault is not None) == faulted))

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> S3FaultProxy:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wake handlers blocked on idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def _decide(self, method: str, target: str) -> Fault | None:
        with self._lock:
            fault = None
            for rule in self._rules:
                if rule.matches(method, target) and (rule.remaining is None or rule.remaining > 0):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    rule.applied += 1
                    fault = rule.fault
                    break
            self._seen.append(Seen(method, target, fault))
            return fault

    def _forward(self, request: _Request) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(request.method, request.target, skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers:
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.endheaders(request.body or None)
            response = conn.getresponse()
            body = response.read()
            return response.status, response.reason, list(response.getheaders()), body
        finally:
            conn.close()
