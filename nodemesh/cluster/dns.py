"""The node-local DNS server: cluster names → ClusterIPs and pod IPs, as Kubernetes' DNS does.

`build_records` (pure) turns services and pods into a name table; `answer` (pure) answers one DNS
query from it; `DnsServer` serves UDP and TCP on the node-local address. Names outside
`cluster.local` get NXDOMAIN: the cluster has no way out, so there is nothing to forward to.

`ClusterDns` is where it runs: in the cluster daemon, one server per node on the node-local
address, as CoreDNS is a cluster service and not a part of the node agent. An agent that is
killed, crash-looping or being upgraded costs no lookup.

Records: ``<svc>.<ns>.svc.cluster.local`` A → the ClusterIP (a headless service: its ready pods'
IPs), ``_<port>._<proto>.<svc>.<ns>.svc.cluster.local`` SRV → the named port, and
``<a-b-c-d>.<ns>.pod.cluster.local`` A → the pod's IP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nodemesh.cluster.config import CLUSTER_DOMAIN, NODE_DNS_IP
from nodemesh.host.files import read_json, write_json_atomic
from nodemesh.model.labels import service_selects

log = logging.getLogger("nodemesh.dns")
TTL = 5
TYPE_A, TYPE_NS, TYPE_SOA, TYPE_PTR, TYPE_AAAA, TYPE_SRV, TYPE_ANY = 1, 2, 6, 12, 28, 33, 255
RCODE_OK, RCODE_FORMERR, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 0, 1, 3, 4, 5
# Per-client query budget (hostile neighbours): a pod flooding the node-local DNS gets REFUSED
# beyond it, so it cannot take the server's CPU from other pods' lookups.
DNS_QPS_PER_CLIENT = 1000
DNS_BURST_PER_CLIENT = 2000
REFUSED_SAMPLE = 64


@dataclass
class Records:
    a: dict[str, list[str]] = field(default_factory=dict)
    srv: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # (port, target name)


def _ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def build_records(services: Iterable[dict], pods: Iterable[dict],
                  domain: str = CLUSTER_DOMAIN) -> Records:
    pods = list(pods)
    rec = Records()
    for p in pods:
        ip = (p.get("status") or {}).get("podIP")
        if ip:
            name = f"{ip.replace('.', '-')}.{p['metadata']['namespace']}.pod.{domain}"
            rec.a[name] = [ip]
    for s in services:
        meta, spec = s["metadata"], s["spec"]
        fqdn = f"{meta['name']}.{meta['namespace']}.svc.{domain}"
        cip = spec.get("clusterIP")
        if cip and cip != "None":
            rec.a[fqdn] = [cip]
        elif cip == "None":
            rec.a[fqdn] = sorted(
                p["status"]["podIP"] for p in pods
                if p["metadata"]["namespace"] == meta["namespace"] and _ready(p)
                and (p.get("status") or {}).get("podIP")
                and service_selects(spec.get("selector"), p["metadata"].get("labels") or {}))
        for port in spec.get("ports") or []:
            if port.get("name"):
                srv = f"_{port['name']}._{port.get('protocol', 'TCP').lower()}.{fqdn}"
                rec.srv[srv] = [(port["port"], fqdn)]
    return rec


def _read_name(msg: bytes, off: int) -> tuple[str, int]:
    labels: list[str] = []
    jumped, end, hops = False, off, 0
    while True:
        if off >= len(msg):
            raise ValueError("truncated name")
        n = msg[off]
        if n & 0xC0 == 0xC0:  # compression pointer
            if off + 1 >= len(msg) or hops > 20:
                raise ValueError("bad pointer")
            if not jumped:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            jumped, hops = True, hops + 1
            continue
        if n == 0:
            if not jumped:
                end = off + 1
            return ".".join(labels), end
        labels.append(msg[off + 1: off + 1 + n].decode("ascii", "replace"))
        off += 1 + n


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            b = label.encode()
            out += bytes([len(b)]) + b
    return out + b"\x00"


class TokenBuckets:
    """One token bucket per key (a client IP): `rate` tokens a second, at most `burst` saved.

    `allow(key, now)` takes one token if there is one. Pure apart from its own table, which is
    bounded: above `max_keys` buckets the full ones (idle clients) are forgotten.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._b: dict[object, tuple[float, float]] = {}

    def allow(self, key: object, now: float) -> bool:
        if self.rate <= 0:
            return True  # no cap
        tokens, last = self._b.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        if key not in self._b and len(self._b) >= self.max_keys:
            self._forget(now)
        self._b[key] = (tokens, now)
        return ok

    def _forget(self, now: float) -> None:
        for k, (tokens, last) in list(self._b.items()):
            if tokens + (now - last) * self.rate >= self.burst:
                del self._b[k]
        if len(self._b) >= self.max_keys:
            self._b.clear()


def refused(query: bytes) -> bytes:
    """A REFUSED response to `query` (its header and question), or b"" for a malformed one."""
    if len(query) < 12:
        return b""
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if qdcount != 1 or flags & 0x8000:
        return b""
    try:
        _, off = _read_name(query, 12)
    except ValueError:
        return b""
    if len(query) < off + 4:
        return b""
    return (struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x0100) | RCODE_REFUSED, 1, 0, 0, 0)
            + query[12: off + 4])


def answer(query: bytes, records: Records, domain: str = CLUSTER_DOMAIN) -> bytes:
    """The response to one DNS query message."""
    if len(query) < 12:
        return b""
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    rd = flags & 0x0100
    if qdcount != 1 or flags & 0x8000:
        return struct.pack("!HHHHHH", qid, 0x8000 | rd | RCODE_FORMERR, 0, 0, 0, 0)
    try:
        qname, off = _read_name(query, 12)
        qtype, qclass = struct.unpack("!HH", query[off: off + 4])
    except (ValueError, struct.error):
        return struct.pack("!HHHHHH", qid, 0x8000 | rd | RCODE_FORMERR, 0, 0, 0, 0)
    question = query[12: off + 4]
    name = qname.lower().rstrip(".")
    answers: list[bytes] = []
    rcode = RCODE_OK
    known = name in records.a or name in records.srv
    if qtype in (TYPE_A, TYPE_ANY) and name in records.a:
        for ip in records.a[name]:
            answers.append(b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, 1, TTL, 4)
                           + ipaddress.IPv4Address(ip).packed)
    elif qtype in (TYPE_SRV, TYPE_ANY) and name in records.srv:
        for port, target in records.srv[name]:
            rdata = struct.pack("!HHH", 0, 100, port) + _encode_name(target)
            answers.append(b"\xc0\x0c" + struct.pack("!HHIH", TYPE_SRV, 1, TTL, len(rdata)) + rdata)
    elif not known:
        # A name that is a prefix of known names (e.g. "ns.svc.cluster.local") exists but has no
        # records of its own: NOERROR with no answer, as CoreDNS does; anything else: NXDOMAIN.
        suffix = "." + name
        if not any(k.endswith(suffix) for k in (*records.a, *records.srv)) and name != domain:
            rcode = RCODE_NXDOMAIN
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | rcode, 1, len(answers), 0, 0)
    _ = qclass
    return header + question + b"".join(answers)


class DnsServer:
    """Serves `answer` on UDP and TCP port 53 of an address of the calling network namespace."""

    def __init__(self, address: str, port: int = 53, qps_per_client: float = DNS_QPS_PER_CLIENT,
                 burst_per_client: float = DNS_BURST_PER_CLIENT) -> None:
        self.address = address
        self.port = port
        self.records = Records()
        self.limit = TokenBuckets(qps_per_client, burst_per_client)
        self.answered = 0
        self.refused = 0  # queries over a client's budget: answered REFUSED (never silent)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None

    async def start(self, sockets: tuple[socket.socket, socket.socket] | None = None) -> None:
        """Serve on `sockets` (UDP, TCP: bound and listening already), or bind our own."""
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: tuple) -> None:
                resp = server.respond(data, addr[0])
                if resp:
                    self.t.sendto(resp, addr)  # type: ignore[attr-defined]

        if sockets is not None:
            udp, tcp = sockets
            udp.setblocking(False)
            tcp.setblocking(False)
            self._udp, _ = await loop.create_datagram_endpoint(Udp, sock=udp)
            self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, self.port))
        self._udp, _ = await loop.create_datagram_endpoint(Udp, sock=sock)
        self._tcp = await asyncio.start_server(self._serve_tcp, self.address, self.port,
                                               reuse_address=True)

    def respond(self, query: bytes, client: str) -> bytes:
        """The answer to `query` from `client`, or REFUSED when the client is over its budget."""
        if self.limit.allow(client, time.monotonic()):
            self.answered += 1
            return answer(query, self.records)
        self.refused += 1
        if self.refused in (1, 1000) or self.refused % 100000 == 0:
            log.warning("DNS: %s is over %g queries/s: refused (%d so far)", client,
                        self.limit.rate, self.refused)
        # Answering every refused query costs the server nearly what answering it does (measured:
        # docs/benchmarks.md, Hostile neighbours): one in REFUSED_SAMPLE gets REFUSED, so the
        # client learns why; the others are dropped. All are counted.
        return refused(query) if self.refused % REFUSED_SAMPLE == 1 else b""

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
                peer = writer.get_extra_info("peername") or ("",)
                resp = self.respond(await reader.readexactly(n), peer[0])
                writer.write(struct.pack("!H", len(resp)) + resp)
                await writer.drain()
        writer.close()

    def close(self) -> None:
        if self._udp:
            self._udp.close()
        if self._tcp:
            self._tcp.close()


class ClusterDns:
    """Every node's DNS server, on one asyncio loop in a thread of the cluster daemon.

    The sockets are the daemon's (bound in each node's namespace). The records come from the
    daemon's informer, rebuilt when Services or Pods change. Each node's counters are written to
    `counters_file(node)` about once a second (`{"answered", "refused", "records"}`), which is
    where that node's agent reads them for its metrics and status.
    """

    REPORT_SECONDS = 1.0

    def __init__(self, informer: object, counters_file: Callable[[str], str]) -> None:
        self.informer = informer
        self.counters_file = counters_file
        self.records = Records()
        self.servers: dict[str, DnsServer] = {}
        self._reported: dict[str, tuple[int, int, int]] = {}
        self._dirty = True
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="dns", daemon=True)

    def start(self) -> None:
        self.informer.add_listener(self._on_change)  # type: ignore[attr-defined]
        self._thread.start()

    def serve(self, node: str, sockets: tuple[socket.socket, socket.socket]) -> None:
        """Start answering on `node`'s sockets (UDP, TCP) with the current records."""
        asyncio.run_coroutine_threadsafe(self._serve(node, sockets), self._loop).result(10)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        for srv in self.servers.values():
            srv.close()

    def _on_change(self, kinds: set[str]) -> None:
        if kinds & {"Service", "Pod", "*"}:
            self._dirty = True
            self._loop.call_soon_threadsafe(self._wake.set)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.create_task(self._refresh_loop())
        self._loop.run_forever()

    async def _serve(self, node: str, sockets: tuple[socket.socket, socket.socket]) -> None:
        srv = DnsServer(NODE_DNS_IP)
        srv.records = self.records
        await srv.start(sockets)
        self.servers[node] = srv

    async def _refresh_loop(self) -> None:
        while True:
            self._wake.clear()  # before the look at _dirty: a change after it wakes the wait
            if self._dirty:
                self._dirty = False
                try:
                    k = self.informer.kinds(("Service", "Pod"))  # type: ignore[attr-defined]
                    self.records = build_records(k["Service"], k["Pod"])
                    for srv in self.servers.values():
                        srv.records = self.records
                except Exception:
                    log.exception("DNS records failed; keeping the last ones")
            self._report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.REPORT_SECONDS)

    def _report(self) -> None:
        for node, srv in self.servers.items():
            now = (srv.answered, srv.refused, len(srv.records.a))
            if self._reported.get(node) == now:
                continue
            try:
                write_json_atomic(self.counters_file(node), dict(
                    zip(("answered", "refused", "records"), now, strict=True)))
                self._reported[node] = now
            except OSError as e:
                log.warning("DNS counters of %s: %s", node, e)


def read_counters(path: str) -> dict[str, int]:
    """A node's DNS counters as `ClusterDns` last wrote them (zeros before the first write)."""
    got = read_json(path) or {}
    return {k: int(got.get(k, 0)) for k in ("answered", "refused", "records")}
