"""The agent's L7 half: the node's Envoy, its xDS snapshot, redirects into it, route statuses.

On every relevant store change the agent translates (pure, `nodemesh.route.translate`) the
cluster's routes, services, pods and L7 policy into one Envoy snapshot for this node, serves it
over xDS, and points the datapath at the new listeners — in an order that never sends a
connection to a listener Envoy does not have yet: redirects that go away are removed first, the
snapshot is pushed and ACKed, then new redirects are added. Envoy's access logs come back over
gRPC and become L7 flows. Route statuses (Accepted, ResolvedRefs, and Envoy's NACKs) are written
back to the routes.

Envoy is started detached and adopted by the next agent, so restarting the agent never
restarts Envoy or drops its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from nodemesh.agent.certs import CertManager
from nodemesh.agent.certs import state_file as certs_state_file
from nodemesh.agent.l7flows import AccessLogFlow
from nodemesh.agent.tunnelflows import tunnel_failure
from nodemesh.certs.spiffe import spiffe_id
from nodemesh.cluster.config import ClusterConfig
from nodemesh.cluster.trust import fingerprint_of
from nodemesh.datapath.layout import IpcacheFlags
from nodemesh.errors import NodemeshError
from nodemesh.host import netns
from nodemesh.host.files import read_json, write_json_atomic
from nodemesh.host.procs import describe_exit, reaped_status
from nodemesh.mtls.tls import ROOTS_SECRET
from nodemesh.mtls.tunnel import TunnelInput, TunnelPlan, mesh_pods, plan_tunnel
from nodemesh.observe.agentevents import AgentEventType, agent_event
from nodemesh.observe.ring import FlowRing
from nodemesh.proxy.als import AccessLogReceiver, tcp_entry_to_dict
from nodemesh.proxy.envoy import (
    EnvoyProcess,
    HotRestart,
    base_id_path,
    bootstrap,
    remove_shared_memory,
)
from nodemesh.proxy.snapshot import CLUSTER, LISTENER, SECRET, Snapshot
from nodemesh.proxy.xds import XdsServer
from nodemesh.route import (
    PROXY_IP,
    L7Input,
    Pod,
    RedirectKey,
    RouteKey,
    Service,
    l7_policies_from_compiled,
    stamp_transition_times,
    translate,
    with_nack,
)
from nodemesh.route.inputs import MtlsView
from nodemesh.route.protos import LISTENER_TYPE
from nodemesh.route.visibility import visibility_routes
from nodemesh.store import Store
from nodemesh.store.base import now_rfc3339
from nodemesh.store.informer import RESYNC_SECONDS, SyncedRevision

log = logging.getLogger("nodemesh.proxy")
WATCHED = {"Pod", "Service", "Namespace", "HTTPRoute", "GRPCRoute", "CiliumNetworkPolicy",
           "Identity", "PeerAuthentication", "TrustBundle", "*"}
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")


@dataclass
class EnvoyExit:
    """One exit of the node Envoy, and how long the node was without one."""

    pid: int
    how: str  # "killed by SIGKILL", ...
    at: str = field(default_factory=now_rfc3339)
    down_ms: float | None = None  # set once the next Envoy has the listeners
    _t: float = field(default_factory=time.monotonic, repr=False)
    _wall: float = field(default_factory=time.time, repr=False)

    def back(self) -> None:
        self.down_ms = round((time.monotonic() - self._t) * 1000, 1)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "how": self.how, "at": self.at, "downMs": self.down_ms}


class ProxyManager:
    def __init__(self, cfg: ClusterConfig, node: str, store: Store, informer, flows: FlowRing,
                 datapath, concurrency: int = 2) -> None:
        self.cfg = cfg
        self.node = node
        self.store = store
        self.informer = informer
        self.flows = flows
        self.datapath = datapath
        self.concurrency = concurrency
        node_dir = cfg.node_dir(node)
        self.socket = os.path.join(node_dir, "xds.sock")
        self.envoy_dir = os.path.join(node_dir, "envoy")
        self.ports_file = os.path.join(node_dir, "proxy-ports.json")
        self.xds = XdsServer(on_nack=self._on_nack)
        self.als = AccessLogReceiver(raw_callback=self._on_access_log)
        self.envoy: EnvoyProcess | None = None
        self.ports: dict[RedirectKey, int] = self._load_ports()
        self.redirects: dict[RedirectKey, int] = {}
        self.listener_targets: dict[int, RedirectKey] = {}
        self.nack: dict[str, Any] | None = None  # the last NACK, while it stands
        self.owners: Mapping[str, tuple[RouteKey, ...]] = {}
        self.statuses: dict[RouteKey, dict] = {}
        self.error: str | None = None
        self.syncs = 0
        self.synced = SyncedRevision()
        self._dirty = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.timer = None  # a histogram child (the agent's reconcile latency for "proxy")
        self.l7_policy_names: dict[tuple[str, int], list[str]] = {}
        self.l7_identities: dict[RedirectKey, set[int]] = {}
        self._redirects_applied: tuple[dict, dict] | None = None  # the last set_proxy_redirects
        # The mutual-TLS tunnel (docs/security.md): the node's workload certificates, the plan
        # last pushed, the plan whose listeners and secrets Envoy accepted, and pods that are
        # being created (in the store, perhaps not yet in the informer).
        self.certs: CertManager | None = None
        if cfg.mtls:
            self.certs = CertManager(node, cfg.ca_socket, certs_state_file(node_dir),
                                     cfg.cert_ttl_seconds)
            self.certs.on_change.append(self._kick)
        self.tunnel: TunnelPlan | None = None
        self.tunnel_acked: TunnelPlan | None = None
        self.bundle_fingerprints: list[str] = []
        self._pending_local: dict[str, tuple[dict, str]] = {}
        self._mesh_reported: dict | None = None
        self._push_lock: asyncio.Lock | None = None
        self._acked_changed: asyncio.Condition | None = None  # tunnel_acked was replaced
        self.tunnel_failures = 0  # failed tunnel connections Envoy logged
        # Envoy's exits (docs/reliability.md): a pidfd in the event loop tells us at once, and
        # each exit is kept with how long the node was without its Envoy.
        self._pidfd: int | None = None
        self._watched: int | None = None  # the pid the pidfd is of
        self._envoy_exited = False
        self.envoy_exits: list[EnvoyExit] = []  # the last few, newest last
        self.envoy_restarts = 0
        self.hot_restarts: list[dict[str, Any]] = []  # planned ones (`nodemesh proxy restart`)
        self._draining: list[EnvoyProcess] = []  # earlier epochs still draining
        self.base_id_path = base_id_path(self.envoy_dir)
        # When the current Envoy was started: only its own acknowledgements count (the xDS
        # server keeps the last acknowledged version per node, across streams). 0 for an
        # adopted one (the xDS server is new: whatever it heard, it heard from that Envoy).
        self._envoy_since = 0.0

    # ---- persistence of listener ports (a restarted agent keeps Envoy's listeners as they are) --
    def _load_ports(self) -> dict[RedirectKey, int]:
        data = read_json(self.ports_file) or {}
        out = {}
        for k, port in (data.get("ports") or {}).items():
            ip, _, rest = k.partition(":")
            p, _, proto = rest.partition("/")
            out[RedirectKey(ip, int(p), proto or "TCP")] = int(port)
        return out

    def _save_ports(self) -> None:
        write_json_atomic(self.ports_file, {"ports": {str(k): v for k, v in self.ports.items()}})

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._push_lock = asyncio.Lock()
        self._acked_changed = asyncio.Condition()
        netns.ip_batch([f"addr replace {PROXY_IP}/32 dev lo"])
        await self.xds.start(self.socket, als=self.als)
        await asyncio.to_thread(self._ensure_envoy)
        self._watch_envoy()
        self.informer.add_listener(self._on_store_change)
        if self.datapath is not None:
            self.datapath.on_policy_input.append(self._on_policy_input)
        self._dirty.set()

    def _on_store_change(self, kinds: set[str]) -> None:
        if kinds & WATCHED:
            self.synced.changed()
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._dirty.set)
        else:
            self.synced.unrelated(self.informer.revision)

    def _kick(self) -> None:
        """Something the snapshot depends on changed outside the store (a certificate)."""
        self.synced.changed()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dirty.set)

    def _on_policy_input(self) -> None:
        """The datapath compiled new policy input or identities (its sync thread)."""
        self.synced.changed()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dirty.set)

    def _ensure_envoy(self) -> None:
        pidfile = os.path.join(self.envoy_dir, "envoy.json")
        if self.envoy is not None and self.envoy.alive():
            return
        adopted = EnvoyProcess.adopt(pidfile)
        if adopted is not None:
            self.envoy = adopted
            self._envoy_since = 0.0
            log.info("adopted the node's Envoy (pid %d)", adopted.pid)
            return
        # No Envoy of this node runs: the shared memory of an earlier one's hot restart is stale.
        remove_shared_memory(self.base_id_path)
        self.envoy = self._start_envoy(HotRestart(self.base_id_path))
        log.info("started the node's Envoy (pid %d)", self.envoy.pid)

    def _start_envoy(self, hot_restart: HotRestart) -> EnvoyProcess:
        """Start an Envoy; it is the current one from then on (see `_acked`)."""
        config = bootstrap(self.node, self.socket,
                           admin_socket=os.path.join(self.envoy_dir, "admin.sock"),
                           cluster=self.cfg.name)
        since = time.time()
        proc = EnvoyProcess.start(config, self.envoy_dir, concurrency=self.concurrency,
                                  cgroup_path=self.cfg.proxy_cgroup(self.node),
                                  log_level="warning", hot_restart=hot_restart)
        self._envoy_since = since
        return proc

    async def restart_envoy(self, drain_seconds: int = 5,
                            parent_shutdown_seconds: int = 20) -> dict[str, Any]:
        """A planned restart (an upgrade, a bootstrap change): Envoy's hot restart. The new
        Envoy takes the listening sockets over from the running one (the same sockets: the
        tunnel's socket lookup and the datapath's redirects do not change), gets the snapshot
        over xDS, and only then is the old one told to drain: its HTTP connections are closed
        after their current request, its other connections stay until it exits
        (`parent_shutdown_seconds`). No connection is refused meanwhile."""
        old = self.envoy
        if old is None or not old.alive():
            raise NodemeshError(f"node {self.node} has no running Envoy to restart")
        if old.hot_restart is None:
            raise NodemeshError(f"node {self.node}'s Envoy (pid {old.pid}) was started without "
                                "hot restart (by an older agent): it cannot hand over; kill it "
                                "and the agent starts one that can")
        t0 = time.monotonic()
        plan = HotRestart(self.base_id_path, old.hot_restart.epoch + 1, drain_seconds,
                          parent_shutdown_seconds)
        new = await asyncio.to_thread(self._start_envoy, plan)
        self._unwatch_envoy()  # the old one's exit is expected now
        self.envoy = new
        self._watch_envoy()
        self._draining.append(old)
        asyncio.get_running_loop().create_task(self._reap_draining(old))
        # Ready when the new Envoy acknowledged the listeners (it drains the old one itself
        # once it is initialised, i.e. has them).
        await self.sync()
        lds = self.xds.get_snapshot(self.node)
        version = lds.type_version(LISTENER_TYPE) if lds is not None else ""
        with contextlib.suppress(TimeoutError):
            await self.xds.wait_for(lambda: self._acked(LISTENER_TYPE, version), timeout=10.0)
        took = round((time.monotonic() - t0) * 1000, 1)
        done = {"oldPid": old.pid, "newPid": new.pid, "epoch": plan.epoch,
                "drainSeconds": drain_seconds, "parentShutdownSeconds": parent_shutdown_seconds,
                "at": now_rfc3339(), "tookMs": took,
                "ready": self._acked(LISTENER_TYPE, version)}
        self.hot_restarts = [*self.hot_restarts[-4:], done]
        self.flows.add(agent_event(
            self.node, AgentEventType.ENVOY_HOT_RESTARTED,
            f"hot restart of the node Envoy: pid {old.pid} -> pid {new.pid} (epoch {plan.epoch}) "
            f"in {took:.0f} ms; the old one drains for {drain_seconds} s",
            old_pid=old.pid, new_pid=new.pid, epoch=plan.epoch, took_ms=took))
        log.warning("hot restart of the node's Envoy: pid %d -> pid %d (epoch %d) in %.0f ms; "
                    "the old one drains for %d s", old.pid, new.pid, plan.epoch, took,
                    drain_seconds)
        return done

    async def _reap_draining(self, old: EnvoyProcess) -> None:
        """Wait for a draining Envoy to exit (and reap it when it is our child)."""
        while old.alive():
            await asyncio.sleep(0.5)
        if old in self._draining:
            self._draining.remove(old)
        log.info("the draining Envoy (pid %d) exited", old.pid)

    # ---- Envoy's exits -------------------------------------------------------------------------
    def _watch_envoy(self) -> None:
        """Have the event loop wake us the moment the node's Envoy exits (a pidfd is readable
        once its process has exited, whether or not it is our child)."""
        if self._loop is None or self.envoy is None or self._watched == self.envoy.pid:
            return
        self._unwatch_envoy()
        try:
            fd = os.pidfd_open(self.envoy.pid)
        except OSError:
            return  # gone already: the periodic check restarts it
        self._loop.add_reader(fd, self._on_envoy_exit)
        self._pidfd, self._watched = fd, self.envoy.pid

    def _unwatch_envoy(self) -> None:
        if self._pidfd is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
        self._pidfd = self._watched = None

    def _on_envoy_exit(self) -> None:
        pid = self._watched
        self._unwatch_envoy()
        how = "exited"
        if self.envoy is not None and self.envoy.pid == pid:
            how = self.envoy.exit_description()
        log.error("the node's Envoy (pid %s) %s; starting another", pid, how)
        self.envoy_exits = [*self.envoy_exits[-4:], EnvoyExit(pid or 0, how)]
        self.flows.add(agent_event(self.node, AgentEventType.ENVOY_EXITED,
                                   f"the node Envoy (pid {pid}) {how}; starting another",
                                   pid=pid or 0))
        self._envoy_since = time.time()  # nothing the dead one acknowledged counts now
        self._envoy_exited = True
        self._dirty.set()

    def _how_it_ended(self) -> None:
        """An Envoy that is not our child was reaped by the cluster daemon, perhaps before we
        could read its status from /proc: the daemon recorded it."""
        last = self.envoy_exits[-1] if self.envoy_exits else None
        if last is not None and last.how == "exited":
            status = reaped_status(self.cfg.reaped_file, last.pid, last._wall - 1.0)
            if status is not None:
                last.how = describe_exit(status)

    def _envoy_back(self) -> None:
        """The new Envoy has the listeners (and the tunnel is in the socket lookup)."""
        last = self.envoy_exits[-1] if self.envoy_exits else None
        if last is not None and last.down_ms is None and self.envoy is not None \
                and self.envoy.pid != last.pid:
            self._how_it_ended()  # (the daemon has surely reaped it by now)
            last.back()
            self.flows.add(agent_event(
                self.node, AgentEventType.ENVOY_STARTED,
                f"the node Envoy is back (pid {self.envoy.pid}) {last.down_ms:.0f} ms after "
                f"pid {last.pid} {last.how}", pid=self.envoy.pid, down_ms=last.down_ms,
                previous_pid=last.pid, previous_exit=last.how))
            log.warning("the node's Envoy is back (pid %d) %.0f ms after pid %s %s",
                        self.envoy.pid, last.down_ms, last.pid, last.how)

    async def run(self, stopping: asyncio.Event) -> None:
        """Sync on changes (and every RESYNC_SECONDS); restart Envoy the moment it exits (its
        pidfd), and check it every second in case that was missed."""
        try:
            await self._loop_until(stopping)
        finally:
            self._unwatch_envoy()

    async def _loop_until(self, stopping: asyncio.Event) -> None:
        last_check = last_sync = 0.0
        while not stopping.is_set():
            woke = False
            wait = 2.0 if self.certs is None else min(2.0, self.certs.next_due())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), wait)
                woke = True
            self._dirty.clear()
            if self.certs is not None and self.certs.next_due() <= 0.05:
                woke = True  # a certificate to renew
            if self._envoy_exited or time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                if self._envoy_exited or self.envoy is None or not self.envoy.alive():
                    if not self._envoy_exited:
                        log.warning("the node's Envoy is not running; starting it")
                    self._envoy_exited = False
                    woke = True
                    try:
                        await asyncio.to_thread(self._ensure_envoy)
                        self.envoy_restarts += 1
                        self._watch_envoy()
                        self._how_it_ended()
                    except Exception as e:
                        self.error = f"cannot start Envoy: {e}"
                        log.error("%s", self.error)
            if not woke and time.monotonic() - last_sync < RESYNC_SECONDS:
                continue
            try:
                await self.sync()
                last_sync = time.monotonic()
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                log.exception("proxy sync failed")
                await asyncio.sleep(0.5)
                self._dirty.set()

    async def stop(self) -> None:
        await self.xds.stop()

    # ---- the sync --------------------------------------------------------------------------------
    def _translate(self):
        from nodemesh.policy import Compiler

        k = self.informer.kinds(("Service", "Pod", "HTTPRoute", "GRPCRoute", "CiliumNetworkPolicy",
                                 "Namespace", "PeerAuthentication", "TrustBundle"))
        identities = self.datapath.pod_identities if self.datapath else {}
        pods = []
        for p in k["Pod"]:
            if p["metadata"].get("deletionTimestamp"):
                continue
            meta = p["metadata"]
            pods.append(Pod.from_object(p, identities.get((meta["namespace"], meta["name"]), 0)))
        services = [Service.from_object(s) for s in k["Service"]
                    if (s["spec"].get("clusterIP") or "None") != "None"]
        l7 = ()
        has_http_rules = any("rules" in str(c.get("spec", "")) or "rules" in str(c.get("specs", ""))
                             for c in k["CiliumNetworkPolicy"])
        if has_http_rules and self.datapath is not None and self.datapath.policy_input is not None:
            compiler = Compiler(self.datapath.policy_input)
            compiled = {e.ref: compiler.compile(e) for e in self.datapath.policy_input.endpoints}
            l7 = l7_policies_from_compiled(compiled, pods)
        # Which policies guard each redirected pod port: an L7 denial names them in its flow.
        self.l7_policy_names = {(p.pod_ip, p.port): sorted({r.policy for r in p.rules if r.policy})
                                for p in l7}
        # Which clients each redirected pod port takes into the proxy (0 = any identity).
        self.l7_identities = {p.key: {i for r in p.rules for i in r.identities} for p in l7}
        routes = list(k["HTTPRoute"]) + list(k["GRPCRoute"])
        routes += visibility_routes(k["Service"], k["Namespace"], routes)
        tunnel, secrets, view = self._tunnel(k)
        inp = L7Input.build(self.node, services, pods, routes, l7, mtls=view)
        return translate(inp, self.ports), k, tunnel, secrets

    def _tunnel(self, k: Mapping[str, list]) -> tuple[TunnelPlan | None, list, MtlsView | None]:
        """The tunnel's listeners, clusters and secrets (its certificates renewed or fetched
        as needed) and what the L7 translation needs of it; (None, [], None) without mTLS."""
        if self.certs is None:
            return None, [], None
        bundle = next((b for b in k["TrustBundle"] if b["metadata"]["name"] == "default"), None)
        spec = (bundle or {}).get("spec") or {}
        roots = [r.encode() for r in spec.get("roots") or []]
        self.certs.set_bundle(roots, str(spec.get("signing") or ""))
        pods = list(k["Pod"])
        known = {(p["metadata"].get("uid"), (p.get("status") or {}).get("podIP")) for p in pods}
        for uid, (pod, ip) in list(self._pending_local.items()):
            if (uid, ip) in known:
                self._pending_local.pop(uid, None)
            else:
                pods = [p for p in pods if p["metadata"].get("uid") != uid]
                pods.append({**pod, "status": {**(pod.get("status") or {}), "podIP": ip}})
        mesh = mesh_pods(pods, k["PeerAuthentication"])
        td = self.cfg.trust_domain
        wanted = {p.workload.spiffe(td) for p in mesh if p.node == self.node}
        self.certs.sync(wanted)
        ready = self.certs.ready() if roots else frozenset()
        plan = plan_tunnel(TunnelInput(self.node, td, tuple(mesh), ready,
                                       tuple(n.ip for n in self.cfg.nodes)))
        leaves = self.certs.snapshot()
        secrets = [workload_secret(i, leaves[i]) for i in sorted(plan.secrets)]
        if roots:
            secrets.append(roots_secret(roots))
        self.bundle_fingerprints = [fingerprint_of(r) for r in roots]
        view = MtlsView(
            trust_domain=td,
            clients={p.ip: p.workload.spiffe(td) for p in mesh
                     if p.node == self.node and p.workload.spiffe(td) in plan.secrets},
            servers={p.ip: p.workload.spiffe(td) for p in mesh if p.node != self.node},
            tunnelled=frozenset(ip for ip, f in plan.ipcache_flags.items()
                                if f & IpcacheFlags.TUNNEL),
            ports={(ip, port): t for ip, port, t in plan.port_overrides})
        return plan, secrets, view

    def cover_pod(self, pod: dict, ip: str, timeout: float = 15.0) -> None:
        """Block until the node's Envoy can carry a new local pod's connections through the
        tunnel (its identity's certificate, and its address in the tunnel listeners): its
        containers may start only then, so its first connection is tunnelled at once."""
        if self.certs is None or self._loop is None:
            return
        meta, spec = pod["metadata"], pod.get("spec") or {}
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        self.certs.ensure(spiffe_id(self.cfg.trust_domain, meta["namespace"], sa), timeout)
        fut = asyncio.run_coroutine_threadsafe(self._cover(meta["uid"], pod, ip, timeout),
                                               self._loop)
        fut.result(timeout + 5)

    async def _cover(self, uid: str, pod: dict, ip: str, timeout: float) -> None:
        # The proxy's loop syncs (pods created together share one push); this waits for it.
        self._pending_local[uid] = (pod, ip)
        self._kick()
        deadline = time.monotonic() + timeout
        assert self._acked_changed is not None
        async with self._acked_changed:
            while True:
                acked = self.tunnel_acked
                if acked is not None and ip in acked.sources:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodemeshError(f"pod {meta_ref(pod)}: the node's Envoy did not take "
                                        f"its mutual-TLS configuration within {timeout:g} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._acked_changed.wait(), min(left, 1.0))

    async def sync(self) -> None:
        assert self._push_lock is not None
        async with self._push_lock:
            self.synced.begin()
            try:
                revision = await self._push()
            except BaseException:
                self.synced.failed()
                raise
            self.synced.done(revision)

    async def _push(self) -> int:
        """Translate the store as the informer has it and bring Envoy to it; returns that revision."""
        t0 = time.monotonic()
        revision = self.informer.revision
        result, k, tunnel, secrets = await asyncio.to_thread(self._translate)
        self.ports = dict(result.ports)
        await asyncio.to_thread(self._save_ports)
        new = {**result.service_redirects, **result.pod_redirects}
        # 1. Redirects that go away or move go first: no connection may reach a port Envoy drops.
        interim = {key: port for key, port in self.redirects.items() if new.get(key) == port}
        if interim != self.redirects:
            await asyncio.to_thread(self._set_redirects, interim, result)
        # 2. The snapshot, and Envoy's answer.
        snap = result.snapshot
        by_type = {t: list(msgs) for t, msgs in snap.by_type().items()}
        if tunnel is not None:
            by_type[LISTENER] += tunnel.listeners
            by_type[CLUSTER] += tunnel.clusters
            if secrets:
                by_type[SECRET] = secrets
        xsnap = Snapshot(by_type)
        self.xds.set_snapshot(self.node, xsnap)
        self.tunnel = tunnel
        # Redirects need Envoy's listeners (and the tunnel's, the secrets they present): wait
        # for those answers only (an Envoy with no clusters never answers for endpoints).
        lds_version = xsnap.type_version(LISTENER_TYPE)
        sds_version = xsnap.type_version(SECRET)
        has_listeners = bool(xsnap.names(LISTENER_TYPE))

        def answered() -> bool:
            lds = self._acked(LISTENER_TYPE, lds_version) or self._nacked(LISTENER_TYPE,
                                                                         lds_version)
            return lds and (not secrets or self._acked(SECRET, sds_version)
                            or self._nacked(SECRET, sds_version))

        if has_listeners:
            with contextlib.suppress(TimeoutError):
                await self.xds.wait_for(answered, timeout=2.0)
        listeners_ok = self._acked(LISTENER_TYPE, lds_version) and (
            not secrets or self._acked(SECRET, sds_version))
        if tunnel is not None and listeners_ok:
            self.tunnel_acked = tunnel
            assert self._acked_changed is not None
            async with self._acked_changed:
                self._acked_changed.notify_all()
            if tunnel.listeners and self.datapath is not None and self.envoy is not None:
                await self._fill_tunnel(self.envoy.pid)
            await asyncio.to_thread(self._report_mesh, secrets)
        state = self.xds.sync_state(self.node)
        # 3. New redirects, once Envoy has the listeners.
        if listeners_ok or not has_listeners:
            self._envoy_back()
            await asyncio.to_thread(self._set_redirects, new, result)
        else:
            # Retried in a second (or at the next change).
            log.warning("Envoy has not accepted the listeners (%s); redirects wait", state)
            if self._loop is not None:
                self._loop.call_later(1.0, self._dirty.set)
        # A rejection stands while the version Envoy rejected is the one we still serve.
        self.nack = None
        for type_url, st in self.xds.status(self.node).items():
            nack = st.get("nack")
            if nack and nack.get("version") == xsnap.type_version(type_url):
                self.nack = {"type": type_url, "version": nack["version"],
                             "message": nack.get("message", ""),
                             "resource_names": list(nack.get("resource_names") or [])}
                break
        self.owners = result.owners
        await asyncio.to_thread(self._write_statuses, result.route_statuses, k)
        self.listener_targets = {port: key for key, port in result.ports.items()}
        self.error = None
        self.syncs += 1
        if self.timer is not None:
            self.timer.observe(time.monotonic() - t0)
        return revision

    async def _fill_tunnel(self, pid: int, timeout: float = 5.0) -> None:
        """Put Envoy's tunnel listeners in the socket lookup. Envoy acknowledges listeners
        before its workers listen on them (a new Envoy, under load, took up to ~0.3 s here), so
        look again every 10 ms until both are there; else retry at the next push, in 1 s."""
        assert self.datapath is not None
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.to_thread(self.datapath.set_tunnel_up, pid)
            if self.datapath.tunnel_up:
                return
            if time.monotonic() > deadline:
                log.warning("Envoy (pid %d) does not listen on the tunnel ports yet; "
                            "retrying in 1 s", pid)
                if self._loop is not None:
                    self._loop.call_later(1.0, self._dirty.set)
                return
            await asyncio.sleep(0.01)

    def _report_mesh(self, secrets: list) -> None:
        """Tell the control plane (the Node's status) which roots this node's Envoy trusts and
        which roots issued the leaves it presents: a CA rotation advances on these."""
        assert self.certs is not None
        leaves = self.certs.snapshot()
        plan = self.tunnel_acked
        mesh = {"trustedRoots": sorted(self.bundle_fingerprints),
                "leafIssuers": sorted({leaves[i].issuer_fingerprint
                                       for i in (plan.secrets if plan else ()) if i in leaves}),
                "certificates": len(plan.secrets) if plan else 0}
        if mesh == self._mesh_reported:
            return
        with self.store.transaction() as t:
            node = t.get("Node", "", self.node)
            if node is None:
                return
            status = dict(node.get("status") or {})
            status["mesh"] = mesh
            t.put_status("Node", "", self.node, status)
        self._mesh_reported = mesh

    def _nacked(self, type_url: str, version: str) -> bool:
        nack = (self.xds.status(self.node).get(type_url) or {}).get("nack")
        return bool(nack) and nack.get("version") == version

    def _acked(self, type_url: str, version: str) -> bool:
        """`version` acknowledged by the current Envoy (not by one it replaced)."""
        st = self.xds.status(self.node).get(type_url) or {}
        return (bool(version) and st.get("acked_version") == version
                and (st.get("acked_at") or 0) >= self._envoy_since)

    def _set_redirects(self, redirects: Mapping[RedirectKey, int], result) -> None:
        applied = (dict(redirects), {k: set(v) for k, v in self.l7_identities.items()})
        if applied == self._redirects_applied:
            return  # nothing new for the datapath (a resync of its maps would only wait)
        self.redirects = dict(redirects)
        if self.datapath is None:
            return
        service = {k: v for k, v in redirects.items() if k in result.service_redirects}
        pod = {k: v for k, v in redirects.items() if k in result.pod_redirects}
        self.datapath.set_proxy_redirects(service, pod, self.l7_identities)
        self._redirects_applied = applied

    def _write_statuses(self, statuses: Mapping[RouteKey, dict], k: Mapping[str, list]) -> None:
        now = now_rfc3339()
        nacked: set[RouteKey] = set()
        if self.nack is not None:
            for name in self.nack.get("resource_names") or []:
                nacked.update(self.owners.get(name, ()))
        current = {RouteKey.of(o): o for kind in ROUTE_KINDS for o in k[kind]}
        # Envoy's message rarely names the resource, and several may have changed at once: when
        # some of the suspects hold a regular expression RE2 rejects, those are the culprits.
        culprits = {key for key in nacked if key in current and _bad_regexes(current[key])}
        if culprits:
            nacked = culprits
        wanted = {}
        for key, status in statuses.items():
            obj = current.get(key)
            if obj is None:
                continue
            if key in nacked and self.nack is not None:
                status = with_nack(status, self.nack["message"])
            for p in status.get("parents") or []:
                for c in p.get("conditions") or []:
                    c["observedGeneration"] = obj["metadata"].get("generation", 1)
            wanted[key] = (obj["metadata"]["uid"], status)
        if not wanted:
            return
        # Every node's agent writes these statuses: compare with the store as it is now, not
        # with the informer's copy, or another agent's write that our informer has not seen
        # yet could stand (our own status writes do not wake us).
        with self.store.transaction() as t:
            for key, (uid, status) in wanted.items():
                cur = t.get(key.kind, key.namespace, key.name)
                if cur is None or cur["metadata"]["uid"] != uid:
                    continue
                t.put_status(key.kind, key.namespace, key.name,  # a no-op when equal
                             stamp_transition_times(status, cur.get("status"), now))

    # ---- Envoy's answers -------------------------------------------------------------------------
    def _on_nack(self, node_id: str, type_url: str, version: str, message: str,
                 resource_names: list[str]) -> None:
        log.warning("Envoy rejected %s %s: %s (suspects: %s)", type_url.rsplit(".", 1)[-1],
                    version, message, ", ".join(resource_names))
        # The next sync reads the rejection from the xDS status and writes it into the routes.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dirty.set)

    def _on_access_log(self, node: str, _log_name: str,
                       entry: accesslog_pb2.HTTPAccessLogEntry | accesslog_pb2.TCPAccessLogEntry
                       ) -> None:
        ctx = self.datapath.context if self.datapath is not None else None
        if ctx is None:
            return
        if isinstance(entry, accesslog_pb2.TCPAccessLogEntry):
            # The tunnel's failures only (they are rare: build the flow now).
            self.tunnel_failures += 1
            raw = entry.SerializeToString()
            flow = tunnel_failure(tcp_entry_to_dict(entry), ctx, raw)
            if flow is not None:
                self.flows.add(flow)
            return
        self.flows.add(AccessLogFlow(entry.SerializeToString(), node, ctx, self.listener_targets,
                                     self.l7_policy_names))

    def status(self) -> dict:
        st = self.xds.status(self.node)
        return {
            "envoy": {"pid": self.envoy.pid if self.envoy else None,
                      "alive": bool(self.envoy and self.envoy.alive()),
                      "rssBytes": self.envoy.rss_bytes() if self.envoy else None,
                      "restarts": self.envoy_restarts,
                      "epoch": (self.envoy.hot_restart.epoch
                                if self.envoy and self.envoy.hot_restart else None),
                      "draining": [e.pid for e in self._draining],
                      "hotRestarts": self.hot_restarts,
                      "exits": [e.to_json() for e in self.envoy_exits]},
            "xds": {"state": self.xds.sync_state(self.node),
                    "types": {t.rsplit(".", 1)[-1]: {"acked": v.get("acked_version"),
                                                     "sent": v.get("sent_version")}
                              for t, v in st.items()}},
            "nack": self.nack, "redirects": len(self.redirects), "syncs": self.syncs,
            "mtls": self.mtls_status(),
            "syncedRevision": self.synced.value, "error": self.error,
            "accessLogs": self.als.stats() if hasattr(self.als, "stats") else {},
        }


    def mtls_status(self) -> dict | None:
        if self.certs is None:
            return None
        acked = self.tunnel_acked
        return {"trustDomain": self.cfg.trust_domain,
                "certificates": self.certs.status(),
                "renewals": self.certs.renewals,
                "error": self.certs.last_error,
                "tunnel": {"acked": acked is not None,
                           "sources": len(acked.sources) if acked else 0,
                           "inbound": len(acked.inbound_pods) if acked else 0,
                           "failures": self.tunnel_failures},
                "trustedRoots": list(self.bundle_fingerprints)}


def meta_ref(pod: Mapping[str, Any]) -> str:
    meta = pod["metadata"]
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


def workload_secret(identity: str, leaf: Any) -> secret_pb2.Secret:
    """An SDS secret with a workload identity's certificate chain and key (named by its
    SPIFFE ID)."""
    s = secret_pb2.Secret(name=identity)
    s.tls_certificate.certificate_chain.inline_bytes = leaf.chain_pem
    s.tls_certificate.private_key.inline_bytes = leaf.key_pem
    return s


def roots_secret(roots: list[bytes]) -> secret_pb2.Secret:
    """The trust bundle as an SDS validation context."""
    s = secret_pb2.Secret(name=ROOTS_SECRET)
    s.validation_context.trusted_ca.inline_bytes = b"".join(roots)
    return s


def _bad_regexes(route: Mapping[str, Any]) -> list[str]:
    """The RegularExpression values of a route that RE2 would reject."""
    from nodemesh.route.validate import check_regex

    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            value = node.get("value")
            if node.get("type") == "RegularExpression" and isinstance(value, str) \
                    and check_regex(value):
                found.append(value)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(route.get("spec") or {})
    return found
