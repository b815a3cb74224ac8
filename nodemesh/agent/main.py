"""`nodemesh agent --node NAME`: the per-node daemon.

Started (and restarted) by the cluster daemon in the host's namespaces; it moves itself into its
node's network namespace before any thread exists (setns is per thread), then: follows the store,
runs the node's pods, serves the local API, and reports the node's health.
SIGTERM stops the agent only: pods, and everything programmed in the kernel, keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import time
from collections import ChainMap
from datetime import datetime, timedelta
from typing import Any

from nodemesh.agent.api import ApiError, ApiServer
from nodemesh.agent.cni import CniPods
from nodemesh.agent.datapath import DatapathSync
from nodemesh.agent.proxy import ProxyManager
from nodemesh.agent.reconcile import NodeReconciler
from nodemesh.cluster.config import NODE_DNS_IP, ClusterConfig
from nodemesh.cluster.dns import read_counters
from nodemesh.cluster.pods import PodHooks, PodManager
from nodemesh.errors import NodemeshError
from nodemesh.host import netns
from nodemesh.host.files import write_json_atomic
from nodemesh.host.procs import ProcRef
from nodemesh.model.nodes import lease_object
from nodemesh.model.workloads import is_deleting
from nodemesh.observe.agentevents import AgentEventType, agent_event
from nodemesh.observe.filters import FlowFilter, matches
from nodemesh.observe.metrics import AgentCollector, AgentMetrics
from nodemesh.observe.ring import FlowRing, as_flow
from nodemesh.proxy.envoy import HotRestart
from nodemesh.route import PROXY_IP
from nodemesh.store import Store, open_store
from nodemesh.store.base import now_micro, now_rfc3339
from nodemesh.store.informer import Informer

log = logging.getLogger("nodemesh.agent")


class NoPods:
    """Kubernetes mode: the kubelet runs the pods. The sandboxes the datapath manages (`local`)
    come from nodemesh-cni instead; there is nothing to start, stop or report here."""

    def __init__(self) -> None:
        self.local: dict = {}

    def reconcile(self) -> None:
        pass

    def report_status(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class Agent:
    def __init__(self, cfg: ClusterConfig, node: str,
                 metrics_socket: socket.socket | None = None, *, store: Store | None = None,
                 kubernetes: bool = False) -> None:
        # Kubernetes mode (nodemesh/agent/kubernetes.py): `store` is the API server's, the
        # kubelet runs the pods and owns the Node's status.
        self.kubernetes = kubernetes
        self.cfg = cfg
        self.metrics_socket = metrics_socket
        self.metrics = AgentMetrics(node)
        self.node = cfg.node(node)
        self.store = store if store is not None else open_store(cfg.state_dir)
        self.informer = Informer(self.store)
        self.flows = FlowRing(int(cfg.extra.get("flow_ring_size", 16384)),
                              on_add=self.metrics.observe)
        hooks = PodHooks()
        # Pods created together wait together (for the node Envoy's push and the datapath's
        # sync, each shared by all the pods waiting): enough workers that a batch is large.
        self.pods: PodManager | NoPods = (
            NoPods() if kubernetes
            else PodManager(cfg, node, self.store, self.informer, hooks, workers=16))
        # Pods whose sandbox a container runtime brings over CNI (nodemesh-cni): the same hooks.
        # In Kubernetes mode every pod of the node comes so.
        self.cni = CniPods(cfg, node, self.store, hooks, every_pod=kubernetes)
        self.datapath: DatapathSync | None = None
        self.proxy: ProxyManager | None = None
        self.reconciler: NodeReconciler | None = None
        if cfg.datapath == "bpf":
            self.datapath = DatapathSync(cfg, node, self.flows,
                                         ChainMap(self.pods.local, self.cni.local),
                                         int(cfg.extra.get("maglev_table_size", 16381)))
            self.datapath.on_local_ips = lambda ips: setattr(self.metrics, "local_ips", ips)
            self.datapath.on_refusals = self._on_refusals
            self.cni.check_endpoint = self.datapath.check_endpoint
            if cfg.extra.get("proxy", True):
                self.proxy = ProxyManager(cfg, node, self.store, self.flows)
                self.proxy.timer = self.metrics.reconcile.labels("proxy")
                # Before the datapath lets a new pod's veth pass traffic (and its containers
                # start): its certificate and its place in the node Envoy's tunnel listeners.
                proxy = self.proxy
                hooks.sandbox_ready.append(lambda pod, sb: proxy.cover_pod(pod, sb.ip))
            self.reconciler = NodeReconciler(cfg, node, self.store, self.informer, self.datapath,
                                             self.proxy)
            self.reconciler.timer = self.metrics.timed
            hooks.sandbox_ready.append(self.reconciler.sandbox_ready)
            hooks.sandbox_removed.append(self.reconciler.sandbox_removed)
        self.api = ApiServer(cfg.agent_socket(node))
        self.started = time.time()
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._lease_acquired = ""

    # ---- wiring ------------------------------------------------------------------------------
    def _on_change(self, kinds: set[str]) -> None:
        if kinds <= {"Lease"}:
            return  # (leases renewed: nothing this node runs depends on them)
        loop, wake = self._loop, self._wake
        if wake is not None:
            loop.call_soon_threadsafe(wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._request_stop)
        self.informer.add_listener(self._on_change)
        self.informer.start()
        await asyncio.to_thread(self.informer.wait_synced)
        # The lease from now on: the node's datapath keeps serving while an agent restarts, so
        # an agent that runs and reaches the store holds it (a kubelet, too, renews early).
        # (Kubernetes mode: the kubelet holds the node's lease.)
        lease_task = None if self.kubernetes else asyncio.create_task(self._lease_loop())
        # The datapath adopts what the previous agent left pinned, then catches up.
        if self.datapath is not None and self.reconciler is not None:
            await asyncio.to_thread(self.datapath.start)
            await asyncio.to_thread(self.reconciler.reconcile)
        if self.proxy is not None:
            await self.proxy.start()
            assert self.datapath is not None
            await asyncio.to_thread(self.datapath.set_proxy, PROXY_IP,
                                    self.cfg.proxy_cgroup(self.node.name))
            self.proxy.pushing = True
        if self.reconciler is not None:
            self.reconciler.start()  # (the first push into the node Envoy, if there is one)
        self._routes()
        await self.api.start()
        self._register_collectors()
        if self.metrics_socket is not None:
            await asyncio.start_server(self._serve_metrics, sock=self.metrics_socket)
        log.info("agent of %s ready (pid %d, pods adopted: %d)", self.node.name, os.getpid(),
                 len(self.pods.local))
        me = ProcRef.of(os.getpid())
        if me is not None:  # the daemon restarts a ready agent at once (no crash backoff)
            write_json_atomic(self.cfg.agent_ready_file(self.node.name), me.to_json())
        self.flows.add(agent_event(
            self.node.name, AgentEventType.AGENT_STARTED,
            f"agent started (pid {os.getpid()}, pods adopted: {len(self.pods.local)})",
            pid=os.getpid(), pods_adopted=len(self.pods.local)))
        self._stopped = asyncio.Event()
        await asyncio.to_thread(self._heartbeat)
        tasks = [*([lease_task] if lease_task else []), asyncio.create_task(self._reconcile_loop()),
                 asyncio.create_task(self._status_loop())]
        if self.proxy is not None:
            tasks.append(asyncio.create_task(self.proxy.run(self._stopped)))
        while not self._stopping:
            await asyncio.sleep(0.1)
        self._stopped.set()
        for t in tasks:
            t.cancel()
        if self.proxy is not None:
            await self.proxy.stop()
        self.api.close()
        self.pods.shutdown()
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.datapath is not None:
            self.datapath.stop()
        self.informer.stop()
        log.info("agent of %s stopped; pods keep running", self.node.name)

    def _register_collectors(self) -> None:
        dp, proxy = self.datapath, self.proxy

        def lost() -> dict[str, int]:
            out = {"flow_followers": self.flows.lost_followers,
                   "flow_ring_overwritten": self.flows.overwritten}
            if dp is not None:
                out["ringbuf_full"] = dp.ring_lost()
                out["event_budget"] = dp.events_suppressed()
            if proxy is not None:
                out["access_logs"] = int(proxy.als.dropped)
            return out

        self.metrics.registry.register(AgentCollector(
            self.node.name, metrics=self.metrics,
            workloads=dp.workload_of_identity if dp else None,
            maps=dp.map_fill if dp else None,
            l4_bytes=dp.l4_counters if dp else None,
            xds=proxy.xds.stats if proxy else None,
            lost=lost, refused=dp.refused if dp else None, drops=dp.drops if dp else None,
            dns=None if self.kubernetes else self._dns_queries))

    def _dns_queries(self) -> dict[str, int]:
        """This node's DNS queries by result, as the cluster daemon that serves them counts."""
        got = read_counters(self.cfg.dns_counters_file(self.node.name))
        return {"answered": got["answered"], "refused": got["refused"]}

    async def _serve_metrics(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        """Prometheus text format on the node's loopback port of the host."""
        try:
            line = (await reader.readline()).decode("latin-1")
            while (await reader.readline()).strip():
                pass
            path = line.split(" ")[1] if " " in line else "/"
            if path.split("?")[0] == "/metrics":
                self.metrics.flow_ring.set(len(self.flows))
                body = await asyncio.to_thread(self.metrics.expose)
                head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body = b"see /metrics\n"
                head = "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                         .encode() + body)
            await writer.drain()
        except (ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    def _request_stop(self) -> None:
        self._stopping = True

    async def _reconcile_loop(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            with self.metrics.timed("pods"):
                self.pods.reconcile()
                if not self.kubernetes:  # (in Kubernetes the API server finishes deletes)
                    pods = self.informer.list("Pod")
                    if any(is_deleting(p) for p in pods):
                        await asyncio.to_thread(self.cni.finish_deletes, pods)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    async def _status_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.pods.report_status)
            except Exception:
                log.exception("status report failed")
            await asyncio.sleep(0.2)

    async def _lease_loop(self) -> None:
        """Renew the node's lease every third of its duration (Kubernetes' kubelet renews at a
        quarter): the node lifecycle controller takes the node out of service when it lapses."""
        period = self.cfg.node_lease_seconds / 3
        while True:
            started = time.monotonic()
            try:
                await asyncio.to_thread(self._renew_lease)
            except Exception:
                log.exception("lease renewal failed")
            # glibc keeps freed memory of C extensions (protobuf, gRPC) in its heaps; give it
            # back, the agent's footprint is part of what the mesh costs a node.
            _malloc_trim()
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    def _renew_lease(self) -> None:
        now = now_micro()
        if not self._lease_acquired:
            self._lease_acquired = now
        lease = lease_object(self.node.name, self.node.name, self.cfg.node_lease_seconds, now,
                             self._lease_acquired)
        for attempt in self.store.retrying():
            with attempt as t:
                t.put(lease)

    def _heartbeat(self) -> None:
        """The Node's conditions the agent owns (DatapathTablesFull); Ready is the node
        lifecycle controller's, from the lease."""
        if self.kubernetes:  # the kubelet reports the Node; the agent's own state is in /status
            return
        with self.store.transaction() as t:
            node = t.get("Node", "", self.node.name)
            if node is None:
                return
            status = dict(node.get("status") or {})
            own = self._tables_condition()
            kept = [c for c in status.get("conditions") or []
                    if c.get("type") not in {o["type"] for o in own}]
            status["conditions"] = [*kept, *own]
            t.put_status("Node", "", self.node.name, status)

    # ---- exhausted tables: the Node's DatapathTablesFull condition -----------------------------
    _tables_since = ""

    def _tables_condition(self) -> list[dict]:
        if self.datapath is None:
            return []
        full = [r for _, r in sorted(self.datapath.refusals.items())]
        if not self._tables_since:
            self._tables_since = now_rfc3339()
        return [{"type": "DatapathTablesFull", "status": "True" if full else "False",
                 "reason": "MapFull" if full else "TablesFit",
                 "lastTransitionTime": self._tables_since,
                 "message": " ".join(r.message() for r in full)
                 or "every object fits in the datapath's maps"}]

    def _on_refusals(self, refusals: list) -> None:
        """The set of refused objects changed (in the reconcile thread): the Node says so now,
        not at the next heartbeat."""
        self._tables_since = now_rfc3339()
        self._heartbeat()

    # ---- API ---------------------------------------------------------------------------------
    def _routes(self) -> None:
        self.api.route("GET", "/healthz", self._healthz)
        self.api.route("GET", "/status", self._status)
        self.api.route("GET", "/flows", self._flows)
        self.api.route("GET", "/proxy/stats", self._proxy_admin("stats"))
        self.api.route("GET", "/proxy/clusters", self._proxy_admin("clusters"))
        self.api.route("GET", "/proxy/config", self._proxy_admin("config"))
        self.api.route("GET", "/certificates", self._certificates)
        self.api.route("POST", "/proxy/restart", self._proxy_restart)
        self.api.route("GET", "/debug/memory", self._debug_memory)
        for command in ("add", "del", "check", "gc"):
            self.api.route("POST", f"/cni/{command}", self._cni(command))

    def _cni(self, command: str):
        """nodemesh-cni's requests (nodemesh.agent.cni answers them in a worker thread)."""
        fn = {"add": self.cni.add, "del": self.cni.delete, "check": self.cni.check,
              "gc": self.cni.gc}[command]

        async def handler(q: dict, body: bytes) -> Any:
            if self._stopping:
                raise ApiError(503, f"the agent of node {self.node.name} is stopping",
                               cniCode=11)
            if self.reconciler is None and command == "add":
                raise ApiError(409, f"node {self.node.name} runs no datapath (datapath: none)",
                               cniCode=100)
            try:
                req = json.loads(body or b"{}")
            except ValueError as e:
                raise ApiError(400, f"CNI {command}: the request is not JSON: {e}",
                               cniCode=6) from None
            if not isinstance(req, dict):
                raise ApiError(400, f"CNI {command}: the request must be an object", cniCode=6)
            return await asyncio.to_thread(fn, req)

        return handler

    async def _proxy_restart(self, q: dict, body: bytes) -> Any:
        """A planned restart of the node Envoy (hot restart): {drainSeconds,
        parentShutdownSeconds} optional."""
        if self.proxy is None:
            raise ApiError(503, f"node {self.node.name} runs no proxy")
        try:
            req = json.loads(body or b"{}")
            drain = int(req.get("drainSeconds", 5))
            shutdown = int(req.get("parentShutdownSeconds", 20))
        except (ValueError, TypeError, AttributeError) as e:
            raise ApiError(400, f"proxy restart: bad request body: {e}") from None
        if not HotRestart.times_ok(drain, shutdown):
            raise ApiError(400, "proxy restart: need 0 <= drainSeconds <= "
                                f"parentShutdownSeconds <= {HotRestart.MAX_SECONDS}")
        try:
            return await self.proxy.restart_envoy(drain, shutdown)
        except NodemeshError as e:
            raise ApiError(409, e.message) from None

    async def _certificates(self, q: dict, body: bytes) -> Any:
        """The workload certificates this node holds (no keys)."""
        st = self.proxy.mtls_status() if self.proxy else None
        if st is None:
            return {"node": self.node.name, "mtls": False, "certificates": []}
        return {"node": self.node.name, "mtls": True, **st}

    async def _debug_memory(self, q: dict, body: bytes) -> Any:
        """Where the agent's memory is: its smaps_rollup figures and, when the agent was started
        with PYTHONTRACEMALLOC=N, the largest allocations by file and line (`?top=K`)."""
        import tracemalloc

        roll = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    roll[parts[0].rstrip(":")] = int(parts[1])
        out: dict[str, Any] = {"smaps_rollup_kib": roll, "tracing": tracemalloc.is_tracing()}
        if tracemalloc.is_tracing():
            top = int((q.get("top") or ["30"])[0])
            snap = await asyncio.to_thread(tracemalloc.take_snapshot)
            stats = snap.statistics("lineno")
            out["traced_kib"] = round(sum(s.size for s in stats) / 1024)
            out["top"] = [{"where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
                           "kib": round(s.size / 1024, 1), "count": s.count}
                          for s in stats[:top]]
            by_file: dict[str, int] = {}
            for s in stats:
                by_file[s.traceback[0].filename] = by_file.get(s.traceback[0].filename, 0) + s.size
            out["top_files"] = [{"file": f, "kib": round(n / 1024, 1)} for f, n in
                                sorted(by_file.items(), key=lambda x: -x[1])[:top]]
        return out

    async def _healthz(self, q: dict, body: bytes) -> Any:
        return {"ok": True}

    async def _status(self, q: dict, body: bytes) -> Any:
        if self._stopping:
            raise ApiError(503, "agent is stopping")
        return {
            "node": self.node.name, "ip": self.node.ip, "podCIDR": self.node.pod_cidr,
            "pid": os.getpid(), "uptimeSeconds": round(time.time() - self.started, 1),
            "pods": len(self.pods.local), "cniPods": self.cni.status(),
            "storeRevision": self.informer.revision,
            "dns": ({"servedBy": "the cluster's DNS (Kubernetes mode)"} if self.kubernetes else
                    {"address": NODE_DNS_IP, "servedBy": "cluster daemon",
                     **read_counters(self.cfg.dns_counters_file(self.node.name))}),
            "datapath": self.datapath.status() if self.datapath else {"mode": "none"},
            "proxy": self.proxy.status() if self.proxy else None,
            "flows": {"ring": len(self.flows), "capacity": self.flows.capacity,
                      "total": self.flows.total,
                      "lostEvents": self.datapath.ring_lost() if self.datapath else 0,
                      "suppressedEvents": (self.datapath.events_suppressed()
                                           if self.datapath else 0),
                      "overwritten": self.flows.overwritten},
        }

    def _proxy_admin(self, what: str):
        """The node Envoy's admin API, through the agent (Envoy's admin is local to the node)."""

        async def handler(q: dict, body: bytes) -> Any:
            envoy = self.proxy.envoy if self.proxy else None
            if envoy is None or not envoy.alive():
                raise ApiError(503, f"node {self.node.name} has no running Envoy")
            if what == "stats":
                flt = (q.get("filter") or [None])[-1]
                return await asyncio.to_thread(envoy.stats, flt)
            if what == "clusters":
                return await asyncio.to_thread(envoy.clusters)
            return await asyncio.to_thread(envoy.config_dump)

        return handler

    async def _flows(self, q: dict, body: bytes) -> Any:
        """Recent flows (`last`, filters), or with `follow=1` a stream of new ones."""
        try:
            flt = FlowFilter.from_query(q)
        except NodemeshError as e:
            raise ApiError(400, e.message) from None
        last = int(q.get("last", ["0"])[-1] or 0)
        if q.get("follow", ["0"])[-1] == "1":
            return self._follow(flt, last)
        return await asyncio.to_thread(self._matching, flt, last)

    def _matching(self, flt: FlowFilter, last: int) -> list[dict]:
        """The flows that match, oldest first; with `last`, only the newest `last` of them.
        Walks back from the newest and stops early, so flows nobody asks for stay raw."""
        # Flows arrive roughly in time order (access logs up to a second or two late): stop
        # walking back well before `since`, and let the filter decide exactly.
        cutoff = None
        if flt.since:
            t = datetime.fromisoformat(flt.since.replace("Z", "+00:00")) - timedelta(seconds=10)
            cutoff = t.strftime("%Y-%m-%dT%H:%M:%S")
        found = []
        for f in self.flows.newest_first():
            if cutoff and f.get("time", "")[:19] < cutoff:
                break
            if matches(flt, f):
                found.append(f)
                if last and len(found) >= last:
                    break
        found.reverse()
        return found

    async def _follow(self, flt: FlowFilter, last: int):
        queue = self.flows.follow()
        try:
            if last:
                for f in await asyncio.to_thread(self._matching, flt, last):
                    yield f
            while not self._stopping:
                try:
                    f = as_flow(await asyncio.wait_for(queue.get(), 1.0))
                except TimeoutError:
                    continue
                if matches(flt, f):
                    yield f
        finally:
            self.flows.unfollow(queue)


def _malloc_trim() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def bind_metrics(cfg: ClusterConfig, node: str) -> socket.socket | None:
    """The metrics listener on the host's loopback (created before we enter the node's
    namespace, so it stays in the host's): the node's documented port, or the next free one
    when another cluster holds it; the port in use is written to <node dir>/metrics.json."""
    base = cfg.node(node).metrics_port
    for port in [base + i * 16 for i in range(16)]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen(64)
        s.setblocking(False)
        write_json_atomic(os.path.join(cfg.node_dir(node), "metrics.json"),
                          {"address": "127.0.0.1", "port": port})
        return s
    return None


def run_agent(cfg: ClusterConfig, node: str) -> int:
    cfg.node(node)  # refuse an unknown node before touching anything
    node_dir = cfg.node_dir(node)
    os.makedirs(node_dir, exist_ok=True)
    metrics_socket = bind_metrics(cfg, node)
    netns.enter_netns(cfg.node_netns(node))  # before any thread: setns is per thread
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ref = ProcRef.of(os.getpid())
    assert ref is not None
    write_json_atomic(os.path.join(node_dir, "agent.json"), ref.to_json())
    asyncio.run(Agent(cfg, node, metrics_socket).run())
    return 0
