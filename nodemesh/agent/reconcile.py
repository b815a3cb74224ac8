"""The agent's one reconcile step: gather the inputs, build the `NodeSnapshot`, apply it.

Each step reads the store as the informer has it, allocates identities for label sets that have
none, has the node's certificates fetched or renewed, and builds the node's snapshot (pure,
`nodemesh.node.build_node_snapshot`). Then it applies it, always in this order:

1. the datapath: ipcache, services and policy, with only the redirects into the node Envoy that
   keep their listener (one that goes away or moves is removed here), and the endpoints last;
2. the node Envoy: the snapshot over xDS, and its acknowledgement of the listeners and secrets
   (the tunnel's listeners then go into the socket lookup);
3. the new redirects, once Envoy has their listeners; then route statuses.

No syncer calls another: the datapath (`DatapathSync`) and the proxy (`ProxyManager`) are
told what to do by this module only. Steps run one at a time: on store changes, every
RESYNC_SECONDS, when the proxy asks (Envoy restarted, a certificate changed, a NACK), and when a
pod's veth is attached or removed (its pod waits for the step that programs it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from nodemesh.agent.datapath import DatapathSync
from nodemesh.agent.proxy import ProxyManager
from nodemesh.cluster.config import ClusterConfig
from nodemesh.host.sandbox import Sandbox
from nodemesh.node.snapshot import (
    KINDS,
    NodeInputs,
    NodeSnapshot,
    build_node_snapshot,
    known_identities,
    label_key,
    missing_identities,
)
from nodemesh.store import Store
from nodemesh.store.identities import allocate_identity
from nodemesh.store.informer import RESYNC_SECONDS

log = logging.getLogger("nodemesh.reconcile")
DATAPATH_KINDS = {"Pod", "Service", "Namespace", "NetworkPolicy", "CiliumNetworkPolicy",
                  "Identity", "PeerAuthentication", "*"}
PROXY_KINDS = {"Pod", "Service", "Namespace", "HTTPRoute", "GRPCRoute", "CiliumNetworkPolicy",
               "Identity", "PeerAuthentication", "TrustBundle", "*"}


class NodeReconciler:
    """Keeps the node's datapath and Envoy equal to what the store says (see the module)."""

    def __init__(self, cfg: ClusterConfig, node: str, store: Store, informer,
                 datapath: DatapathSync, proxy: ProxyManager | None = None) -> None:
        self.cfg = cfg
        self.node = cfg.node(node)
        self.store = store
        self.informer = informer
        self.datapath = datapath
        self.proxy = proxy
        self.snapshot: NodeSnapshot | None = None  # the last one applied
        self.timer = None  # a context manager factory for reconcile timing (the agent's metrics)
        self._lock = threading.RLock()  # one step at a time
        self._ready_lock = threading.Lock()
        self._ready: dict[str, tuple[dict, Any]] = {}  # new pods waiting for a step
        self._ready_errors: dict[str, Exception] = {}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._retry: threading.Timer | None = None
        # Kubernetes mode: the other nodes (and their addresses) are the API's Node objects.
        self.kubernetes = cfg.store.get("type") == "kubernetes"
        self._datapath_kinds = DATAPATH_KINDS | ({"Node"} if self.kubernetes else set())
        if proxy is not None:
            proxy.on_change = self.kick
            proxy.reconcile_now = self.reconcile

    # ---- triggers -------------------------------------------------------------------------------
    def start(self) -> None:
        """Follow the store (and the proxy's requests) from now on."""
        self.informer.add_listener(self._on_store_change)
        threading.Thread(target=self._loop, name="reconcile", daemon=True).start()
        self.kick()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._retry is not None:
            self._retry.cancel()

    def kick(self) -> None:
        """Something the snapshot depends on changed outside the store."""
        if self.proxy is not None:
            self.proxy.synced.changed()
        self._dirty.set()

    def _kick_later(self, seconds: float) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._retry = threading.Timer(seconds, self.kick)
        self._retry.daemon = True
        self._retry.start()

    def _on_store_change(self, kinds: set[str]) -> None:
        for synced, watched in ((self.datapath.synced, self._datapath_kinds),
                                (self.proxy.synced if self.proxy else None, PROXY_KINDS)):
            if synced is None:
                continue
            if kinds & watched:
                synced.changed()
            else:
                # Nothing it depends on changed (a node heartbeat, a route's status).
                synced.unrelated(self.informer.revision)
        if kinds & (self._datapath_kinds | (PROXY_KINDS if self.proxy else set())):
            self._dirty.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(RESYNC_SECONDS)
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile failed; retrying")
                time.sleep(0.5)
                self._dirty.set()

    # ---- pod hooks (PodManager threads) ---------------------------------------------------------
    def sandbox_ready(self, pod: dict, sb: Sandbox) -> None:
        """Attach the programs to a new pod's veth and program its policy; the pod's
        containers start only after this returns."""
        ep = self.datapath.attach(pod, sb)
        uid = ep.uid
        # Pods created together share one step: whichever thread gets the lock first programs
        # every pod that is waiting (a step per pod would queue them behind each other).
        with self._ready_lock:
            self._ready[uid] = (pod, ep)
        with self._lock:
            with self._ready_lock:
                if uid in self._ready_errors:
                    raise self._ready_errors.pop(uid)
                batch, self._ready = self._ready, {}
            if not batch:
                return  # another pod's step programmed this one
            self.datapath.add_endpoints([e for _, e in batch.values()])
            try:
                self.reconcile(starting={u: (p, e.sandbox.ip) for u, (p, e) in batch.items()})
            except Exception as err:
                with self._ready_lock:
                    self._ready_errors.update({u: err for u in batch if u != uid})
                raise

    def sandbox_removed(self, sb: Sandbox) -> None:
        with self._lock:
            if self.datapath.remove_endpoint(sb):
                self.reconcile()
        self.datapath.detach(sb)

    # ---- the step ---------------------------------------------------------------------------------
    def reconcile(self, starting: Mapping[str, tuple[dict, str]] | None = None) -> None:
        """One step (see the module docstring); returns once every stage is done."""
        with self._lock:
            dp, proxy = self.datapath, self.proxy
            pushing = proxy is not None and proxy.can_push()
            revision = self.informer.revision
            dp.synced.begin()
            if pushing:
                assert proxy is not None
                proxy.synced.begin()
            try:
                timed = self.timer("datapath") if self.timer else contextlib.nullcontext()
                with timed:
                    snap = self._build(starting)
                    dp.apply(snap)
            except BaseException:
                dp.synced.failed()
                if pushing:
                    assert proxy is not None
                    proxy.synced.failed()
                raise
            dp.synced.done(revision)
            self.snapshot = snap
            if proxy is None:
                return
            proxy.context = snap.context
            if not pushing:
                return
            try:
                self._proxy_stages(proxy, snap)
            except BaseException as e:
                proxy.synced.failed()
                proxy.error = f"{type(e).__name__}: {e}"
                raise
            proxy.synced.done(revision)

    def _build(self, starting: Mapping[str, tuple[dict, str]] | None) -> NodeSnapshot:
        dp, proxy = self.datapath, self.proxy
        dp.adopt_local_endpoints()
        k = self.informer.kinds(KINDS)
        inp = NodeInputs(
            node=self.node.name, node_ip=self.node.ip,
            node_ips=self._node_ips(), objects=k,
            attached=dp.attached(), starting=dict(starting or {}),
            covering=proxy.covering(k["Pod"]) if proxy is not None else {},
            identities=known_identities(k["Identity"]), mtls=self.cfg.mtls,
            trust_domain=self.cfg.trust_domain, proxy=proxy is not None,
            proxy_ports=dict(proxy.ports) if proxy is not None else {},
            applied=dp.applied, previous_lb=dp.lb_state, maglev_m=dp.dp.maglev_m,
            previous_policy=dict(dp.lowered),
            boot_offset_ns=time.time_ns() - time.monotonic_ns(),
            capacities=dp.capacities())
        missing = missing_identities(inp)
        if missing:
            ids = dict(inp.identities)
            for labels in missing:
                ids[label_key(labels)] = allocate_identity(self.store, labels)
            inp = dataclasses.replace(inp, identities=ids)
        if proxy is not None and proxy.certs is not None:
            inp = dataclasses.replace(inp, certificates=proxy.certificates(inp))
        return build_node_snapshot(inp)

    def _node_ips(self) -> dict[str, str]:
        ips = {n.name: n.ip for n in self.cfg.nodes}
        if self.kubernetes:
            from nodemesh.agent.kubernetes import node_addresses

            ips = {**node_addresses(self.informer.list("Node")), **ips}
        return ips

    def _proxy_stages(self, proxy: ProxyManager, snap: NodeSnapshot) -> None:
        t0 = time.monotonic()
        assert snap.envoy is not None
        outcome = proxy.push(snap.envoy)
        if outcome.tunnel_acked:
            if snap.envoy.tunnel is not None and snap.envoy.tunnel.listeners \
                    and proxy.envoy is not None:
                self._fill_tunnel(proxy.envoy.pid)
            proxy.report_mesh()
        if outcome.listeners_ok:
            proxy.envoy_back()
            self.datapath.apply_redirects(snap)
            proxy.redirects = snap.redirects.all()
        else:
            # Retried in a second (or at the next change).
            log.warning("Envoy has not accepted the listeners (%s); redirects wait",
                        proxy.xds.sync_state(proxy.node))
            self._kick_later(1.0)
        proxy.finish(snap.envoy, self.informer.kinds(("HTTPRoute", "GRPCRoute")))
        if proxy.timer is not None:
            proxy.timer.observe(time.monotonic() - t0)

    def _fill_tunnel(self, pid: int, timeout: float = 5.0) -> None:
        """Put Envoy's tunnel listeners in the socket lookup. Envoy acknowledges listeners
        before its workers listen on them (a new Envoy, under load, took up to ~0.3 s here), so
        look again every 10 ms until both are there; else retry in 1 s."""
        deadline = time.monotonic() + timeout
        while True:
            self.datapath.set_tunnel_up(pid)
            if self.datapath.tunnel_up:
                return
            if time.monotonic() > deadline:
                log.warning("Envoy (pid %d) does not listen on the tunnel ports yet; "
                            "retrying in 1 s", pid)
                self._kick_later(1.0)
                return
            time.sleep(0.01)
