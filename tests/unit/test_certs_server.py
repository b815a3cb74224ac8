"""The CA service end to end over a real unix socket: signing, refusals, robustness, the client."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509

from nodemesh.certs.authority import BuiltinCA, CaError
from nodemesh.certs.authorize import authorize
from nodemesh.certs.client import CaClient, CaUnavailable
from nodemesh.certs.leaf import leaf_from, make_csr, new_key, verify_chain
from nodemesh.certs.server import MAX_REQUEST_BYTES, NOT_A_NODE, CaServer, netns_inode_of

TD = "cluster.local"
SID = "spiffe://cluster.local/ns/prod/sa/api"
MAX_TTL = 3600.0
PODS = [{"metadata": {"name": "api-1", "namespace": "prod"},
         "spec": {"nodeName": "node1", "serviceAccountName": "api"}}]


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="nm-ca-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ca(short_dir: str) -> BuiltinCA:
    return BuiltinCA.create(os.path.join(short_dir, "ca"), TD)


class Peers:
    """node_of_peer for tests: the test process is node1, unless told to be nobody."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.known = True

    def __call__(self, pid: int) -> str | None:
        self.seen.append(pid)
        return "node1" if self.known and pid == os.getpid() else None


@pytest.fixture
def peers() -> Peers:
    return Peers()


@pytest.fixture
def start(ca: BuiltinCA, short_dir: str, peers: Peers) -> Iterator[Callable[..., CaServer]]:
    servers: list[CaServer] = []

    def make(**kwargs: Any) -> CaServer:
        kwargs.setdefault("authorizer", lambda node, sid: authorize(node, sid, TD, PODS))
        server = CaServer(kwargs.pop("ca", ca), os.path.join(short_dir, "ca.sock"), peers,
                          kwargs.pop("authorizer"), kwargs.pop("max_ttl_seconds", MAX_TTL), **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(start: Callable[..., CaServer]) -> CaServer:
    return start()


@pytest.fixture
def client(server: CaServer) -> CaClient:
    return CaClient(server.socket_path, timeout=5.0)


def line_of(request: dict[str, Any]) -> bytes:
    return json.dumps(request).encode() + b"\n"


def raw(path: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def exchange(s: socket.socket, data: bytes) -> dict[str, Any]:
    s.sendall(data)
    return json.loads(read_line(s))


def read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


# ---- the happy path --------------------------------------------------------------------------

def test_sign_roots_and_status_through_the_client(ca: BuiltinCA, client: CaClient, peers: Peers) -> None:
    key = new_key()
    chain = client.sign(make_csr(key, SID), SID, 600)
    roots = client.roots()
    assert roots == ca.roots()
    assert verify_chain(chain, roots) is None
    leaf = leaf_from(chain, key, roots)
    assert leaf.spiffe_id == SID
    assert 590 <= leaf.expires_in() <= 600
    assert client.status() == json.loads(json.dumps(ca.status()))
    assert peers.seen == [os.getpid()]  # SO_PEERCRED gave the server the test process's pid


def test_the_socket_is_root_only(server: CaServer) -> None:
    st = os.stat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_the_ttl_is_clamped_to_the_maximum(client: CaClient) -> None:
    chain = client.sign(make_csr(new_key(), SID), SID, 30 * 86400)
    not_after = x509.load_pem_x509_certificate(chain).not_valid_after_utc
    assert abs(not_after - (datetime.now(UTC) + timedelta(seconds=MAX_TTL))) < timedelta(seconds=5)


def test_signing_is_logged(client: CaClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nodemesh.ca"):
        chain = client.sign(make_csr(new_key(), SID), SID, 60)
    serial = format(x509.load_pem_x509_certificate(chain).serial_number, "x")
    records = [r for r in caplog.records if r.name == "nodemesh.ca" and "signed" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    message = records[0].getMessage()
    assert SID in message and "node node1" in message and serial in message and "expires" in message


def test_several_requests_on_one_connection(server: CaServer) -> None:
    with raw(server.socket_path) as s:
        request = {"op": "sign", "csr": make_csr(new_key(), SID).decode(), "spiffeId": SID, "ttlSeconds": 60}
        s.sendall((json.dumps({"op": "roots"}) + "\n" + json.dumps(request) + "\n\n"
                   + json.dumps({"op": "status"}) + "\n").encode())
        replies = s.makefile("rb")
        assert len(json.loads(replies.readline())["roots"]) == 1
        assert "chain" in json.loads(replies.readline())
        assert json.loads(replies.readline())["trustDomain"] == TD  # the empty line is skipped


def test_a_last_request_without_a_newline_is_answered(server: CaServer) -> None:
    with raw(server.socket_path) as s:
        s.sendall(b'{"op": "roots"}')
        s.shutdown(socket.SHUT_WR)
        assert "roots" in json.loads(read_line(s))


def test_rotation_shows_through_the_server(ca: BuiltinCA, client: CaClient) -> None:
    ca.rotate()
    assert len(client.roots()) == 2
    assert client.status()["rotation"] == "rotating"
    ca.retire()
    assert len(client.roots()) == 1


# ---- refusals --------------------------------------------------------------------------------

def test_an_unknown_caller_gets_no_certificate(client: CaClient, peers: Peers) -> None:
    peers.known = False
    with pytest.raises(CaError, match=f"^{NOT_A_NODE}$"):
        client.sign(make_csr(new_key(), SID), SID, 60)
    assert client.roots()  # public facts need no node


def test_the_authorizer_refusal_reaches_the_caller(client: CaClient) -> None:
    other = "spiffe://cluster.local/ns/prod/sa/admin"
    with pytest.raises(CaError) as e:
        client.sign(make_csr(new_key(), other), other, 60)
    assert str(e.value) == f"node node1 runs no pod of {other}"


def test_the_ca_refusal_reaches_the_caller(client: CaClient) -> None:
    with pytest.raises(CaError) as e:
        client.sign(make_csr(new_key(), "spiffe://cluster.local/ns/prod/sa/admin"), SID, 60)
    assert str(e.value).startswith(f"CSR for {SID}: subjectAltName: want exactly the URI {SID}")


@pytest.mark.parametrize(("line", "error"), [
    (b"this is not json\n", "request is not valid JSON"),
    (b"\xff\xfe\n", "request is not valid JSON"),
    (b"[1, 2]\n", "request must be a JSON object"),
    (b"[" * 60000 + b"\n", "request is not valid JSON"),  # deep enough to exhaust the parser's stack
    (b'{"op": "delete"}\n', "unknown op 'delete'; want sign, roots or status"),
    (b"{}\n", "unknown op None; want sign, roots or status"),
    (b'{"op": "sign", "spiffeId": "x", "ttlSeconds": 1}\n',
     "sign: csr: required, a PEM certificate signing request"),
    (b'{"op": "sign", "csr": "x", "ttlSeconds": 1}\n', "sign: spiffeId: required, the SPIFFE ID to sign for"),
    (b'{"op": "sign", "csr": "x", "spiffeId": "x"}\n', "sign: ttlSeconds: required, a number of seconds"),
    (b'{"op": "sign", "csr": "x", "spiffeId": "x", "ttlSeconds": "60"}\n',
     "sign: ttlSeconds: required, a number of seconds"),
    (b'{"op": "sign", "csr": 5, "spiffeId": "x", "ttlSeconds": 1}\n', "sign: csr: required"),
    (line_of({"op": "sign", "csr": "x", "spiffeId": SID, "ttlSeconds": -1}),
     "ttlSeconds: must be a positive number of seconds, got -1"),
    (line_of({"op": "sign", "csr": "x", "spiffeId": SID, "ttlSeconds": 60}),
     f"CSR for {SID}: not a PEM certificate signing request"),
])
def test_bad_requests_get_an_error_and_the_connection_stays_usable(server: CaServer, line: bytes,
                                                                  error: str) -> None:
    with raw(server.socket_path) as s:
        reply = exchange(s, line)
        assert reply == {"error": reply["error"]}
        assert reply["error"].startswith(error)
        assert "Traceback" not in reply["error"]
        assert "roots" in exchange(s, b'{"op": "roots"}\n')


def test_an_oversized_request_is_refused_and_the_connection_closed(server: CaServer) -> None:
    with raw(server.socket_path) as s:
        reply = exchange(s, b'{"op": "roots", "pad": "' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}\n')
        assert reply == {"error": f"request too large: more than {MAX_REQUEST_BYTES} bytes in one line"}
        assert s.recv(1) == b""


def test_an_oversized_request_without_a_newline_is_refused_too(server: CaServer) -> None:
    with raw(server.socket_path) as s:
        reply = exchange(s, b"x" * (MAX_REQUEST_BYTES + 1))
        assert reply["error"].startswith("request too large")
    # The server is still there for everyone else.
    assert CaClient(server.socket_path).roots()


def test_a_request_of_exactly_the_limit_is_served(server: CaServer) -> None:
    head = b'{"op": "roots", "pad": "'
    line = head + b"x" * (MAX_REQUEST_BYTES - len(head) - 2) + b'"}'
    assert len(line) == MAX_REQUEST_BYTES
    with raw(server.socket_path) as s:
        assert "roots" in exchange(s, line + b"\n")


def test_internal_errors_are_reported_without_a_traceback(ca: BuiltinCA, start: Callable[..., CaServer],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    def broken(node: str, sid: str) -> str | None:
        raise RuntimeError("store is down")

    server = start(authorizer=broken)
    with caplog.at_level(logging.ERROR, logger="nodemesh.ca"), pytest.raises(CaError) as e:
        CaClient(server.socket_path).sign(make_csr(new_key(), SID), SID, 60)
    assert str(e.value) == "internal error in the certificate authority: RuntimeError"
    assert any("store is down" in (r.exc_text or "") or r.exc_info for r in caplog.records)


# ---- concurrency, timeouts, lifecycle --------------------------------------------------------

def test_a_silent_connection_does_not_block_other_clients(server: CaServer, client: CaClient) -> None:
    silent = [raw(server.socket_path) for _ in range(3)]
    try:
        half = raw(server.socket_path)
        half.sendall(b'{"op": "ro')  # half a request, then nothing
        began = time.monotonic()
        chain = client.sign(make_csr(new_key(), SID), SID, 60)
        assert verify_chain(chain, client.roots()) is None
        assert time.monotonic() - began < 2
        half.close()
    finally:
        for s in silent:
            s.close()


def test_idle_connections_are_closed(start: Callable[..., CaServer]) -> None:
    server = start(idle_timeout_seconds=0.3)
    with raw(server.socket_path) as s:
        began = time.monotonic()
        assert s.recv(1) == b""
        assert time.monotonic() - began < 3


def test_too_many_connections_are_told_so(start: Callable[..., CaServer]) -> None:
    server = start(max_connections=2)
    held = [raw(server.socket_path) for _ in range(2)]
    try:
        time.sleep(0.1)  # let the server take both
        with raw(server.socket_path) as s:
            assert json.loads(read_line(s))["error"].startswith("too many connections")
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 3
    while True:  # slots come back once the held connections are gone
        try:
            assert CaClient(server.socket_path).roots()
            break
        except CaError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_concurrent_clients(client: CaClient) -> None:
    results: list[bytes] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(client.sign(make_csr(new_key(), SID), SID, 60))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and len(results) == 16


def test_start_removes_a_stale_socket(ca: BuiltinCA, short_dir: str, peers: Peers) -> None:
    path = os.path.join(short_dir, "ca.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    server = CaServer(ca, path, peers, lambda n, s: None, MAX_TTL)
    server.start()
    try:
        assert CaClient(path).roots() == ca.roots()
    finally:
        server.stop()
    assert not os.path.exists(path)


def test_start_refuses_to_steal_a_live_socket_or_remove_a_file(server: CaServer, ca: BuiltinCA,
                                                              short_dir: str, peers: Peers) -> None:
    with pytest.raises(CaError, match="another CA server is listening there"):
        CaServer(ca, server.socket_path, peers, lambda n, s: None, MAX_TTL).start()
    path = os.path.join(short_dir, "not-a-socket")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(CaError, match="exists and is not a socket"):
        CaServer(ca, path, peers, lambda n, s: None, MAX_TTL).start()
    assert os.path.exists(path)


def test_stop_closes_open_connections(start: Callable[..., CaServer]) -> None:
    server = start()
    with raw(server.socket_path) as s:
        assert "roots" in exchange(s, b'{"op": "roots"}\n')
        server.stop()
        assert s.recv(1) == b""
    assert not os.path.exists(server.socket_path)
    server.stop()  # twice is fine


# ---- the client's errors ---------------------------------------------------------------------

def test_client_without_a_socket_says_the_ca_is_unavailable(short_dir: str) -> None:
    path = os.path.join(short_dir, "missing.sock")
    with pytest.raises(CaUnavailable) as e:
        CaClient(path).roots()
    assert str(e.value) == (f"certificate authority unavailable: {path} does not exist "
                            "(is the cluster daemon running?)")
    assert e.value.exit_code == 1


def test_client_of_a_dead_socket_says_the_ca_is_unavailable(short_dir: str) -> None:
    path = os.path.join(short_dir, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    with pytest.raises(CaUnavailable, match="refused the connection"):
        CaClient(path).status()


def test_client_times_out_on_a_server_that_never_answers(short_dir: str) -> None:
    path = os.path.join(short_dir, "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(1)  # connections queue up, nobody reads them
    try:
        began = time.monotonic()
        with pytest.raises(CaUnavailable, match=r"no answer from .* within 0.3 s"):
            CaClient(path, timeout=0.3).sign(make_csr(new_key(), SID), SID, 60)
        assert time.monotonic() - began < 3
    finally:
        mute.close()


def test_client_reports_a_server_that_hangs_up(short_dir: str) -> None:
    path = os.path.join(short_dir, "rude.sock")
    rude = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rude.bind(path)
    rude.listen(1)

    def hang_up() -> None:
        conn, _ = rude.accept()
        conn.recv(65536)  # read the request first, so the close is an orderly one, not a reset
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        with pytest.raises(CaUnavailable, match="closed without a reply"):
            CaClient(path).roots()
    finally:
        t.join(5)
        rude.close()


# ---- helpers ---------------------------------------------------------------------------------

def test_netns_inode_of() -> None:
    assert netns_inode_of(os.getpid()) == os.stat("/proc/self/ns/net").st_ino
    assert netns_inode_of(2**22 + 12345) is None  # beyond pid_max: never a process
