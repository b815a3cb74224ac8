"""The CA service the cluster daemon runs: JSON lines over a root-only unix socket.

One JSON object per line each way, as many requests per connection as the client likes:

- ``{"op": "sign", "csr": "<PEM>", "spiffeId": "spiffe://...", "ttlSeconds": 86400}``
  → ``{"chain": "<PEM>"}``
- ``{"op": "roots"}`` → ``{"roots": ["<PEM>", ...]}``
- ``{"op": "status"}`` → the CA's status
- anything wrong → ``{"error": "..."}``: never a traceback, never a hang.

Signing is for node agents only. The server learns the caller's pid from the kernel
(SO_PEERCRED), asks `node_of_peer` which node that process belongs to (in the local cluster: by
its network namespace, see `netns_inode_of`), then asks `authorizer` whether that node may have
the identity (see `nodemesh.certs.authorize`). Roots and status are public facts and need no
node. Each connection has a thread of its own and an idle timeout, so a silent client blocks
nobody.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any

from cryptography import x509

from nodemesh.certs.authority import CaError, CertificateAuthority
from nodemesh.certs.pem import iso

log = logging.getLogger("nodemesh.ca")

MAX_REQUEST_BYTES = 64 * 1024
NOT_A_NODE = "caller is not a node agent of this cluster"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def netns_inode_of(pid: int) -> int | None:
    """The inode of `pid`'s network namespace (what tells nodes apart), None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except (OSError, ValueError):
        return None


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process at the other end of a unix socket, as the kernel saw it at connect."""
    pid, _, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid


class _Refused(Exception):
    """A request that gets an error reply (bad input or a refusal); not a fault of the server."""


def _field(req: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = req.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise _Refused(f"sign: {name}: required, {what}")
    return value


class CaServer:
    """Serves one CertificateAuthority on a unix socket, from threads of its own."""

    def __init__(self, ca: CertificateAuthority, socket_path: str, node_of_peer: Callable[[int], str | None],
                 authorizer: Callable[[str, str], str | None], max_ttl_seconds: float, *,
                 idle_timeout_seconds: float = 30.0, max_connections: int = 64) -> None:
        self.ca = ca
        self.socket_path = socket_path
        self.node_of_peer = node_of_peer
        self.authorizer = authorizer
        self.max_ttl_seconds = max_ttl_seconds
        self.idle_timeout_seconds = idle_timeout_seconds
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._wakeup: tuple[int, int] | None = None  # a pipe: stop() writes to it to end accept_loop
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # root-only: the socket is created 0600
        try:
            listener.bind(self.socket_path)
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        listener.listen(64)
        listener.setblocking(False)  # accepted only when poll() says so, next to the wakeup pipe
        self._listener = listener
        self._wakeup = os.pipe()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="nodemesh-ca", daemon=True)
        self._thread.start()
        log.info("CA server for %s listening on %s", self.ca.trust_domain, self.socket_path)

    def stop(self) -> None:
        self._stopping.set()
        if self._wakeup is not None:
            os.write(self._wakeup[1], b"x")
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise CaError(f"{self.socket_path}: exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.socket_path)
        except OSError:
            os.unlink(self.socket_path)  # nobody answers: left by a server that died
            return
        finally:
            probe.close()
        raise CaError(f"{self.socket_path}: another CA server is listening there")

    # ---- connections ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wakeup is not None
        # poll, not select: the daemon may hold more than FD_SETSIZE descriptors.
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wakeup[0], select.POLLIN)
        while not self._stopping.is_set():
            events = poller.poll()
            if not any(fd == self._listener.fileno() for fd, _ in events):
                continue
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                continue  # the client gave up between poll() and accept()
            except OSError as e:
                if self._stopping.is_set():
                    break
                log.warning("CA server: accept: %s", e)
                continue
            if not self._slots.acquire(blocking=False):
                with conn, contextlib.suppress(OSError):
                    self._reply(conn, {"error": "too many connections to the certificate authority; retry"})
                continue
            self._spawn(conn)

    def _spawn(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)
        worker = threading.Thread(target=self._serve, args=(conn,), name="nodemesh-ca-conn", daemon=True)
        try:
            worker.start()
        except RuntimeError as e:  # no thread to be had: drop this client, keep serving the others
            log.warning("CA server: cannot serve a connection: %s", e)
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.idle_timeout_seconds)
            pid = peer_pid(conn)
            buf = b""
            while not self._stopping.is_set():
                newline = buf.find(b"\n")
                if newline < 0:
                    if len(buf) > MAX_REQUEST_BYTES:
                        self._reply(conn, self._too_large())
                        return  # the rest of this line cannot be told from the next request
                    chunk = conn.recv(65536)
                    if not chunk:
                        if buf.strip():
                            self._reply(conn, self.handle(buf, pid))
                        return
                    buf += chunk
                    continue
                line, buf = buf[:newline], buf[newline + 1:]
                if len(line) > MAX_REQUEST_BYTES:
                    self._reply(conn, self._too_large())
                    return
                if line.strip():
                    self._reply(conn, self.handle(line, pid))
        except TimeoutError:
            pass  # idle: the client may reconnect when it has something to ask
        except OSError:
            pass  # the client went away
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    @staticmethod
    def _too_large() -> dict[str, Any]:
        return {"error": f"request too large: more than {MAX_REQUEST_BYTES} bytes in one line"}

    @staticmethod
    def _reply(conn: socket.socket, response: dict[str, Any]) -> None:
        try:
            data = json.dumps(response).encode()
        except (TypeError, ValueError):
            log.exception("CA server: a response is not JSON-able")
            data = json.dumps({"error": "internal error in the certificate authority: bad response"}).encode()
        conn.sendall(data + b"\n")

    # ---- requests ---------------------------------------------------------------------------
    def handle(self, line: bytes, pid: int) -> dict[str, Any]:
        """The response to one request line from process `pid`; never raises."""
        try:
            try:
                req = json.loads(line)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
                raise _Refused("request is not valid JSON") from None
            if not isinstance(req, dict):
                raise _Refused("request must be a JSON object")
            op = req.get("op")
            if op == "roots":
                return {"roots": [p.decode() for p in self.ca.roots()]}
            if op == "status":
                return self.ca.status()
            if op == "sign":
                return self._sign(req, pid)
            raise _Refused(f"unknown op {op!r}; want sign, roots or status")
        except (_Refused, CaError) as e:
            return {"error": str(e)}
        except Exception as e:
            log.exception("CA server: request from pid %d failed", pid)
            return {"error": f"internal error in the certificate authority: {type(e).__name__}"}

    def _sign(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        node = self.node_of_peer(pid) if pid > 0 else None  # pid 0: the peer is outside our pid namespace
        if node is None:
            raise _Refused(NOT_A_NODE)
        csr = _field(req, "csr", str, "a PEM certificate signing request")
        spiffe_id = _field(req, "spiffeId", str, "the SPIFFE ID to sign for")
        ttl = _field(req, "ttlSeconds", (int, float), "a number of seconds")
        if reason := self.authorizer(node, spiffe_id):
            log.warning("CA: refused %s to node %s: %s", spiffe_id, node, reason)
            raise _Refused(reason)
        chain = self.ca.sign(csr.encode(), spiffe_id, min(ttl, self.max_ttl_seconds))
        leaf = x509.load_pem_x509_certificate(chain)
        log.info("CA: signed %s for node %s: serial %x, expires %s", spiffe_id, node, leaf.serial_number,
                 iso(leaf.not_valid_after_utc))
        return {"chain": chain.decode()}
