"""The echo server as a process on 127.0.0.1: HTTP, HTTPS, TCP, UDP, gRPC and the client."""

from __future__ import annotations

import json
import random
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from nodemesh.echo import command_for, grpcecho
from nodemesh.echo.testing import EchoProcess, free_port

ENV = {
    "POD_NAME": "echo-v1-7d9f8-abcde",
    "NAMESPACE": "gateway-conformance-mesh",
    "SERVICE_NAME": "echo-v1",
    "INGRESS_NAME": "mesh",
    "POD_IP": "127.0.0.1",
    "NODE_NAME": "node-a",
}


class Ports:
    def __init__(self) -> None:
        self.http = free_port()
        self.https = free_port()
        self.tcp = free_port()
        self.udp = free_port(socket.SOCK_DGRAM)
        self.grpc = free_port()


@pytest.fixture(scope="module")
def ports() -> Iterator[Ports]:
    p = Ports()
    args = [
        f"--tcp={p.tcp}",
        f"--port={p.http}",
        f"--grpc={p.grpc}",
        f"--port={p.https}",
        f"--tls={p.https}",
        "--crt=/nonexistent/cert.crt",
        "--key=/nonexistent/cert.key",
        f"--udp={p.udp}",
    ]
    with EchoProcess(args, env=ENV) as proc:
        assert len(proc.lines) == 5
        yield p
        assert proc.proc is not None and proc.proc.poll() is None, "server died during tests"


# --- a minimal HTTP/1.1 client that shows exactly what is on the wire -------------------------


class Conn:
    def __init__(self, port: int, tls_name: str | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if tls_name is not None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock, server_hostname=tls_name)
        self.sock = sock
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self, head_only: bool = False) -> tuple[int, dict[str, list[str]], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a response: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.lower(), []).append(value.strip())
        length = 0 if head_only else int(headers.get("content-length", ["0"])[0])
        while len(self.buf) < length:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def is_closed(self) -> bool:
        try:
            return self.buf == b"" and not self._fill()
        except (ConnectionResetError, TimeoutError):
            return True


def get(port: int, path: str = "/", headers: str = "", host: str = "echo") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode()


def roundtrip(port: int, request: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    conn = Conn(port)
    try:
        conn.send(request)
        return conn.response()
    finally:
        conn.close()


# --- HTTP ---------------------------------------------------------------------------------------


def test_json_shape_and_header_echo(ports: Ports) -> None:
    status, headers, body = roundtrip(
        ports.http,
        get(ports.http, "/foo/bar?x=1&y=2", "x-foo: a\r\nX-FOO: b\r\nUser-Agent: t\r\n", "echo:80"),
    )
    assert status == 200
    assert headers["content-type"] == ["application/json"]
    assert headers["x-content-type-options"] == ["nosniff"]
    doc = json.loads(body)
    assert doc["path"] == "/foo/bar?x=1&y=2"
    assert doc["host"] == "echo:80"
    assert doc["method"] == "GET"
    assert doc["proto"] == "HTTP/1.1"
    assert doc["headers"] == {"X-Foo": ["a", "b"], "User-Agent": ["t"]}
    assert doc["namespace"] == "gateway-conformance-mesh"
    assert doc["pod"] == "echo-v1-7d9f8-abcde"
    assert doc["service"] == "echo-v1"
    assert doc["ingress"] == "mesh"
    assert doc["httpPort"] == str(ports.http)
    assert "tls" not in doc


def test_echo_set_header(ports: Ports) -> None:
    status, headers, body = roundtrip(
        ports.http,
        get(ports.http, "/", "X-Echo-Set-Header: X-Header-Set:v1,X-Multi:a\r\n"
            "X-Echo-Set-Header: X-Multi:b\r\n"),
    )  # fmt: skip
    assert status == 200
    assert headers["x-header-set"] == ["v1"]
    assert headers["x-multi"] == ["a,b"]
    assert json.loads(body)["headers"]["X-Echo-Set-Header"] == ["X-Header-Set:v1,X-Multi:a",
                                                                "X-Multi:b"]  # fmt: skip
    # The conformance round-tripper always sends the header, usually empty.
    status, headers, _ = roundtrip(ports.http, get(ports.http, "/", "X-Echo-Set-Header: \r\n"))
    assert status == 200


def test_keepalive_many_requests_one_connection(ports: Ports) -> None:
    conn = Conn(ports.http)
    try:
        for i in range(300):
            conn.send(get(ports.http, f"/seq/{i}"))
            status, headers, body = conn.response()
            assert status == 200
            assert "connection" not in headers
            assert json.loads(body)["path"] == f"/seq/{i}"
        # Pipelined: 100 requests in one write, answers in order.
        conn.send(b"".join(get(ports.http, f"/pipe/{i}") for i in range(100)))
        for i in range(100):
            assert json.loads(conn.response()[2])["path"] == f"/pipe/{i}"
    finally:
        conn.close()


def test_pipelined_large_responses_with_back_pressure(ports: Ports) -> None:
    """300 pipelined 16 KiB answers (~5 MB) while the client reads slowly: all, in order."""
    requests = b"".join(get(ports.http, f"/?size=16384&n={i}") for i in range(300))
    conn = Conn(ports.http)
    sender = threading.Thread(target=conn.send, args=(requests,))
    try:
        sender.start()
        time.sleep(0.3)  # let the server's write buffer fill up
        for i in range(300):
            status, _, body = conn.response()
            assert (status, len(body)) == (200, 16384)
            assert json.loads(body)["path"] == f"/?size=16384&n={i}"
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.is_closed()
    finally:
        sender.join(10)
        conn.close()


def test_request_split_into_single_bytes(ports: Ports) -> None:
    conn = Conn(ports.http)
    try:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in get(ports.http, "/slow", "X-A: 1\r\n"):
            conn.send(bytes([byte]))
        status, _, body = conn.response()
        assert status == 200
        assert json.loads(body)["headers"] == {"X-A": ["1"]}
    finally:
        conn.close()


def test_content_length_body(ports: Ports) -> None:
    payload = bytes(random.Random(1).getrandbits(8) for _ in range(200_000))
    conn = Conn(ports.http)
    try:
        conn.send(
            f"POST /upload HTTP/1.1\r\nHost: e\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
            + get(ports.http, "/after")
        )
        status, _, body = conn.response()
        doc = json.loads(body)
        assert (status, doc["method"], doc["headers"]["Content-Length"]) == (
            200,
            "POST",
            [str(len(payload))],
        )
        assert json.loads(conn.response()[2])["path"] == "/after"
    finally:
        conn.close()


def test_chunked_body_in_pieces(ports: Ports) -> None:
    body = b"5;ext=1\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: t\r\n\r\n"
    conn = Conn(ports.http)
    try:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.send(b"POST /chunked HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 3):
            conn.send(body[i : i + 3])
            time.sleep(0.001)
        status, _, resp = conn.response()
        doc = json.loads(resp)
        assert status == 200
        assert doc["path"] == "/chunked"
        assert "Transfer-Encoding" not in doc["headers"]  # as Go's net/http reports it
        conn.send(get(ports.http, "/next"))
        assert json.loads(conn.response()[2])["path"] == "/next"
    finally:
        conn.close()


def test_expect_100_continue(ports: Ports) -> None:
    conn = Conn(ports.http)
    try:
        conn.send(b"PUT /e HTTP/1.1\r\nHost: e\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        status, _, _ = conn.response()
        assert status == 100
        conn.send(b"data")
        status, _, body = conn.response()
        assert status == 200
        assert json.loads(body)["method"] == "PUT"
    finally:
        conn.close()


def test_size_knob(ports: Ports) -> None:
    status, headers, body = roundtrip(ports.http, get(ports.http, "/?size=16384"))
    assert status == 200
    assert len(body) == 16384
    assert headers["content-length"] == ["16384"]
    assert json.loads(body)["pod"] == "echo-v1-7d9f8-abcde"  # padded, still JSON
    status, _, body = roundtrip(ports.http, get(ports.http, "/big", "X-Echo-Size: 1048576\r\n"))
    assert (status, len(body)) == (200, 1048576)
    status, headers, body = roundtrip(ports.http, get(ports.http, "/?size=10"))
    assert (status, body) == (200, b"x" * 10)
    assert headers["content-type"] == ["application/octet-stream"]
    status, _, body = roundtrip(ports.http, get(ports.http, "/?size=0"))
    assert (status, body) == (200, b"")
    for bad in ("/?size=-1", "/?size=abc", f"/?size={64 * 1024 * 1024 + 1}"):
        status, _, body = roundtrip(ports.http, get(ports.http, bad))
        assert status == 400
        assert "message" in json.loads(body)


def test_head(ports: Ports) -> None:
    conn = Conn(ports.http)
    try:
        conn.send(b"HEAD /h?size=16384 HTTP/1.1\r\nHost: e\r\n\r\n")
        status, headers, body = conn.response(head_only=True)
        assert status == 200
        assert headers["content-length"] == ["16384"]
        assert headers["content-type"] == ["application/json"]
        assert body == b""
        # No body bytes followed: the next response parses cleanly.
        conn.send(get(ports.http, "/after-head"))
        assert json.loads(conn.response()[2])["path"] == "/after-head"
    finally:
        conn.close()


def test_status_health_and_slashes(ports: Ports) -> None:
    status, _, body = roundtrip(ports.http, get(ports.http, "/status/418"))
    assert (status, body) == (418, b"")
    assert roundtrip(ports.http, get(ports.http, "/status/503"))[0] == 503
    assert roundtrip(ports.http, get(ports.http, "/status/abc"))[0] == 400
    assert roundtrip(ports.http, get(ports.http, "/status/2000"))[0] == 400
    status, _, body = roundtrip(ports.http, get(ports.http, "/health"))
    assert (status, body) == (200, b"OK")
    assert roundtrip(ports.http, get(ports.http, "/healthz"))[2] == b"OK"
    assert roundtrip(ports.http, get(ports.http, "//health"))[2] == b"OK"
    doc = json.loads(roundtrip(ports.http, get(ports.http, "//a//b"))[2])
    assert doc["path"] == "//a//b"  # reported as sent


def test_delay(ports: Ports) -> None:
    conn = Conn(ports.http)
    try:
        start = time.monotonic()
        conn.send(get(ports.http, "/?delay=300ms") + get(ports.http, "/second"))
        first = json.loads(conn.response()[2])
        second = json.loads(conn.response()[2])
        assert time.monotonic() - start >= 0.29
        assert (first["path"], second["path"]) == ("/?delay=300ms", "/second")
    finally:
        conn.close()
    status, _, body = roundtrip(ports.http, get(ports.http, "/?delay=soon"))
    assert status == 500
    assert json.loads(body) == {"message": 'time: invalid duration "soon"'}


def test_http10_and_connection_close(ports: Ports) -> None:
    conn = Conn(ports.http)
    try:
        conn.send(b"GET /old HTTP/1.0\r\n\r\n")
        status, headers, body = conn.response()
        assert status == 200
        assert json.loads(body)["proto"] == "HTTP/1.0"
        assert headers["connection"] == ["close"]
        assert conn.is_closed()
    finally:
        conn.close()
    conn = Conn(ports.http)
    try:
        conn.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert conn.response()[1]["connection"] == ["keep-alive"]
        conn.send(get(ports.http, "/b", "Connection: close\r\n"))
        assert conn.response()[1]["connection"] == ["close"]
        assert conn.is_closed()
    finally:
        conn.close()


def test_absolute_form_target(ports: Ports) -> None:
    doc = json.loads(
        roundtrip(ports.http, b"GET http://other.example:81/x?q HTTP/1.1\r\nHost: echo\r\n\r\n")[2]
    )
    assert (doc["host"], doc["path"]) == ("other.example:81", "http://other.example:81/x?q")


MALFORMED = [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET nopath HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nExpect: teapot\r\n\r\n", 417),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS on a plain port
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70_000, 431),  # never ends
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "code"), MALFORMED)
def test_malformed_requests_get_an_error_and_close(ports: Ports, request_bytes: bytes, code: int) -> None:
    conn = Conn(ports.http)
    try:
        conn.send(request_bytes)
        status, headers, body = conn.response()
        assert status == code
        assert headers["connection"] == ["close"]
        assert body.startswith(str(code).encode())
        assert conn.is_closed()
    finally:
        conn.close()
    assert roundtrip(ports.http, get(ports.http, "/still-alive"))[0] == 200


def test_random_garbage_never_breaks_the_server(ports: Ports) -> None:
    rng = random.Random(42)
    pieces = [b"GET ", b"POST ", b"/", b" HTTP/1.1", b"\r\n", b"\n", b":", b"Host: a",
              b"Content-Length: 5", b"Transfer-Encoding: chunked", b"0", b"ff", b"\x00", b" "]  # fmt: skip
    for _ in range(150):
        if rng.random() < 0.5:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        else:
            data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        with socket.create_connection(("127.0.0.1", ports.http), timeout=5) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    assert roundtrip(ports.http, get(ports.http, "/survived"))[0] == 200


def test_tls_port(ports: Ports) -> None:
    conn = Conn(ports.https, tls_name="echo-v1.gateway-conformance-mesh")
    try:
        conn.send(get(ports.https, "/secure", host="echo-v1:443"))
        status, _, body = conn.response()
        doc = json.loads(body)
        assert status == 200
        assert doc["path"] == "/secure"
        assert doc["httpPort"] == str(ports.https)
        assert doc["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
        assert doc["tls"]["serverName"] == "echo-v1.gateway-conformance-mesh"
        assert doc["tls"]["cipherSuite"]
        cert = conn.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert cert
    finally:
        conn.close()


# --- TCP and UDP --------------------------------------------------------------------------------


def test_tcp_echo(ports: Ports) -> None:
    payload = bytes(random.Random(7).getrandbits(8) for _ in range(1 << 20))
    with socket.create_connection(("127.0.0.1", ports.tcp), timeout=10) as s:
        s.sendall(b"hello")
        assert s.recv(5) == b"hello"
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(1 << 16):
            got += chunk
    assert bytes(got) == payload


def test_udp_echo_and_hostname(ports: Ports) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"ping \x00\xff", ("127.0.0.1", ports.udp))
        assert s.recvfrom(2048)[0] == b"ping \x00\xff"
        s.sendto(b"hostname", ("127.0.0.1", ports.udp))
        assert s.recvfrom(2048)[0] == b"echo-v1-7d9f8-abcde"
        s.sendto(b"hostname\n", ("127.0.0.1", ports.udp))
        assert s.recvfrom(2048)[0] == b"echo-v1-7d9f8-abcde\n"
        s.sendto(b"hostnames", ("127.0.0.1", ports.udp))
        assert s.recvfrom(2048)[0] == b"hostnames"


# --- gRPC ---------------------------------------------------------------------------------------


def _headers(resp: dict[str, object]) -> list[tuple[str, str]]:
    assertions = resp["assertions"]
    assert isinstance(assertions, dict)
    return [(h["key"], h["value"]) for h in assertions["headers"]]


def test_grpc_echo_metadata_round_trip(ports: Ports) -> None:
    target = f"127.0.0.1:{ports.grpc}"
    resp = grpcecho.call(target, "Echo", [("x-test-case", "set"), ("x-multi", "1"),
                                          ("x-multi", "2")], authority="echo:7070")  # fmt: skip
    a = resp["assertions"]
    assert a["fully_qualified_method"] == "/gateway_api_conformance.echo_basic.grpcecho.GrpcEcho/Echo"
    assert a["authority"] == "echo:7070"
    headers = _headers(resp)
    assert (":authority", "echo:7070") in headers
    assert ("x-test-case", "set") in headers
    assert [v for k, v in headers if k == "x-multi"] == ["1", "2"]
    assert a["context"] == {
        "namespace": "gateway-conformance-mesh",
        "ingress": "mesh",
        "service_name": "echo-v1",
        "pod": "echo-v1-7d9f8-abcde",
    }
    two = grpcecho.call(target, "EchoTwo", {"X-Upper": "v"})
    assert two["assertions"]["fully_qualified_method"].endswith("GrpcEcho/EchoTwo")
    assert ("x-upper", "v") in _headers(two)
    assert two["assertions"]["authority"] == target


def test_grpc_unimplemented(ports: Ports) -> None:
    target = f"127.0.0.1:{ports.grpc}"
    with pytest.raises(grpc.RpcError) as err:
        grpcecho.call(target, "EchoThree")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as err:
        grpcecho.call(target, "/no.Such/Method")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_grpc_istio_echo(ports: Ports) -> None:
    text = grpcecho.call_istio(f"127.0.0.1:{ports.grpc}", "hi", {"x-a": "1"}, authority="echo:7070")
    lines = text.splitlines()
    assert "StatusCode=200" in lines
    assert "Hostname=echo-v1-7d9f8-abcde" in lines
    assert "RequestHeader=x-a:1" in lines
    assert "Host=echo:7070" in lines
    assert "Echo=hi" in lines
    assert "Proto=GRPC" in lines


# --- the Istio-style client command -------------------------------------------------------------


def parse_istio(output: str) -> dict[str, object]:
    """The fields the conformance suite's parse.go reads (first match, like Go's regexps)."""

    def first(field: str) -> str:
        m = re.search(field + "=(.*)", output)
        return m.group(1) if m else ""

    req: dict[str, list[str]] = {}
    for m in re.finditer("RequestHeader=(.*)", output):
        name, sep, value = m.group(1).partition(":")
        if sep:
            req.setdefault(name.lower(), []).append(value)
    resp: dict[str, str] = {}
    for m in re.finditer("ResponseHeader=(.*)", output):
        name, sep, value = m.group(1).partition(":")
        if sep:
            resp[name.lower()] = value
    return {
        "code": first("StatusCode"),
        "hostname": first("Hostname"),
        "request_headers": req,
        "response_headers": resp,
    }


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command_for(["client", *args]), capture_output=True, text=True, timeout=30)


def test_client_http(ports: Ports) -> None:
    r = run_client(
        f"http://127.0.0.1:{ports.http}/v1",
        "--method=GET",
        "-H",
        "x-header-add:this-value-should-be-appended",
        "-H",
        "X-Echo-Set-Header:X-Header-Set:v1",
    )
    assert r.returncode == 0, r.stderr
    got = parse_istio(r.stdout)
    assert got["code"] == "200"
    assert got["hostname"] == "echo-v1-7d9f8-abcde"
    req = got["request_headers"]
    assert isinstance(req, dict)
    assert req["x-header-add"] == ["this-value-should-be-appended"]
    resp = got["response_headers"]
    assert isinstance(resp, dict)
    assert resp["x-header-set"] == "v1"


def test_client_count_and_status(ports: Ports) -> None:
    r = run_client(f"http://127.0.0.1:{ports.http}/status/404", "--count=3")
    assert r.returncode == 0, r.stderr
    blocks = [b for b in r.stdout.split("\n\n") if b.strip()]
    assert len(blocks) == 3
    assert all(parse_istio(b)["code"] == "404" for b in blocks)


def test_client_grpc(ports: Ports) -> None:
    r = run_client(f"grpc://127.0.0.1:{ports.grpc}", "-H", "x-test-case:set", "-H", "Host:echo")
    assert r.returncode == 0, r.stderr
    got = parse_istio(r.stdout)
    assert got["code"] == "200"
    assert got["hostname"] == "echo-v1-7d9f8-abcde"
    req = got["request_headers"]
    assert isinstance(req, dict)
    assert req["x-test-case"] == ["set"]


def test_client_failure_exit_code() -> None:
    r = run_client(f"http://127.0.0.1:{free_port()}/", "--timeout=1s")
    assert r.returncode == 1
    assert "error" in r.stderr
