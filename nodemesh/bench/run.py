"""`python -m nodemesh.bench`: the side-by-side benchmark (no mesh / sidecar model / nodemesh L4 /
nodemesh L7), run in local clusters of its own and torn down at the end.

Sections, in this order (see docs/benchmarks.md for the method and what the numbers mean):

1. traffic: for every run and workload, the four modes back to back (the order rotates by one
   each run); each cell runs wrk (closed loop) and the open-loop generator at fixed rates, and
   reads the CPU time of the mesh's own processes around each phase;
2. datapath: TCP round trips (one connection; connect/request/close) and new connections per
   second, pod→pod and pod→service, ``--datapath bpf`` against ``--datapath none``;
3. change: apply → first observed effect of a policy change and of a route change;
4. hostile: a victim pod's DNS lookups, new TCP connections and a change's apply → synced on
   the node, with no flood, with a DNS flood and with a connection flood from another pod on
   the same node (docs/reliability.md "Hostile neighbours");
5. memory: the mesh's processes (and BPF maps) at 10, 50 and 100 pods on the node;
6. mtls: mutual TLS across nodes, in two 2-node clusters of its own (clients on node1, servers
   on node2; the single-node clusters are down by then): no mesh, the sidecar model with mTLS
   between the sidecars, nodemesh L4 and L7 through its tunnel, measured as the traffic section
   is; then the memory of the server node at 10 and 100 pods.

CPUs: the load generators run on CPU 1; every process of the clusters (daemons, agents, node
Envoys, shims, servers, sidecars) is pinned to CPU 0 before each cell. Before each cell the
harness waits (bounded) until the machine is quiet, since other work may share this VM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from nodemesh.bench import memory, workload
from nodemesh.bench.cluster import BenchCluster
from nodemesh.bench.loadgen import WRK_LUA, cpu_busy_seconds, proc_cpu_seconds
from nodemesh.bench.stats import median, percentile
from nodemesh.bench.workload import MODES, MTLS_MODES, Workload
from nodemesh.host.procs import reap_children, set_child_subreaper

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The hostile section's programs, run in pods: the victim's sequential lookups (1 s timeout each;
# prints p50/p99 ms and how many were lost) and a DNS flood that never awaits its answers.
HOSTILE_LOOKUPS = r"""
import json, socket, struct, sys, time
name, n = sys.argv[1], int(sys.argv[2])
q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("169.254.20.10", 53))
s.settimeout(1)
ms, lost = [], 0
for i in range(n):
    t = time.perf_counter()
    s.send(struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + q)
    try:
        while struct.unpack("!H", s.recv(512)[:2])[0] != i:
            pass
        ms.append((time.perf_counter() - t) * 1000)
    except socket.timeout:
        lost += 1
    time.sleep(0.005)
ms.sort()
pct = lambda p: round(ms[min(len(ms) - 1, int(p * len(ms)))], 3) if ms else None
print(json.dumps({"n": n, "lost": lost, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}))
"""
HOSTILE_DNS_FLOOD = r"""
import socket, struct, sys, time
end = time.monotonic() + float(sys.argv[1])
q = b"\x03foo\x07default\x03svc\x07cluster\x05local\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("169.254.20.10", 53))
s.setblocking(False)
n = 0
while time.monotonic() < end:
    for _ in range(100):
        try:
            s.send(struct.pack("!HHHHHH", n & 0xFFFF, 0x0100, 1, 0, 0, 0) + q); n += 1
        except BlockingIOError:
            pass
    try:
        while True:
            s.recv(512)
    except BlockingIOError:
        pass
print(n)
"""
LOADGEN_CPU = 1
SERVER_CPU = 0
BENCH_NICE = -10  # every process of the benchmark: other work on a shared VM disturbs it less
QUIET_BUSY_CPUS = 0.45  # busy CPUs (of 2) below which the machine counts as quiet
FOREIGN_MAX_CPUS = 0.25  # other processes' CPU during a cell above which it is repeated
LAG_MAX_US = 200.0  # generator send lag p99 above which the cell is repeated (it was stalled)
SINGLE_NODE_SECTIONS = ("traffic", "datapath", "change", "hostile", "memory")
SECTIONS = (*SINGLE_NODE_SECTIONS, "mtls")
ALL_MODES = tuple(dict.fromkeys(MODES + MTLS_MODES))
SIDECAR_CERT_TTL = 24 * 3600  # nodemesh's default --cert-ttl (and Istio's default)


@dataclass(frozen=True)
class Plan:
    quick: bool
    runs: int
    workloads: tuple[Workload, ...]
    wrk_seconds: float
    open_seconds: float
    warmup: float
    rates: tuple[int, ...]
    wrk_connections: int
    pool: int
    dp_runs: int
    dp_seconds: float
    dp_placements: tuple[str, ...]
    dp_parallel: int
    change_samples: int
    change_interval_ms: float
    hostile_seconds: float  # each flood (and the victim's measurements during it)
    hostile_lookups: int  # the victim's sequential DNS lookups per condition
    mem_points: tuple[int, ...]
    mtls_workloads: tuple[Workload, ...]
    mtls_rates: tuple[int, ...]
    mtls_mem_points: tuple[int, ...]
    mem_settle: float  # seconds between the last pod's start and the memory reading
    gate_max_wait: float
    gate_total: float
    retries: int  # repeats of a disturbed cell
    retries_total: int  # and of all cells together


FULL = Plan(quick=False, runs=5, workloads=workload.ALL_WORKLOADS, wrk_seconds=2.0,
            open_seconds=2.0, warmup=0.25, rates=(500, 2000), wrk_connections=12, pool=32,
            dp_runs=5, dp_seconds=1.5, dp_placements=("same-cpu", "cross-cpu"), dp_parallel=8,
            change_samples=100, change_interval_ms=2.0, hostile_seconds=6.0,
            hostile_lookups=400, mem_points=(10, 50, 100),
            # nginx only: the fast server shows what the mesh adds; echo (Python) would dilute it.
            mtls_workloads=tuple(w for w in workload.ALL_WORKLOADS if w.server == "nginx"),
            # A new TLS connection per request: 200/s every mode carries here; at 500/s
            # nodemesh L4 (one handshake per connection) saturates; 2000/s is beyond them all.
            mtls_rates=(200, 500), mtls_mem_points=(10, 100), mem_settle=3.0,
            gate_max_wait=15.0, gate_total=300.0, retries=2, retries_total=60)
QUICK = replace(FULL, quick=True, runs=1,
                workloads=(Workload("nginx", "keepalive", "small"), Workload("echo", "close", "16k")),
                wrk_seconds=1.0, open_seconds=1.0, warmup=0.2, dp_runs=1, dp_seconds=0.5,
                dp_placements=("same-cpu",), change_samples=6, hostile_seconds=2.0,
                hostile_lookups=50, mem_points=(10,),
                # Keep-alive: a smoke run checks that every mode works, not where it saturates
                # (a new connection per request, one TLS handshake each, is for the full run).
                mtls_workloads=(Workload("nginx", "keepalive", "small"),), mtls_mem_points=(10,),
                mem_settle=1.0, gate_max_wait=2.0, gate_total=10.0, retries=0,
                retries_total=0)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- machine facts ------------------------------------------------------------------------
def _cmd(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (p.stdout + p.stderr).strip()


def environment() -> dict[str, Any]:
    from nodemesh import __version__
    from nodemesh.proxy.envoy import envoy_binary

    cpu = next((line.split(":", 1)[1].strip() for line in _cmd(["lscpu"]).splitlines()
                if line.startswith("Model name")), "")
    with open("/proc/meminfo") as f:
        mem = next((line.split()[1] for line in f if line.startswith("MemTotal")), "0")
    git = _cmd(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = bool(_cmd(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"]))
    return {
        "cpu_model": cpu, "cpus": os.cpu_count(), "memory_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "nodemesh": __version__, "git_commit": git, "git_dirty": dirty,
        "envoy": _cmd([envoy_binary(), "--version"]).split("version:")[-1].strip(),
        "wrk": _cmd(["wrk", "-v"]).splitlines()[0] if _cmd(["wrk", "-v"]) else "",
        "nginx": _cmd(["nginx", "-v"]).replace("nginx version: ", ""),
        "iptables": _cmd(["iptables", "--version"]),
        "bpftool": _cmd(["bpftool", "version"]).splitlines()[0] if _cmd(["bpftool", "version"]) else "",
        "cc": _cmd(["cc", "--version"]).splitlines()[0] if _cmd(["cc", "--version"]) else "",
    }


def all_process_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (utime + stime) of every process on the machine, to report what else ran
    meanwhile (processes that start and end between two calls are not seen)."""
    tck = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        rest = data.rsplit(")", 1)[1].split()
        out[int(pid)] = (cmd or data.split("(", 1)[1].split(")")[0],
                         (int(rest[11]) + int(rest[12])) / tck)
    return out


def _proc_table() -> dict[int, tuple[int, float, bool]]:
    """pid -> (ppid, utime + stime seconds, kernel thread?) of every process."""
    tck = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float, bool]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid, flags = int(rest[1]), int(rest[6])
        out[int(pid)] = (ppid, (int(rest[11]) + int(rest[12])) / tck,
                         bool(flags & 0x00200000) or int(pid) == 2 or ppid == 2)  # PF_KTHREAD
    return out


class ForeignMeter:
    """CPU used by processes that are neither the benchmark's nor kernel threads, between
    `start` and `stop` (processes that start and end in between are not seen)."""

    def __init__(self, mine: Callable[[], set[int]]) -> None:
        self.mine = mine

    def _snapshot(self) -> dict[int, float]:
        table = _proc_table()
        me = os.getpid()
        skip = set(self.mine()) | {me}
        out = {}
        for pid, (ppid, cpu, kthread) in table.items():
            if kthread or pid in skip:
                continue
            p, hops = ppid, 0
            while p > 1 and p != me and hops < 32:  # our own descendants (CLI, execs)
                p, hops = table.get(p, (0, 0.0, False))[0], hops + 1
            if p != me:
                out[pid] = cpu
        return out

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.before = self._snapshot()

    def stop(self) -> dict[str, float]:
        after = self._snapshot()
        wall = time.monotonic() - self.t0
        cpu = sum(c - self.before.get(pid, 0.0) for pid, c in after.items()
                  if c >= self.before.get(pid, 0.0))
        return {"foreign_cpu_s": round(cpu, 2), "foreign_cpus": round(cpu / wall, 3) if wall else 0.0}


# ---- the benchmark ------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadTarget:
    """Where a mode's load starts and goes, and what to count around it."""

    cluster: BenchCluster
    pod: str
    container: str | None
    targets: list[str]  # "ip:port"
    host: str  # the Host header
    roles: dict[int, str] = field(default_factory=dict)  # the mesh's processes (CPU is read)
    l7_node: str | None = None  # the node whose Envoy must serve the requests (L7)
    tunnel_node: str | None = None  # the node whose Envoy terminates nodemesh's tunnel
    stats_url: str | None = None  # the client sidecar's counters, read by the loadgen


def in_parallel(*calls: Callable[[], object]) -> None:
    """Run `calls` at once (cluster ups and downs: mostly waiting), then raise the first error."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def sidecar_certs(directory: str) -> dict[str, workload.SidecarTls]:
    """The sidecar model's workload certificates, by ServiceAccount, from a throwaway CA in
    `directory` (nodemesh's built-in CA class, so the certificates are of the same kind as the
    node Envoys': EC P-256, the SPIFFE ID as the only URI SAN)."""
    from nodemesh.certs import BuiltinCA, make_csr, new_key, spiffe_id
    from nodemesh.certs.pem import key_to_pem

    ca = BuiltinCA.create(directory, workload.TRUST_DOMAIN)
    root = ca.roots()[0].decode()
    out = {}
    for sa in (workload.CLIENT_SA, workload.SERVER_SA):
        key = new_key()
        sid = spiffe_id(workload.TRUST_DOMAIN, workload.NAMESPACE, sa)
        chain = ca.sign(make_csr(key, sid), sid, SIDECAR_CERT_TTL).decode()
        out[sa] = workload.SidecarTls(sid, chain, key_to_pem(key).decode(), root)
    return out


class Bench:
    def __init__(self, plan: Plan, modes: tuple[str, ...], sections: tuple[str, ...]) -> None:
        self.plan = plan
        self.modes = modes
        self.sections = sections
        self.python = sys.executable
        from nodemesh.proxy.envoy import envoy_binary

        self.envoy = envoy_binary()
        self.work = tempfile.mkdtemp(prefix="nodemesh-bench-")
        os.chmod(self.work, 0o755)
        sfx = uuid.uuid4().hex[:5]

        def cluster(tag: str, datapath: str, nodes: int = 1) -> BenchCluster:
            name = f"nmb{sfx}{tag}"
            return BenchCluster(name, tempfile.mkdtemp(prefix=f"nodemesh-{name}-"), datapath,
                                nodes=nodes, log=log)

        self.plain, self.mesh = cluster("p", "none"), cluster("m", "bpf")
        # The mTLS section's: 2 nodes each; nodemesh's has mutual TLS on (the default).
        self.plain2, self.mesh2 = cluster("tp", "none", 2), cluster("tm", "bpf", 2)
        self.clusters = (self.plain, self.mesh, self.plain2, self.mesh2)
        self.nmrr = os.path.join(self.work, "nmrr")
        self.lua = os.path.join(self.work, "wrk.lua")
        self.l7: dict[str, Any] = {"available": False, "reason": "not checked"}
        self.targets: dict[str, Any] = {}
        self.mtls_targets: dict[str, Any] = {}
        self.gate_spent = 0.0
        self.wait_mode: dict[str, float] = {"spin_us": 1e9, "presend_us": 0}
        self.meter = ForeignMeter(lambda: {p for c in self.clusters if c.is_up
                                           for p in c.all_pids()})
        self.retried = 0
        self.results: dict[str, Any] = {"plan": _plan_json(plan), "modes": list(modes),
                                        "sections": list(sections), "work_dir": self.work,
                                        "clusters": {"plain": self.plain.name,
                                                     "mesh": self.mesh.name,
                                                     "plain2": self.plain2.name,
                                                     "mesh2": self.mesh2.name}}

    # ---- setup ----------------------------------------------------------------------------
    def build_tools(self) -> None:
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nmrr.c")
        subprocess.run(["cc", "-O2", "-Wall", "-o", self.nmrr, src], check=True,
                       capture_output=True, text=True)
        with open(self.lua, "w") as f:
            f.write(WRK_LUA)
        os.chmod(self.lua, 0o644)

    def setup(self) -> None:
        """The single-node clusters and what the sections before `mtls` run in them."""
        t0 = time.monotonic()
        log(f"clusters: {self.plain.name} (--datapath none), {self.mesh.name} (--datapath bpf)")
        in_parallel(self.plain.up, self.mesh.up)
        py, ev = self.python, self.envoy
        rr_svc = workload.service("rr", {"app": "rr"}, port=workload.RR_PORT,
                                  target=workload.RR_PORT)
        plain_objs = [*workload.plain_servers(py), workload.client_pod(), workload.calib_pod(),
                      workload.rr_pod(self.nmrr), rr_svc, *workload.sidecar_servers(py, ev)]
        self.plain.apply(plain_objs)
        policy = workload.allow_client_policy(
            "allow-client", ["nginx", "echo", "nginx-l7", "echo-l7", "rr"],
            [workload.SERVER_PORT, workload.RR_PORT])
        mesh_objs = [*workload.plain_servers(py), workload.client_pod(),
                     workload.rr_pod(self.nmrr), rr_svc, policy, *workload.l7_workload(py),
                     *workload.change_target(py), workload.hostile_pod()]
        self.mesh.apply(mesh_objs)
        self.plain.wait_ready(expected=workload.expected_pods(plain_objs))
        self.plain.apply([workload.sidecar_client(ev, self.outbound(self.plain, workload.SERVERS))])
        self.plain.wait_ready(expected=workload.expected_pods(plain_objs) + 1)
        self.mesh.wait_ready(expected=workload.expected_pods(mesh_objs))
        self.targets = {
            **self.prepare_clients(self.plain, self.mesh, workload.SERVERS),
            "rr_plain": self.plain.pod_ips("rr")[0], "rr_mesh": self.mesh.pod_ips("rr")[0],
            "rr_vip": self.mesh.vip("rr"), "pt_vip": self.mesh.vip("pt"),
            "pt_l7_vip": self.mesh.vip("pt-l7"),
        }
        self.l7 = self.detect_l7(self.mesh, self.targets["l7"])
        self.pin()
        self.results["setup_seconds"] = round(time.monotonic() - t0, 1)
        self.results["targets"] = self.targets
        self.results["l7"] = self.l7

    @staticmethod
    def outbound(plain: BenchCluster, servers: tuple[str, ...], peer_id: str = ""
                 ) -> list[workload.OutboundService]:
        """The sidecar client's services: the sidecar servers' VIPs and pod IPs (with mTLS,
        the SPIFFE ID the servers must present)."""
        return [workload.OutboundService(f"sc-{s}", plain.vip(f"sc-{s}"), workload.SERVICE_PORT,
                                         tuple((ip, workload.SERVER_PORT)
                                               for ip in plain.pod_ips(f"sc-{s}")), peer_id)
                for s in servers]

    @staticmethod
    def prepare_clients(plain: BenchCluster, mesh: BenchCluster, servers: tuple[str, ...]
                        ) -> dict[str, dict[str, Any]]:
        """What each mode's client sends to, per server: the pod IPs (no mesh), the VIPs (the
        others); also sets tcp_tw_reuse in the clients (new connection per request)."""
        tw = ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"]
        in_parallel(lambda: plain.exec("client", tw),
                    lambda: plain.exec("sc-client", tw, container="app"),
                    lambda: mesh.exec("client", tw), lambda: mesh.exec("client-l7", tw))
        return {"plain": {s: plain.pod_ips(s) for s in servers},
                "sidecar": {s: plain.vip(f"sc-{s}") for s in servers},
                "l4": {s: mesh.vip(s) for s in servers},
                "l7": {s: mesh.vip(f"{s}-l7") for s in servers}}

    def pin(self) -> None:
        for c in self.clusters:
            if c.is_up:
                c.pin({SERVER_CPU}, BENCH_NICE)

    # ---- L7 detection ----------------------------------------------------------------------
    PROBE = r"""
import json, socket, sys
out = {}
for name, host in json.loads(sys.argv[1]).items():
    try:
        s = socket.create_connection((host, 80), timeout=3)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        out[name] = {"status": int(lines[0].split()[1]), "headers": headers,
                     "body": body.decode("utf-8", "replace")[:2000]}
    except OSError as e:
        out[name] = {"error": str(e)}
print(json.dumps(out))
"""

    @staticmethod
    def node_envoy_requests(cluster: BenchCluster, node: str = workload.CLIENT_NODE) -> int | None:
        """Requests the node's Envoy has served (downstream, admin excluded)."""
        stats = cluster.envoy_stats(node, "downstream_rq_total")
        if stats is None:
            return None
        return int(sum(v for k, v in stats.items()
                       if k.startswith("http.") and not k.startswith("http.admin.")))

    @staticmethod
    def tunnel_counters(cluster: BenchCluster, node: str) -> dict[str, int] | None:
        """What the node Envoy's inbound tunnel listener has taken: connections and bytes in
        mutual TLS, TLS handshakes, and plaintext connections (the `inbound_plain` chain)."""
        stats = cluster.envoy_stats(node, r"^(tcp\.inbound_.*|listener\..*\.ssl\.handshake)$")
        if stats is None:
            return None
        out = {"connections": 0, "bytes": 0, "handshakes": 0, "plaintext_connections": 0}
        for k, v in stats.items():
            if k.endswith(".ssl.handshake"):
                out["handshakes"] += int(v)
            elif k.startswith("tcp.inbound_plain."):
                if k.endswith(".downstream_cx_total"):
                    out["plaintext_connections"] += int(v)
            elif k.endswith(".downstream_cx_total"):
                out["connections"] += int(v)
            elif k.endswith(".downstream_cx_rx_bytes_total"):
                out["bytes"] += int(v)
        return out

    def detect_l7(self, mesh: BenchCluster, vips: dict[str, str]) -> dict[str, Any]:
        """Is a route on a Service honoured by the node's Envoy? Route status Accepted=True, a
        200 through the route, and evidence of the proxy in the exchange."""
        l7 = self._detect_l7(mesh, vips)
        log(f"nodemesh L7 in {mesh.name}: {'available' if l7['available'] else 'UNAVAILABLE'}"
            f" ({l7['reason']})")
        return l7

    def _detect_l7(self, mesh: BenchCluster, vips: dict[str, str]) -> dict[str, Any]:
        names = [f"{s}-l7" for s in vips]
        deadline = time.monotonic() + (10 if self.plan.quick else 20)
        status: dict[str, Any] = {}
        while True:
            accepted = True
            for n in names:
                r = mesh.get("httproute", n)
                conds = [c for p in (r.get("status") or {}).get("parents") or []
                         for c in p.get("conditions") or []]
                status[n] = conds
                accepted &= any(c.get("type") == "Accepted" and c.get("status") == "True"
                                for c in conds)
            before = self.node_envoy_requests(mesh)
            probe = json.loads(mesh.exec("client-l7", [self.python, "-c", self.PROBE, json.dumps(
                {n: vips[n[:-3]] for n in names})]).out)
            after = self.node_envoy_requests(mesh)
            ok = all(p.get("status") == 200 for p in probe.values())
            echo = probe.get("echo-l7", {})  # absent when only nginx runs (the mTLS section)
            seen = echo.get("headers", {})
            try:
                reflected = json.loads(echo.get("body") or "{}").get("headers", {})
            except ValueError:
                reflected = {}
            evidence = {
                "x-envoy-upstream-service-time": "x-envoy-upstream-service-time" in seen,
                "request headers added on the way (echo)": sorted(
                    h for h in reflected if h in ("X-Request-Id", "X-Forwarded-Proto")),
                "node Envoy requests during the probe": (after - before)
                if before is not None and after is not None else None,
            }
            proxied = bool(evidence["x-envoy-upstream-service-time"]
                           or evidence["request headers added on the way (echo)"]
                           or (evidence["node Envoy requests during the probe"] or 0) > 0)
            if accepted and ok and proxied:
                return {"available": True, "reason": "route Accepted, 200 through the node Envoy",
                        "evidence": evidence, "conditions": status}
            if time.monotonic() > deadline:
                why = []
                if not accepted:
                    why.append("route not Accepted")
                if not ok:
                    why.append("requests through the route failed: " + "; ".join(
                        f"{k}: {v.get('status') or v.get('error')} {v.get('body', '')[:120]!r}"
                        for k, v in probe.items()))
                if not proxied:
                    why.append("no sign of the proxy in the exchange")
                return {"available": False, "reason": ", ".join(why), "evidence": evidence,
                        "conditions": status, "probe": probe}
            time.sleep(1.0)

    # ---- quiet gate -----------------------------------------------------------------------
    def quiet_gate(self) -> dict[str, float]:
        """Wait (bounded) until the machine is quiet; returns what was seen."""
        waited = 0.0
        while True:
            b0, t0 = cpu_busy_seconds(), time.monotonic()
            time.sleep(0.3)
            b1, t1 = cpu_busy_seconds(), time.monotonic()
            busy = sum(b1[k] - b0[k] for k in b1) / (t1 - t0)
            if (busy < QUIET_BUSY_CPUS or waited >= self.plan.gate_max_wait
                    or self.gate_spent >= self.plan.gate_total):
                return {"busy_cpus": round(busy, 2), "waited_s": round(waited, 1)}
            time.sleep(0.7)
            waited += 1.0
            self.gate_spent += 1.0

    # ---- traffic --------------------------------------------------------------------------
    def endpoint(self, mode: str, server: str, mtls: bool = False) -> LoadTarget:
        """Client, targets and counters of `mode` for `server`'s workload: in the single-node
        clusters, or (`mtls`) in the mTLS section's, where the modes carry a "-mtls" suffix."""
        plain, mesh = (self.plain2, self.mesh2) if mtls else (self.plain, self.mesh)
        t = self.mtls_targets if mtls else self.targets
        tunnel = workload.SERVER_NODE if mtls else None
        kind = mode.removesuffix("-mtls")
        if kind == "loopback":
            return LoadTarget(plain, "calib", None, [f"127.0.0.1:{workload.SERVER_PORT}"], "localhost")
        if kind == "nomesh":
            return LoadTarget(plain, "client", None,
                            [f"{ip}:{workload.SERVER_PORT}" for ip in t["plain"][server]], server)
        vip = [f"{t[kind][server]}:{workload.SERVICE_PORT}"]
        if kind == "sidecar":
            return LoadTarget(plain, "sc-client", "app", vip, f"sc-{server}", plain.sidecar_roles(),
                            stats_url=workload.SIDECAR_TLS_STATS_URL if mtls else None)
        if kind == "l7":
            return LoadTarget(mesh, "client-l7", None, vip, f"{server}-l7", mesh.mesh_roles(),
                            l7_node=workload.CLIENT_NODE, tunnel_node=tunnel)
        return LoadTarget(mesh, "client", None, vip, server, mesh.mesh_roles(), tunnel_node=tunnel)

    def traffic_cell(self, ep: LoadTarget, mode: str, w: Workload, run: int,
                     rates: tuple[int, ...] | None = None) -> dict[str, Any]:
        p = self.plan
        rates = p.rates if rates is None else rates
        gate = self.quiet_gate()
        self.pin()
        close = w.conn == "close"
        wrk_targets = ep.targets * 3 if len(ep.targets) == 1 else ep.targets
        phases: list[dict[str, Any]] = [{
            "kind": "wrk", "targets": wrk_targets, "threads": len(wrk_targets), "host": ep.host,
            "path": w.path, "connections": p.wrk_connections, "seconds": p.wrk_seconds,
            "close": close, "lua": self.lua}]
        for rate in rates:
            phases.append({"kind": "open", "targets": ep.targets, "host": ep.host, "path": w.path,
                           "rate": rate, "seconds": p.open_seconds, "warmup": p.warmup,
                           "close": close, "pool": p.pool, **self.wait_mode})
        pids = sorted(ep.roles)
        spec: dict[str, Any] = {"cpu_pids": pids, "phases": phases}
        if ep.stats_url:
            spec["stats_url"] = ep.stats_url
        before = self.node_envoy_requests(ep.cluster, ep.l7_node) if ep.l7_node else None
        tunnel0 = self.tunnel_counters(ep.cluster, ep.tunnel_node) if ep.tunnel_node else None
        t0 = time.monotonic()
        self.meter.start()
        r = ep.cluster.exec(ep.pod, ["taskset", "-c", str(LOADGEN_CPU), self.python, "-m",
                                     "nodemesh.bench.loadgen", json.dumps(spec)],
                            container=ep.container, timeout=120 + p.wrk_seconds
                            + len(rates) * (p.open_seconds + 5), check=False)
        cell: dict[str, Any] = {"mode": mode, "workload": w.name, "run": run, "gate": gate,
                                **self.meter.stop(),
                                "cpu_pids": len(pids),
                                "cpu_roles": {str(k): v for k, v in ep.roles.items()},
                                "seconds": round(time.monotonic() - t0, 2)}
        try:
            out = json.loads(r.out.strip().splitlines()[-1])
            cell["phases"] = out["phases"]
        except (ValueError, IndexError, KeyError):
            cell["error"] = f"loadgen exited {r.code}: {r.err.strip()[-500:]}"
            cell["phases"] = []
        else:
            if "stats_delta" in out:
                cell["sidecar_stats"] = out["stats_delta"]
        if ep.l7_node:
            after = self.node_envoy_requests(ep.cluster, ep.l7_node)
            cell["node_envoy_requests"] = (after - before) if None not in (before, after) else None
        if ep.tunnel_node:
            tunnel1 = self.tunnel_counters(ep.cluster, ep.tunnel_node)
            cell["tunnel"] = ({k: tunnel1[k] - tunnel0[k] for k in tunnel1}
                              if tunnel0 is not None and tunnel1 is not None else None)
        lags = [(ph.get("send_lag_us") or {}).get("p99") or 0.0 for ph in cell["phases"]
                if (ph.get("phase") or {}).get("kind") == "open"]
        cell["disturbed"] = disturbed(cell["foreign_cpus"], max(lags, default=0.0))
        return cell

    def repeat_if_disturbed(self, measure: Callable[[], dict[str, Any]],
                            discarded: list[dict[str, Any]]) -> dict[str, Any]:
        """Measure; while other work disturbed the measurement, measure again (bounded)."""
        cell = measure()
        tries = 0
        while (cell.get("disturbed") and tries < self.plan.retries
               and self.retried < self.plan.retries_total):
            tries += 1
            self.retried += 1
            log(f"    repeating ({cell['disturbed']})")
            discarded.append(cell)
            cell = measure()
        cell["attempt"] = tries + 1
        return cell

    def run_cells(self, section: str, modes: list[str], workloads: tuple[Workload, ...],
                  measure: Callable[[str, Workload, int], dict[str, Any]],
                  cells: list[dict[str, Any]], discarded: list[dict[str, Any]],
                  before_run: Callable[[int], None] | None = None) -> None:
        """Every run: for each workload, the modes back to back, in an order that rotates by
        one each run; a disturbed cell is measured again (bounded)."""
        p = self.plan
        total = p.runs * len(workloads) * len(modes)
        log(f"{section}: {p.runs} run(s) x {len(workloads)} workload(s) x {len(modes)} mode(s) "
            f"= {total} cells")
        for run in range(p.runs):
            if before_run is not None:
                before_run(run)
            order = modes[run % len(modes):] + modes[:run % len(modes)]
            for w in workloads:
                for mode in order:
                    cell = self.repeat_if_disturbed(
                        lambda mode=mode, w=w, run=run: measure(mode, w, run), discarded)
                    cells.append(cell)
                    summary = ", ".join(
                        f"{x['phase']['kind']}@{x['phase'].get('rate', 'max')}"
                        f" {x.get('achieved_rps', 0):.0f}/s p99 {x.get('latency_us', {}).get('p99', 0):.0f}us"
                        f" err {x.get('errors', '?')}" for x in cell["phases"]) or cell.get("error", "")
                    log(f"  [{len(cells)}/{total}] run {run + 1} {w.name} {mode}: {summary}")

    def traffic(self) -> None:
        p = self.plan
        modes = [m for m in self.modes if m in MODES and (m != "l7" or self.l7["available"])]
        cells: list[dict[str, Any]] = []
        discarded: list[dict[str, Any]] = []
        t0 = time.monotonic()
        calibration: list[dict[str, Any]] = []
        # Filled in as we go: an interrupted run still reports what it measured.
        self.results["calibration"] = {"cells": calibration}
        self.results["traffic"] = {"cells": cells, "discarded": discarded}
        calib = [w for w in workload.ALL_WORKLOADS if w.server == "nginx" and w.body == "small"
                 and (w in p.workloads or w.conn == "keepalive")]

        def calibrate(run: int) -> None:
            # The generators against nginx on the pod's loopback: the floor they measure.
            for w in calib:
                cell = self.traffic_cell(self.endpoint("loopback", w.server), "loopback", w, run)
                calibration.append(cell)
                log(f"  calibration run {run + 1} {w.name} on loopback: " + ", ".join(
                    f"{x['phase']['kind']}@{x['phase'].get('rate', 'max')} p50 "
                    f"{x.get('latency_us', {}).get('p50', 0):.0f}us" for x in cell["phases"]))

        self.run_cells("traffic", modes, p.workloads,
                       lambda m, w, r: self.traffic_cell(self.endpoint(m, w.server), m, w, r),
                       cells, discarded, calibrate)
        self.results["traffic"]["seconds"] = round(time.monotonic() - t0, 1)

    # ---- datapath ---------------------------------------------------------------------------
    def datapath_exec(self, cluster: BenchCluster, target: str, placement: str) -> dict[str, Any]:
        cpu = str(SERVER_CPU if placement == "same-cpu" else LOADGEN_CPU)
        s = self.plan.dp_seconds
        port = str(workload.RR_PORT)
        script = "; ".join([
            f"taskset -c {cpu} {self.nmrr} rr {target} {port} 64 {s}",
            f"taskset -c {cpu} {self.nmrr} crr {target} {port} 64 {s}",
            f"taskset -c {cpu} {self.nmrr} cps {target} {port} 64 {s} {self.plan.dp_parallel}"])
        r = cluster.exec("client", ["sh", "-c", script], timeout=60 + 3 * s, check=False)
        out: dict[str, Any] = {}
        for line in r.out.splitlines():
            with contextlib.suppress(ValueError):
                d = json.loads(line)
                out[d["mode"]] = d
        if len(out) < 3:
            out["error"] = f"nmrr exited {r.code}: {r.err.strip()[-300:]}"
        return out

    def datapath(self) -> None:
        p = self.plan
        cells: list[dict[str, Any]] = []
        discarded: list[dict[str, Any]] = []
        t0 = time.monotonic()
        log(f"datapath: {p.dp_runs} run(s) x {len(p.dp_placements)} placement(s)")
        for run in range(p.dp_runs):
            for placement in p.dp_placements:
                combos = [("none", "pod", self.plain, self.targets["rr_plain"]),
                          ("bpf", "pod", self.mesh, self.targets["rr_mesh"]),
                          ("bpf", "service", self.mesh, self.targets["rr_vip"])]
                if run % 2:
                    combos.reverse()
                for dp, target_kind, cluster, ip in combos:
                    def measure(dp: str = dp, target_kind: str = target_kind,
                                cluster: BenchCluster = cluster, ip: str = ip,
                                placement: str = placement, run: int = run) -> dict[str, Any]:
                        gate = self.quiet_gate()
                        self.pin()
                        mesh = cluster.mesh_pids()
                        self.meter.start()
                        c0 = proc_cpu_seconds(mesh)
                        r = self.datapath_exec(cluster, ip, placement)
                        mesh_cpu = proc_cpu_seconds(mesh) - c0
                        foreign = self.meter.stop()
                        return {"run": run, "placement": placement, "datapath": dp,
                                "target": target_kind, "gate": gate, **foreign,
                                "mesh_cpu_s": round(mesh_cpu, 3) if mesh else None,
                                "disturbed": disturbed(foreign["foreign_cpus"], 0.0), **r}
                    r = self.repeat_if_disturbed(measure, discarded)
                    cells.append(r)
                    log(f"  run {run + 1} {placement} {dp} pod→{target_kind}: " + ", ".join(
                        f"{m} p50 {r[m]['p50_us']:.1f}µs" for m in ("rr", "crr") if m in r)
                        + (f", {r['cps']['rate']:.0f} conn/s" if "cps" in r else r.get("error", "")))
        self.results["datapath"] = {"cells": cells, "discarded": discarded,
                                    "seconds": round(time.monotonic() - t0, 1)}

    # ---- change latency ---------------------------------------------------------------------
    def change_series(self, kind: str, pod: str, argv: list[str], states: list[Any],
                      objs_of: Callable[[Any], list[dict]], outcome_of: Callable[[Any], str],
                      ) -> dict[str, Any]:
        """Flip between `states` (states[0] is in force), apply → first probe sent after the
        apply's start that shows the new state's outcome."""
        proc = self.mesh.exec_popen(pod, argv)
        lines: list[tuple[int, str]] = []
        cond = threading.Condition()

        def reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit():
                    with cond:
                        lines.append((int(parts[0]), parts[1]))
                        cond.notify_all()

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        samples: list[dict[str, Any]] = []
        try:
            cur = 0

            def wait_for(outcome: str, since: int, timeout: float) -> int | None:
                deadline = time.monotonic() + timeout
                with cond:
                    while True:
                        for t, o in lines:
                            if t >= since and o == outcome:
                                return t
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return None
                        cond.wait(left)

            def current() -> str | None:
                with cond:
                    return lines[-1][1] if lines else None

            # The state in force must be what the probe sees before the first change.
            start = time.monotonic_ns()
            if wait_for(outcome_of(states[0]), 0, 10) is None:
                return {"error": f"the probe never saw {outcome_of(states[0])!r} "
                                 f"(last: {current()!r})", "samples": []}
            time.sleep(0.2)
            for i in range(self.plan.change_samples):
                nxt = (cur + 1) % len(states)
                # Stable in the old state for a moment (no effect of the previous change pending).
                with cond:
                    stable_since = lines[-1][0] if lines else start
                while time.monotonic_ns() - stable_since < 150_000_000:
                    time.sleep(0.02)
                t0, t1 = self.mesh.apply_timed(objs_of(states[nxt]))
                seen = wait_for(outcome_of(states[nxt]), t0, 5.0)
                samples.append({"i": i, "to": str(states[nxt]), "apply_ms": (t1 - t0) / 1e6,
                                "effect_ms": (seen - t0) / 1e6 if seen else None})
                cur = nxt
                if seen is None:  # make sure the next sample starts from a known state
                    wait_for(outcome_of(states[cur]), t0, 5.0)
                time.sleep(0.05)
        finally:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        eff = sorted(s["effect_ms"] for s in samples if s["effect_ms"] is not None)
        return {"kind": kind, "samples": samples, "n": len(samples),
                "missed": sum(1 for s in samples if s["effect_ms"] is None),
                "p50_ms": percentile(eff, 50), "p99_ms": percentile(eff, 99),
                "max_ms": eff[-1] if eff else None,
                "apply_p50_ms": median(s["apply_ms"] for s in samples)}

    def cli_apply_ms(self, objs: list[dict]) -> float:
        """Wall time of `nodemesh apply -f` for the same change (interpreter start-up included)."""
        import yaml

        t0 = time.monotonic()
        self.mesh.cli("apply", "-f", "-", input=yaml.safe_dump_all(objs))
        return (time.monotonic() - t0) * 1000

    def change(self) -> None:
        t0 = time.monotonic()
        out: dict[str, Any] = {}
        pt = workload.CHANGE_TARGET
        log(f"change: policy flips ({self.plan.change_samples} samples)")
        self.pin()
        out["policy"] = self.change_series(
            "NetworkPolicy", "client", ["taskset", "-c", str(LOADGEN_CPU), self.python, "-m",
                              "nodemesh.bench.poller", "tcp", self.targets["pt_vip"],
                              str(workload.SERVICE_PORT), str(self.plan.change_interval_ms)],
            [True, False], lambda allow: [workload.toggle_policy(pt, pt, allow)],
            lambda allow: "ok" if allow else "fail")
        out["policy"]["cli_apply_ms"] = self.cli_apply_ms([workload.toggle_policy(pt, pt, True)])
        if self.l7["available"]:
            log(f"change: route edits ({self.plan.change_samples} samples)")
            gens = list(range(self.plan.change_samples + 1))
            out["route"] = self.change_series(
                "HTTPRoute", "client-l7", ["taskset", "-c", str(LOADGEN_CPU), self.python, "-m",
                              "nodemesh.bench.poller", "http", self.targets["pt_l7_vip"],
                              str(workload.SERVICE_PORT), str(self.plan.change_interval_ms), "/"],
                gens, lambda g: [workload.http_route(f"{pt}-l7", f"{pt}-l7", header_gen=g)],
                lambda g: str(g))
        else:
            out["route"] = {"error": "nodemesh L7 unavailable: " + self.l7["reason"]}
        for k in ("policy", "route"):
            r = out[k]
            if "p50_ms" in r:
                log(f"  {k}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, missed {r['missed']}")
        out["seconds"] = round(time.monotonic() - t0, 1)
        self.results["change"] = out

    # ---- hostile neighbours ---------------------------------------------------------------
    def hostile_victim(self, seconds: float) -> dict[str, Any]:
        """The victim's view, from the client pod: sequential DNS lookups, then new TCP
        connections (nmrr crr) to the rr service, then a Service applied and synced."""
        r = self.mesh.exec("client", ["taskset", "-c", str(LOADGEN_CPU), self.python, "-c",
                                      HOSTILE_LOOKUPS, workload.HOSTILE_NAME,
                                      str(self.plan.hostile_lookups)], timeout=120, check=False)
        out: dict[str, Any] = {"dns": json.loads(r.out) if r.code == 0 else {"error": r.err[-300:]}}
        r = self.mesh.exec("client", ["taskset", "-c", str(LOADGEN_CPU), self.nmrr, "crr",
                                      self.targets["rr_vip"], str(workload.RR_PORT), "64",
                                      str(seconds / 2)], timeout=60 + seconds, check=False)
        out["tcp"] = json.loads(r.out.splitlines()[-1]) if r.code == 0 else {"error": r.err[-300:]}
        out["apply_synced_ms"] = self.apply_synced_ms()
        return out

    def apply_synced_ms(self) -> float | None:
        """apply of a Service → the node's agent reports the store's revision synced (ms)."""
        from nodemesh.cluster.agentclient import AgentClient
        from nodemesh.store import open_store

        svc = workload.service("hostile-probe", {"app": "nobody"}, port=80, target=80)
        svc["metadata"]["labels"] = {"gen": uuid.uuid4().hex[:8]}
        _, t1 = self.mesh.apply_timed([svc])
        rev = open_store(self.mesh.state_dir).revision()
        agent = AgentClient(os.path.join(self.mesh.node_dir("node1"), "agent.sock"), "node1")
        while time.monotonic_ns() - t1 < 30e9:
            with contextlib.suppress(Exception):
                if int(agent.get("/status")["datapath"]["syncedRevision"]) >= rev:
                    return round((time.monotonic_ns() - t1) / 1e6, 2)
            time.sleep(0.002)
        return None

    def hostile(self) -> None:
        """Victim p50/p99 with and without a flood from another pod on the node (one run per
        `runs`, conditions in a rotating order), with the agent's CPU during each."""
        t0 = time.monotonic()
        secs = self.plan.hostile_seconds
        floods: dict[str, list[str] | None] = {
            "none": None,
            "dns": [self.python, "-c", HOSTILE_DNS_FLOOD, str(secs * 3)],
            "connections": [self.nmrr, "flood", self.targets["rr_mesh"], "9", str(secs * 3)]}
        names = list(floods)
        cells: list[dict[str, Any]] = []
        log(f"hostile: {self.plan.runs} run(s) x {len(names)} conditions")
        for run in range(self.plan.runs):
            order = names[run % len(names):] + names[:run % len(names)]
            for name in order:
                self.pin()
                agent = self.mesh.agent_pid()
                cpu0 = proc_cpu_seconds([agent]) if agent else 0.0
                w0 = time.monotonic()
                flood = None
                if floods[name] is not None:
                    argv = ["taskset", "-c", str(SERVER_CPU), *floods[name]]  # type: ignore[misc]
                    flood = self.mesh.exec_popen("hostile", argv)
                    time.sleep(1.0)
                try:
                    victim = self.hostile_victim(secs)
                finally:
                    flood_out = ""
                    if flood is not None:
                        flood.terminate()
                        flood_out, _ = flood.communicate(timeout=60)
                wall = time.monotonic() - w0
                cpu = (proc_cpu_seconds([agent]) - cpu0) if agent else None
                cell = {"run": run, "flood": name, "victim": victim, "wall_s": round(wall, 2),
                        "agent_cpu_share": round(cpu / wall, 4) if cpu is not None else None,
                        "flood_out": flood_out.strip()[-200:]}
                cells.append(cell)
                dns, tcp = victim.get("dns") or {}, victim.get("tcp") or {}
                log(f"  {name}: dns p99 {dns.get('p99_ms')} ms lost {dns.get('lost')}, "
                    f"tcp p99 {tcp.get('p99_us')} us, apply→synced {victim['apply_synced_ms']} ms"
                    f", agent {cell['agent_cpu_share']}")
        self.mesh.cli("delete", "service", "hostile-probe", check=False)
        self.results["hostile"] = {"cells": cells, "seconds": round(time.monotonic() - t0, 1)}

    # ---- memory -----------------------------------------------------------------------------
    def memory(self) -> None:
        t0 = time.monotonic()
        py, ev = self.python, self.envoy
        points = self.memory_series(
            self.plain, self.mesh, "node1", self.plan.mem_points,
            ["echo", "nginx-l7", "echo-l7", "pt"], ["client-l7", "rr", "hostile"],
            lambda n: workload.sidecar_servers(py, ev, replicas=n, servers=("nginx",)),
            lambda n: workload.plain_servers(py, replicas=n))
        self.results["memory"] = {"points": points, "seconds": round(time.monotonic() - t0, 1)}

    def memory_series(self, plain: BenchCluster, mesh: BenchCluster, node: str,
                      counts: tuple[int, ...], mesh_deployments: list[str], mesh_pods: list[str],
                      sidecar_servers: Callable[[int], list[dict]],
                      mesh_servers: Callable[[int], list[dict]]) -> list[dict[str, Any]]:
        """The memory of the mesh's components on `node` when it holds exactly N meshed pods,
        for each N of `counts`: the deployments and pods named here (and sc-echo) go, then
        `sc-nginx` and `nginx` are scaled to make up N with the meshed pods still on the node
        (their objects come from `sidecar_servers(n)` and `mesh_servers(n)`, the same templates
        as before, so only the replicas change). Services, policies and routes stay."""
        if mesh_deployments:
            mesh.cli("delete", "deployment", *mesh_deployments, check=False)
        if mesh_pods:
            mesh.cli("delete", "pod", *mesh_pods, check=False, timeout=180)
        plain.cli("delete", "deployment", "sc-echo", check=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = ([p for p in mesh.pods() if _app(p) in mesh_deployments
                     or p["metadata"]["name"] in mesh_pods]
                    + [p for p in plain.pods() if _app(p) == "sc-echo"])
            if not left:
                break
            time.sleep(0.5)

        def live(c: BenchCluster) -> list[dict[str, Any]]:
            return [p for p in c.pods() if not p["metadata"].get("deletionTimestamp")]

        def on_node(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [p for p in pods if p["spec"].get("nodeName") == node]

        def deployment(objs: list[dict], name: str) -> list[dict]:
            return [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == name]

        points = []
        for n in counts:
            # Count what is on the node now; the scalable deployments make up the rest.
            plain_pods, mesh_pods_now = live(plain), live(mesh)
            sc_others = [p for p in on_node(plain_pods) if len(p["spec"].get("containers") or []) == 2
                         and _app(p) != "sc-nginx"]
            mesh_others = [p for p in on_node(mesh_pods_now) if _app(p) != "nginx"]
            sc_n = max(1, n - len(sc_others))
            mesh_n = max(1, n - len(mesh_others))
            log(f"memory: {n} pods on {node} of {plain.name}/{mesh.name} "
                f"(sc-nginx x {sc_n}, nginx x {mesh_n})")
            plain.apply(deployment(sidecar_servers(sc_n), "sc-nginx"))
            mesh.apply(deployment(mesh_servers(mesh_n), "nginx"))
            timeout = 60 + 3 * n
            plain.wait_ready(expected=len(plain_pods) + sc_n
                             - sum(1 for p in plain_pods if _app(p) == "sc-nginx"), timeout=timeout)
            mesh.wait_ready(expected=len(mesh_pods_now) + mesh_n
                            - sum(1 for p in mesh_pods_now if _app(p) == "nginx"), timeout=timeout)
            time.sleep(self.plan.mem_settle)  # let the new Envoys and the agents settle
            points.append(self.memory_point(plain, mesh, node, n))
        return points

    @staticmethod
    def memory_point(plain: BenchCluster, mesh: BenchCluster, node: str, n: int) -> dict[str, Any]:
        sidecars = plain.sidecar_envoy_pids(node)
        agent = mesh.agent_pid(node)
        maps = memory.bpf_maps_memlock(os.path.join(mesh.cfg.bpffs, node))
        plain_agent = plain.agent_pid(node)
        point = {
            "pods": n, "node": node,
            "sidecar": {**memory.processes_memory(sidecars), "meshed_pods": len(sidecars)},
            "nodemesh": {
                "agent": memory.processes_memory([agent] if agent else []),
                "envoy": memory.processes_memory(mesh.node_envoy_pids(node)),
                "envoy_heap": mesh.envoy_memory(node),
                "bpf_maps": maps,
                "pods": sum(1 for p in mesh.pods() if p["spec"].get("nodeName") == node),
                "certificates": mesh.certificates(node),
            },
            "runtime_only_agent": memory.processes_memory([plain_agent] if plain_agent else []),
        }
        nm = point["nodemesh"]
        for k in ("rss", "pss", "private"):
            nm[f"total_{k}"] = nm["agent"][k] + nm["envoy"][k] + maps["bytes"]
        log(f"  {n} pods: sidecars PSS {point['sidecar']['pss'] / 2**20:.0f} MiB "
            f"({len(sidecars)} Envoys), nodemesh PSS+maps {nm['total_pss'] / 2**20:.0f} MiB "
            f"(agent {nm['agent']['pss'] / 2**20:.0f}, envoy {nm['envoy']['pss'] / 2**20:.0f}, "
            f"maps {maps['bytes'] / 2**20:.0f}; {nm['certificates']} certificate(s))")
        return point

    # ---- mTLS across nodes --------------------------------------------------------------------
    def setup_mtls(self) -> dict[str, Any]:
        """The mTLS section's 2-node clusters: clients on node1, servers on node2."""
        t0 = time.monotonic()
        # The single-node clusters are done with: their agents and Envoys would share the
        # servers' CPU. They go down while the new ones come up (nothing is measured meanwhile).
        done = [c for c in (self.plain, self.mesh) if c.is_up]
        log(f"mtls clusters: {self.plain2.name} (--datapath none, 2 nodes), {self.mesh2.name} "
            "(--datapath bpf, 2 nodes, mutual TLS on)"
            + (f"; {', '.join(c.name for c in done)} down" if done else ""))
        in_parallel(*(c.down for c in done), self.plain2.up, self.mesh2.up)
        servers = tuple(s for s in workload.SERVERS if any(w.server == s for w in self.plan.mtls_workloads))
        self.certs = sidecar_certs(os.path.join(self.work, "sidecar-ca"))
        server_tls = self.certs[workload.SERVER_SA]
        py, ev = self.python, self.envoy
        plain_objs = workload.mtls_plain(py, ev, servers, server_tls)
        mesh_objs = workload.mtls_mesh(py, servers)
        self.plain2.apply(plain_objs)
        self.mesh2.apply(mesh_objs)
        self.plain2.wait_ready(expected=workload.expected_pods(plain_objs))
        # The sidecar client last: its outbound clusters list the servers' addresses.
        self.plain2.apply([workload.mtls_sidecar_client(
            ev, self.outbound(self.plain2, servers, server_tls.spiffe_id),
            self.certs[workload.CLIENT_SA])])
        self.plain2.wait_ready(expected=workload.expected_pods(plain_objs) + 1)
        self.mesh2.wait_ready(expected=workload.expected_pods(mesh_objs))
        self.mtls_targets = self.prepare_clients(self.plain2, self.mesh2, servers)
        l7 = self.detect_l7(self.mesh2, self.mtls_targets["l7"])
        self.pin()
        return {"setup_seconds": round(time.monotonic() - t0, 1), "servers": list(servers),
                "targets": self.mtls_targets, "l7": l7,
                "sidecar_identities": {sa: t.spiffe_id for sa, t in self.certs.items()},
                "nodemesh_certificates": {n: self.mesh2.certificates(n)
                                          for n in self.mesh2.node_names}}

    def mtls(self) -> None:
        t0 = time.monotonic()
        out: dict[str, Any] = {"cells": [], "discarded": []}
        self.results["mtls"] = out  # filled in as we go: an interrupted run keeps what it has
        out.update(self.setup_mtls())
        modes = [m for m in self.modes if m in MTLS_MODES
                 and (m != "l7-mtls" or out["l7"]["available"])]
        self.run_cells("mtls", modes, self.plan.mtls_workloads,
                       lambda m, w, r: self.traffic_cell(self.endpoint(m, w.server, mtls=True),
                                                         m, w, r, self.plan.mtls_rates),
                       out["cells"], out["discarded"])
        out["traffic_seconds"] = round(time.monotonic() - t0, 1)
        py, ev, servers = self.python, self.envoy, tuple(out["servers"])
        server_tls = self.certs[workload.SERVER_SA]
        out["memory"] = {"points": self.memory_series(
            self.plain2, self.mesh2, workload.SERVER_NODE, self.plan.mtls_mem_points,
            # Servers other than nginx go; nginx-l7 stays (its pods count among the N).
            [d for s in servers if s != "nginx" for d in (s, f"{s}-l7")], [],
            lambda n: workload.mtls_plain(py, ev, servers, server_tls, replicas=n),
            lambda n: workload.mtls_mesh(py, servers, replicas=n))}
        out["seconds"] = round(time.monotonic() - t0, 1)

    # ---- teardown ---------------------------------------------------------------------------
    def teardown(self) -> list[str]:
        left: list[str] = []
        with contextlib.suppress(Exception):  # a failed down shows in the leftovers below
            in_parallel(*(c.down for c in self.clusters if c.is_up))
        for c in self.clusters:
            if c.is_up:  # its down failed: once more, alone
                c.down()
            if os.path.isdir(c.state_dir) and not c.is_up:
                shutil.rmtree(c.state_dir, ignore_errors=True)
            left += c.leftovers()
        shutil.rmtree(self.work, ignore_errors=True)
        if os.path.exists(self.work):
            left.append(f"work dir {self.work}")
        reap_children()
        return left


def _app(pod: dict[str, Any]) -> str:
    return (pod["metadata"].get("labels") or {}).get("app", "")


def disturbed(foreign_cpus: float, lag_p99_us: float) -> str:
    """Why a cell's measurement was disturbed by other work ("" when it was not)."""
    why = []
    if foreign_cpus > FOREIGN_MAX_CPUS:
        why.append(f"other processes used {foreign_cpus:.2f} CPUs")
    if lag_p99_us > LAG_MAX_US:
        why.append(f"the generator was stalled (send lag p99 {lag_p99_us:.0f} us)")
    return "; ".join(why)


def _plan_json(p: Plan) -> dict[str, Any]:
    d = asdict(p)
    d["workloads"] = [w.name for w in p.workloads]
    return d


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options: `nodemesh bench ...` and `python -m nodemesh.bench ...` both
    hand their arguments here unchanged."""
    ap = argparse.ArgumentParser(
        prog="nodemesh bench",
        description="Benchmark no mesh / sidecar model / nodemesh L4 / nodemesh L7 side by side "
                    "in local clusters of its own (needs root; removes everything it created).")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: 1 run, 2 workloads, short phases, 10 pods for memory "
                         "(under 3 minutes)")
    ap.add_argument("--out", metavar="DIR",
                    help="write results.json, summary.md and the plots here (default: the raw "
                         "JSON in bench/results/, the plots in docs/bench/)")
    ap.add_argument("--runs", type=int, help="runs per cell (default 5, --quick 1)")
    ap.add_argument("--modes", default=",".join(ALL_MODES),
                    help=f"comma-separated subset of {','.join(ALL_MODES)} (the traffic section "
                         f"runs those of {','.join(MODES)}, the mtls section those of "
                         f"{','.join(MTLS_MODES)})")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="do not measure: write the summary and plots of an earlier run again")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        return render(args.render, args.out, not args.no_plots)
    if os.geteuid() != 0:
        print("error: nodemesh bench needs root (network namespaces, cgroups, BPF)",
              file=sys.stderr)
        return 1
    modes = tuple(m for m in args.modes.split(",") if m)
    sections = tuple(s for s in args.sections.split(",") if s)
    bad = [m for m in modes if m not in ALL_MODES] + [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: unknown mode or section: {', '.join(bad)}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    if args.runs:
        plan = replace(plan, runs=args.runs, dp_runs=args.runs)
    if shutil.which("wrk") is None or shutil.which("cc") is None or shutil.which("bpftool") is None:
        print("error: nodemesh bench needs wrk, cc and bpftool (run `make setup`)", file=sys.stderr)
        return 1

    from nodemesh.bench import report

    set_child_subreaper()
    os.sched_setaffinity(0, {LOADGEN_CPU})
    os.setpriority(os.PRIO_PROCESS, 0, BENCH_NICE)  # inherited by everything started from here
    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    t0 = time.monotonic()
    procs_before = all_process_cpu()
    bench = Bench(plan, modes, sections)
    bench.results["environment"] = environment()
    bench.results["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    failed: str | None = None
    try:
        bench.build_tools()
        if any(s in sections for s in SINGLE_NODE_SECTIONS):
            bench.setup()
        for section in SECTIONS:
            if section in sections:
                getattr(bench, section)()
    except (Exception, KeyboardInterrupt) as e:
        failed = f"{type(e).__name__}: {e}"
        log(f"failed: {failed}")
    finally:
        log("tearing down")
        left = bench.teardown()
    res = bench.results
    res["leftovers"] = left
    res["retried_cells"] = bench.retried
    res["foreign_max_cpus"] = FOREIGN_MAX_CPUS
    res["lag_max_us"] = LAG_MAX_US
    res["failed"] = failed
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["background"] = _background(procs_before, all_process_cpu(), bench, res["seconds"])
    if left:
        log(f"LEFT BEHIND: {left}")
    summary = report.summarize(res)
    res["summary"] = summary
    out_dir = args.out
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started)) + ("-quick" if plan.quick else "")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        json_path = os.path.join(out_dir, "results.json")
        md_path = os.path.join(out_dir, "summary.md")
        plot_dir = out_dir
    else:
        os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
        json_path = os.path.join(REPO, "bench", "results", f"{stamp}.json")
        md_path = os.path.join(REPO, "bench", "results", f"{stamp}.md")
        plot_dir = os.path.join(REPO, "docs", "bench")
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    with open(md_path, "w") as f:
        f.write(report.markdown(res))
    if not args.no_plots:
        try:
            res["plots"] = report.plots(res, plot_dir)
        except Exception as e:  # plots are a convenience; the numbers are in the JSON
            log(f"plots failed: {type(e).__name__}: {e}")
    log(f"results: {json_path}; summary: {md_path}; took {res['seconds']:.0f}s")
    print(report.markdown(res))
    problems = report.problems(res)
    for p in problems:
        log(f"problem: {p}")
    return 1 if (failed or left or problems) else 0


def render(path: str, out_dir: str | None, with_plots: bool) -> int:
    """Summary (next to the JSON, or in `out_dir`) and plots (docs/bench/, or `out_dir`) of an
    earlier run's raw results."""
    from nodemesh.bench import report

    with open(path) as f:
        res = json.load(f)
    res["summary"] = report.summarize(res)
    md = os.path.join(out_dir, "summary.md") if out_dir else os.path.splitext(path)[0] + ".md"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(md, "w") as f:
        f.write(report.markdown(res))
    if with_plots:
        report.plots(res, out_dir or os.path.join(REPO, "docs", "bench"))
    print(f"wrote {md}")
    return 0


def _background(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                bench: Bench, seconds: float) -> dict[str, Any]:
    """CPU used by processes that are not the benchmark's while it ran (the VM may be shared)."""
    mine = (*(c.state_dir for c in bench.clusters), bench.work, "nodemesh.bench", "wrk ")
    others = []
    for pid, (cmd, cpu) in after.items():
        if any(m in cmd for m in mine) or pid == os.getpid():
            continue
        delta = cpu - before.get(pid, (cmd, 0.0))[1] if pid in before else cpu
        if delta >= 0.5:
            others.append({"pid": pid, "cmd": cmd, "cpu_s": round(delta, 1)})
    others.sort(key=lambda x: -x["cpu_s"])
    return {"other_processes_cpu_s": round(sum(o["cpu_s"] for o in others), 1),
            "wall_s": seconds, "top": others[:8]}
