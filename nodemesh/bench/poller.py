"""The change-latency probe of `nodemesh bench`, run inside a client pod (standard library only).

``python -m nodemesh.bench.poller tcp HOST PORT INTERVAL_MS`` opens a new TCP connection every
INTERVAL_MS milliseconds; the outcome is ``ok`` when it is established within 100 ms, else
``fail`` (a dropped SYN never completes). ``python -m nodemesh.bench.poller http HOST PORT
INTERVAL_MS PATH`` sends one request per new connection to the echo server and reports the
value of the ``X-Bench-Gen`` request header the echo server saw (``none`` without one), so a
route change that sets that header is seen on the first request it applies to.

Output, on stdout: ``READY``, then ``<send time ns> <outcome>`` each time the outcome differs
from the previous probe's, in the order the probes were *sent* (an answer that arrives late
does not reorder them). Times are CLOCK_MONOTONIC, the same clock the harness reads when it
starts an apply. The probe runs until its stdin is closed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import socket
import struct
import sys
import time

_LINGER0 = struct.pack("ii", 1, 0)
TCP_TIMEOUT_NS = 100_000_000
HTTP_TIMEOUT_NS = 1_000_000_000


class Probe:
    __slots__ = ("buf", "deadline", "outcome", "sent", "sock", "writing")

    def __init__(self, sock: socket.socket, sent: int, timeout_ns: int) -> None:
        self.sock = sock
        self.sent = sent
        self.deadline = sent + timeout_ns
        self.outcome: str | None = None
        self.buf = b""
        self.writing = True


def http_outcome(data: bytes) -> str:
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head[9:12])
    except ValueError:
        return "bad-response"
    if status != 200:
        return f"status-{status}"
    try:
        headers = json.loads(body)["headers"]
    except (ValueError, KeyError, TypeError):
        return "bad-body"
    vals = headers.get("X-Bench-Gen") or ["none"]
    return str(vals[0])


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] not in ("tcp", "http"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, host, port, interval = argv[0], argv[1], int(argv[2]), float(argv[3]) / 1000
    path = argv[4] if len(argv) > 4 else "/"
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    timeout_ns = TCP_TIMEOUT_NS if mode == "tcp" else HTTP_TIMEOUT_NS
    ep = select.epoll()
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    ep.register(stdin, select.EPOLLIN)
    probes: collections.deque[Probe] = collections.deque()
    by_fd: dict[int, Probe] = {}
    last: str | None = None
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    next_send = time.monotonic_ns()

    def finish(p: Probe, outcome: str) -> None:
        p.outcome = outcome
        fd = p.sock.fileno()
        by_fd.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            ep.unregister(fd)
        p.sock.close()

    while True:
        now = time.monotonic_ns()
        if now >= next_send:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            p = Probe(s, now, timeout_ns)
            probes.append(p)
            rc = s.connect_ex((host, port))
            if rc not in (0, 115):  # EINPROGRESS
                finish(p, "fail" if mode == "tcp" else "connect-error")
            else:
                by_fd[s.fileno()] = p
                ep.register(s.fileno(), select.EPOLLOUT)
            next_send += int(interval * 1e9)
            if next_send < now:  # fell behind (stalled): do not burst
                next_send = now + int(interval * 1e9)
        wait = max(0.0, (next_send - time.monotonic_ns()) / 1e9)
        for fd, ev in ep.poll(min(wait, 0.001)):
            if fd == stdin:
                if not os.read(stdin, 4096):
                    return 0
                continue
            p = by_fd.get(fd)
            if p is None:
                continue
            if p.writing:
                err = p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err or ev & (select.EPOLLERR | select.EPOLLHUP):
                    finish(p, "fail" if mode == "tcp" else "connect-error")
                elif mode == "tcp":
                    finish(p, "ok")
                else:
                    p.writing = False
                    try:
                        p.sock.send(request)
                        ep.modify(fd, select.EPOLLIN)
                    except OSError:
                        finish(p, "write-error")
                continue
            try:
                chunk = p.sock.recv(65536)
            except OSError:
                finish(p, "read-error")
                continue
            if chunk:
                p.buf += chunk
            else:
                finish(p, http_outcome(p.buf))
        now = time.monotonic_ns()
        for p in list(by_fd.values()):
            if now > p.deadline:
                finish(p, "fail" if mode == "tcp" else "timeout")
        while probes and probes[0].outcome is not None:
            p = probes.popleft()
            if p.outcome != last:
                last = p.outcome
                out.write(f"{p.sent} {p.outcome}\n")
                out.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
