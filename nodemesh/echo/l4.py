"""TCP and UDP echo for the ``--tcp`` and ``--udp`` listeners.

TCP: every byte received is written back unchanged, until the client closes its side (then the
server closes too). Reading pauses while the client is not reading what is echoed back.

UDP: every datagram is sent back unchanged to its sender, with nothing prepended, except that a
datagram whose text is exactly ``hostname`` (optionally followed by ``\\n`` or ``\\r\\n``) is
answered with the pod name (followed by ``\\n`` when the query had one). Load-balancing tests send
``hostname`` to a service VIP and count which pods answer.
"""

from __future__ import annotations

import asyncio
from typing import cast

__all__ = ["TCPEcho", "TCPEchoProtocol", "UDPEchoProtocol"]


class TCPEcho:
    """Per-process state of the TCP echo: the open connections, to close at shutdown."""

    def __init__(self) -> None:
        self.connections: set[TCPEchoProtocol] = set()

    def protocol_factory(self) -> TCPEchoProtocol:
        return TCPEchoProtocol(self)

    def close_all(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()


class TCPEchoProtocol(asyncio.Protocol):
    """Writes back what it reads, with back-pressure."""

    def __init__(self, owner: TCPEcho) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool | None:
        return False  # close once the echoed bytes are flushed

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()


class UDPEchoProtocol(asyncio.DatagramProtocol):
    """Sends each datagram back; ``hostname`` is answered with the pod name."""

    def __init__(self, pod: str) -> None:
        self.pod = pod.encode()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector datagram transport is not a DatagramTransport subclass.)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if len(data) <= 10 and data.rstrip(b"\r\n") == b"hostname":
            reply = self.pod + (b"\n" if data.endswith(b"\n") else b"")
        else:
            reply = data
        self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (peer gone): nothing to do, keep serving.
        pass
