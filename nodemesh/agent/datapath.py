"""The agent's datapath syncer: a `NodeSnapshot`'s datapath part → the node's BPF maps.

Thin on purpose: `nodemesh.node.build_node_snapshot` decides what the maps should hold; this
module attaches the programs to pod veths, writes the snapshot's entries (`Datapath.sync_map`
writes only the difference), and drains the flow-event ring into the agent's flow ring. The
reconcile step (`nodemesh.agent.reconcile`) decides when.

Order matters where it touches safety: a pod's policy entries are written before its
`nm_endpoints` entry (until then its veth drops everything), and its endpoint entry is removed
before its policy entries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from nodemesh.cluster.config import LIMIT_RODATA, NODE_DNS_IP, ClusterConfig
from nodemesh.datapath import layout as L
from nodemesh.datapath import libbpf
from nodemesh.datapath.lb import LbState
from nodemesh.datapath.loader import Datapath, mount_bpffs
from nodemesh.host.sandbox import Sandbox
from nodemesh.node.fit import FIT_MAPS, Refusal
from nodemesh.node.snapshot import Endpoint, NodeSnapshot, Redirects
from nodemesh.observe.agentevents import AgentEventType, agent_event
from nodemesh.observe.flow import RESERVED_IDENTITIES, RawEvent, StaticContext
from nodemesh.observe.metrics import PROTOCOL_LABELS
from nodemesh.observe.ring import FlowRing
from nodemesh.policy.lower import LoweredPolicy
from nodemesh.route.inputs import RedirectKey
from nodemesh.store.informer import SyncedRevision

log = logging.getLogger("nodemesh.datapath")
EVENTS_NICE = 10  # the flow-event reader's nice, relative to the agent's


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

    def attached(self) -> Endpoint:
        return Endpoint(self.uid, self.namespace, self.name, self.sandbox.ip, self.ifindex,
                           self.netns_cookie)


@dataclass
class SyncStats:
    runs: int = 0
    last_seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)  # "ns/pod" -> policy compile error


class DatapathSync:
    """Owns the node's Datapath and writes snapshots into its maps."""

    def __init__(self, cfg: ClusterConfig, node: str, flows: FlowRing, local_pods,
                 maglev_table_size: int = 16381) -> None:
        self.cfg = cfg
        self.node = cfg.node(node)
        self.flows = flows
        # uid -> LocalPod (the PodManager's records) or CniPod (the CNI plugin's): each has
        # uid, namespace, name, sandbox and adoptable()
        self.local_pods = local_pods
        self.dp = Datapath(node, cfg.bpffs, cfg.node_cgroup(node),
                           maglev_table_size=maglev_table_size, map_sizes=cfg.maps,
                           rodata={LIMIT_RODATA[k]: v for k, v in cfg.datapath_limits.items()})
        self.endpoints: dict[str, LocalEndpoint] = {}  # uid -> endpoint
        self.lb_state: LbState | None = None
        self.stats = SyncStats()
        self.context = StaticContext(node_name=node)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.lowered: dict[int, LoweredPolicy] = {}  # ifindex -> last good policy
        self._cookie_ips: dict[int, str] = {}
        self.synced = SyncedRevision()
        self.identity_workloads: dict[int, tuple[str, str]] = {}  # for per-workload metrics
        self.applied = Redirects()  # the redirects into the node Envoy the maps hold
        self.proxy_ip = "0.0.0.0"
        self.local_ips: frozenset[bytes] = frozenset()
        self.on_local_ips = None  # called with local_ips after each apply (the agent's metrics)
        self._tunnel_socks: dict[int, int] = {}  # nm_tunnel_socks as last written (cookies)
        self._tunnel_up = False  # set_tunnel_up has done its work for the listeners it saw
        self._capacities: dict[str, int] = {}  # FIT_MAPS -> max entries, read at load
        self.refusals: dict[str, Refusal] = {}  # map -> what the last snapshot left out
        self.on_refusals = None  # called with the refusals when they change (the Node condition)
        # pods whose veth was removed while the PodManager still lists them (its hook runs
        # before it forgets the pod): never adopted again
        self._removed: set[str] = set()

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        mount_bpffs(self.cfg.bpffs)
        self.dp.ensure_built()
        self.dp.load()
        self._capacities = {}
        for name in FIT_MAPS:
            with contextlib.suppress(Exception):
                self._capacities[name] = self.dp.maps.capacity(name)
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
        threading.Thread(target=self._event_loop, name="datapath-events", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

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

    # ---- pod veths ----------------------------------------------------------------------------
    def attach(self, pod: dict, sb: Sandbox) -> LocalEndpoint:
        """Attach the programs to a new pod's veth (it drops everything until `apply` writes
        its endpoint entry)."""
        ifindex = self.dp.attach_endpoint(sb.host_ifname)
        meta = pod["metadata"]
        return LocalEndpoint(meta["uid"], meta["namespace"], meta["name"], sb, ifindex,
                             netns_cookie=_cookie(sb))

    def add_endpoints(self, eps: list[LocalEndpoint]) -> None:
        with self._lock:
            for ep in eps:
                self.endpoints[ep.uid] = ep
                self._removed.discard(ep.uid)

    def remove_endpoint(self, sb: Sandbox) -> bool:
        """Forget a pod's veth, failing closed first (its endpoint entry goes at once)."""
        with self._lock:
            ep = self.endpoints.pop(sb.uid, None)
            self._removed.add(sb.uid)
            if ep is None:
                return False
            self.dp.endpoints.delete(L.u32(ep.ifindex))
            self.lowered.pop(ep.ifindex, None)
            return True

    def detach(self, sb: Sandbox) -> None:
        self.dp.detach_endpoint(sb.host_ifname)

    def check_endpoint(self, uid: str) -> list[str]:
        """What is wrong with a pod's datapath ([] when its veth's programs are attached and
        its endpoint entry is programmed): CNI's CHECK."""
        with self._lock:
            ep = self.endpoints.get(uid)
            if ep is None:
                return ["the datapath has no endpoint for this pod"]
            problems = self.dp.check_endpoint(ep.sandbox.host_ifname, ep.ifindex)
            if not ep.programmed or self.dp.endpoints.get(L.u32(ep.ifindex)) is None:
                problems.append(f"no nm_endpoints entry for {ep.sandbox.host_ifname} "
                                f"(index {ep.ifindex}): its traffic is dropped")
            return problems

    def attached(self) -> dict[str, Endpoint]:
        with self._lock:
            return {uid: ep.attached() for uid, ep in self.endpoints.items()}

    def adopt_local_endpoints(self) -> None:
        """After an agent restart: pods that run here but that this agent did not create."""
        with self._lock:
            self._adopt_local_endpoints()

    # ---- applying a snapshot ----------------------------------------------------------------
    def apply(self, snap: NodeSnapshot) -> None:
        """Everything but new redirects into the node Envoy: ipcache, services (with the
        redirects that may stay), policy, and, last, the endpoints."""
        t0 = time.monotonic()
        with self._lock:
            # Port-level modes first: a flag that says "look at the ports" must find them there.
            self.dp.sync_map("nm_tunnel_port", snap.tunnel_ports)
            self.dp.sync_map("nm_ipcache", snap.ipcache)
            self.dp.apply_lb(snap.lb_interim)
            self.lb_state = snap.lb_interim
            policy_pairs, cidr_pairs = snap.policy_entries()
            self.dp.sync_map("nm_policy", policy_pairs)
            self.dp.sync_map("nm_policy_cidr", cidr_pairs)
            self.dp.sync_map("nm_l7_redir", snap.redirects_interim.l7_redir_entries())
            self.applied = snap.redirects_interim
            for uid, ep in self.endpoints.items():
                ep.identity = snap.identity_of.get(uid, 0)
                ep.programmed = ep.programmed or uid in snap.programmed
            # The network namespace of each pod says who a connect() comes from (its socket
            # has no address yet): written with, and agreeing with, the endpoint entries.
            # Endpoints last: a pod's veth passes traffic only once its policy is in place.
            self.dp.sync_map("nm_netns", snap.netns)
            self.dp.sync_map("nm_endpoints", snap.endpoints)
            self.dp.sync_map("nm_lxc", snap.lxc)
            self.lowered = dict(snap.policy)
            self.context = snap.context
            self.identity_workloads = dict(snap.identity_workloads)
            self._cookie_ips = dict(snap.cookie_ips)
            self.local_ips = snap.local_ips
            self.stats.runs += 1
            self.stats.errors = dict(snap.policy_errors)
            self.stats.last_seconds = time.monotonic() - t0
        for ref, msg in snap.policy_errors.items():
            log.error("policy for %s: %s (keeping its previous entries)", ref, msg)
        try:  # (telling must never stop the datapath's sync)
            self._report_refusals(snap.refusals)
        except Exception:
            log.exception("reporting the full maps failed")
        if self.on_local_ips is not None:
            self.on_local_ips(self.local_ips)

    # ---- exhausted tables --------------------------------------------------------------------
    def capacities(self) -> dict[str, int]:
        """The sizes of the maps the node snapshot fits objects into (as the kernel has them)."""
        return dict(self._capacities)

    def _report_refusals(self, refusals: list[Refusal]) -> None:
        """A map that had no room: an agent event (MAP_FULL) each time what it left out changes,
        MAP_ROOM once everything fits again; the log says the same."""
        new = {r.map: r for r in refusals}
        old = self.refusals
        if new == old:
            return
        for name, r in sorted(new.items()):
            if old.get(name) is not None and old[name].objects == r.objects:
                continue
            log.warning("%s", r.message())
            self.flows.add(agent_event(
                self.node.name, AgentEventType.MAP_FULL, r.message(), map=r.map,
                size=r.capacity, needed=r.needed, object_kind=r.kind, objects=list(r.objects),
                raise_with=f"nodemesh up --map-size {r.map}=N",
                cluster_json=f'"maps": {{"{r.map}": N}}'))
        for name in sorted(set(old) - set(new)):
            msg = f"map {name}: every object fits again ({old[name].capacity} entries)"
            log.info("%s", msg)
            self.flows.add(agent_event(self.node.name, AgentEventType.MAP_ROOM, msg, map=name,
                                       size=old[name].capacity))
        self.refusals = new
        if self.on_refusals is not None:
            try:
                self.on_refusals(list(new.values()))
            except Exception:
                log.exception("reporting the full maps failed")

    def drops(self) -> dict[tuple[str, str], int]:
        """nm_metrics' dropped packets: (Hubble drop reason, direction) -> packets."""
        out: dict[tuple[str, str], int] = {}
        for k, c in self.dp.read_metrics().items():
            if k.verdict != L.Verdict.DROPPED:
                continue
            reason = (k.reason.hubble_name if isinstance(k.reason, L.DropReason)
                      else str(k.reason))
            key = (reason, k.direction.name.lower())
            out[key] = out.get(key, 0) + c.packets
        return out

    def refused(self) -> dict[str, int]:
        """map -> objects the last snapshot left out (0 for a map that fits everything)."""
        out = dict.fromkeys(self._capacities, 0)
        for name, r in self.refusals.items():
            out[name] = len(r.objects)
        return out

    def apply_redirects(self, snap: NodeSnapshot) -> None:
        """The snapshot's redirects into the node Envoy (it has their listeners now)."""
        with self._lock:
            self.dp.apply_lb(snap.lb)
            self.lb_state = snap.lb
            self.dp.sync_map("nm_l7_redir", snap.redirects.l7_redir_entries())
            self.applied = snap.redirects

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

    def _adopt_redirects(self) -> None:
        """Keep the redirects into the node Envoy that a previous agent programmed until this
        agent's node Envoy has taken its own: until then the services with routes and the pod
        ports with L7 policy must stay behind the proxy."""
        service: dict[RedirectKey, int] = {}
        pod: dict[RedirectKey, int] = {}
        identities: dict[RedirectKey, set[int]] = {}
        for k, v in self.dp.services.items():
            if k.backend_slot == 0 and v.flags & L.ServiceFlags.L7 and v.l7_proxy_port:
                key = RedirectKey(L.ip4_str(k.address), k.dport, _proto_name(k.protocol))
                service[key] = v.l7_proxy_port
        for k, v in self.dp.l7_redir.items():
            key = RedirectKey(L.ip4_str(k.addr), k.port, _proto_name(k.protocol))
            pod[key] = v.proxy_port
            identities.setdefault(key, set()).add(k.identity)
        self.applied = Redirects(service, pod, {k: frozenset(v) for k, v in identities.items()})
        if service or pod:
            log.info("kept %d service and %d pod-port redirects into the node Envoy",
                     len(service), len(pod))

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
        self._removed.intersection_update(self.local_pods.keys())  # (gone from the PodManager)
        for uid, lp in list(self.local_pods.items()):
            if uid in self.endpoints or not lp.adoptable() or uid in self._removed:
                continue
            try:
                ifindex = self.dp.attach_endpoint(lp.sandbox.host_ifname)
            except Exception as e:
                log.warning("pod %s/%s: cannot attach to %s: %s", lp.namespace, lp.name,
                            lp.sandbox.host_ifname, e)
                continue
            self.endpoints[uid] = LocalEndpoint(uid, lp.namespace, lp.name, lp.sandbox, ifindex,
                                                netns_cookie=_cookie(lp.sandbox))


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

    def events_suppressed(self) -> int:
        """Flow events over their source's budget (nm_event_budget; lib/events.h), not sent."""
        try:
            return int(sum(v.over for _, v in self.dp.map("nm_event_budget").items()))
        except Exception:
            return 0

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
            proto = PROTOCOL_LABELS.get(k.protocol, str(k.protocol))
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
                "services": len(self.lb_state.rev_nat) if self.lb_state else 0,
                "tablesFull": [r.to_json() for _, r in sorted(self.refusals.items())]}


def _proto_name(number: int) -> str:
    """A redirect key's protocol as Kubernetes spells it (TCP unless UDP)."""
    return "UDP" if number == L.Proto.UDP else "TCP"


def _cookie(sb: Sandbox) -> int:
    try:
        return libbpf.netns_cookie(libbpf.netns_path(sb.netns))
    except Exception:
        return 0
