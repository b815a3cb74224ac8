"""The `scale` section of `nodemesh bench`: many Services with EndpointSlices, on etcd.

A 2-node cluster on etcd (one member) gets Services without a selector, each with one
EndpointSlice of 10 ready endpoints (addresses in 10.200.0.0/14 that no pod has: nothing is sent
to them, the section measures the control plane), in steps up to 100, 1,000 and 5,000 services.
At each step:

- **convergence**: from the start of the step's writes (batches of `BATCH` services and their
  slices, one transaction each) until every node's agent has programmed the store's revision
  (its datapath's ``syncedRevision``, what ``/status`` reports);
- **change**: `CHANGES` times, one endpoint of one service's slice moves to another address;
  from the start of that write until every node's agent has programmed its revision (p50, p99;
  target at 1,000 services: p99 ≤ 100 ms);
- **relist after compaction**: etcd is compacted past a watcher's revision; the informer's own
  path (the watch answers `Compacted`, then a full list) is timed (target ≤ 2 s);
- **agent RSS** of each node (target at 1,000 services ≤ 150 MB), and the agents' last
  reconcile step's duration.

The measuring runs in a process of its own (`python -m nodemesh.bench.scale STATE_DIR ...`),
which moves into the underlay's network namespace before it starts a thread, as the CLI does,
to reach the cluster's etcd; it talks to the agents over their unix sockets.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from typing import Any

from nodemesh.bench.stats import percentile

ENDPOINTS = 10
# Services (and as many slices) per transaction: an etcd transaction that reads more than 100
# keys compares the whole prefix, so any other write (a lease renewal) would make it conflict.
BATCH = 25
CHANGES = 60
STEPS = (100, 1000, 5000)
QUICK_STEPS = (20, 100)
ADDRESS_BASE = int(ipaddress.ip_address("10.200.0.0"))
VIP_BASE = int(ipaddress.ip_address("10.96.16.0"))
TARGET_CHANGE_P99_MS = 100.0
TARGET_RELIST_S = 2.0
TARGET_AGENT_RSS_MB = 150.0
TARGET_AT = 1000
# Every scale point's LB tables must fit: 5,000 services of 10 backends (and room to spare).
MAP_SIZES = {"nm_lb4_svc": 131072, "nm_lb4_be": 131072, "nm_lb4_revnat": 65536}


# ---- objects (pure) -----------------------------------------------------------------------------
def address(i: int, j: int, shift: int = 0) -> str:
    """Endpoint j of service i (shifted: the same endpoint moved, for a change)."""
    return str(ipaddress.ip_address(ADDRESS_BASE + (i * ENDPOINTS + j + shift * 7919) % (1 << 18)))


def service(i: int) -> dict[str, Any]:
    """Service i, with a ClusterIP of its own (10.96.16.0 + i: the driver writes it as a
    controller would, without the apply's allocation, which reads every Service)."""
    vip = str(ipaddress.ip_address(VIP_BASE + i))
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"scale-{i}"},
            "spec": {"clusterIP": vip, "ports": [{"name": "http", "port": 80}]}}


def endpoint_slice(i: int, nodes: list[str], moved: int = 0) -> dict[str, Any]:
    """Service i's slice; `moved` > 0 moves its first endpoint elsewhere (a change)."""
    eps = []
    for j in range(ENDPOINTS):
        ip = address(i, j, moved if j == 0 else 0)
        eps.append({"addresses": [ip], "conditions": {"ready": True},
                    "nodeName": nodes[j % len(nodes)]})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"scale-{i}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": f"scale-{i}"}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


# ---- the measuring process ---------------------------------------------------------------------
class _Driver:
    def __init__(self, state_dir: str) -> None:
        from nodemesh.cluster.agentclient import AgentClient
        from nodemesh.cluster.config import load_cluster
        from nodemesh.store import open_store

        self.cfg = load_cluster(state_dir)
        self.store = open_store(state_dir)
        self.nodes = [n.name for n in self.cfg.nodes]
        self.agents = {n: AgentClient(self.cfg.agent_socket(n), n, timeout=5) for n in self.nodes}
        self.count = 0

    def synced(self) -> dict[str, int]:
        out = {}
        for n, a in self.agents.items():
            try:
                out[n] = int(a.get("/status")["datapath"]["syncedRevision"])
            except Exception:
                out[n] = -1
        return out

    def wait_synced(self, revision: int, timeout: float, poll: float = 0.005) -> float | None:
        """Seconds until every agent programmed `revision` (None: not within `timeout`)."""
        t0 = time.monotonic()
        pending = set(self.nodes)
        while pending:
            got = self.synced()
            pending = {n for n in pending if got[n] < revision}
            if not pending:
                break
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(poll)
        return time.monotonic() - t0

    def write(self, objs: list[dict[str, Any]]) -> int:
        """Validated objects written in one transaction (as a controller writes them; a Service
        brings its ClusterIP); the revision of the write."""
        from nodemesh.model.validate import validate_objects

        valid = validate_objects(objs, "scale")
        for attempt in self.store.retrying():
            with attempt as t:
                for o in valid:
                    t.put(o)
        return self.store.revision()

    def put(self, obj: dict[str, Any]) -> int:
        return self.write([obj])

    def grow(self, to: int) -> dict[str, Any]:
        t0 = time.monotonic()
        rev = self.store.revision()
        while self.count < to:
            end = min(to, self.count + BATCH)
            objs = [o for i in range(self.count, end)
                    for o in (service(i), endpoint_slice(i, self.nodes))]
            rev = self.write(objs)
            self.count = end
        applied = time.monotonic() - t0
        waited = self.wait_synced(rev, 600, poll=0.05)
        return {"apply_s": round(applied, 2),
                "converge_s": round(time.monotonic() - t0, 2) if waited is not None else None}

    def changes(self, n: int, step: int) -> dict[str, Any]:
        import random

        rng = random.Random(step)
        samples = []
        missed = 0
        for k in range(n):
            i = rng.randrange(self.count)
            obj = endpoint_slice(i, self.nodes, moved=1 + k + step * 1000)
            time.sleep(0.15)  # the previous change settles
            t0 = time.monotonic()
            rev = self.put(obj)
            waited = self.wait_synced(rev, 30.0)
            if waited is None:
                missed += 1
                continue
            samples.append((time.monotonic() - t0) * 1000)
        return {"n": len(samples), "missed": missed,
                "p50_ms": _r(percentile(sorted(samples), 50)),
                "p99_ms": _r(percentile(sorted(samples), 99)),
                "max_ms": _r(max(samples) if samples else None), "samples_ms": [_r(s) for s in samples]}

    def relist(self, repeats: int = 3) -> dict[str, Any]:
        from nodemesh.store import Compacted
        from nodemesh.store.informer import Informer

        times = []
        objects = 0
        for r in range(repeats):
            inf = Informer(self.store)
            inf._relist()
            behind = inf.revision
            for k in range(2):  # history to drop: the watcher's next revision is compacted
                self.put(endpoint_slice(0, self.nodes, moved=900000 + 10 * r + k))
            self.store.compact(self.store.revision())  # type: ignore[attr-defined]
            t0 = time.monotonic()
            try:
                self.store.watch(behind, 1.0)
                return {"error": "the watch from a compacted revision did not fail"}
            except Compacted:
                inf._relist()
            times.append(time.monotonic() - t0)
            objects = len(inf._objects)
        return {"seconds_max": _r(max(times), 3), "seconds": [_r(t, 3) for t in times],
                "objects": objects}

    def agent_memory(self) -> dict[str, Any]:
        from nodemesh.host.files import read_json
        from nodemesh.host.procs import ProcRef

        out = {}
        for n in self.nodes:
            ref = ProcRef.from_json(read_json(os.path.join(self.cfg.node_dir(n), "agent.json")))
            out[n] = _rss_mb(ref.pid) if ref is not None else None
        return out

    def last_sync(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for n, a in self.agents.items():
            try:
                out[n] = float(a.get("/status")["datapath"]["lastSyncSeconds"])
            except Exception:
                out[n] = None
        return out


def _r(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(v, digits)


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def measure(state_dir: str, steps: tuple[int, ...], changes: int,
            log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict[str, Any]:
    d = _Driver(state_dir)
    points = []
    for n in steps:
        log(f"scale: {n} services")
        p: dict[str, Any] = {"services": n, "endpoints": n * ENDPOINTS}
        p.update(d.grow(n))
        time.sleep(1.0)  # (the agents' last reconcile of the growth, and a malloc_trim)
        p["agent_rss_mb"] = d.agent_memory()
        p["last_sync_s"] = d.last_sync()
        # (a step costs seconds at 5,000 services: fewer samples there, their max is the p99)
        p["change"] = d.changes(changes if n <= TARGET_AT else max(10, changes // 3), n)
        p["relist"] = d.relist()
        log(f"  converged in {p['converge_s']} s; change p50 {p['change']['p50_ms']} ms, p99 "
            f"{p['change']['p99_ms']} ms; relist {p['relist'].get('seconds_max')} s; agent RSS "
            f"{p['agent_rss_mb']} MB")
        points.append(p)
    return {"points": points, "nodes": d.nodes, "store": d.cfg.store_type,
            "store_members": len(d.cfg.store_members), "batch": BATCH,
            "endpoints_per_service": ENDPOINTS}


def main(argv: list[str]) -> int:
    """`python -m nodemesh.bench.scale STATE_DIR STEPS CHANGES OUT_JSON`."""
    from nodemesh.cluster.config import load_cluster
    from nodemesh.host import netns

    state_dir, steps, changes, out = argv
    netns.enter_for_store(load_cluster(state_dir).store)  # before any thread
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    res = measure(state_dir, tuple(int(x) for x in steps.split(",")), int(changes))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


# ---- the report ---------------------------------------------------------------------------------
def targets(sec: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets at 1,000 services (or the largest step below it, for --quick)."""
    pts = [p for p in sec.get("points") or [] if p["services"] <= TARGET_AT]
    if not pts:
        return {}
    p = max(pts, key=lambda p: p["services"])
    rss = max((v for v in p["agent_rss_mb"].values() if v is not None), default=None)
    ch = p["change"].get("p99_ms")
    rl = p["relist"].get("seconds_max")
    return {"services": p["services"],
            "change_p99_ms": ch, "change_met": ch is not None and ch <= TARGET_CHANGE_P99_MS
            and not p["change"].get("missed"),
            "relist_s": rl, "relist_met": rl is not None and rl <= TARGET_RELIST_S,
            "agent_rss_mb": rss, "rss_met": rss is not None and rss <= TARGET_AGENT_RSS_MB}


def markdown(sec: dict[str, Any]) -> list[str]:
    if sec.get("error"):
        return ["## Scale (EndpointSlices on etcd)\n", f"failed: {sec['error']}", ""]
    L = ["## Scale (EndpointSlices on etcd)\n",
         f"{len(sec.get('nodes') or [])} nodes, etcd with {sec.get('store_members')} member(s); "
         f"each Service without a selector has one EndpointSlice of "
         f"{sec.get('endpoints_per_service')} ready endpoints; applied {sec.get('batch')} "
         "services (and their slices) per transaction. Effect = every node's agent has "
         "programmed the write's revision (datapath `syncedRevision`).\n",
         "| services | endpoints | apply (s) | converged (s) | change p50 (ms) | change p99 (ms) "
         "| missed | relist after compaction (s) | agent RSS (MB) | last reconcile step (s) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for p in sec.get("points") or []:
        ch, rl = p["change"], p["relist"]
        rss = ", ".join(f"{n} {v}" for n, v in sorted(p["agent_rss_mb"].items()))
        sync = ", ".join(f"{n} {v}" for n, v in sorted(p["last_sync_s"].items()))
        L.append(f"| {p['services']:,} | {p['endpoints']:,} | {p['apply_s']} | {p['converge_s']} "
                 f"| {ch.get('p50_ms')} | {ch.get('p99_ms')} | {ch.get('missed')} "
                 f"| {rl.get('seconds_max', rl.get('error'))} | {rss} | {sync} |")
    t = targets(sec)
    if t:
        def v(ok: bool) -> str:
            return "met" if ok else "MISSED"

        L += ["", f"Targets at {t['services']:,} services: change p99 ≤ {TARGET_CHANGE_P99_MS:g} ms: "
              f"{v(t['change_met'])} ({t['change_p99_ms']} ms); relist ≤ {TARGET_RELIST_S:g} s: "
              f"{v(t['relist_met'])} ({t['relist_s']} s); agent RSS ≤ {TARGET_AGENT_RSS_MB:g} MB: "
              f"{v(t['rss_met'])} ({t['agent_rss_mb']} MB)."]
    return [*L, ""]


def _frame(ax: Any, title: str, unit: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("services (10 endpoints each)")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def plot(plt: Any, sec: dict[str, Any], path: str) -> list[str]:
    pts = sec.get("points") or []
    if not pts:
        return []
    xs = [p["services"] for p in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted(pts[0]["agent_rss_mb"]):
        a1.plot(xs, [p["agent_rss_mb"].get(n) for p in pts], "o-", label=f"agent RSS, {n}")
    a1.axhline(TARGET_AGENT_RSS_MB, color="grey", ls=":", label="target at 1,000")
    _frame(a1, "Agent memory", "MB")
    a2.plot(xs, [p["change"].get("p99_ms") for p in pts], "o-", label="one change, p99")
    a2.plot(xs, [p["change"].get("p50_ms") for p in pts], "o--", label="one change, p50")
    a2.plot(xs, [(p["converge_s"] or 0) * 1000 for p in pts], "s-", label="convergence of the step")
    a2.plot(xs, [(p["relist"].get("seconds_max") or 0) * 1000 for p in pts], "^-",
            label="relist after compaction")
    a2.axhline(TARGET_CHANGE_P99_MS, color="grey", ls=":", label="100 ms")
    a2.set_yscale("log")
    _frame(a2, "Time to effect on every node", "ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
