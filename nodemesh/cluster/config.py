"""Where a cluster's state lives and how its kernel objects are named.

One `ClusterConfig` per state directory, written by `nodemesh up` to ``cluster.json``. Every name
the cluster gives a kernel object (network namespaces, interfaces, cgroups) derives from it, so
`nodemesh down` can find and remove everything even after a crash.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import ipaddress
import json
import os
from dataclasses import dataclass, field

from nodemesh.errors import NoCluster, NodemeshError
from nodemesh.host.files import write_json_atomic
from nodemesh.host.sandbox import Sandbox
from nodemesh.node.addresses import NODE_DNS_IP, POD_GATEWAY  # noqa: F401 - re-exported

DEFAULT_STATE_DIR = "/var/lib/nodemesh"
DEFAULT_CLUSTER_NAME = "nodemesh"
UNDERLAY_CIDR = "172.30.0.0/24"
# Addresses on the underlay besides the nodes' (.1-.16): the local etcd's members (.21-.25), and
# the underlay namespace's own (on its bridge), from which the daemon and the CLI reach them.
ETCD_MEMBER_BASE = 21
STORE_ACCESS_IP = "172.30.0.254"
POD_CIDR_FORMAT = "10.244.{index}.0/24"
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
METRICS_BASE_PORT = 9962
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CERT_TTL_SECONDS = 24 * 3600.0
MIN_CERT_TTL_SECONDS = 2.0  # node i serves metrics on 127.0.0.1:(9962 + i - 1) of the host


def state_dir_from(arg: str | None = None) -> str:
    """--state-dir, else $NODEMESH_STATE_DIR, else /var/lib/nodemesh."""
    return os.path.abspath(arg or os.environ.get("NODEMESH_STATE_DIR") or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class NodeConfig:
    name: str
    index: int  # 1-based
    ip: str  # underlay address
    pod_cidr: str

    @property
    def metrics_port(self) -> int:
        return METRICS_BASE_PORT + self.index - 1


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    state_dir: str
    nodes: tuple[NodeConfig, ...]
    service_cidr: str = SERVICE_CIDR
    cgroup_root: str = ""  # the cgroup v2 mount this cluster's cgroups live under
    extra: dict = field(default_factory=dict)
    # Where desired state lives (docs/store.md): {"type": "sqlite"}, or {"type": "etcd",
    # "endpoints", "ca", "cert", "key", "members": [{"name", "ip", "netns"}], "access_netns"}.
    store: dict = field(default_factory=lambda: {"type": "sqlite"})
    maps: dict = field(default_factory=dict)  # BPF map sizes (see "Map sizes" below)
    limits: dict = field(default_factory=dict)  # datapath budgets (see "Limits" below)

    # ---- naming -------------------------------------------------------------------------
    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise NodemeshError(f"no node named {name!r} in cluster {self.name} "
                            f"(nodes: {', '.join(n.name for n in self.nodes)})")

    def node_netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    @property
    def underlay_netns(self) -> str:
        return f"{self.name}-underlay"

    def member_netns(self, member: str) -> str:
        """The network namespace of etcd member `member` (etcd1 ...) of the cluster's store."""
        return f"{self.name}-{member}"

    @property
    def store_type(self) -> str:
        return str(self.store.get("type", "sqlite"))

    @property
    def store_members(self) -> list[dict]:
        """The etcd members this cluster runs ([] for SQLite or an etcd the user runs)."""
        return list(self.store.get("members") or [])

    @property
    def etcd_dir(self) -> str:
        """The etcd members' data (<member>/data), logs and PIDs, and their PKI (pki/)."""
        return os.path.join(self.state_dir, "etcd")

    def pod_netns(self, uid: str) -> str:
        return f"{self.name}-pod-{uid[:8]}"

    @staticmethod
    def pod_host_ifname(uid: str) -> str:
        return f"lxc{uid.replace('-', '')[:8]}"

    @property
    def cgroup_dir(self) -> str:
        return os.path.join(self.cgroup_root, self.name)

    def node_cgroup(self, node: str) -> str:
        return os.path.join(self.cgroup_dir, node)

    def pod_cgroup(self, node: str, uid: str) -> str:
        return os.path.join(self.node_cgroup(node), f"pod-{uid}")

    def pod_sandbox(self, node: str, uid: str, ip: str) -> Sandbox:
        """The names of pod `uid`'s sandbox on `node`, with address `ip`."""
        return Sandbox(uid=uid, netns=self.pod_netns(uid), host_ifname=self.pod_host_ifname(uid),
                       ip=ip, cgroup=self.pod_cgroup(node, uid))

    def proxy_cgroup(self, node: str) -> str:
        # Envoy lives beside the pods, not under them: the socket programs on the node's pod
        # cgroup must not translate the proxy's own connections twice.
        return os.path.join(self.cgroup_dir, f"{node}-proxy")

    # ---- files ----------------------------------------------------------------------------
    @property
    def datapath(self) -> str:
        """"bpf" (the mesh) or "none" (plain routing, for benchmarks' "no mesh" baseline)."""
        return str(self.extra.get("datapath", "bpf"))

    @property
    def mtls(self) -> bool:
        """Mutual TLS between nodes (docs/security.md): on unless `up --mtls off`; only with
        the bpf datapath and the node Envoy."""
        return (self.datapath == "bpf" and bool(self.extra.get("proxy", True))
                and self.extra.get("mtls", "on") != "off")

    @property
    def trust_domain(self) -> str:
        return str(self.extra.get("trust_domain", DEFAULT_TRUST_DOMAIN))

    @property
    def cert_ttl_seconds(self) -> float:
        """The lifetime of workload certificates (renewed at half of it)."""
        return float(self.extra.get("cert_ttl_seconds", DEFAULT_CERT_TTL_SECONDS))

    @property
    def ca_dir(self) -> str:
        """The built-in certificate authority (its key readable by root only)."""
        return os.path.join(self.state_dir, "ca")

    @property
    def ca_socket(self) -> str:
        """Where node agents ask the cluster's CA for certificates (the daemon serves it)."""
        return os.path.join(self.state_dir, "ca.sock")

    @property
    def reaped_file(self) -> str:
        """What the daemon (the subreaper) reaped lately: pid, wait status, time."""
        return os.path.join(self.state_dir, "reaped.json")

    @property
    def bpffs(self) -> str:
        return os.path.join(self.state_dir, "bpf")

    def node_dir(self, node: str) -> str:
        return os.path.join(self.state_dir, "nodes", node)

    def dns_counters_file(self, node: str) -> str:
        """The node's DNS counters, written by the cluster daemon that serves its DNS."""
        return os.path.join(self.node_dir(node), "dns.json")

    def agent_ready_file(self, node: str) -> str:
        """Written by an agent once it serves: the daemon restarts a ready agent at once and
        backs off only for one that dies before it is ready (a crash loop)."""
        return os.path.join(self.node_dir(node), "agent-ready.json")

    def agent_socket(self, node: str) -> str:
        return os.path.join(self.node_dir(node), "agent.sock")

    def pods_dir(self) -> str:
        return os.path.join(self.state_dir, "pods")

    def pod_dir(self, uid: str) -> str:
        return os.path.join(self.pods_dir(), uid)

    # ---- persistence -----------------------------------------------------------------------
    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["nodes"] = [dataclasses.asdict(n) for n in self.nodes]
        if self.maps:
            d["maps_help"] = MAPS_HELP
        if self.limits:
            d["limits_help"] = LIMITS_HELP
        return d

    @classmethod
    def from_json(cls, d: dict) -> ClusterConfig:
        nodes = tuple(NodeConfig(**n) for n in d["nodes"])
        return cls(
            name=d["name"], state_dir=d["state_dir"], nodes=nodes,
            service_cidr=d.get("service_cidr", SERVICE_CIDR),
            cgroup_root=d.get("cgroup_root", ""), extra=d.get("extra", {}),
            store=d.get("store") or {"type": "sqlite"},
            maps=dict(d.get("maps") or {}),
            limits=dict(d.get("limits") or {}),
        )

    @property
    def datapath_limits(self) -> dict[str, int]:
        """Every datapath budget: cluster.json's ``limits`` over the defaults."""
        return {**LIMIT_DEFAULTS, **{k: int(v) for k, v in self.limits.items()
                                     if k in LIMIT_DEFAULTS}}

    @property
    def map_sizes(self) -> dict[str, int]:
        """Every sizable BPF map's size: cluster.json's ``maps`` over the defaults."""
        return {**MAP_SIZE_DEFAULTS, **{k: int(v) for k, v in self.maps.items()
                                        if k in MAP_SIZE_DEFAULTS}}

    def save(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        write_json_atomic(os.path.join(self.state_dir, "cluster.json"), self.to_json())


DATAPATHS = ("bpf", "none")


def plan_cluster(name: str, state_dir: str, node_count: int, cgroup_root: str,
                 datapath: str = "bpf", mtls: str = "on",
                 trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 cert_ttl_seconds: float = DEFAULT_CERT_TTL_SECONDS,
                 store: dict | None = None) -> ClusterConfig:
    """The addresses and names of a new cluster of `node_count` nodes (pure); `store` is what
    `etcdmembers.plan_store` planned (default: SQLite)."""
    if not 1 <= node_count <= 16:
        raise NodemeshError(f"--nodes must be 1-16, not {node_count}", 2)
    underlay = list(ipaddress.ip_network(UNDERLAY_CIDR).hosts())
    nodes = tuple(
        NodeConfig(
            name=f"node{i}", index=i, ip=str(underlay[i - 1]),
            pod_cidr=POD_CIDR_FORMAT.format(index=i),
        )
        for i in range(1, node_count + 1)
    )
    if datapath not in DATAPATHS:
        raise NodemeshError(f"--datapath {datapath!r}: must be one of {', '.join(DATAPATHS)}", 2)
    if mtls not in ("on", "off"):
        raise NodemeshError(f"--mtls {mtls!r}: must be on or off", 2)
    from nodemesh.certs.spiffe import check_trust_domain

    why = check_trust_domain(trust_domain)
    if why:
        raise NodemeshError(f"--trust-domain {trust_domain!r}: {why}", 2)
    if not MIN_CERT_TTL_SECONDS <= cert_ttl_seconds <= 366 * 24 * 3600:
        raise NodemeshError(f"--cert-ttl {cert_ttl_seconds:g}s: must be between "
                            f"{MIN_CERT_TTL_SECONDS:g}s and 366 days", 2)
    extra: dict = {"datapath": datapath, "mtls": mtls if datapath == "bpf" else "off",
                   "trust_domain": trust_domain, "cert_ttl_seconds": cert_ttl_seconds}
    return with_planned_maps(ClusterConfig(name=name, state_dir=state_dir, nodes=nodes,
                                           cgroup_root=cgroup_root, extra=extra,
                                           store=dict(store or {"type": "sqlite"})))



def load_cluster(state_dir: str) -> ClusterConfig:
    path = os.path.join(state_dir, "cluster.json")
    try:
        with open(path) as f:
            return ClusterConfig.from_json(json.load(f))
    except FileNotFoundError:
        raise NoCluster(state_dir) from None



# ---- Map sizes (cluster.json "maps") ------------------------------------------------------------
# The size of each BPF map a node's datapath loads: max entries (bytes for the nm_events ring
# buffer). The defaults are bpf/lib/maps.h's; `nodemesh up --map-size NAME=N` (repeatable)
# writes others into cluster.json, and each agent sets them before it loads the programs. An
# object that does not fit is refused whole and reported (docs/reliability.md, "Exhausted
# tables").
MAP_SIZE_DEFAULTS: dict[str, int] = {
    "nm_endpoints": 4096, "nm_ipcache": 65536, "nm_policy": 65536, "nm_policy_cidr": 16384,
    "nm_ct": 65536, "nm_lb4_svc": 65536, "nm_lb4_be": 65536, "nm_lb4_revnat": 65536,
    "nm_lb4_maglev": 1024, "nm_lb4_affin": 16384, "nm_lb4_rsk": 32768, "nm_events": 1 << 20,
    "nm_metrics": 1024, "nm_flowcnt": 8192, "nm_l7_redir": 16384, "nm_lxc": 4096,
    "nm_netns": 4096, "nm_tunnel_port": 4096,
}
MAP_SIZE_MAX = 1 << 24  # entries (nm_events: bytes, up to 1 GiB)
MAP_SIZE_FLAG = "--map-size"
MAPS_HELP = ("maps: BPF map sizes in entries (nm_events: bytes, a power of 2 >= 4096); "
             "raise one with `nodemesh down --keep-state && nodemesh up --map-size NAME=N`, "
             "or edit this block and restart the agents")


def parse_map_sizes(items: list[str] | None) -> dict[str, int]:
    """`--map-size NAME=N` values → {name: N}; a clear error (exit 2) for an unknown map or a
    bad size."""
    out: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise NodemeshError(f"{MAP_SIZE_FLAG} {item!r}: must be NAME=N, e.g. nm_lb4_svc=131072",
                                2)
        if name not in MAP_SIZE_DEFAULTS:
            raise NodemeshError(f"{MAP_SIZE_FLAG} {item!r}: no map {name!r} (maps: "
                                f"{', '.join(sorted(MAP_SIZE_DEFAULTS))})", 2)
        try:
            n = int(value)
        except ValueError:
            n = 0
        if name == "nm_events":
            if not 4096 <= n <= 1 << 30 or n & (n - 1):
                raise NodemeshError(f"{MAP_SIZE_FLAG} {item!r}: nm_events is a ring buffer; its "
                                    "size is bytes, a power of 2 from 4096 to 1073741824", 2)
        elif not 1 <= n <= MAP_SIZE_MAX:
            raise NodemeshError(f"{MAP_SIZE_FLAG} {item!r}: N must be an integer from 1 to "
                                f"{MAP_SIZE_MAX}", 2)
        out[name] = n
    return out


_NEW_CLUSTER_MAPS: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "new_cluster_maps", default=None)


@contextlib.contextmanager
def map_sizes_for_new_cluster(sizes: dict[str, int]):
    """The map sizes `plan_cluster` writes into a new cluster.json while this is entered
    (`nodemesh up --map-size`)."""
    token = _NEW_CLUSTER_MAPS.set(dict(sizes))
    try:
        yield
    finally:
        _NEW_CLUSTER_MAPS.reset(token)


def with_planned_maps(cfg: ClusterConfig) -> ClusterConfig:
    """A planned cluster with its map sizes and limits: the defaults and what `--map-size` and
    `--limit` asked for."""
    return dataclasses.replace(cfg, maps={**MAP_SIZE_DEFAULTS, **(_NEW_CLUSTER_MAPS.get() or {})},
                               limits={**LIMIT_DEFAULTS, **(_NEW_CLUSTER_LIMITS.get() or {})})


# ---- Limits (cluster.json "limits") -------------------------------------------------------------
# Per-source budgets the datapath enforces (docs/reliability.md, "Hostile neighbours"), set in
# the programs' .rodata at load: `nodemesh up --limit NAME=N` (repeatable) for a new or stopped
# cluster, or cluster.json and an agent restart. 0 means no budget.
LIMIT_DEFAULTS: dict[str, int] = {
    "events_per_second": 20000, "event_burst": 40000,
    "dns_queries_per_second": 2000, "dns_burst": 4000,
}
LIMIT_MAX = 10_000_000
LIMIT_FLAG = "--limit"
LIMITS_HELP = ("limits: per-source budgets of the datapath; events_per_second/event_burst: flow "
               "events a pod's veth (or socket namespace) may send the agent, the rest counted "
               "as suppressed; dns_queries_per_second/dns_burst: UDP queries a pod may send the "
               "node-local DNS, the rest dropped (DROP_RATE_LIMITED); 0 = no budget; change with "
               "`nodemesh up --limit NAME=N` on a stopped cluster, or here and restart the agents")
# The .rodata variable of the programs each limit sets (bpf/lib/events.h, bpf/lib/dnslimit.h).
LIMIT_RODATA = {"events_per_second": "nm_event_rate", "event_burst": "nm_event_burst",
                "dns_queries_per_second": "nm_dns_qps", "dns_burst": "nm_dns_burst"}


def parse_limits(items: list[str] | None) -> dict[str, int]:
    """`--limit NAME=N` values, checked (exit 2 naming the flag and the problem)."""
    out: dict[str, int] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq:
            raise NodemeshError(f"{LIMIT_FLAG} {item!r}: must be NAME=N, e.g. "
                                "events_per_second=50000", 2)
        if name not in LIMIT_DEFAULTS:
            raise NodemeshError(f"{LIMIT_FLAG} {item!r}: no limit {name!r} (limits: "
                                f"{', '.join(sorted(LIMIT_DEFAULTS))})", 2)
        try:
            n = int(value)
        except ValueError:
            n = -1
        if not 0 <= n <= LIMIT_MAX:
            raise NodemeshError(f"{LIMIT_FLAG} {item!r}: N must be an integer from 0 (no "
                                f"budget) to {LIMIT_MAX}", 2)
        out[name] = n
    return out


_NEW_CLUSTER_LIMITS: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "new_cluster_limits", default=None)


@contextlib.contextmanager
def limits_for_new_cluster(limits: dict[str, int]):
    """The limits `plan_cluster` writes into a new cluster.json while this is entered."""
    token = _NEW_CLUSTER_LIMITS.set(dict(limits))
    try:
        yield
    finally:
        _NEW_CLUSTER_LIMITS.reset(token)
