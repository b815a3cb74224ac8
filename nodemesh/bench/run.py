"""`python -m nodemesh.bench`: the side-by-side benchmark (no mesh / sidecar model / nodemesh L4 /
nodemesh L7), run in local clusters of its own and torn down at the end.

Sections, in this order (see docs/benchmarks.md for the method and what the numbers mean):

1. traffic: for every run and workload, the four modes back to back (the order rotates by one
   each run); each cell runs wrk (closed loop) and the open-loop generator at fixed rates, and
   reads the CPU time of the mesh's own processes around each phase;
2. datapath: TCP round trips (one connection; connect/request/close) and new connections per
   second, pod→pod and pod→service, ``--datapath bpf`` against ``--datapath none``;
3. change: apply → first observed effect of a policy change and of a route change;
4. memory: the mesh's processes (and BPF maps) at 10, 50 and 100 pods on the node.

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
from dataclasses import asdict, dataclass, replace
from typing import Any

from nodemesh.bench import memory, workload
from nodemesh.bench.cluster import BenchCluster
from nodemesh.bench.loadgen import WRK_LUA, cpu_busy_seconds, proc_cpu_seconds
from nodemesh.bench.stats import median, percentile
from nodemesh.bench.workload import MODES, Workload
from nodemesh.cluster.procs import reap_children, set_child_subreaper

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADGEN_CPU = 1
SERVER_CPU = 0
BENCH_NICE = -10  # every process of the benchmark: other work on a shared VM disturbs it less
QUIET_BUSY_CPUS = 0.45  # busy CPUs (of 2) below which the machine counts as quiet
FOREIGN_MAX_CPUS = 0.25  # other processes' CPU during a cell above which it is repeated
LAG_MAX_US = 200.0  # generator send lag p99 above which the cell is repeated (it was stalled)


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
    mem_points: tuple[int, ...]
    gate_max_wait: float
    gate_total: float
    retries: int  # repeats of a disturbed cell
    retries_total: int  # and of all cells together


FULL = Plan(quick=False, runs=5, workloads=workload.ALL_WORKLOADS, wrk_seconds=2.0,
            open_seconds=2.0, warmup=0.25, rates=(500, 2000), wrk_connections=12, pool=32,
            dp_runs=5, dp_seconds=1.5, dp_placements=("same-cpu", "cross-cpu"), dp_parallel=8,
            change_samples=100, change_interval_ms=2.0, mem_points=(10, 50, 100),
            gate_max_wait=15.0, gate_total=300.0, retries=2,
            retries_total=60)
QUICK = replace(FULL, quick=True, runs=1,
                workloads=(Workload("nginx", "keepalive", "small"), Workload("echo", "close", "16k")),
                wrk_seconds=1.0, open_seconds=1.0, warmup=0.2, dp_runs=1, dp_seconds=0.5,
                dp_placements=("same-cpu",), change_samples=6, mem_points=(10,),
                gate_max_wait=2.0, gate_total=10.0, retries=0,
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
        self.plain = BenchCluster(f"nmb{sfx}p", tempfile.mkdtemp(prefix=f"nodemesh-nmb{sfx}p-"),
                                  "none", log=log)
        self.mesh = BenchCluster(f"nmb{sfx}m", tempfile.mkdtemp(prefix=f"nodemesh-nmb{sfx}m-"),
                                 "bpf", log=log)
        self.nmrr = os.path.join(self.work, "nmrr")
        self.lua = os.path.join(self.work, "wrk.lua")
        self.l7: dict[str, Any] = {"available": False, "reason": "not checked"}
        self.gate_spent = 0.0
        self.wait_mode: dict[str, float] = {"spin_us": 1e9, "presend_us": 0}
        self.meter = ForeignMeter(lambda: set(self.plain.all_pids()) | set(self.mesh.all_pids()))
        self.retried = 0
        self.results: dict[str, Any] = {"plan": _plan_json(plan), "modes": list(modes),
                                        "work_dir": self.work,
                                        "clusters": {"plain": self.plain.name,
                                                     "mesh": self.mesh.name}}

    # ---- setup ----------------------------------------------------------------------------
    def build_tools(self) -> None:
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nmrr.c")
        subprocess.run(["cc", "-O2", "-Wall", "-o", self.nmrr, src], check=True,
                       capture_output=True, text=True)
        with open(self.lua, "w") as f:
            f.write(WRK_LUA)
        os.chmod(self.lua, 0o644)

    def setup(self) -> None:
        t0 = time.monotonic()
        self.build_tools()
        log(f"clusters: {self.plain.name} (--datapath none), {self.mesh.name} (--datapath bpf)")
        self.plain.up()
        self.mesh.up()
        py, ev = self.python, self.envoy
        rr_svc = workload.service("rr", {"app": "rr"}, port=workload.RR_PORT,
                                  target=workload.RR_PORT)
        self.plain.apply([*workload.plain_servers(py), workload.client_pod(), workload.calib_pod(),
                          workload.rr_pod(self.nmrr), rr_svc, *workload.sidecar_servers(py, ev)])
        n_plain, n_mesh = 15, 16  # pods in what is applied here (see workload.py)
        policy = workload.allow_client_policy(
            "allow-client", ["nginx", "echo", "nginx-l7", "echo-l7", "rr"],
            [workload.SERVER_PORT, workload.RR_PORT])
        self.mesh.apply([*workload.plain_servers(py), workload.client_pod(),
                         workload.rr_pod(self.nmrr), rr_svc, policy, *workload.l7_workload(py),
                         *workload.change_target(py)])
        self.plain.wait_ready(expected=n_plain)
        outbound = [workload.OutboundService(f"sc-{s}", self.plain.vip(f"sc-{s}"),
                                             workload.SERVICE_PORT,
                                             tuple((ip, workload.SERVER_PORT)
                                                   for ip in self.plain.pod_ips(f"sc-{s}")))
                    for s in workload.SERVERS]
        self.plain.apply([workload.sidecar_client(ev, outbound)])
        self.plain.wait_ready(expected=n_plain + 1)
        self.mesh.wait_ready(expected=n_mesh)
        tw = ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"]
        self.plain.exec("client", tw)
        self.plain.exec("sc-client", tw, container="app")
        self.mesh.exec("client", tw)
        self.mesh.exec("client-l7", tw)
        self.targets = {
            "plain": {s: self.plain.pod_ips(s) for s in workload.SERVERS},
            "sidecar": {s: self.plain.vip(f"sc-{s}") for s in workload.SERVERS},
            "l4": {s: self.mesh.vip(s) for s in workload.SERVERS},
            "l7": {s: self.mesh.vip(f"{s}-l7") for s in workload.SERVERS},
            "rr_plain": self.plain.pod_ips("rr")[0], "rr_mesh": self.mesh.pod_ips("rr")[0],
            "rr_vip": self.mesh.vip("rr"), "pt_vip": self.mesh.vip("pt"),
            "pt_l7_vip": self.mesh.vip("pt-l7"),
        }
        self.l7 = self.detect_l7()
        log(f"nodemesh L7: {'available' if self.l7['available'] else 'UNAVAILABLE'}"
            f" ({self.l7['reason']})")
        self.pin()
        self.results["setup_seconds"] = round(time.monotonic() - t0, 1)
        self.results["targets"] = self.targets
        self.results["l7"] = self.l7

    def pin(self) -> None:
        for c in (self.plain, self.mesh):
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

    def node_envoy_requests(self) -> int | None:
        """Requests the mesh cluster's node Envoy has served (downstream, admin excluded)."""
        from nodemesh.proxy.envoy import AdminClient

        pidfile = os.path.join(self.mesh.node_dir(), "envoy", "envoy.json")
        try:
            with open(pidfile) as f:
                admin = json.load(f).get("admin") or {}
            client = AdminClient(socket_path=admin.get("socket_path"),
                                 host=admin.get("host", "127.0.0.1"),
                                 port=int(admin.get("port", 15000)), timeout=3)
            stats = client.stats(filter="downstream_rq_total")
        except Exception:  # no Envoy, no admin: the caller reports "unknown"
            return None
        return int(sum(v for k, v in stats.items()
                       if k.startswith("http.") and not k.startswith("http.admin.")))

    def detect_l7(self) -> dict[str, Any]:
        """Is a route on a Service honoured by the node's Envoy? Route status Accepted=True, a
        200 through the route, and evidence of the proxy in the exchange."""
        names = [f"{s}-l7" for s in workload.SERVERS]
        deadline = time.monotonic() + (10 if self.plan.quick else 20)
        status: dict[str, Any] = {}
        while True:
            accepted = True
            for n in names:
                r = self.mesh.get("httproute", n)
                conds = [c for p in (r.get("status") or {}).get("parents") or []
                         for c in p.get("conditions") or []]
                status[n] = conds
                accepted &= any(c.get("type") == "Accepted" and c.get("status") == "True"
                                for c in conds)
            before = self.node_envoy_requests()
            probe = json.loads(self.mesh.exec("client-l7", [self.python, "-c", self.PROBE, json.dumps(
                {n: self.targets["l7"][n[:-3]] for n in names})]).out)
            after = self.node_envoy_requests()
            ok = all(p.get("status") == 200 for p in probe.values())
            echo = probe.get("echo-l7", {})
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
    def mode_client(self, mode: str) -> tuple[BenchCluster, str, str | None]:
        if mode == "loopback":
            return self.plain, "calib", None
        if mode == "nomesh":
            return self.plain, "client", None
        if mode == "sidecar":
            return self.plain, "sc-client", "app"
        if mode == "l7":
            return self.mesh, "client-l7", None
        return self.mesh, "client", None

    def mode_targets(self, mode: str, server: str) -> tuple[list[str], str]:
        """(targets "ip:port", Host header) of the workload's servers in `mode`."""
        if mode == "loopback":
            return [f"127.0.0.1:{workload.SERVER_PORT}"], "localhost"
        if mode == "nomesh":
            return [f"{ip}:{workload.SERVER_PORT}" for ip in self.targets["plain"][server]], server
        key = {"sidecar": "sidecar", "l4": "l4", "l7": "l7"}[mode]
        host = {"sidecar": f"sc-{server}", "l4": server, "l7": f"{server}-l7"}[mode]
        return [f"{self.targets[key][server]}:{workload.SERVICE_PORT}"], host

    def mode_cpu_pids(self, mode: str) -> list[int]:
        if mode in ("nomesh", "loopback"):
            return []
        if mode == "sidecar":
            return self.plain.sidecar_envoy_pids()
        return self.mesh.mesh_pids()

    def cpu_roles(self, mode: str, pids: list[int]) -> dict[str, str]:
        """What each measured process is: the agent, the node Envoy or a sidecar Envoy."""
        if mode == "sidecar":
            return {str(p): "sidecar Envoy" for p in pids}
        agent = self.mesh.agent_pid()
        return {str(p): "agent" if p == agent else "node Envoy" for p in pids}

    def traffic_cell(self, mode: str, w: Workload, run: int) -> dict[str, Any]:
        p = self.plan
        cluster, pod, container = self.mode_client(mode)
        targets, host = self.mode_targets(mode, w.server)
        gate = self.quiet_gate()
        self.pin()
        close = w.conn == "close"
        wrk_targets = targets * 3 if len(targets) == 1 else targets
        phases: list[dict[str, Any]] = [{
            "kind": "wrk", "targets": wrk_targets, "threads": len(wrk_targets), "host": host,
            "path": w.path, "connections": p.wrk_connections, "seconds": p.wrk_seconds,
            "close": close, "lua": self.lua}]
        for rate in p.rates:
            phases.append({"kind": "open", "targets": targets, "host": host, "path": w.path,
                           "rate": rate, "seconds": p.open_seconds, "warmup": p.warmup,
                           "close": close, "pool": p.pool, **self.wait_mode})
        pids = self.mode_cpu_pids(mode)
        roles = self.cpu_roles(mode, pids)
        spec = {"cpu_pids": pids, "phases": phases}
        before = self.node_envoy_requests() if mode == "l7" else None
        t0 = time.monotonic()
        self.meter.start()
        r = cluster.exec(pod, ["taskset", "-c", str(LOADGEN_CPU), self.python, "-m",
                               "nodemesh.bench.loadgen", json.dumps(spec)],
                         container=container, timeout=120 + p.wrk_seconds
                         + len(p.rates) * (p.open_seconds + 5), check=False)
        cell: dict[str, Any] = {"mode": mode, "workload": w.name, "run": run, "gate": gate,
                                **self.meter.stop(),
                                "cpu_pids": len(pids), "cpu_roles": roles,
                                "seconds": round(time.monotonic() - t0, 2)}
        try:
            cell["phases"] = json.loads(r.out.strip().splitlines()[-1])["phases"]
        except (ValueError, IndexError):
            cell["error"] = f"loadgen exited {r.code}: {r.err.strip()[-500:]}"
            cell["phases"] = []
        if mode == "l7":
            after = self.node_envoy_requests()
            cell["node_envoy_requests"] = (after - before) if None not in (before, after) else None
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

    def traffic(self) -> None:
        p = self.plan
        modes = [m for m in self.modes if m != "l7" or self.l7["available"]]
        cells: list[dict[str, Any]] = []
        discarded: list[dict[str, Any]] = []
        total = p.runs * len(p.workloads) * len(modes)
        log(f"traffic: {p.runs} run(s) x {len(p.workloads)} workload(s) x {len(modes)} mode(s) "
            f"= {total} cells")
        t0 = time.monotonic()
        calibration: list[dict[str, Any]] = []
        # Filled in as we go: an interrupted run still reports what it measured.
        self.results["calibration"] = {"cells": calibration}
        self.results["traffic"] = {"cells": cells, "discarded": discarded}
        calib = [w for w in workload.ALL_WORKLOADS if w.server == "nginx" and w.body == "small"
                 and (w in p.workloads or w.conn == "keepalive")]
        for run in range(p.runs):
            # The generators against nginx on the pod's loopback: the floor they measure.
            for w in calib:
                cell = self.traffic_cell("loopback", w, run)
                calibration.append(cell)
                log(f"  calibration run {run + 1} {w.name} on loopback: " + ", ".join(
                    f"{x['phase']['kind']}@{x['phase'].get('rate', 'max')} p50 "
                    f"{x.get('latency_us', {}).get('p50', 0):.0f}us" for x in cell["phases"]))
            order = modes[run % len(modes):] + modes[:run % len(modes)]
            for w in p.workloads:
                for mode in order:
                    cell = self.repeat_if_disturbed(
                        lambda mode=mode, w=w, run=run: self.traffic_cell(mode, w, run), discarded)
                    cells.append(cell)
                    ph = cell["phases"]
                    summary = ", ".join(
                        f"{x['phase']['kind']}@{x['phase'].get('rate', 'max')}"
                        f" {x.get('achieved_rps', 0):.0f}/s p99 {x.get('latency_us', {}).get('p99', 0):.0f}us"
                        f" err {x.get('errors', '?')}" for x in ph) or cell.get("error", "")
                    log(f"  [{len(cells)}/{total}] run {run + 1} {w.name} {mode}: {summary}")
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

    # ---- memory -----------------------------------------------------------------------------
    def memory(self) -> None:
        t0 = time.monotonic()
        points = []
        # Each node must hold exactly N meshed pods: keep one client and the nginx servers
        # (scaled below), remove the rest. Services, policies and routes stay.
        self.mesh.cli("delete", "deployment", "echo", "nginx-l7", "echo-l7", "pt", check=False)
        self.mesh.cli("delete", "pod", "client-l7", "rr", check=False, timeout=180)
        self.plain.cli("delete", "deployment", "sc-echo", check=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = ([p for p in self.mesh.pods() if _app(p) not in ("nginx", "")]
                    + [p for p in self.plain.pods() if _app(p) == "sc-echo"])
            if not left:
                break
            time.sleep(0.5)
        for n in self.plan.mem_points:
            # Count what is on the node now; the scalable deployments make up the rest.
            plain = [p for p in self.plain.pods() if not p["metadata"].get("deletionTimestamp")]
            sc_others = [p for p in plain if len(p["spec"].get("containers") or []) == 2
                         and _app(p) != "sc-nginx"]
            mesh = [p for p in self.mesh.pods() if not p["metadata"].get("deletionTimestamp")]
            mesh_others = [p for p in mesh if _app(p) != "nginx"]
            sc_n = max(1, n - len(sc_others))
            mesh_n = max(1, n - len(mesh_others))
            log(f"memory: {n} pods per node (sc-nginx x {sc_n}, nginx x {mesh_n})")
            py, ev = self.python, self.envoy
            self.plain.apply([o for o in workload.sidecar_servers(py, ev, replicas=sc_n,
                                                                   only="nginx")
                              if o["kind"] == "Deployment"])
            self.mesh.apply([o for o in workload.plain_servers(py, replicas=mesh_n)
                             if o["kind"] == "Deployment" and o["metadata"]["name"] == "nginx"])
            timeout = 60 + 3 * n
            self.plain.wait_ready(expected=len(plain) - len([p for p in plain if _app(p) == "sc-nginx"])
                                  + sc_n, timeout=timeout)
            self.mesh.wait_ready(expected=len(mesh_others) + mesh_n, timeout=timeout)
            time.sleep(3.0)  # let the new Envoys and the agents settle
            sidecars = self.plain.sidecar_envoy_pids()
            agent = self.mesh.agent_pid()
            envoys = self.mesh.node_envoy_pids()
            maps = memory.bpf_maps_memlock(os.path.join(self.mesh.cfg.bpffs, "node1"))
            plain_agent = self.plain.agent_pid()
            point = {
                "pods": n,
                "sidecar": {**memory.processes_memory(sidecars), "meshed_pods": len(sidecars)},
                "nodemesh": {
                    "agent": memory.processes_memory([agent] if agent else []),
                    "envoy": memory.processes_memory(envoys),
                    "bpf_maps": maps,
                    "pods": len(self.mesh.pods()),
                },
                "runtime_only_agent": memory.processes_memory([plain_agent] if plain_agent else []),
            }
            nm = point["nodemesh"]
            for k in ("rss", "pss", "private"):
                nm[f"total_{k}"] = nm["agent"][k] + nm["envoy"][k] + maps["bytes"]
            points.append(point)
            log(f"  {n} pods: sidecars PSS {point['sidecar']['pss'] / 2**20:.0f} MiB "
                f"({len(sidecars)} Envoys), nodemesh PSS+maps {nm['total_pss'] / 2**20:.0f} MiB "
                f"(agent {nm['agent']['pss'] / 2**20:.0f}, envoy {nm['envoy']['pss'] / 2**20:.0f}, "
                f"maps {maps['bytes'] / 2**20:.0f})")
        self.results["memory"] = {"points": points, "seconds": round(time.monotonic() - t0, 1)}

    # ---- teardown ---------------------------------------------------------------------------
    def teardown(self) -> list[str]:
        left: list[str] = []
        for c in (self.plain, self.mesh):
            if os.path.exists(os.path.join(c.state_dir, "cluster.json")):
                c.down()
            elif os.path.isdir(c.state_dir):
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
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--sections", default="traffic,datapath,change,memory",
                    help="comma-separated subset of traffic,datapath,change,memory")
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
    bad = [m for m in modes if m not in MODES] + [
        s for s in sections if s not in ("traffic", "datapath", "change", "memory")]
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
        bench.setup()
        for section in ("traffic", "datapath", "change", "memory"):
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
    mine = (bench.plain.state_dir, bench.mesh.state_dir, bench.work, "nodemesh.bench",
            "nodemesh --state-dir " + bench.plain.state_dir, "wrk ")
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
