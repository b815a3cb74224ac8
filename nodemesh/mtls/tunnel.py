"""The tunnel between node Envoys: one node's view of the mesh → its tunnel listeners, clusters
and datapath flags (pure; docs/security.md has the design).

Every TCP connection between pods of different nodes is carried node Envoy → node Envoy inside
mutual TLS (TLS 1.3, ALPN `ALPN`) with the client workload's own certificate:

- **Outbound** (the client's node). The datapath hands the pod's connection, addresses intact,
  to the listener on ``PROXY_IP:TUNNEL_OUT_PORT``. A filter-chain matcher picks the chain by the
  source address (the local pod, hence its workload identity: the client certificate) and the
  destination address (the remote pod, hence the identity it must prove). The chain sets
  Envoy's well-known filter state ``envoy.network.upstream_subject_alt_names`` to that identity
  and proxies to the cluster of the client's identity (ORIGINAL_DST: the same destination
  address, bound to the client's address by ``original_src``), whose TLS context presents the
  client's certificate and checks the server's against the trust bundle and that identity. A
  destination the matcher does not know yet (a pod this node's Envoy has not heard of) gets the
  identity's catch-all chain: the server must prove *a* workload identity of the trust domain.
- **Inbound** (the server's node). The datapath hands the SYN to the listener on
  ``PROXY_IP:TUNNEL_IN_PORT``. TLS with ALPN `ALPN` is terminated with the destination pod's
  certificate, and the client's must be the workload identity of the pod whose address the
  connection carries (the chain is picked by destination and source address); a source address
  no pod of the cluster has gets a chain that accepts any workload of the trust domain, whose
  address is then nobody's (the kernel sees identity ``world``). Envoy connects to the pod with
  the client's address and the socket mark ``NM_MARK_AUTH``, so the pod's veth applies its
  L3/L4 policy to the real client and knows the client proved who it is. Anything else
  (plaintext, or TLS that is not the tunnel's) is passed through in clear where the pod's
  PeerAuthentication mode (or its port's) is PERMISSIVE or DISABLE, and refused where it is
  STRICT (no chain matches: the listener's access log reports it).

The datapath learns from the same view which destinations to tunnel (`TunnelPlan.ipcache_flags`,
`port_overrides`) and which local pods receive through the inbound listener (`inbound_pods`).
Matchers are the only part of the listeners that changes as pods come and go: Envoy keeps every
connection when only a listener's filter-chain matcher changes; chains change only when a
workload identity appears on, or leaves, the node or the cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Every message type that appears inside an Any must be in the descriptor pool for ParseDict.
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2  # noqa: F401
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.set_filter_state.v3 import (  # noqa: F401
    set_filter_state_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from google.protobuf import wrappers_pb2  # noqa: F401
from xds.type.matcher.v3 import ip_pb2  # noqa: F401

from nodemesh.certs.spiffe import spiffe_id
from nodemesh.datapath.layout import (
    NM_MARK_AUTH,
    NM_MARK_TUNNEL,
    TUNNEL_IN_PORT,
    TUNNEL_OUT_PORT,
    IpcacheFlags,
)
from nodemesh.mtls.peerauth import Mode, WorkloadMode
from nodemesh.route.protos import Cluster, Listener, parse
from nodemesh.route.resources import XDS_CLUSTER
from nodemesh.route.tls import (
    ALPN,
    any_workload,
    downstream_tls,
    upstream_socket_options,
    upstream_tls,
)

OUTBOUND_LISTENER = "tunnel/outbound"
INBOUND_LISTENER = "tunnel/inbound"
INBOUND_CLUSTER = "tunnel/inbound"  # to the local pod, authenticated client (NM_MARK_AUTH)
PLAIN_CLUSTER = "tunnel/inbound-plain"  # to the local pod, plaintext from outside the mesh
PLAIN_CHAIN = "inbound/plain"
TCP_ALS_LOG_NAME = "nodemesh-tunnel"
CONNECT_TIMEOUT = "5s"
# The tunnel listeners bind the wildcard address: Envoy takes an accepted connection's local
# address from the socket (its original destination, as bpf_sk_assign delivered it) only for
# wildcard listeners. The datapath finds them by proxy_ip and the port; their matchers serve only
# pod destinations, so nothing else reaching these ports gets a filter chain.
LISTEN_ANY = "0.0.0.0"

_TYPE = "type.googleapis.com/"
_NET_INPUTS = _TYPE + "envoy.extensions.matching.common_inputs.network.v3."
_STRING = _TYPE + "google.protobuf.StringValue"
# The connection's local address is its original destination (the datapath handed it over with
# bpf_sk_assign to a transparent listener); this filter tells Envoy so, for ORIGINAL_DST.
_ORIGINAL_DST = {"name": "envoy.filters.listener.original_dst", "typed_config": {
    "@type": _TYPE + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}


@dataclass(frozen=True, order=True)
class WorkloadId:
    """A workload identity: a namespace and a ServiceAccount."""

    namespace: str
    service_account: str

    def spiffe(self, trust_domain: str) -> str:
        return spiffe_id(trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True)
class MeshPod:
    """A pod as the tunnel sees it: where it is, who it is, what it accepts."""

    ip: str
    namespace: str
    name: str
    node: str
    service_account: str = "default"
    mode: WorkloadMode = field(default_factory=lambda: WorkloadMode(Mode.STRICT))

    @property
    def workload(self) -> WorkloadId:
        return WorkloadId(self.namespace, self.service_account or "default")

    def tunnelled(self) -> bool:
        """Does any port of the pod take mutual TLS?"""
        return self.mode.mode != Mode.DISABLE or any(m != Mode.DISABLE
                                                      for m in self.mode.ports.values())


@dataclass(frozen=True)
class TunnelInput:
    """`pods`: every pod of the cluster with an address. `ready`: the workload identities whose
    certificates this node's Envoy has (SPIFFE IDs); a local pod of another identity is left
    out of the outbound listener (its containers do not start before its certificate is in)."""

    node: str
    trust_domain: str
    pods: tuple[MeshPod, ...]
    ready: frozenset[str] = frozenset()
    node_ips: tuple[str, ...] = ()  # the nodes' underlay addresses: sources known by address

    @property
    def local(self) -> tuple[MeshPod, ...]:
        return tuple(p for p in self.pods if p.node == self.node)

    @property
    def remote(self) -> tuple[MeshPod, ...]:
        return tuple(p for p in self.pods if p.node != self.node)


@dataclass(frozen=True)
class DatapathTunnel:
    """What the datapath of one node needs: the ipcache flags of other nodes' pods, the ports
    whose mode differs from their pod's, and the local pods that receive through the inbound
    listener."""

    ipcache_flags: Mapping[str, int] = field(default_factory=dict)
    port_overrides: tuple[tuple[str, int, bool], ...] = ()
    inbound_pods: frozenset[str] = frozenset()


def datapath_tunnel(pods: Iterable[MeshPod], node: str) -> DatapathTunnel:
    """The datapath's part of the tunnel (pure; the same view gives the same flags on every
    node, so a client tunnels exactly where the server expects it)."""
    ipcache_flags: dict[str, int] = {}
    overrides: list[tuple[str, int, bool]] = []
    inbound: set[str] = set()
    for p in pods:
        if not p.ip:
            continue
        if p.node == node:
            if p.tunnelled():
                inbound.add(p.ip)
            continue
        default = p.mode.mode != Mode.DISABLE
        differing = sorted((port, m != Mode.DISABLE) for port, m in p.mode.ports.items()
                           if (m != Mode.DISABLE) != default)
        flags = IpcacheFlags.TUNNEL if default else IpcacheFlags.NONE
        if differing:
            flags |= IpcacheFlags.TUNNEL_PORTS
            overrides += [(p.ip, port, t) for port, t in differing]
        if flags:
            ipcache_flags[p.ip] = int(flags)
    return DatapathTunnel(ipcache_flags, tuple(sorted(overrides)), frozenset(inbound))


def mesh_pods(pods: Iterable[Mapping[str, Any]],
              peer_authentications: Iterable[Mapping[str, Any]] = (),
              default: Mode = Mode.STRICT) -> list[MeshPod]:
    """The pods (store objects with an address, not being deleted) with their identities and
    effective PeerAuthentication modes."""
    from nodemesh.mtls.peerauth import resolve_modes

    live = [p for p in pods if (p.get("status") or {}).get("podIP")
            and not p["metadata"].get("deletionTimestamp")]
    modes = resolve_modes(live, peer_authentications, default=default)
    out = []
    for p in live:
        meta, spec = p["metadata"], p.get("spec") or {}
        ns = meta.get("namespace") or "default"
        out.append(MeshPod(ip=p["status"]["podIP"], namespace=ns, name=meta["name"],
                           node=spec.get("nodeName") or "",
                           service_account=(spec.get("serviceAccountName")
                                            or spec.get("serviceAccount") or "default"),
                           mode=modes.get((ns, meta["name"]), WorkloadMode(default))))
    return out


@dataclass(frozen=True)
class TunnelPlan:
    listeners: tuple[Listener, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    # SPIFFE IDs of the workloads on this node: the certificates it needs.
    local_identities: frozenset[str] = frozenset()
    # SPIFFE IDs the listeners and clusters reference (a subset of `ready`).
    secrets: frozenset[str] = frozenset()
    # pod IP (of another node) -> IpcacheFlags: how this node's pods reach it.
    ipcache_flags: Mapping[str, int] = field(default_factory=dict)
    # (pod IP, port, through the tunnel) where a port's mode differs from its pod's.
    port_overrides: tuple[tuple[str, int, bool], ...] = ()
    # local pod IPs whose TCP from other nodes enters through the inbound listener.
    inbound_pods: frozenset[str] = frozenset()
    # local pod IPs the outbound listener serves (their identity's certificate is ready).
    sources: frozenset[str] = frozenset()

    def local_secret_ok(self, ip: str) -> bool:
        return ip in self.sources


# -- pieces ---------------------------------------------------------------------------------

def _action(chain: str) -> dict[str, Any]:
    return {"action": {"name": chain, "typed_config": {"@type": _STRING, "value": chain}}}


def _ip_tree(input_type: str, groups: Iterable[tuple[Iterable[str], dict[str, Any]]],
             on_no_match: dict[str, Any] | None = None) -> dict[str, Any]:
    """A matcher over an IP input: the first group whose addresses hold it gives its on_match."""
    ranges = []
    for ips, on_match in groups:
        ips = sorted(set(ips))
        if ips:
            ranges.append({"ranges": [{"address_prefix": ip, "prefix_len": 32} for ip in ips],
                           "on_match": on_match})
    tree: dict[str, Any] = {"matcher_tree": {
        "input": {"name": input_type, "typed_config": {"@type": _NET_INPUTS + input_type}},
        "custom_match": {"name": "ip", "typed_config": {
            "@type": _TYPE + "xds.type.matcher.v3.IPMatcher", "range_matchers": ranges}}}}
    if on_no_match is not None:
        tree["on_no_match"] = on_no_match
    return tree


def tcp_access_log(listener: str, *, no_chain_only: bool = False) -> dict[str, Any]:
    """Failures only (a connection that ends with a response flag, or whose TLS failed): a
    working tunnel costs the agent nothing; the kernel's flow events already show it.

    The listener's own log (`no_chain_only`) says only that no chain took the connection (NR):
    Envoy logs a connection a chain took both there and in the chain's proxy, which would make
    each failure two flows."""
    if no_chain_only:
        failures: dict[str, Any] = {"response_flag_filter": {"flags": ["NR"]}}
    else:
        failures = {"or_filter": {"filters": [
            {"response_flag_filter": {}},
            {"extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    "@type": _TYPE + "envoy.extensions.access_loggers.filters.cel.v3."
                             "ExpressionFilter",
                    "expression": "connection.transport_failure_reason != ''"}}},
        ]}}
    return {
        "name": "envoy.access_loggers.tcp_grpc",
        "filter": failures,
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig",
            "common_config": {
                "log_name": TCP_ALS_LOG_NAME,
                "grpc_service": {"envoy_grpc": {"cluster_name": XDS_CLUSTER}},
                "transport_api_version": "V3",
                "custom_tags": [{"tag": "nodemesh.listener", "literal": {"value": listener}}],
            },
        },
    }


def _tcp_proxy(stat: str, cluster: str, listener: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": _TYPE + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": stat, "cluster": cluster, "access_log": [tcp_access_log(listener)]}}


def _expect_peer(identity: str) -> dict[str, Any]:
    """Sets the SAN the upstream's certificate must carry (Envoy's well-known filter state)."""
    return {"name": "envoy.filters.network.set_filter_state", "typed_config": {
        "@type": _TYPE + "envoy.extensions.filters.network.set_filter_state.v3.Config",
        "on_new_connection": [{
            "object_key": "envoy.network.upstream_subject_alt_names",
            "format_string": {"text_format_source": {"inline_string": identity}},
            "shared_with_upstream": "ONCE"}]}}


def outbound_cluster_name(w: WorkloadId) -> str:
    return f"tunnel/outbound/{w.key}"


def _original_dst(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "alt_stat_name": name.replace("/", "_"), "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": CONNECT_TIMEOUT,
            "cleanup_interval": "60s", **extra}


# -- the plan -------------------------------------------------------------------------------

REFUSE = "refuse"  # a matcher action that names no chain: Envoy closes the connection


def plan_tunnel(inp: TunnelInput) -> TunnelPlan:
    """The tunnel of one node (no listeners when it has no pods)."""
    td = inp.trust_domain
    local = [p for p in inp.local if p.ip]
    remote = [p for p in inp.remote if p.ip]
    local_ids = {p.workload for p in local}
    ready = sorted(w for w in local_ids if w.spiffe(td) in inp.ready)

    dp = datapath_tunnel(inp.pods, inp.node)

    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if ready:
        listeners.append(_outbound_listener(td, ready, local, remote))
        clusters += [_original_dst(outbound_cluster_name(w),
                                   transport_socket=upstream_tls(w.spiffe(td), any_workload(td)),
                                   upstream_bind_config={
                                       "socket_options": upstream_socket_options()})
                     for w in ready]
    if local:
        listeners.append(_inbound_listener(td, ready, local, inp.pods))
        clusters.append(_original_dst(INBOUND_CLUSTER, upstream_bind_config={
            "socket_options": upstream_socket_options(NM_MARK_AUTH)}))
        clusters.append(_original_dst(PLAIN_CLUSTER, upstream_bind_config={
            "socket_options": upstream_socket_options()}))
    return TunnelPlan(
        listeners=tuple(parse(lst, Listener) for lst in listeners),
        clusters=tuple(parse(c, Cluster) for c in clusters),
        local_identities=frozenset(w.spiffe(td) for w in local_ids),
        secrets=frozenset(w.spiffe(td) for w in ready),
        ipcache_flags=dp.ipcache_flags,
        port_overrides=dp.port_overrides,
        inbound_pods=frozenset(ip for ip in dp.inbound_pods
                               if any(p.ip == ip and p.workload in ready for p in local)),
        sources=frozenset(p.ip for p in local if p.workload in ready),
    )


def _ips_by_workload(pods: Iterable[MeshPod]) -> dict[WorkloadId, list[str]]:
    out: dict[WorkloadId, list[str]] = {}
    for p in pods:
        out.setdefault(p.workload, []).append(p.ip)
    return dict(sorted(out.items()))


def _chain_stat(name: str) -> str:
    return name.replace("/", "_").replace("*", "any")


def _outbound_listener(td: str, ready: list[WorkloadId], local: list[MeshPod],
                       remote: list[MeshPod]) -> dict[str, Any]:
    remote_by_id = _ips_by_workload(remote)
    local_by_id = _ips_by_workload(local)
    chains: list[dict[str, Any]] = []
    sources = []
    for src in ready:
        cluster = outbound_cluster_name(src)
        destinations = []
        for dst, ips in remote_by_id.items():
            name = f"outbound/{src.key}/{dst.key}"
            chains.append({"name": name, "filters": [
                _expect_peer(dst.spiffe(td)),
                _tcp_proxy(_chain_stat(name), cluster, OUTBOUND_LISTENER)]})
            destinations.append((ips, _action(name)))
        # A destination this Envoy has not heard of yet: any workload of the trust domain.
        fallback = f"outbound/{src.key}/*"
        chains.append({"name": fallback, "filters": [
            _tcp_proxy(_chain_stat(fallback), cluster, OUTBOUND_LISTENER)]})
        sources.append((local_by_id[src], {"matcher": _ip_tree(
            "DestinationIPInput", destinations, _action(fallback))}))
    return {
        "name": OUTBOUND_LISTENER,
        "address": {"socket_address": {"address": LISTEN_ANY, "port_value": TUNNEL_OUT_PORT}},
        "transparent": True,
        "listener_filters": [_ORIGINAL_DST, {"name": "envoy.filters.listener.original_src",
                                             "typed_config": {
            "@type": _TYPE + "envoy.extensions.filters.listener.original_src.v3.OriginalSrc",
            "mark": NM_MARK_TUNNEL}}],
        "filter_chains": chains,
        # A source the matcher does not know (a pod whose certificate is not in yet) gets no
        # chain: the connection is closed, and the listener's access log says so.
        "filter_chain_matcher": _ip_tree("SourceIPInput", sources),
        "access_log": [tcp_access_log(OUTBOUND_LISTENER, no_chain_only=True)],
        "traffic_direction": "OUTBOUND",
    }


def _inbound_listener(td: str, ready: list[WorkloadId], local: list[MeshPod],
                      pods: Iterable[MeshPod]) -> dict[str, Any]:
    by_id = _ips_by_workload(p for p in pods if p.ip)
    chains: list[dict[str, Any]] = []
    destinations = []
    for dst in ready:
        sources = []
        for src, ips in by_id.items():
            name = f"inbound/{dst.key}/{src.key}"
            chains.append({"name": name,
                           "transport_socket": downstream_tls(dst.spiffe(td),
                                                               {"exact": src.spiffe(td)}),
                           "filters": [_tcp_proxy(_chain_stat(name), INBOUND_CLUSTER,
                                                  INBOUND_LISTENER)]})
            sources.append((ips, _action(name)))
        # A source address no pod of the cluster has: any workload of the trust domain may use
        # it, since it is nobody's identity (the kernel sees "world").
        unknown = f"inbound/{dst.key}/*"
        chains.append({"name": unknown,
                       "transport_socket": downstream_tls(dst.spiffe(td), any_workload(td)),
                       "filters": [_tcp_proxy(_chain_stat(unknown), INBOUND_CLUSTER,
                                              INBOUND_LISTENER)]})
        dst_ips = [p.ip for p in local if p.workload == dst and p.tunnelled()]
        destinations.append((dst_ips, {"matcher": _ip_tree("SourceIPInput", sources,
                                                           _action(unknown))}))
    chains.append({"name": PLAIN_CHAIN, "filters": [
        _tcp_proxy("inbound_plain", PLAIN_CLUSTER, INBOUND_LISTENER)]})
    tls_tree = _ip_tree("DestinationIPInput", destinations)
    plain_tree = _ip_tree("DestinationIPInput", _plain_groups(local))
    matcher = {"matcher_tree": {
        "input": {"name": "transport", "typed_config": {
            "@type": _NET_INPUTS + "TransportProtocolInput"}},
        "exact_match_map": {"map": {"tls": {"matcher": {
            "matcher_tree": {
                "input": {"name": "alpn", "typed_config": {
                    "@type": _NET_INPUTS + "ApplicationProtocolInput"}},
                "exact_match_map": {"map": {f"'{ALPN}'": {"matcher": tls_tree}}}},
            # TLS that is not the tunnel's (the application's own): plaintext to the mesh.
            "on_no_match": {"matcher": plain_tree}}}}}},
        "on_no_match": {"matcher": plain_tree}}
    return {
        "name": INBOUND_LISTENER,
        "address": {"socket_address": {"address": LISTEN_ANY, "port_value": TUNNEL_IN_PORT}},
        "transparent": True,
        "listener_filters": [
            _ORIGINAL_DST,
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.listener.tls_inspector.v3."
                                 "TlsInspector"}},
            {"name": "envoy.filters.listener.original_src", "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.listener.original_src.v3."
                                 "OriginalSrc"}}],
        "filter_chains": chains,
        "filter_chain_matcher": matcher,
        "access_log": [tcp_access_log(INBOUND_LISTENER, no_chain_only=True)],
        "traffic_direction": "INBOUND",
    }


def _plain_groups(local: list[MeshPod]) -> list[tuple[list[str], dict[str, Any]]]:
    """Plaintext to local pods: passed through where the mode (of the pod, or of the port) is
    PERMISSIVE or DISABLE, refused where it is STRICT."""
    def verdict(mode: Mode) -> dict[str, Any]:
        return _action(PLAIN_CHAIN if mode != Mode.STRICT else REFUSE)

    groups: list[tuple[list[str], dict[str, Any]]] = [
        ([p.ip for p in local if not p.mode.ports and p.mode.mode != Mode.STRICT],
         _action(PLAIN_CHAIN))]
    for p in local:
        if p.mode.ports:
            groups.append(([p.ip], {"matcher": {
                "matcher_tree": {
                    "input": {"name": "port", "typed_config": {
                        "@type": _NET_INPUTS + "DestinationPortInput"}},
                    "exact_match_map": {"map": {str(port): verdict(m)
                                                for port, m in sorted(p.mode.ports.items())}}},
                "on_no_match": verdict(p.mode.mode)}}))
    return groups
