"""The CA service's client, for node agents (and `nodemesh status`): JSON lines over a unix socket.

One connection per call: calls are rare (a renewal per identity per half-TTL) and a fresh
connection never finds a server that dropped an idle one.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from nodemesh.certs.authority import CaError
from nodemesh.errors import NodemeshError

MAX_REPLY_BYTES = 4 * 1024 * 1024


class CaUnavailable(NodemeshError):
    """The certificate authority could not be asked (no socket, refused, no answer in time)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"certificate authority unavailable: {why}", 1)


class CaClient:
    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def sign(self, csr_pem: bytes, spiffe_id: str, ttl_seconds: float) -> bytes:
        """The PEM chain for the CSR; CaError with the CA's reason when it refuses."""
        reply = self._call({"op": "sign", "csr": csr_pem.decode(), "spiffeId": spiffe_id,
                            "ttlSeconds": ttl_seconds})
        chain = reply.get("chain")
        if not isinstance(chain, str):
            raise CaUnavailable(f"{self.socket_path}: the reply to sign has no chain")
        return chain.encode()

    def roots(self) -> list[bytes]:
        reply = self._call({"op": "roots"})
        roots = reply.get("roots")
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise CaUnavailable(f"{self.socket_path}: the reply to roots has no list of roots")
        return [r.encode() for r in roots]

    def status(self) -> dict[str, Any]:
        return self._call({"op": "status"})

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        path = self.socket_path
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(path)
                s.sendall(json.dumps(request).encode() + b"\n")
                line = _read_line(s)
        except FileNotFoundError:
            raise CaUnavailable(f"{path} does not exist (is the cluster daemon running?)") from None
        except ConnectionRefusedError:
            raise CaUnavailable(f"{path} refused the connection (is the cluster daemon running?)") from None
        except TimeoutError:
            raise CaUnavailable(f"no answer from {path} within {self.timeout:g} s") from None
        except OSError as e:
            raise CaUnavailable(f"{path}: {e.strerror or e}") from None
        try:
            reply = json.loads(line)
        except ValueError:
            raise CaUnavailable(f"{path}: the reply is not JSON") from None
        if not isinstance(reply, dict):
            raise CaUnavailable(f"{path}: the reply is not a JSON object")
        if "error" in reply:
            raise CaError(str(reply["error"]))
        return reply


def _read_line(s: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            if not buf:
                raise OSError("the connection closed without a reply")
            break
        buf += chunk
        if len(buf) > MAX_REPLY_BYTES:
            raise OSError(f"the reply is larger than {MAX_REPLY_BYTES} bytes")
    return buf.split(b"\n", 1)[0]
