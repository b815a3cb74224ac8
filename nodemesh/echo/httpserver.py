"""HTTP/1.1 echo, compatible with the Gateway API conformance server ``echo-basic``.

Every request is answered with a JSON document describing it, in echo-basic's field names::

    {"path": "/foo?x=1",            # the request target as sent (echo-basic's RequestURI)
     "host": "echo.ns:80",          # Host header, or the authority of an absolute-form target
     "method": "GET", "proto": "HTTP/1.1",
     "headers": {"Accept": ["*/*"], "X-Foo": ["a", "b"]},   # Go-canonical names, Host excluded
     "httpPort": "8080",            # the port the request arrived on
     "namespace": "...", "ingress": "...", "service": "...", "pod": "...",
     "tls": {"version": "TLSv1.3", "serverName": "...", "negotiatedProtocol": "http/1.1",
             "cipherSuite": "TLS_AES_256_GCM_SHA384"}}          # TLS listeners only

The response has ``Content-Type: application/json`` exactly (the conformance round-tripper
compares it literally) and ``X-Content-Type-Options: nosniff``. The JSON is compact, not
indented like echo-basic's; any JSON parser reads both.

echo-basic behaviours kept:

* ``X-Echo-Set-Header: Name:value,Other:value`` request header: each pair becomes a response
  header (name casing kept; repeated names are joined with ``,``).
* ``GET /status/NNN``: empty response with status NNN (200..999; anything else is 400).
* ``/health``: ``200 OK`` with body ``OK`` (``/healthz`` too, a nodemesh addition).
* ``?delay=DURATION`` (Go syntax: ``500ms``, ``1.5s``, ``1m``): wait before answering; an
  unparsable duration is a 500 with ``{"message": ...}``.
* ``//`` in the path is reduced to ``/`` before routing.

nodemesh additions:

* ``?size=N`` query parameter, or ``X-Echo-Size: N`` request header (the query wins): the body
  is exactly N bytes (0 <= N <= 64 MiB). If the echo JSON fits, it is padded with trailing
  spaces (still valid JSON, still says which pod answered); if not, the body is N bytes of ``x``
  with ``Content-Type: application/octet-stream``. The benchmark uses ``?size=16384``.

Protocol: HTTP/1.0 and 1.1 with keep-alive and pipelining, Content-Length and chunked request
bodies (read and discarded, never buffered), ``Expect: 100-continue``, ``HEAD`` (headers and
Content-Length of the GET answer, no body). Malformed requests get a 400 (431 for a header block
over 64 KiB, 501 for an unsupported Transfer-Encoding, 505 for another HTTP version) and the
connection is closed; nothing a client sends can raise out of the protocol. Not supported:
HTTP/2 (neither h2c upgrade nor prior knowledge) and echo-basic's ``/ws`` websocket echo.

Speed: one :class:`asyncio.Protocol` per connection, a hand-written parser over the received
bytes, cached header-name canonicalisation, the constant part of the JSON encoded once per
connection, and one ``transport.write`` per response.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from nodemesh.echo import tlsutil
from nodemesh.echo.config import PodContext

__all__ = [
    "MAX_HEAD",
    "MAX_SIZE",
    "EchoHTTP",
    "HTTPEchoProtocol",
    "canonical_header_name",
    "parse_go_duration",
]

MAX_HEAD = 64 * 1024
MAX_SIZE = 64 * 1024 * 1024

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS = range(6)

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than HTAB; "\n" is the line separator once CRLF became LF.
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_VERSION = re.compile(r"HTTP/\d\.\d")
_HOST_OK = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]*")
_HEX = re.compile(r"[0-9A-Fa-f]{1,15}")
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
    "h": 3600.0,
}  # fmt: skip
_KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"))
# Response headers the echo writes itself: X-Echo-Set-Header may not set these.
_RESERVED = frozenset(
    ("content-length", "transfer-encoding", "connection", "content-type", "x-content-type-options")
)
# OpenSSL names of common TLS 1.2 suites -> the IANA names Go (and echo-basic) report.
_CIPHER_NAMES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384": "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305": "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "ECDHE-RSA-CHACHA20-POLY1305": "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}

_encode = json.JSONEncoder(separators=(",", ":")).encode
_canon_cache: dict[str, str] = {}
_reasons: dict[int, str] = {}
_date_cache: list[Any] = [0, ""]


def canonical_header_name(name: str) -> str | None:
    """Go's CanonicalMIMEHeaderKey for a valid token, else None (cached)."""
    canon = _canon_cache.get(name)
    if canon is None:
        if not _TOKEN.fullmatch(name):
            return None
        canon = "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))
        if len(_canon_cache) < 4096:
            _canon_cache[name] = canon
    return canon


def _reason(code: int) -> str:
    r = _reasons.get(code)
    if r is None:
        try:
            r = HTTPStatus(code).phrase
        except ValueError:
            r = f"status code {code}"
        _reasons[code] = r
    return r


def _date() -> str:
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True)
    return _date_cache[1]


def parse_go_duration(text: str) -> float:
    """Seconds in a Go ``time.ParseDuration`` string (``"1.5s"``, ``"1m30s"``, ``"0"``)."""
    s = text
    sign = 1.0
    if s[:1] in ("-", "+"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if total > 9.2e9:  # beyond Go's int64 nanoseconds
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


class _Request:
    __slots__ = ("head_only", "headers", "host", "keep_alive", "method", "proto", "target")

    def __init__(
        self,
        method: str,
        target: str,
        proto: str,
        host: str,
        headers: dict[str, list[str]],
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.proto = proto
        self.host = host
        self.headers = headers
        self.keep_alive = keep_alive
        self.head_only = method == "HEAD"


class _BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EchoHTTP:
    """Per-process state of the HTTP echo: the pod context and the open connections."""

    def __init__(self, ctx: PodContext) -> None:
        self.ctx = ctx
        self.connections: set[HTTPEchoProtocol] = set()
        self._ctx_json = _encode(
            {
                "namespace": ctx.namespace,
                "ingress": ctx.ingress,
                "service": ctx.service,
                "pod": ctx.pod,
            }
        )[1:-1]

    def protocol_factory(self, port: int, tls: bool) -> Any:
        """The factory for ``loop.create_server`` for a listener on ``port``."""

        def factory() -> HTTPEchoProtocol:
            return HTTPEchoProtocol(self, port, tls)

        return factory

    def context_json(self) -> str:
        """The constant context fields, encoded once: ``"namespace":...,"pod":...``."""
        return self._ctx_json

    def close_all(self) -> None:
        """Close every open connection (at shutdown)."""
        for conn in list(self.connections):
            conn.abort()


class HTTPEchoProtocol(asyncio.Protocol):
    """One HTTP/1.x connection: parse requests from the byte stream, answer each in order."""

    def __init__(self, app: EchoHTTP, port: int, tls: bool) -> None:
        self.app = app
        self.port = str(port)
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.state = _HEAD
        self.remaining = 0
        self.trailer_bytes = 0
        self.pending: _Request | None = None
        self.tail: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.closing = False
        self.eof = False

    # --- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.app.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.app.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.buf = b""

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.timer is None and not self.closing:
            asyncio.get_running_loop().call_soon(self._resume)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.timer is not None or self.write_paused:
            self.buf = data
            return
        try:
            self._feed(data)
        except Exception as exc:  # a bug must cost one connection, never the server
            self._fail(500, f"internal error: {type(exc).__name__}")

    def eof_received(self) -> bool | None:
        # Everything complete was answered synchronously, except a ?delay= answer still due:
        # keep the half-closed connection open for it (plain TCP only), else close now.
        self.eof = True
        return self.timer is not None and not self.tls

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    # --- parsing ---------------------------------------------------------------------------

    def _resume(self) -> None:
        if self.closing or self.timer is not None or self.write_paused:
            return
        assert self.transport is not None
        self.transport.resume_reading()
        data, self.buf = self.buf, b""
        if data:
            self.data_received(data)

    def _feed(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        while pos < n:
            if self.closing:
                return
            if self.timer is not None or self.write_paused:
                self.buf = data[pos:]
                return
            state = self.state
            if state == _HEAD:
                while pos < n and data[pos] in (10, 13):  # tolerate CRLFs between requests
                    pos += 1
                if pos >= n:
                    return
                i = data.find(b"\r\n\r\n", pos)
                j = data.find(b"\n\n", pos, i if i >= 0 else n)
                if j >= 0:
                    end, nxt = j, j + 2
                elif i >= 0:
                    end, nxt = i, i + 4
                else:
                    if n - pos > MAX_HEAD:
                        self._fail(431, "request header block too large")
                    else:
                        self.buf = data[pos:]
                    return
                if end - pos > MAX_HEAD:
                    self._fail(431, "request header block too large")
                    return
                try:
                    req, body = self._parse_head(data[pos:end])
                except _BadRequest as bad:
                    self._fail(bad.code, bad.message)
                    return
                pos = nxt
                if body == 0:
                    self._respond(req)
                elif body > 0:
                    self.pending = req
                    self.state = _BODY
                    self.remaining = body
                else:
                    self.pending = req
                    self.state = _CHUNK_SIZE
                    self.trailer_bytes = 0
            elif state == _BODY:
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self._body_done()
            elif state == _CHUNK_SIZE:
                k = data.find(b"\n", pos)
                if k < 0:
                    if n - pos > 4096:
                        self._fail(400, "chunk size line too long")
                    else:
                        self.buf = data[pos:]
                    return
                line = data[pos:k].rstrip(b"\r")
                pos = k + 1
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size_text.decode("latin-1")):
                    self._fail(400, "malformed chunk size")
                    return
                size = int(size_text, 16)
                if size == 0:
                    self.state = _TRAILERS
                else:
                    self.state = _CHUNK_DATA
                    self.remaining = size
            elif state == _CHUNK_DATA:
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if data[pos] == 10:
                    pos += 1
                    self.state = _CHUNK_SIZE
                elif data[pos] == 13:
                    if pos + 1 >= n:
                        self.buf = data[pos:]
                        return
                    if data[pos + 1] != 10:
                        self._fail(400, "malformed chunked encoding")
                        return
                    pos += 2
                    self.state = _CHUNK_SIZE
                else:
                    self._fail(400, "malformed chunked encoding")
                    return
            else:  # _TRAILERS: read and ignore trailer fields up to the empty line
                k = data.find(b"\n", pos)
                if k < 0:
                    if self.trailer_bytes + n - pos > MAX_HEAD:
                        self._fail(431, "trailer block too large")
                    else:
                        self.buf = data[pos:]
                    return
                self.trailer_bytes += k + 1 - pos
                if self.trailer_bytes > MAX_HEAD:
                    self._fail(431, "trailer block too large")
                    return
                line = data[pos:k].rstrip(b"\r")
                pos = k + 1
                if not line:
                    self._body_done()

    def _body_done(self) -> None:
        self.state = _HEAD
        req = self.pending
        self.pending = None
        if req is not None:
            self._respond(req)

    def _parse_head(self, raw: bytes) -> tuple[_Request, int]:
        """Parse a request head; return the request and its body length (-1 = chunked)."""
        head = raw.decode("latin-1") if raw.isascii() else raw.decode("utf-8", "replace")
        if "\r" in head:
            head = head.replace("\r\n", "\n")
        if _BAD_CHARS.search(head):
            raise _BadRequest(400, "invalid character in request head")
        lines = head.split("\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _BadRequest(400, "malformed request line")
        method, target, proto = parts
        if method not in _KNOWN_METHODS and not _TOKEN.fullmatch(method):
            raise _BadRequest(400, "invalid method")
        if proto != "HTTP/1.1" and proto != "HTTP/1.0":
            if _VERSION.fullmatch(proto):
                raise _BadRequest(505, "HTTP version not supported")
            raise _BadRequest(400, "malformed HTTP version")
        if not target or (target[0] != "/" and target != "*" and "://" not in target and method != "CONNECT"):
            raise _BadRequest(400, "bad request URI")

        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            canon = canonical_header_name(name) if sep else None
            if canon is None:
                raise _BadRequest(400, "malformed header line")
            value = value.strip(" \t")
            values = headers.get(canon)
            if values is None:
                headers[canon] = [value]
            else:
                values.append(value)

        hosts = headers.pop("Host", None)
        if hosts is None:
            if proto == "HTTP/1.1":
                raise _BadRequest(400, "missing required Host header")
            host = ""
        else:
            if len(hosts) > 1:
                raise _BadRequest(400, "too many Host headers")
            host = hosts[0]
            if not _HOST_OK.fullmatch(host):
                raise _BadRequest(400, "malformed Host header")
        if "://" in target and target[0] != "/":
            authority = target.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
            if authority:
                host = authority

        connection = headers.get("Connection")
        if proto == "HTTP/1.1":
            keep_alive = connection is None or not _has_token(connection, "close")
        else:
            keep_alive = connection is not None and _has_token(connection, "keep-alive")

        body = 0
        te = headers.pop("Transfer-Encoding", None) if proto == "HTTP/1.1" else None
        lengths = headers.get("Content-Length")
        if te is not None:
            if len(te) != 1 or te[0].lower() != "chunked":
                raise _BadRequest(501, "unsupported transfer encoding")
            if lengths is not None:
                raise _BadRequest(400, "both Transfer-Encoding and Content-Length")
            body = -1
        elif lengths is not None:
            first = lengths[0]
            if any(v != first for v in lengths):
                raise _BadRequest(400, "conflicting Content-Length headers")
            if not (first.isascii() and first.isdigit()) or len(first) > 18:
                raise _BadRequest(400, "bad Content-Length")
            body = int(first)

        expect = headers.get("Expect")
        if expect is not None and body != 0:
            if proto == "HTTP/1.1" and expect[0].lower() == "100-continue":
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                raise _BadRequest(417, "unsupported Expect header")
        return _Request(method, target, proto, host, headers, keep_alive), body

    # --- responses -------------------------------------------------------------------------

    def _respond(self, req: _Request) -> None:
        target = req.target
        path, _, query = target.partition("?")
        if path[:1] != "/" and "://" in path:
            rest = path.split("://", 1)[1]
            slash = rest.find("/")
            path = rest[slash:] if slash >= 0 else "/"
        if "//" in path:
            path = path.replace("//", "/")

        if path == "/health" or path == "/healthz":
            self._send(200, "text/plain; charset=utf-8", b"OK", req, ())
            return
        if path.startswith("/status/"):
            code = 400
            tail = target[8:] if target.startswith("/status/") else ""
            if len(tail) == 3 and tail.isascii() and tail.isdigit() and int(tail) >= 200:
                code = int(tail)
            self._send(code, None, b"", req, ())
            return

        delay = 0.0
        size_text: str | None = None
        if query:
            for item in query.split("&"):
                key, _, value = item.partition("=")
                if key == "delay" and value:
                    try:
                        delay = parse_go_duration(value)
                    except ValueError as exc:
                        self._send_error_json(500, str(exc), req)
                        return
                elif key == "size":
                    size_text = value
        if size_text is None:
            sizes = req.headers.get("X-Echo-Size")
            if sizes:
                size_text = sizes[0]

        extra: list[tuple[str, str]] = []
        setters = req.headers.get("X-Echo-Set-Header")
        if setters:
            extra = _echo_set_headers(setters)

        if self.tail is None:
            self.tail = self._make_tail()
        doc = _encode(
            {
                "path": target,
                "host": req.host,
                "method": req.method,
                "proto": req.proto,
                "headers": dict(sorted(req.headers.items())),
                "httpPort": self.port,
            }
        )
        body = (doc[:-1] + self.tail).encode("ascii")
        ctype = "application/json"
        if size_text is not None:
            if not (size_text.isascii() and size_text.isdigit()) or int(size_text) > MAX_SIZE:
                self._send_error_json(400, f"size must be 0..{MAX_SIZE} bytes", req)
                return
            size = int(size_text)
            if size >= len(body):
                body = body.ljust(size)
            else:
                body = b"x" * size
                ctype = "application/octet-stream"

        if delay > 0:
            assert self.transport is not None
            self.transport.pause_reading()
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(delay, self._delayed, req, ctype, body, extra)
            return
        self._send(200, ctype, body, req, extra)

    def _delayed(self, req: _Request, ctype: str, body: bytes, extra: list[tuple[str, str]]) -> None:
        self.timer = None
        if self.closing:
            return
        self._send(200, ctype, body, req, extra)
        if self.eof and not self.closing:
            self.closing = True
            assert self.transport is not None
            self.transport.close()
            return
        self._resume()

    def _make_tail(self) -> str:
        tail = "," + self.app.context_json()
        if self.tls and self.transport is not None:
            sslobj = self.transport.get_extra_info("ssl_object")
            if sslobj is not None:
                cipher = sslobj.cipher()
                name = cipher[0] if cipher else ""
                tls: dict[str, str] = {
                    "version": sslobj.version() or "",
                    "serverName": tlsutil.sni_of(sslobj),
                }
                alpn = sslobj.selected_alpn_protocol()
                if alpn:
                    tls["negotiatedProtocol"] = alpn
                tls["cipherSuite"] = _CIPHER_NAMES.get(name, name)
                tail += ',"tls":' + _encode(tls)
        return tail + "}"

    def _send(
        self,
        code: int,
        ctype: str | None,
        body: bytes,
        req: _Request,
        extra: list[tuple[str, str]] | tuple[()],
    ) -> None:
        parts = [f"HTTP/1.1 {code} {_reason(code)}\r\n"]
        if ctype is not None:
            parts.append(f"Content-Type: {ctype}\r\n")
            if ctype == "application/json":
                parts.append("X-Content-Type-Options: nosniff\r\n")
        own_date = True
        for name, value in extra:
            if name.lower() == "date":
                own_date = False
            parts.append(f"{name}: {value}\r\n")
        if own_date:
            parts.append(f"Date: {_date()}\r\n")
        if code >= 200 and code != 204 and code != 304:
            parts.append(f"Content-Length: {len(body)}\r\n")
        if not req.keep_alive:
            parts.append("Connection: close\r\n")
        elif req.proto == "HTTP/1.0":
            parts.append("Connection: keep-alive\r\n")
        parts.append("\r\n")
        head = "".join(parts).encode("utf-8")
        transport = self.transport
        assert transport is not None
        if req.head_only or code == 204 or code == 304:
            transport.write(head)
        else:
            transport.write(head + body)
        if not req.keep_alive:
            self.closing = True
            transport.close()

    def _send_error_json(self, code: int, message: str, req: _Request) -> None:
        body = json.dumps({"message": message}).encode("ascii")
        self._send(code, "application/json", body, req, ())

    def _fail(self, code: int, message: str) -> None:
        """Answer a request we cannot parse, then close the connection."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        body = f"{code} {_reason(code)}: {message}".encode()
        head = (
            f"HTTP/1.1 {code} {_reason(code)}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Date: {_date()}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        transport = self.transport
        transport.write(head + body)
        if transport.can_write_eof():
            # Lingering close, as Go does: half-close and discard what the client still sends
            # for a moment, so that closing with unread input (a TCP RST) cannot destroy the
            # error response before the client has read it.
            transport.write_eof()
            transport.resume_reading()
            self.linger = asyncio.get_running_loop().call_later(1.0, transport.close)
        else:
            transport.close()


def _has_token(values: list[str], token: str) -> bool:
    for value in values:
        for item in value.split(","):
            if item.strip().lower() == token:
                return True
    return False


def _echo_set_headers(setters: list[str]) -> list[tuple[str, str]]:
    """echo-basic's X-Echo-Set-Header: ``Name:value`` pairs separated by commas."""
    out: dict[str, str] = {}
    for setter in setters:
        for pair in setter.split(","):
            name, _, value = pair.strip().partition(":")
            if not name or not _TOKEN.fullmatch(name) or name.lower() in _RESERVED:
                continue  # Go's server drops invalid names when writing
            value = value.strip()
            if name in out:
                out[name] += "," + value
            else:
                out[name] = value
    return list(out.items())
