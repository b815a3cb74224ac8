"""The load generators of `nodemesh bench`, run inside a client pod (standard library only).

``python -m nodemesh.bench.loadgen SPEC_JSON`` runs the phases of SPEC in order and prints one
JSON document with a result per phase:

- ``wrk``: closed loop at maximum rate (wrk 4.1, one process, one thread per target with a Lua
  script that gives each thread its own address and prints exact percentiles as JSON);
- ``open``: open loop at a fixed rate, this module's own generator. Requests are scheduled at
  fixed intervals from the start of the phase and latency is measured from the *scheduled* send
  time, so a stalled server or a busy connection pool shows up as latency instead of silently
  lowering the offered rate (no coordinated omission). Two variants: a pool of keep-alive
  connections (a request goes out on an idle connection; when none is idle it waits in a queue,
  still on the clock), or one new connection per request (connect, request with
  ``Connection: close``, response, close with ``SO_LINGER {1, 0}`` so no TIME_WAIT builds up).

The generator busy-polls one epoll set with non-blocking sockets on its own CPU (the harness
pins it): epoll timeouts have millisecond granularity, and waking an idle vCPU on this kind of VM
costs tens of microseconds, either of which would add the generator's own delay to every sample.
Every phase also reports the *send lag* (actual minus scheduled send time), the generator's own
contribution, and the CPU time that the given mesh processes and each CPU spent during it.

Latencies are kept as a log-bucketed histogram (2 % buckets) so that runs can be pooled.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import json
import math
import os
import select
import socket
import struct
import subprocess
import sys
import time
from typing import Any

BUCKET_BASE = 1.02  # histogram bucket growth: 2 % relative precision
_LOG_BASE = math.log(BUCKET_BASE)
_LINGER0 = struct.pack("ii", 1, 0)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- waiting with a nanosecond timeout ------------------------------------------------------
class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _EpollEvent(ctypes.Structure):
    _pack_ = 1  # packed on x86-64
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


class Waiter:
    """epoll_pwait2 (kernel >= 5.11): block on an epoll set with a nanosecond timeout, which
    select.epoll cannot (its timeout is rounded up to whole milliseconds)."""

    def __init__(self, ep: select.epoll, maxevents: int = 256) -> None:
        self.fd = ep.fileno()
        self.n = maxevents
        self.events = (_EpollEvent * maxevents)()
        self.ts = _Timespec()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK: 1 ns instead of 50 us
        self.fn = getattr(libc, "epoll_pwait2", None)
        if self.fn is not None:
            self.fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_void_p]
            self.fn.restype = ctypes.c_int
        self.ep = ep

    def wait(self, timeout_ns: int) -> list[tuple[int, int]]:
        if self.fn is None:  # old libc: millisecond precision
            return self.ep.poll(max(timeout_ns, 0) / 1e9)
        self.ts.tv_sec, self.ts.tv_nsec = divmod(max(timeout_ns, 0), 1_000_000_000)
        n = self.fn(self.fd, self.events, self.n, ctypes.byref(self.ts), None)
        if n <= 0:
            return []
        ev = self.events
        return [(ev[k].data & 0xFFFFFFFF, ev[k].events) for k in range(n)]


# ---- histograms -----------------------------------------------------------------------------
def bucket_of(ns: int) -> int:
    return int(math.log(max(ns, 1)) / _LOG_BASE)


def bucket_value(b: int) -> float:
    """The middle of bucket `b`, in nanoseconds."""
    return BUCKET_BASE ** (b + 0.5)


def percentiles(sorted_ns: list[int], ps: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """Exact percentiles (nearest rank) of sorted samples, in microseconds."""
    out: dict[str, float] = {}
    n = len(sorted_ns)
    for p in ps:
        key = "p" + (f"{p:g}".replace(".", ""))
        out[key] = round(sorted_ns[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))] / 1000, 2) if n else 0.0
    if n:
        out["mean"] = round(sum(sorted_ns) / n / 1000, 2)
        out["max"] = round(sorted_ns[-1] / 1000, 2)
    return out


def histogram(samples_ns: list[int]) -> dict[str, int]:
    c = collections.Counter(bucket_of(x) for x in samples_ns)
    return {str(k): v for k, v in sorted(c.items())}


# ---- CPU accounting -----------------------------------------------------------------------
def proc_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads, dead ones included), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            total += int(rest[11]) + int(rest[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / _CLK_TCK


def cpu_busy_seconds() -> dict[str, float]:
    """Busy (non-idle, non-iowait) time of each CPU from /proc/stat, in seconds."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            v = [int(x) for x in vals]
            out[name] = (sum(v[:8]) - v[3] - v[4]) / _CLK_TCK
    return out


class CpuWindow:
    """CPU time of the mesh processes (in total and per process) and of each CPU over a phase."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.per0 = {p: proc_cpu_seconds([p]) for p in pids}
        self.cpu0 = cpu_busy_seconds()

    def result(self) -> dict[str, Any]:
        per = {p: proc_cpu_seconds([p]) - self.per0[p] for p in self.pids}
        cpus = cpu_busy_seconds()
        return {"wall_s": round(time.monotonic() - self.t0, 4),
                "mesh_cpu_s": round(sum(per.values()), 3),
                "mesh_cpu_by_pid": {str(p): round(v, 3) for p, v in per.items()},
                "cpu_busy_s": {k: round(cpus[k] - self.cpu0.get(k, 0.0), 3) for k in cpus}}


# ---- wrk --------------------------------------------------------------------------------------
WRK_LUA = r"""
-- nodemesh bench: one target address per thread (NMB_TARGETS="ip:port,ip:port"), JSON summary.
local targets = {}
for t in string.gmatch(os.getenv("NMB_TARGETS") or "", "[^,]+") do
  local host, port = string.match(t, "([^:]+):(%d+)")
  table.insert(targets, {host, port})
end
local n = 0
function setup(thread)
  n = n + 1
  local t = targets[((n - 1) % #targets) + 1]
  thread.addr = wrk.lookup(t[1], t[2])[1]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "latency_us": {"mean": %.2f, "p50": %d, ' ..
    '"p90": %d, "p99": %d, "p999": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


def run_wrk(ph: dict[str, Any]) -> dict[str, Any]:
    targets = ph["targets"]
    lua = ph["lua"]
    if not os.path.exists(lua):
        with open(lua, "w") as f:
            f.write(WRK_LUA)
    threads = int(ph.get("threads", len(targets)))
    url = f"http://{targets[0]}{ph['path']}"
    seconds = max(1, round(float(ph["seconds"])))  # wrk takes whole seconds
    argv = ["wrk", "-t", str(threads), "-c", str(ph["connections"]), "-d", f"{seconds}s",
            "--timeout", "2s", "-s", lua]
    if ph.get("host"):
        argv += ["-H", f"Host: {ph['host']}"]
    if ph.get("close"):
        argv += ["-H", "Connection: close"]
    argv.append(url)
    env = {**os.environ, "NMB_TARGETS": ",".join(targets)}
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=ph["seconds"] + 30)
    line = next((x for x in p.stdout.splitlines() if x.startswith("{")), None)
    if p.returncode != 0 or line is None:
        return {"error": f"wrk exited {p.returncode}: {p.stderr.strip()[-300:]}"}
    r = json.loads(line)
    seconds = r["duration_us"] / 1e6
    errs = r["errors"]
    return {"requests": r["requests"], "errors": sum(errs.values()), "error_kinds": errs,
            "achieved_rps": round(r["requests"] / seconds, 1) if seconds else 0.0,
            "seconds": round(seconds, 3), "latency_us": r["latency_us"], "bytes": r["bytes"]}


# ---- the open-loop generator ----------------------------------------------------------------
class _Conn:
    __slots__ = ("buf", "fd", "sched", "sock", "target", "want_write")

    def __init__(self, sock: socket.socket, target: tuple[str, int]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.target = target
        self.buf = b""
        self.sched = 0  # scheduled send time (ns) of the request in flight, 0 = idle
        self.want_write = False


def _response_done(buf: bytes, closed: bool) -> tuple[bool, int]:
    """(complete, status) of one HTTP/1.1 response in `buf`; status 0 = malformed."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return (closed, 0) if closed else (False, 0)
    head = buf[:end].lower()
    try:
        status = int(head[9:12])
    except ValueError:
        return True, 0
    i = head.find(b"\ncontent-length:")
    if i >= 0:
        j = head.find(b"\n", i + 1)
        length = int(head[i + 16: j if j >= 0 else len(head)])
        return len(buf) - end - 4 >= length, status
    if b"transfer-encoding: chunked" in head:
        return buf.endswith(b"0\r\n\r\n"), status
    return closed, status


def _parse_target(t: str) -> tuple[str, int]:
    host, port = t.rsplit(":", 1)
    return host, int(port)


class OpenLoop:
    """One fixed-rate phase: keep-alive pool or new connection per request."""

    def __init__(self, ph: dict[str, Any]) -> None:
        self.targets = [_parse_target(t) for t in ph["targets"]]
        self.rate = float(ph["rate"])
        self.seconds = float(ph["seconds"])
        self.warmup = float(ph.get("warmup", 0.25))
        self.close = bool(ph.get("close"))
        self.pool = int(ph.get("pool", 32))
        self.timeout_ns = int(float(ph.get("timeout", 2.0)) * 1e9)
        # Busy-poll for spin_us after each send or event and from presend_us before each
        # scheduled send; block in between (0 and 0: always block; a large spin: always spin).
        self.spin_ns = int(float(ph.get("spin_us", 200)) * 1000)
        self.presend_ns = int(float(ph.get("presend_us", 30)) * 1000)
        host = ph.get("host") or ph["targets"][0]
        conn_hdr = "Connection: close\r\n" if self.close else ""
        self.request = f"GET {ph['path']} HTTP/1.1\r\nHost: {host}\r\n{conn_hdr}\r\n".encode()
        self.ep = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.idle: collections.deque[_Conn] = collections.deque()
        self.backlog: collections.deque[int] = collections.deque()
        self.lat: list[int] = []
        self.lag: list[int] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.record_from = 0
        self.rr = 0
        self.completed = 0  # responses, warm-up included (CPU per request uses this)
        self.inflight = 0  # scheduled and not finished (on a connection or in the backlog)
        self.max_inflight = 0

    # -- sockets --
    def _new_socket(self) -> tuple[socket.socket, tuple[str, int]]:
        target = self.targets[self.rr % len(self.targets)]
        self.rr += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        rc = s.connect_ex(target)
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(rc, os.strerror(rc))
        return s, target

    def _drop(self, c: _Conn) -> None:
        self.conns.pop(c.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(c.fd)
        c.sock.close()

    def _open_pool_conn(self) -> _Conn | None:
        try:
            s, target = self._new_socket()
        except OSError:
            self.errors["connect"] += 1
            return None
        c = _Conn(s, target)
        c.want_write = True  # connecting: idle once writable
        self.conns[c.fd] = c
        self.ep.register(c.fd, select.EPOLLOUT)
        return c

    # -- sending --
    def _send(self, c: _Conn, sched: int) -> None:
        now = time.perf_counter_ns()
        if sched >= self.record_from and not self.close:
            self.lag.append(now - sched)
        c.sched = sched
        c.buf = b""
        try:
            c.sock.send(self.request)
        except OSError:
            self._fail(c, "write")

    def _dispatch(self, sched: int) -> None:
        self.inflight += 1
        if self.inflight > self.max_inflight:
            self.max_inflight = self.inflight
        if self.close:
            if len(self.conns) >= 4096:
                self.inflight -= 1
                if sched >= self.record_from:
                    self.errors["overload"] += 1
                return
            if sched >= self.record_from:  # new connection: the lag is until connect() starts
                self.lag.append(time.perf_counter_ns() - sched)
            try:
                s, target = self._new_socket()
            except OSError:
                self.inflight -= 1
                if sched >= self.record_from:
                    self.errors["connect"] += 1
                return
            c = _Conn(s, target)
            c.sched = sched
            c.want_write = True
            self.conns[c.fd] = c
            self.ep.register(c.fd, select.EPOLLOUT)
            return
        if self.idle:
            self._send(self.idle.popleft(), sched)
        else:
            self.backlog.append(sched)

    def _fail(self, c: _Conn, kind: str) -> None:
        if c.sched:
            self.inflight -= 1
            if c.sched >= self.record_from:
                self.errors[kind] += 1
        self._drop(c)
        if not self.close:
            self._open_pool_conn()  # keep the pool at its size

    def _complete(self, c: _Conn, now: int, status: int, reusable: bool = True) -> None:
        self.inflight -= 1
        self.completed += 1
        if c.sched >= self.record_from:
            if 200 <= status < 400:
                self.lat.append(now - c.sched)
            else:
                self.errors[f"status_{status}"] += 1
        c.sched = 0
        if self.close:
            self._drop(c)
        elif not reusable:  # the server closed it after the response
            self._drop(c)
            self._open_pool_conn()
        elif self.backlog:
            self._send(c, self.backlog.popleft())
        else:
            self.idle.append(c)

    # -- events --
    def _on_event(self, fd: int, ev: int, now: int) -> None:
        c = self.conns.get(fd)
        if c is None:
            return
        if c.want_write:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or ev & (select.EPOLLERR | select.EPOLLHUP):
                self._fail(c, "connect")
                return
            c.want_write = False
            self.ep.modify(fd, select.EPOLLIN)
            if self.close:
                self._send(c, c.sched)
            elif self.backlog:
                self._send(c, self.backlog.popleft())
            else:
                self.idle.append(c)
            return
        try:
            data = c.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            self._fail(c, "read")
            return
        if not c.sched:  # an idle keep-alive connection closed by the peer
            if not data:
                self.idle = collections.deque(x for x in self.idle if x is not c)
                self._drop(c)
                self._open_pool_conn()
            return
        closed = not data
        c.buf += data
        done, status = _response_done(c.buf, closed)
        if done:
            self._complete(c, now, status, reusable=not closed)
        elif closed:
            self._fail(c, "read")

    def run(self) -> dict[str, Any]:
        if not self.close:
            for _ in range(self.pool):
                self._open_pool_conn()
            deadline = time.perf_counter_ns() + 2_000_000_000
            while len(self.idle) < len(self.conns) and time.perf_counter_ns() < deadline:
                for fd, ev in self.ep.poll(0.01):
                    self._on_event(fd, ev, time.perf_counter_ns())
            if not self.idle:
                return {"error": f"no connection to {self.targets} could be opened"}
        interval = 1e9 / self.rate
        total = int(self.rate * (self.warmup + self.seconds))
        start = time.perf_counter_ns() + 1_000_000
        self.record_from = start + int(self.warmup * 1e9)
        end = start + int(total * interval)
        i = 0
        poll = self.ep.poll
        perf = time.perf_counter_ns
        waiter = Waiter(self.ep)
        spin_ns, presend_ns = self.spin_ns, self.presend_ns
        active = 0  # time of the last send or event: spin for spin_ns after it
        while True:
            now = perf()
            while i < total and start + int(i * interval) <= now:
                self._dispatch(start + int(i * interval))
                i += 1
                active = now
            events = poll(0)
            if not events and now - active > spin_ns:
                nxt = start + int(i * interval) if i < total else end + self.timeout_ns
                if nxt - now > presend_ns:
                    events = waiter.wait(nxt - now - presend_ns)
            for fd, ev in events:
                active = perf()
                self._on_event(fd, ev, active)
            if i >= total and (self.inflight <= 0 or now > end + self.timeout_ns):
                break
        timed_out = sum(1 for c in self.conns.values() if c.sched and c.sched >= self.record_from)
        timed_out += sum(1 for s in self.backlog if s >= self.record_from)
        if timed_out:
            self.errors["timeout"] += timed_out
        for c in list(self.conns.values()):
            self._drop(c)
        self.ep.close()
        self.lat.sort()
        self.lag.sort()
        ok = len(self.lat)
        errors = sum(self.errors.values())
        return {
            "requests": ok, "requests_total": self.completed, "errors": errors,
            "error_kinds": dict(self.errors),
            "offered_rps": self.rate, "achieved_rps": round(ok / self.seconds, 1),
            "seconds": self.seconds, "latency_us": percentiles(self.lat),
            "histogram": histogram(self.lat), "send_lag_us": percentiles(self.lag, (50, 99, 99.9)),
            "max_inflight": self.max_inflight,
        }


def admin_counters(url: str) -> dict[str, int]:
    """Integer stats from an Envoy admin `/stats` URL (text format: `name: value` lines)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=3) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(": ")
        if name and value.isdigit():
            out[name] = int(value)
    return out


def stats_delta(url: str, before: dict[str, int] | str) -> dict[str, Any]:
    """How the counters at `url` moved since `before` (or why they could not be read)."""
    try:
        after = admin_counters(url)
    except OSError as e:
        return {"error": f"{url}: {e}"}
    if isinstance(before, str):
        return {"error": before}
    return {k: v - before.get(k, 0) for k, v in sorted(after.items())}


def run_phases(spec: dict[str, Any]) -> list[dict[str, Any]]:
    pids = [int(p) for p in spec.get("cpu_pids", [])]
    out = []
    for ph in spec["phases"]:
        win = CpuWindow(pids)
        if ph["kind"] == "wrk":
            r = run_wrk(ph)
        elif ph["kind"] == "open":
            try:
                r = OpenLoop(ph).run()
            except OSError as e:
                r = {"error": f"{type(e).__name__}: {e}"}
        else:
            r = {"error": f"unknown phase kind {ph['kind']!r}"}
        r.update(win.result())
        r["phase"] = {k: v for k, v in ph.items() if k not in ("lua",)}
        out.append(r)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m nodemesh.bench.loadgen SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    # A sidecar's own counters (its admin port is on the pod's loopback, so only a process in
    # the pod reaches it): read around the phases, they show what the proxy did for them.
    url = spec.get("stats_url")
    before: dict[str, int] | str = {}
    if url:
        try:
            before = admin_counters(url)
        except OSError as e:
            before = f"{url}: {e}"
    out: dict[str, Any] = {"phases": run_phases(spec)}
    if url:
        out["stats_delta"] = stats_delta(url, before)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
