"""Packet captures on a cluster's underlay for the tests: tcpdump in the underlay namespace,
and a small pcap reader (Ethernet, IPv4, TCP) to look at what crossed the wire."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    sport: int
    dport: int
    flags: int  # TCP flag bits
    payload: bytes

    @property
    def syn_only(self) -> bool:
        return self.flags & 0x12 == 0x02


def _ip(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def read_pcap(path: str) -> list[Packet]:
    """The TCP/IPv4 packets of a pcap file (Ethernet link type)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    out = []
    off = 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        frame = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6 or len(ip) < ihl + 20:
            continue
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:total]
        sport, dport = struct.unpack(">HH", tcp[:4])
        doff = (tcp[12] >> 4) * 4
        out.append(Packet(_ip(ip[12:16]), _ip(ip[16:20]), sport, dport, tcp[13], tcp[doff:]))
    return out


@contextlib.contextmanager
def capture(netns: str, interface: str = "br0") -> Iterator[list[Packet]]:
    """Capture TCP on the underlay while the block runs; the list is filled when it ends."""
    packets: list[Packet] = []
    fd, path = tempfile.mkstemp(suffix=".pcap", prefix="nm-capture-")
    os.close(fd)
    p = subprocess.Popen(["ip", "netns", "exec", netns, "tcpdump", "-i", interface, "-U",
                          "--immediate-mode", "-s0", "-n", "-w", path, "tcp"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        # tcpdump says "listening on ..." once it captures.
        deadline = time.monotonic() + 10
        assert p.stderr is not None
        line = ""
        while time.monotonic() < deadline and "listening" not in line:
            line = p.stderr.readline()
            if not line and p.poll() is not None:
                raise AssertionError(f"tcpdump exited {p.returncode}")
        time.sleep(0.5)  # it says "listening" a moment before packets reach it
        yield packets
        time.sleep(1.0)  # the last packets reach the file
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
        packets.extend(read_pcap(path))
        os.unlink(path)
