"""The agent's datapath syncer: store objects → identities, ipcache, services, policy → BPF maps.

Thin on purpose: the pure compilers (`nodemesh.identity`, `nodemesh.policy`,
`nodemesh.datapath.lb`) decide what the maps should hold; this module gathers their inputs from the
informer, converts their outputs to the maps' structs, and lets `Datapath.sync_map` write only the
difference. It also drains the flow-event ring into the agent's flow ring.

Order matters where it touches safety: a pod's policy entries are written before its
`nm_endpoints` entry (until then its veth drops everything), and its endpoint entry is removed
before its policy entries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from nodemesh.cluster.config import NODE_DNS_IP, POD_GATEWAY, ClusterConfig
from nodemesh.cluster.controllers import is_deleting, pod_ready
from nodemesh.datapath import layout as L
from nodemesh.datapath import libbpf
from nodemesh.datapath.lb import LbService, LbState, compile_lb
from nodemesh.datapath.loader import Datapath, mount_bpffs
from nodemesh.host.sandbox import Sandbox
from nodemesh.identity import security_labels
from nodemesh.mtls.tunnel import DatapathTunnel, datapath_tunnel, mesh_pods
from nodemesh.observe.flow import (
    RESERVED_IDENTITIES,
    RawEvent,
    StaticContext,
    labels_of,
    workloads_of,
)
from nodemesh.observe.flow import Endpoint as FlowEndpoint
from nodemesh.observe.ring import FlowRing
from nodemesh.policy import Compiler, Endpoint, PolicyCompileError, PolicyInput
from nodemesh.policy.lower import LoweredPolicy, lower_policy
from nodemesh.route.inputs import PROXY_IP
from nodemesh.store import Store
from nodemesh.store.identities import allocate_identity
from nodemesh.store.informer import RESYNC_SECONDS, SyncedRevision

log = logging.getLogger("nodemesh.datapath")
EVENTS_NICE = 10  # the flow-event reader's nice, relative to the agent's
WATCHED = {"Pod", "Service", "Namespace", "NetworkPolicy", "CiliumNetworkPolicy", "Identity",
           "PeerAuthentication", "*"}


@dataclass
class LocalEndpoint:
    uid: str
    namespace: str
    name: str
    sandbox: Sandbox
    ifindex: int
    identity: int = 0
    programmed: bool = False  # its nm_endpoints entry exists
    netns_cookie: int = 0  # what socket-LB events carry instead of a source address


@dataclass
class SyncStats:
    runs: int = 0
    last_seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)  # "ns/pod" -> policy compile error


def named_ports(pod: Mapping) -> dict[str, tuple[tuple[str, int], ...]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for c in pod["spec"].get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name"):
                out.setdefault(p["name"], []).append((p.get("protocol", "TCP"), p["containerPort"]))
    return {k: tuple(v) for k, v in out.items()}


def resolve_target_port(pod: Mapping, port: Mapping) -> int | None:
    """A service port's targetPort on one pod (a name resolves per pod, as Kubernetes does)."""
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    proto = port.get("protocol", "TCP")
    for c in pod["spec"].get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target and p.get("protocol", "TCP") == proto:
                return int(p["containerPort"])
    return None


def lb_services(services: list[dict], pods: list[dict],
                redirects: Mapping | None = None) -> tuple[list[LbService], dict]:
    """Every ClusterIP service port → an LbService with its ready backends (pure); a port in
    `redirects` ((ip, port, protocol) keys with .ip/.port/.protocol) goes to that proxy port."""
    proxy_ports = {(k.ip, k.port, k.protocol): v for k, v in (redirects or {}).items()}
    from nodemesh.model.labels import service_selects

    out: list[LbService] = []
    names: dict[tuple[str, int], tuple[str, str]] = {}
    for svc in services:
        spec, meta = svc["spec"], svc["metadata"]
        vip = spec.get("clusterIP")
        if not vip or vip == "None":
            continue
        selected = [p for p in pods if p["metadata"]["namespace"] == meta["namespace"]
                    and pod_ready(p) and not is_deleting(p) and (p.get("status") or {}).get("podIP")
                    and service_selects(spec.get("selector"), p["metadata"].get("labels") or {})]
        annotations = meta.get("annotations") or {}
        algorithm = annotations.get("service.cilium.io/lb-algorithm", "random")
        affinity = None
        if spec.get("sessionAffinity") == "ClientIP":
            affinity = int(((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
                           .get("timeoutSeconds", 10800))
        for port in spec.get("ports") or []:
            backends = []
            for p in selected:
                target = resolve_target_port(p, port)
                if target:
                    backends.append((p["status"]["podIP"], target))
            proto = port.get("protocol", "TCP")
            out.append(LbService(vip=vip, port=port["port"], proto=proto,
                                 backends=sorted(set(backends)), algorithm=algorithm,
                                 affinity_timeout=affinity,
                                 l7_proxy_port=proxy_ports.get((vip, port["port"], proto))))
            names[(vip, port["port"])] = (meta["namespace"], meta["name"])
    return out, names


class DatapathSync:
    """Owns the node's Datapath and keeps its maps equal to what the store says."""

    def __init__(self, cfg: ClusterConfig, node: str, store: Store, informer, flows: FlowRing,
                 local_pods, maglev_table_size: int = 16381) -> None:
        self.cfg = cfg
        self.node = cfg.node(node)
        self.store = store
        self.informer = informer
        self.flows = flows
        self.local_pods = local_pods  # uid -> LocalPod (the PodManager's records)
        self.dp = Datapath(node, cfg.bpffs, cfg.node_cgroup(node),
                           maglev_table_size=maglev_table_size)
        self.endpoints: dict[str, LocalEndpoint] = {}  # uid -> endpoint
        self.lb_state: LbState | None = None
        self.stats = SyncStats()
        self.context = StaticContext(node_name=node)
        self._lock = threading.RLock()
        self._ready_lock = threading.Lock()
        self._ready: dict[str, tuple[dict, LocalEndpoint]] = {}  # new pods waiting for a sync
        self._ready_errors: dict[str, Exception] = {}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._lowered: dict[int, LoweredPolicy] = {}  # ifindex -> last good policy
        self._cookie_ips: dict[int, str] = {}
        self.synced = SyncedRevision()
        self.identity_workloads: dict[int, tuple[str, str]] = {}  # for per-workload metrics
        self.pod_identities: dict[tuple[str, str], int] = {}  # (namespace, name) -> identity
        self.policy_input: PolicyInput | None = None  # the last compiler input (the proxy uses it)
        self.on_policy_input: list = []  # called after a sync that changed policy_input or identities
        # Destinations the node Envoy takes over (set by the proxy manager): services with routes
        # and pod ports with L7 policy, (ip, port, protocol) -> listener port.
        self.service_redirects: dict = {}
        self.pod_redirects: dict = {}
        self.pod_redirect_identities: dict = {}  # RedirectKey -> client identities (0 = any)
        self.proxy_ip = "0.0.0.0"
        self.timer = None  # set by the agent: a context manager factory for reconcile timing
        self.local_ips: frozenset[bytes] = frozenset()
        self.on_local_ips = None  # called with local_ips after each sync (the agent's metrics)
        self._tunnel_socks: dict[int, int] = {}  # nm_tunnel_socks as last written (cookies)
        self._tunnel_up = False  # set_tunnel_up has done its work for the listeners it saw

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        mount_bpffs(self.cfg.bpffs)
        self.dp.ensure_built()
        self.dp.load()
        # Keep the proxy settings a previous agent made (the node Envoy outlives agents): a
        # moment with proxy_ip 0 would let connections around the proxy.
        current = self.dp.config.get(L.u32(0))
        proxy_ip = L.ip4_str(current.proxy_ip) if current is not None else "0.0.0.0"
        flags = L.ConfigFlags(current.flags) if current is not None else L.ConfigFlags.NONE
        self.proxy_ip = proxy_ip
        self.dp.set_config(self.node.ip, NODE_DNS_IP, proxy_ip, flags)
        self.lb_state = self.dp.current_lb_state()
        self._adopt_redirects()
        self.reader = self.dp.open_events(self._on_event, raw=True)
        self.informer.add_listener(self._on_store_change)
        threading.Thread(target=self._sync_loop, name="datapath-sync", daemon=True).start()
        threading.Thread(target=self._event_loop, name="datapath-events", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _on_store_change(self, kinds: set[str]) -> None:
        if kinds & WATCHED:
            self.synced.changed()
            self._dirty.set()
        else:
            # Nothing the datapath depends on changed (a node heartbeat, a route's status).
            self.synced.unrelated(self.informer.revision)

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(RESYNC_SECONDS)
            self._dirty.clear()
            try:
                self.sync()
            except Exception:
                log.exception("datapath sync failed; retrying")
                time.sleep(0.5)
                self._dirty.set()

    def _event_loop(self) -> None:
        # Flow events are best effort: their reader yields the CPU to the node's workloads
        # (a full ring loses events, counted in nm_lost; it never slows a packet).
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid,
                           min(19, os.getpriority(os.PRIO_PROCESS, tid) + EVENTS_NICE))
        while not self._stop.is_set():
            try:
                self.reader.drain()
            except Exception:
                log.exception("draining flow events failed")
            time.sleep(0.01)

    # ---- pod hooks (PodManager threads) -----------------------------------------------------
    def sandbox_ready(self, pod: dict, sb: Sandbox) -> None:
        """Attach the programs to a new pod's veth and program its policy; the pod's
        containers start only after this returns."""
        ifindex = self.dp.attach_endpoint(sb.host_ifname)
        meta = pod["metadata"]
        uid = meta["uid"]
        ep = LocalEndpoint(uid, meta["namespace"], meta["name"], sb, ifindex,
                           netns_cookie=_cookie(sb))
        # Pods created together share one sync: whichever thread gets the lock first programs
        # every pod that is waiting (a sync per pod would queue them behind each other).
        with self._ready_lock:
            self._ready[uid] = (pod, ep)
        with self._lock:
            with self._ready_lock:
                if uid in self._ready_errors:
                    raise self._ready_errors.pop(uid)
                batch, self._ready = self._ready, {}
            if not batch:
                return  # another pod's sync programmed this one
            for u, (_, e) in batch.items():
                self.endpoints[u] = e
            try:
                self._sync_locked(extra_pods={u: (p, e.sandbox.ip) for u, (p, e) in batch.items()})
            except Exception as err:
                with self._ready_lock:
                    self._ready_errors.update({u: err for u in batch if u != uid})
                raise

    def sandbox_removed(self, sb: Sandbox) -> None:
        with self._lock:
            ep = self.endpoints.pop(sb.uid, None)
            if ep is not None:
                self.dp.endpoints.delete(L.u32(ep.ifindex))  # fail closed first
                self._lowered.pop(ep.ifindex, None)
                self._sync_locked()
        self.dp.detach_endpoint(sb.host_ifname)

    # ---- the sync ---------------------------------------------------------------------------
    def sync(self) -> None:
        with self._lock:
            if self.timer is not None:
                with self.timer("datapath"):
                    self._sync_locked()
            else:
                self._sync_locked()

    def set_proxy(self, proxy_ip: str, proxy_cgroup: str) -> None:
        """The node Envoy is up at proxy_ip: its replies must come back to it (the return path
        on the underlay device and pod veths), its upstream connections pass their client's
        egress policy (connect4_proxy on its cgroup), and socket-LB may now send to it."""
        with self._lock:
            self.dp.attach_netdev("eth0")
            self.dp.attach_proxy_cgroup(proxy_cgroup)
            self.dp.install_proxy_routing()
            self.proxy_ip = proxy_ip
            current = self.dp.config.get(L.u32(0))
            keep = (L.ConfigFlags(current.flags) & L.ConfigFlags.TUNNEL if current is not None
                    else L.ConfigFlags.NONE)
            self.dp.set_config(self.node.ip, NODE_DNS_IP, proxy_ip,
                               L.ConfigFlags.PROXY_RETURN | keep)

    def set_proxy_redirects(self, service: Mapping, pod: Mapping,
                            pod_identities: Mapping | None = None) -> None:
        """New redirect sets from the proxy manager; applied before this returns."""
        with self._lock:
            self.service_redirects = dict(service)
            self.pod_redirects = dict(pod)
            self.pod_redirect_identities = dict(pod_identities or {})
            self._sync_locked()

    def _adopt_redirects(self) -> None:
        """Keep the redirects into the node Envoy that a previous agent programmed until this
        agent's proxy manager has computed its own: until then the services with routes and
        the pod ports with L7 policy must stay behind the proxy."""
        from nodemesh.route.inputs import RedirectKey

        protos = {int(L.Proto.TCP): "TCP", int(L.Proto.UDP): "UDP"}
        for k, v in self.dp.services.items():
            if k.backend_slot == 0 and v.flags & L.ServiceFlags.L7 and v.l7_proxy_port:
                key = RedirectKey(L.ip4_str(k.address), k.dport, protos.get(k.protocol, "TCP"))
                self.service_redirects[key] = v.l7_proxy_port
        for k, v in self.dp.l7_redir.items():
            key = RedirectKey(L.ip4_str(k.addr), k.port, protos.get(k.protocol, "TCP"))
            self.pod_redirects[key] = v.proxy_port
            self.pod_redirect_identities.setdefault(key, set()).add(k.identity)
        if self.service_redirects or self.pod_redirects:
            log.info("kept %d service and %d pod-port redirects into the node Envoy",
                     len(self.service_redirects), len(self.pod_redirects))

    def _identity_for(self, labels: dict[str, str], known: dict[tuple, int]) -> int:
        key = tuple(sorted(labels.items()))
        ident = known.get(key)
        if ident is None:
            ident = allocate_identity(self.store, labels)
            known[key] = ident
        return ident

    def _sync_locked(self, extra_pods: Mapping[str, tuple[dict, str]] | None = None) -> None:
        self.synced.begin()
        try:
            revision = self._program(extra_pods)
        except BaseException:
            self.synced.failed()
            raise
        self.synced.done(revision)

    def _program(self, extra_pods: Mapping[str, tuple[dict, str]] | None) -> int:
        """Write the maps from the store as the informer has it; returns that revision."""
        t0 = time.monotonic()
        revision = self.informer.revision
        k = self.informer.kinds(("Pod", "Service", "Namespace", "NetworkPolicy",
                                 "CiliumNetworkPolicy", "Identity", "PeerAuthentication"))
        namespaces = {n["metadata"]["name"]: n for n in k["Namespace"]}
        known = {tuple(sorted((o.get("spec") or {}).get("labels", {}).items())): int(o["metadata"]["name"])
                 for o in k["Identity"]}
        # Every pod with an address: from the store, and local pods not reported yet.
        pods: dict[str, tuple[dict, str]] = {}
        for p in k["Pod"]:
            ip = (p.get("status") or {}).get("podIP")
            if ip and not is_deleting(p):
                pods[p["metadata"]["uid"]] = (p, ip)
        for uid, ep in self.endpoints.items():
            if uid not in pods:
                cur = self.informer.get("Pod", ep.namespace, ep.name)
                if cur is not None and cur["metadata"]["uid"] == uid:
                    pods[uid] = (cur, ep.sandbox.ip)
        pods.update(extra_pods or {})
        self._adopt_local_endpoints()

        # identities
        identity_of: dict[str, int] = {}
        ident_labels: dict[int, dict[str, str]] = {}
        for uid, (p, _) in pods.items():
            labels = security_labels(p, namespaces.get(p["metadata"]["namespace"]))
            identity_of[uid] = self._identity_for(labels, known)
            ident_labels[identity_of[uid]] = labels
        for key, ident in known.items():
            ident_labels.setdefault(ident, dict(key))

        # The mutual-TLS tunnel: which pods of other nodes this node's pods reach through it
        # (ipcache flags), and which local pods receive through it (their endpoint flag).
        tunnel = self._tunnel_flags(pods, k["PeerAuthentication"])

        # ipcache: every pod, every node, the world
        node_ips = {n.name: n.ip for n in self.cfg.nodes}
        ipcache: list[tuple[L.IpcacheKey, L.IpcacheEntry]] = [
            (L.IpcacheKey.of("0.0.0.0/0"), L.IpcacheEntry(L.Identity.WORLD, 0, 0, 0))]
        for n in self.cfg.nodes:
            ident = L.Identity.HOST if n.name == self.node.name else L.Identity.REMOTE_NODE
            ipcache.append((L.IpcacheKey.of(f"{n.ip}/32"), L.IpcacheEntry(ident, L.ip4(n.ip), 0, 0)))
        for ip in (POD_GATEWAY, NODE_DNS_IP, PROXY_IP):
            ipcache.append((L.IpcacheKey.of(f"{ip}/32"),
                            L.IpcacheEntry(L.Identity.HOST, L.ip4(self.node.ip), 0, 0)))
        for uid, (p, ip) in pods.items():
            host = node_ips.get(p["spec"].get("nodeName") or "", self.node.ip)
            ipcache.append((L.IpcacheKey.of(f"{ip}/32"),
                            L.IpcacheEntry(identity_of[uid], L.ip4(host),
                                           tunnel.ipcache_flags.get(ip, 0), 0)))
        # Port-level modes first: a flag that says "look at the ports" must find them there.
        self.dp.sync_map("nm_tunnel_port", [L.tunnel_port_entry(ip, port, t)
                                            for ip, port, t in tunnel.port_overrides])
        self.dp.sync_map("nm_ipcache", ipcache)

        # services
        all_pods = [p for p, _ in pods.values()]
        svcs, svc_names = lb_services(k["Service"], all_pods, self.service_redirects)
        state = compile_lb(svcs, self.lb_state, self.dp.maglev_m)
        self.dp.apply_lb(state)
        self.lb_state = state

        # policy, for the local endpoints
        inp = PolicyInput(
            endpoints=[Endpoint(p["metadata"]["namespace"], p["metadata"]["name"],
                                dict(p["metadata"].get("labels") or {}), ip, identity_of[uid],
                                named_ports(p)) for uid, (p, ip) in pods.items()],
            namespaces={n: dict(o["metadata"].get("labels") or {}) for n, o in namespaces.items()},
            identities=ident_labels,
            network_policies=k["NetworkPolicy"], cilium_policies=k["CiliumNetworkPolicy"])
        identities = {(p["metadata"]["namespace"], p["metadata"]["name"]): identity_of[uid]
                      for uid, (p, _) in pods.items()}
        changed = inp != self.policy_input or identities != self.pod_identities
        self.policy_input = inp
        self.pod_identities = identities
        if changed:
            # The proxy compiles L7 rules from these: it must not stay on the previous ones.
            for fn in self.on_policy_input:
                fn()
        compiler = Compiler(inp)
        by_ref = {e.ref: e for e in inp.endpoints}
        policy_names: dict[int, str] = {}
        errors: dict[str, str] = {}
        for uid, ep in self.endpoints.items():
            ep.identity = identity_of.get(uid, 0)
            pe = by_ref.get(f"{ep.namespace}/{ep.name}")
            if pe is None:
                continue
            try:
                compiled = compiler.compile(pe)
                self._lowered[ep.ifindex] = lower_policy(compiled, ep.ifindex)
                policy_names.update(compiled.policy_names)
            except PolicyCompileError as e:
                errors[f"{ep.namespace}/{ep.name}"] = e.message
                log.error("policy for %s/%s: %s (keeping its previous entries)", ep.namespace,
                          ep.name, e.message)
        live = {ep.ifindex for ep in self.endpoints.values()}
        policy_pairs, cidr_pairs = L.policy_map_pairs(
            lowered for ifindex, lowered in self._lowered.items() if ifindex in live)
        self.dp.sync_map("nm_policy", policy_pairs)
        self.dp.sync_map("nm_policy_cidr", cidr_pairs)
        # Pod ports that L7 policy covers: connect() from any pod here goes to the node Envoy.
        # Only clients some L7 rule covers are redirected (per client identity; 0 = any client);
        # every other client connects to the pod, whose L3/L4 policy decides in the kernel.
        redir = []
        for k, port in sorted(self.pod_redirects.items()):
            if k.protocol != "TCP":
                continue
            for ident in sorted(self.pod_redirect_identities.get(k, {0})):
                redir.append(L.l7_redirect(k.ip, k.port, port, identity=ident))
        self.dp.sync_map("nm_l7_redir", redir)
        # Endpoints last: a pod's veth passes traffic only once its policy is in place.
        endpoint_pairs, lxc_pairs = [], []
        for ep in self.endpoints.values():
            lowered = self._lowered.get(ep.ifindex)
            if lowered is None or not ep.identity:
                continue
            flags = lowered.flags
            if ep.sandbox.ip in tunnel.inbound_pods:
                flags |= L.EndpointFlags.TUNNEL_IN
            endpoint_pairs.append((L.u32(ep.ifindex), L.EndpointInfo(
                L.ip4(ep.sandbox.ip), ep.identity, flags, 0)))
            lxc_pairs.append(L.lxc_entry(ep.sandbox.ip, ep.ifindex, ep.identity))
            ep.programmed = True
        # The network namespace of each pod says who a connect() comes from (its socket has no
        # address yet): written with, and agreeing with, the endpoint entries.
        self.dp.sync_map("nm_netns", [L.netns_entry(ep.netns_cookie, ep.identity, ep.ifindex)
                                      for ep in self.endpoints.values()
                                      if ep.programmed and ep.netns_cookie])
        self.dp.sync_map("nm_endpoints", endpoint_pairs)
        self.dp.sync_map("nm_lxc", lxc_pairs)

        self._update_context(pods, identity_of, ident_labels, svc_names, policy_names)
        self.stats.runs += 1
        self.stats.errors = errors
        self.stats.last_seconds = time.monotonic() - t0
        return revision

    def _tunnel_flags(self, with_ips: Mapping[str, tuple[dict, str]],
                      peer_auths: list[dict]) -> DatapathTunnel:
        if not self.cfg.mtls:
            return DatapathTunnel()
        # Local pods not reported yet carry their address only in `with_ips`.
        objs = []
        for p, ip in with_ips.values():
            if (p.get("status") or {}).get("podIP") != ip:
                p = {**p, "status": {**(p.get("status") or {}), "podIP": ip}}
            objs.append(p)
        return datapath_tunnel(mesh_pods(objs, peer_auths), self.node.name)

    @property
    def tunnel_up(self) -> bool:
        """Both tunnel listeners are in the socket lookup (as of the last set_tunnel_up)."""
        return self._tunnel_up

    def set_tunnel_up(self, envoy_pid: int) -> None:
        """The node Envoy has the tunnel's listeners: put them where the node's socket lookup
        finds them (nm_tunnel_socks), then let the datapath hand the pods' connections to other
        nodes to them (and the SYNs from other nodes). Idempotent: it refills the listeners
        after an Envoy restart."""
        from nodemesh.datapath.layout import TUNNEL_IN_PORT, TUNNEL_OUT_PORT

        if self._tunnel_up and self.dp.tunnel_listener_cookies() == self._tunnel_socks:
            return  # already so (each proxy push asks): no need to queue for the lock
        with self._lock:
            have = self.dp.tunnel_listener_cookies()
            if len(have) < 2 or have != self._tunnel_socks:
                got = self.dp.set_tunnel_listeners(envoy_pid, {0: TUNNEL_OUT_PORT,
                                                               1: TUNNEL_IN_PORT})
                self._tunnel_socks = self.dp.tunnel_listener_cookies()
                if got:  # (the caller looks again until both are there)
                    log.info("tunnel listeners of Envoy pid %d in the socket lookup: %s",
                             envoy_pid, sorted(got))
            current = self.dp.config.get(L.u32(0))
            flags = L.ConfigFlags(current.flags) if current is not None else L.ConfigFlags.NONE
            if not flags & L.ConfigFlags.TUNNEL:
                self.dp.set_config(self.node.ip, NODE_DNS_IP, self.proxy_ip,
                                   flags | L.ConfigFlags.PROXY_RETURN | L.ConfigFlags.TUNNEL)
                log.info("mutual-TLS tunnel enabled in the datapath")
            self._tunnel_up = len(self._tunnel_socks) == 2

    def _adopt_local_endpoints(self) -> None:
        """After an agent restart: pods that run here but that this agent did not create."""
        for uid, lp in list(self.local_pods.items()):
            if uid in self.endpoints or lp.shim is None:
                continue
            try:
                ifindex = self.dp.attach_endpoint(lp.sandbox.host_ifname)
            except Exception as e:
                log.warning("pod %s/%s: cannot attach to %s: %s", lp.namespace, lp.name,
                            lp.sandbox.host_ifname, e)
                continue
            self.endpoints[uid] = LocalEndpoint(uid, lp.namespace, lp.name, lp.sandbox, ifindex,
                                                netns_cookie=_cookie(lp.sandbox))

    def _update_context(self, pods: Mapping[str, tuple[dict, str]], identity_of: Mapping[str, int],
                        ident_labels: Mapping[int, Mapping[str, str]],
                        svc_names: Mapping[tuple[str, int], tuple[str, str]],
                        policy_names: Mapping[int, str]) -> None:
        by_ip, by_identity = {}, {}
        local_ids = {ep.uid: ep.ifindex for ep in self.endpoints.values()}
        for uid, (p, ip) in pods.items():
            meta = p["metadata"]
            fe = FlowEndpoint(identity=identity_of[uid], namespace=meta["namespace"],
                              pod_name=meta["name"],
                              labels=labels_of(meta.get("labels") or {}, meta["namespace"]),
                              workloads=workloads_of(meta.get("ownerReferences") or []),
                              id=local_ids.get(uid, 0))
            by_ip[ip] = fe
            by_identity.setdefault(identity_of[uid], FlowEndpoint(
                identity=identity_of[uid], namespace=meta["namespace"], labels=fe.labels))
        revnat = {}
        if self.lb_state is not None:
            for (vip, port, _proto), idx in self.lb_state.rev_nat.items():
                name = svc_names.get((vip, port))
                if name:
                    revnat[idx] = name
        from nodemesh.observe.metrics import workload_of

        self.identity_workloads = {}
        for fe in by_ip.values():
            self.identity_workloads.setdefault(fe.identity, workload_of(fe.to_json()))
        self._cookie_ips = {ep.netns_cookie: ep.sandbox.ip for ep in self.endpoints.values()
                            if ep.netns_cookie}
        self.local_ips = frozenset(socket.inet_aton(ep.sandbox.ip)
                                   for ep in self.endpoints.values())
        if self.on_local_ips is not None:
            self.on_local_ips(self.local_ips)
        spiffe_ids = {}
        if self.cfg.mtls:
            from nodemesh.certs.spiffe import spiffe_id

            td = self.cfg.trust_domain
            for p, ip in pods.values():
                spec = p.get("spec") or {}
                sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
                spiffe_ids[ip] = spiffe_id(td, p["metadata"]["namespace"], sa)
        self.context = StaticContext(
            node_name=self.node.name, by_ip=by_ip, by_identity=by_identity,
            services_by_revnat=revnat, services_by_address=dict(svc_names),
            policies=dict(policy_names),
            boot_offset_ns=time.time_ns() - time.monotonic_ns(), spiffe_ids=spiffe_ids)

    # ---- events ----------------------------------------------------------------------------
    def _on_event(self, raw: bytes) -> None:
        # Kept raw: the flow is built only if someone reads it (observe, the UI, a follower).
        self.flows.add(RawEvent(raw, self.context, self._cookie_ips))

    def workload_of_identity(self, identity: int) -> tuple[str, str]:
        """(namespace, workload) for metrics; reserved identities by name."""
        found = self.identity_workloads.get(identity)
        if found is not None:
            return found
        reserved = RESERVED_IDENTITIES.get(identity)
        return "", reserved.split(":", 1)[1] if reserved else f"identity-{identity}"

    def ring_lost(self) -> int:
        """Events the kernel could not put in the ring buffer (nm_lost, summed over CPUs)."""
        try:
            per_cpu = self.dp.map("nm_lost").get(L.u32(0))
        except Exception:
            return 0
        if per_cpu is None:
            return 0
        return int(sum(int(getattr(v, "value", v)) for v in per_cpu))

    # ---- for metrics (read at scrape time) ----------------------------------------------------
    FILL_MAPS = ("nm_endpoints", "nm_ipcache", "nm_policy", "nm_policy_cidr", "nm_ct",
                 "nm_lb4_svc", "nm_lb4_be", "nm_lb4_revnat", "nm_lb4_affin", "nm_lb4_rsk",
                 "nm_flowcnt")

    def map_fill(self) -> list[tuple[str, int, int]]:
        out = []
        for name in self.FILL_MAPS:
            try:
                m = self.dp.map(name)
                info = libbpf.map_info(m.fd)
                count = sum(1 for _ in m.keys())  # noqa: SIM118 - a BPF map, not a dict
                out.append((name, count, int(info.max_entries)))
            except Exception:
                continue
        return out

    def l4_counters(self) -> list[tuple[dict[str, str], int, int]]:
        """nm_flowcnt per workload pair: (labels, bytes, packets)."""

        names = dict(self.identity_workloads)
        for ident, label in ((1, "host"), (2, "world"), (6, "remote-node")):
            names.setdefault(ident, ("", label))
        totals: dict[tuple, list[int]] = {}
        for k, c in self.dp.read_flow_counters().items():
            sns, sw = names.get(k.src_identity, ("", f"identity-{k.src_identity}"))
            dns, dw = names.get(k.dst_identity, ("", f"identity-{k.dst_identity}"))
            proto = {6: "tcp", 17: "udp", 1: "icmp"}.get(k.protocol, str(k.protocol))
            verdict = getattr(k.verdict, "name", str(k.verdict))
            direction = getattr(k.direction, "name", str(k.direction)).lower()
            t = totals.setdefault((sns, sw, dns, dw, proto, verdict, direction), [0, 0])
            t[0] += c.bytes
            t[1] += c.packets
        keys = ("source_namespace", "source_workload", "destination_namespace",
                "destination_workload", "protocol", "verdict", "direction")
        return [(dict(zip(keys, k, strict=True)), b, p) for k, (b, p) in totals.items()]

    def status(self) -> dict:
        return {"endpoints": len(self.endpoints),
                "programmed": sum(1 for e in self.endpoints.values() if e.programmed),
                "syncs": self.stats.runs, "syncedRevision": self.synced.value,
                "lastSyncSeconds": round(self.stats.last_seconds, 4),
                "policyErrors": self.stats.errors,
                "services": len(self.lb_state.rev_nat) if self.lb_state else 0}


def _cookie(sb: Sandbox) -> int:
    try:
        return libbpf.netns_cookie(libbpf.netns_path(sb.netns))
    except Exception:
        return 0
