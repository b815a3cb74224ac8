"""The agent's L7 half: the node's Envoy, its xDS snapshot, redirects into it, route statuses.

The node snapshot (`nodemesh.node.build_node_snapshot`) carries the node Envoy's resources; the
reconcile step (`nodemesh.agent.reconcile`) hands them to `push`, which serves them over xDS and
waits for Envoy's answer, and then to `finish`, which writes route statuses (Accepted,
ResolvedRefs, and Envoy's NACKs) back to the routes. This module also keeps Envoy running (its
exits, hot restarts), fetches the node's workload certificates, and turns Envoy's access logs
(over gRPC) into L7 flows.

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

from nodemesh.agent.certs import CertManager
from nodemesh.agent.certs import state_file as certs_state_file
from nodemesh.agent.l7flows import AccessLogFlow
from nodemesh.agent.tunnelflows import tunnel_failure
from nodemesh.certs.spiffe import spiffe_id
from nodemesh.cluster.config import ClusterConfig
from nodemesh.cluster.trust import fingerprint_of
from nodemesh.errors import NodemeshError
from nodemesh.host import netns
from nodemesh.host.files import read_json, write_json_atomic
from nodemesh.host.procs import describe_exit, reaped_status
from nodemesh.mtls.tunnel import TunnelPlan
from nodemesh.node.snapshot import Certificates, EnvoyPart, NodeInputs, trust_roots, wanted_certificates
from nodemesh.observe.agentevents import AgentEventType, agent_event
from nodemesh.observe.flow import StaticContext
from nodemesh.observe.ring import FlowRing
from nodemesh.proxy.als import AccessLogReceiver, tcp_entry_to_dict
from nodemesh.proxy.envoy import (
    EnvoyProcess,
    HotRestart,
    base_id_path,
    bootstrap,
    remove_shared_memory,
)
from nodemesh.proxy.external import write_bootstrap
from nodemesh.proxy.snapshot import SECRET
from nodemesh.proxy.xds import XdsServer
from nodemesh.route import PROXY_IP, RedirectKey, RouteKey, stamp_transition_times, with_nack
from nodemesh.route.protos import LISTENER_TYPE
from nodemesh.store import Store
from nodemesh.store.base import now_rfc3339
from nodemesh.store.informer import SyncedRevision

log = logging.getLogger("nodemesh.proxy")
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")


@dataclass(frozen=True)
class PushOutcome:
    """Envoy's answer to a push."""

    listeners_ok: bool  # it has the listeners (and secrets), or there are none to wait for
    tunnel_acked: bool  # it took the tunnel's listeners and secrets


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
    def __init__(self, cfg: ClusterConfig, node: str, store: Store, flows: FlowRing,
                 concurrency: int = 2) -> None:
        self.cfg = cfg
        self.node = node
        self.store = store
        self.flows = flows
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
        self.context: StaticContext | None = None  # set by the reconcile step (for L7 flows)
        # Set by the reconcile step: ask for a step soon / run one now (blocking).
        self.on_change: Any = lambda: None
        self.reconcile_now: Any = lambda: None
        self.pushing = False  # the agent has set the datapath up for the proxy: pushes may go
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
        self._waiting_logged = False  # external mode: "waiting for the node Envoy" said once
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

    def can_push(self) -> bool:
        return self.pushing and self._loop is not None

    def _kick(self) -> None:
        """Something the snapshot depends on changed outside the store (a certificate)."""
        self.on_change()

    @property
    def external(self) -> bool:
        """The node Envoy is started by someone else (Kubernetes: the nodemesh-envoy DaemonSet);
        the agent writes its bootstrap and adopts it (nodemesh.proxy.external)."""
        return self.cfg.extra.get("proxy") == "external"

    def _bootstrap(self) -> dict:
        return bootstrap(self.node, self.socket,
                         admin_socket=os.path.join(self.envoy_dir, "admin.sock"),
                         cluster=self.cfg.name)

    def _ensure_envoy(self) -> None:
        pidfile = os.path.join(self.envoy_dir, "envoy.json")
        if self.envoy is not None and self.envoy.alive():
            return
        if self.external:
            write_bootstrap(self.envoy_dir, self._bootstrap())
        adopted = EnvoyProcess.adopt(pidfile)
        if adopted is not None:
            self.envoy = adopted
            if not (self.external and self.envoy_exits):
                # (An external Envoy that replaced one this agent saw exit: only what it
                # acknowledges from now on counts; `_on_envoy_exit` set the time.)
                self._envoy_since = 0.0
            self._waiting_logged = False
            log.info("adopted the node's Envoy (pid %d)", adopted.pid)
            return
        if self.external:
            if not self._waiting_logged:
                log.warning("waiting for the node Envoy (nodemesh-envoy) to start from %s",
                            self.envoy_dir)
                self._waiting_logged = True
            self.envoy = None
            return
        # No Envoy of this node runs: the shared memory of an earlier one's hot restart is stale.
        remove_shared_memory(self.base_id_path)
        self.envoy = self._start_envoy(HotRestart(self.base_id_path))
        log.info("started the node's Envoy (pid %d)", self.envoy.pid)

    def _start_envoy(self, hot_restart: HotRestart) -> EnvoyProcess:
        """Start an Envoy; it is the current one from then on (see `_acked`)."""
        config = self._bootstrap()
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
        if self.external:
            raise NodemeshError(f"node {self.node}'s Envoy is not the agent's to restart (\"proxy\": "
                                "\"external\"): restart its nodemesh-envoy pod")
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
        await asyncio.to_thread(self.reconcile_now)
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
        then = ("waiting for nodemesh-envoy to start another" if self.external
                else "starting another")
        log.error("the node's Envoy (pid %s) %s; %s", pid, how, then)
        self.envoy_exits = [*self.envoy_exits[-4:], EnvoyExit(pid or 0, how)]
        self.flows.add(agent_event(self.node, AgentEventType.ENVOY_EXITED,
                                   f"the node Envoy (pid {pid}) {how}; {then}",
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

    def envoy_back(self) -> None:
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
        """Restart Envoy the moment it exits (its pidfd), and check it every second in case
        that was missed; renew certificates when due. Each asks for a reconcile step."""
        try:
            await self._loop_until(stopping)
        finally:
            self._unwatch_envoy()

    async def _loop_until(self, stopping: asyncio.Event) -> None:
        last_check = 0.0
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
                        if self.envoy is not None:
                            self.envoy_restarts += 1
                        self._watch_envoy()
                        self._how_it_ended()
                    except Exception as e:
                        self.error = f"cannot start Envoy: {e}"
                        log.error("%s", self.error)
            if woke:
                self.on_change()

    async def stop(self) -> None:
        await self.xds.stop()

    # ---- the reconcile step's stages ---------------------------------------------------------------
    def covering(self, pods: list[dict]) -> dict[str, tuple[dict, str]]:
        """Pods whose tunnel is being readied (`cover_pod`) that the store does not show with
        their address yet."""
        known = {(p["metadata"].get("uid"), (p.get("status") or {}).get("podIP")) for p in pods}
        for uid, (_pod, ip) in list(self._pending_local.items()):
            if (uid, ip) in known:
                self._pending_local.pop(uid, None)
        return dict(self._pending_local)

    def certificates(self, inp: NodeInputs) -> Certificates:
        """The node's workload certificates for the tunnel, fetched or renewed as needed."""
        assert self.certs is not None
        roots, signing = trust_roots(inp.objects)
        self.certs.set_bundle(roots, signing)
        self.certs.sync(wanted_certificates(inp))
        self.bundle_fingerprints = [fingerprint_of(r) for r in roots]
        return Certificates(ready=frozenset(self.certs.ready()), leaves=self.certs.snapshot())

    def push(self, envoy: EnvoyPart, timeout: float = 30.0) -> PushOutcome:
        """Serve `envoy`'s resources and wait (up to 2 s) for Envoy's answer (from a thread)."""
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self._push(envoy), self._loop)
        return fut.result(timeout)

    async def _push(self, envoy: EnvoyPart) -> PushOutcome:
        assert self._push_lock is not None
        async with self._push_lock:
            self.ports = dict(envoy.result.ports)
            await asyncio.to_thread(self._save_ports)
            self.l7_policy_names = dict(envoy.policy_names)
            self.listener_targets = dict(envoy.listener_targets)
            xsnap = envoy.snapshot
            self.xds.set_snapshot(self.node, xsnap)
            self.tunnel = envoy.tunnel
            # Redirects need Envoy's listeners (and the tunnel's, the secrets they present): wait
            # for those answers only (an Envoy with no clusters never answers for endpoints).
            lds_version = xsnap.type_version(LISTENER_TYPE)
            sds_version = xsnap.type_version(SECRET)
            has_listeners = bool(xsnap.names(LISTENER_TYPE))
            secrets = envoy.has_secrets

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
            tunnel_acked = False
            if envoy.tunnel is not None and listeners_ok:
                self.tunnel_acked = envoy.tunnel
                tunnel_acked = True
                assert self._acked_changed is not None
                async with self._acked_changed:
                    self._acked_changed.notify_all()
            return PushOutcome(listeners_ok or not has_listeners, tunnel_acked)

    def finish(self, envoy: EnvoyPart, k: Mapping[str, list]) -> None:
        """After a push: the rejection that stands, and the routes' statuses."""
        xsnap = envoy.snapshot
        # A rejection stands while the version Envoy rejected is the one we still serve.
        self.nack = None
        for type_url, st in self.xds.status(self.node).items():
            nack = st.get("nack")
            if nack and nack.get("version") == xsnap.type_version(type_url):
                self.nack = {"type": type_url, "version": nack["version"],
                             "message": nack.get("message", ""),
                             "resource_names": list(nack.get("resource_names") or [])}
                break
        self.owners = envoy.result.owners
        self._report("the routes' statuses",
                     lambda: self._write_statuses(envoy.result.route_statuses, k))
        self.error = None
        self.syncs += 1

    def report_mesh(self) -> None:
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

        def write() -> None:
            for attempt in self.store.retrying():  # the heartbeat writes the Node's status too
                with attempt as t:
                    node = t.get("Node", "", self.node)
                    if node is None:
                        return
                    status = dict(node.get("status") or {})
                    status["mesh"] = mesh
                    t.put_status("Node", "", self.node, status)
            self._mesh_reported = mesh

        self._report("the Node's mesh status", write)

    # What the proxy stage reports into the store (route statuses, the Node's mesh status) is
    # for users: with the store unavailable the step still counts (the datapath and Envoy are
    # programmed); the report is written by the step after the store is back (the informer lists
    # again then, which runs one). While the last write failed less than this long ago, the
    # steps in between do not try (each try can wait STORE_TIMEOUT).
    REPORT_BACKOFF = 2.0
    _report_failed_at: float | None = None

    _report_retry: threading.Timer | None = None

    def _report_later(self) -> None:
        """One more step once the back-off is over (the report waits for one)."""
        if self._report_retry is None or not self._report_retry.is_alive():
            self._report_retry = threading.Timer(self.REPORT_BACKOFF, lambda: self.on_change())
            self._report_retry.daemon = True
            self._report_retry.start()

    def _report(self, what: str, write: Any) -> None:
        failed_at = self._report_failed_at
        if failed_at is not None and time.monotonic() - failed_at < self.REPORT_BACKOFF:
            self._report_later()
            return
        try:
            write()
        except NodemeshError as e:
            if not str(e).startswith("store unavailable"):
                raise
            if failed_at is None:
                log.warning("could not write %s (%s); the next step after the store is back "
                            "writes it", what, e)
            self._report_failed_at = time.monotonic()
            self._report_later()
            return
        if failed_at is not None:
            log.info("the store answers again; %s written", what)
            self._report_failed_at = None

    def _nacked(self, type_url: str, version: str) -> bool:
        nack = (self.xds.status(self.node).get(type_url) or {}).get("nack")
        return bool(nack) and nack.get("version") == version

    def _acked(self, type_url: str, version: str) -> bool:
        """`version` acknowledged by the current Envoy (not by one it replaced)."""
        st = self.xds.status(self.node).get(type_url) or {}
        return (bool(version) and st.get("acked_version") == version
                and (st.get("acked_at") or 0) >= self._envoy_since)

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
        # yet could stand (our own status writes do not wake us). On etcd the other agents' (and
        # apply's) writes of the same routes make a commit lose with Conflict: run it again
        # rather than fail the whole reconcile step.
        for attempt in self.store.retrying():
            with attempt as t:
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
        # The next step reads the rejection from the xDS status and writes it into the routes.
        self.on_change()

    def _on_access_log(self, node: str, _log_name: str,
                       entry: accesslog_pb2.HTTPAccessLogEntry | accesslog_pb2.TCPAccessLogEntry
                       ) -> None:
        ctx = self.context
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
