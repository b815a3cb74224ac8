"""What the route translation reads: plain, immutable data about one node's view of the cluster.

`L7Input` holds everything `translate` may look at — services, pods, the HTTPRoute/GRPCRoute
objects (already validated and defaulted by `nodemesh.model`), the L7 (HTTP) policy of pod ports
and the name of the node whose Envoy is being configured. Nothing here does I/O; the
``from_object`` helpers only reshape Kubernetes-style dicts the agent already holds.

Shapes chosen here (see docs/routes.md):

- `Pod.named_ports` maps a container port name to its TCP port number (what a Service's named
  ``targetPort`` resolves to, per pod).
- `L7Policy` is one destination pod port with HTTP rules, as the policy compiler emits them
  (ingress ``toPorts[].rules.http`` of CiliumNetworkPolicies): for each rule, the source
  identities it allows (0 = any identity) and the ``rules.http`` entries exactly as written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from nodemesh.model.endpointslice import selects_pods, slice_backends
from nodemesh.model.labels import service_selects

PROXY_IP = "169.254.42.1"
FIRST_LISTENER_PORT = 15001
CONTROLLER_NAME = "nodemesh.io/mesh"
ANY_IDENTITY = 0  # in `L7PolicyRule.identities`: every source


def _frozen_map(m: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(sorted((m or {}).items())))


@dataclass(frozen=True, order=True)
class RedirectKey:
    """A destination the datapath sends to the proxy: (IP, port, protocol) → listener port."""

    ip: str
    port: int
    protocol: str = "TCP"

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True)
class RouteKey:
    """Which route: kind (HTTPRoute or GRPCRoute), namespace, name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> RouteKey:
        meta = obj["metadata"]
        return cls(obj["kind"], meta.get("namespace") or "default", meta["name"])


@dataclass(frozen=True)
class ServicePort:
    """One port of a Service. `target_port` is a number or the name of a container port."""

    port: int
    target_port: int | str
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True)
class SliceEndpoint:
    """A backend of a Service without a selector, from its EndpointSlices: address, number
    (the slice port's), and the pod it names ("namespace/name", or the address) and its node."""

    ip: str
    port: int
    ref: str
    node: str = ""


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str | None  # None: headless (or not allocated yet): no frontend to intercept
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)  # empty: selects no pod
    # A Service without a selector: its EndpointSlices (None for a Service whose endpoints
    # are the pods it selects), and the nodes whose endpoints are no backend.
    slices: tuple[Mapping[str, Any], ...] | None = None
    unreachable: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "selector", _frozen_map(self.selector))

    def slice_endpoints(self, port: ServicePort) -> tuple[SliceEndpoint, ...]:
        """The ready endpoints of the Service's slices for `port` (by name and protocol, as
        kube-proxy matches them); computed when a route needs them, not for every Service."""
        out = []
        for addr, number, ep in slice_backends(self.slices or (), port.name, port.protocol,
                                               self.unreachable):
            target = ep.get("targetRef") or {}
            ref = (f"{target.get('namespace') or self.namespace}/{target['name']}"
                   if target.get("kind", "Pod") == "Pod" and target.get("name") else addr)
            out.append(SliceEndpoint(addr, number, ref, ep.get("nodeName") or ""))
        return tuple(out)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port_by_number(self, number: int, protocol: str = "TCP") -> ServicePort | None:
        return next((p for p in self.ports if p.port == number and p.protocol == protocol), None)

    def selects(self, pod: Pod) -> bool:
        """Kubernetes: a Service picks the pods of its namespace whose labels include its
        selector; an empty selector picks none."""
        return pod.namespace == self.namespace and service_selects(self.selector, pod.labels)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], slices: Iterable[Mapping[str, Any]] = (),
                    unreachable: frozenset[str] = frozenset()) -> Service:
        """`slices`: the Service's own EndpointSlices (used only when it has no selector);
        `unreachable`: nodes whose endpoints are no backend."""
        meta, spec = obj["metadata"], obj.get("spec") or {}
        ip = spec.get("clusterIP")
        ports = tuple(
            ServicePort(port=p["port"], target_port=p.get("targetPort", p["port"]),
                        name=p.get("name") or "", protocol=p.get("protocol") or "TCP",
                        app_protocol=p.get("appProtocol"))
            for p in spec.get("ports") or [])
        return cls(namespace=meta.get("namespace") or "default", name=meta["name"],
                   cluster_ip=ip if ip and ip != "None" else None, ports=ports,
                   selector=spec.get("selector") or {},
                   slices=None if selects_pods(obj) else tuple(slices), unreachable=unreachable)


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    ip: str | None  # None until the pod has a sandbox
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    identity: int = 0
    named_ports: Mapping[str, int] = field(default_factory=dict)  # TCP container ports by name

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen_map(self.labels))
        object.__setattr__(self, "named_ports", _frozen_map(self.named_ports))

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def resolve_port(self, target: int | str) -> int | None:
        """A Service targetPort for this pod: numbers as they are, names through the pod's
        container ports (None when the pod has no port of that name, as in Kubernetes)."""
        if isinstance(target, int):
            return target
        return self.named_ports.get(target)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], identity: int = 0) -> Pod:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        named = {p["name"]: p["containerPort"]
                 for c in spec.get("containers") or [] for p in c.get("ports") or []
                 if p.get("name") and (p.get("protocol") or "TCP") == "TCP"}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        return cls(namespace=meta.get("namespace") or "default", name=meta["name"],
                   ip=status.get("podIP") or None, node=spec.get("nodeName") or "",
                   labels=meta.get("labels") or {}, ready=ready, identity=identity,
                   named_ports=named)


@dataclass(frozen=True)
class L7PolicyRule:
    """Who may send which HTTP requests: `http` holds CNP ``rules.http`` entries as written
    (``method``, ``path``, ``host``, ``headers``, ``headerMatches``); an empty tuple allows every
    request. `identities` are source identities; `ANY_IDENTITY` (0) allows every source."""

    identities: tuple[int, ...]
    http: tuple[Mapping[str, Any], ...] = ()
    policy: str = ""  # "CiliumNetworkPolicy ns/name", for names and messages only


@dataclass(frozen=True)
class L7Policy:
    """A pod port whose ingress is filtered at L7: traffic to (pod_ip, port, protocol) from
    this node's pods goes through this node's Envoy, which allows what one of `rules` allows."""

    pod_ip: str
    port: int
    rules: tuple[L7PolicyRule, ...]
    protocol: str = "TCP"
    pod: str = ""  # "namespace/name", for names and messages only

    @property
    def key(self) -> RedirectKey:
        return RedirectKey(self.pod_ip, self.port, self.protocol)


@dataclass(frozen=True)
class MtlsView:
    """What the L7 translation needs of the mutual-TLS tunnel (docs/security.md): an upstream
    connection to a pod of another node is made in mutual TLS, with the certificate of the
    client pod's workload identity, and must meet the server pod's.

    - `clients`: local pod IP → its workload identity (SPIFFE ID), for the identities whose
      certificates this node's Envoy holds;
    - `servers`: pod IP of another node → its workload identity;
    - `tunnelled`: the pods of other nodes reached through the tunnel (mode not DISABLE) ...
    - `ports`: ... except where a port's mode differs from its pod's: (IP, port) → tunnelled.
    """

    trust_domain: str
    clients: Mapping[str, str] = field(default_factory=dict)
    servers: Mapping[str, str] = field(default_factory=dict)
    tunnelled: frozenset[str] = frozenset()
    ports: Mapping[tuple[str, int], bool] = field(default_factory=dict)

    def server_identity(self, ip: str, port: int) -> str | None:
        """The identity an upstream connection to ip:port must meet, or None: plaintext."""
        through = self.ports.get((ip, port), ip in self.tunnelled)
        return self.servers.get(ip) if through else None


@dataclass(frozen=True)
class L7Input:
    """Everything one node's translation looks at.

    `routes` are HTTPRoute/GRPCRoute objects (``gateway.networking.k8s.io/v1``) as
    `nodemesh.model` validated and defaulted them. `reference_grants` are ReferenceGrant objects
    (``gateway.networking.k8s.io/v1beta1``); they matter only with
    `require_reference_grants`, because GAMMA lets mesh routes reach backends in any namespace
    without one (GEP-1426, "Namespace boundaries").
    """

    node: str
    services: tuple[Service, ...] = ()
    pods: tuple[Pod, ...] = ()
    routes: tuple[Mapping[str, Any], ...] = ()
    l7_policies: tuple[L7Policy, ...] = ()
    reference_grants: tuple[Mapping[str, Any], ...] = ()
    require_reference_grants: bool = False
    mtls: MtlsView | None = None  # None: upstreams to other nodes go in clear

    @classmethod
    def build(cls, node: str, services: Iterable[Service] = (), pods: Iterable[Pod] = (),
              routes: Iterable[Mapping[str, Any]] = (), l7_policies: Iterable[L7Policy] = (),
              **kw: Any) -> L7Input:
        """Convenience: accept any iterables, store tuples."""
        return cls(node=node, services=tuple(services), pods=tuple(pods), routes=tuple(routes),
                   l7_policies=tuple(l7_policies), **kw)

    @property
    def local_pods(self) -> tuple[Pod, ...]:
        """The pods on this node: the only possible clients of this node's Envoy."""
        return tuple(p for p in self.pods if p.node == self.node and p.ip)


# The policy compiler's numbers (nodemesh.policy.types): ingress direction, TCP.
_POLICY_INGRESS = 0
_POLICY_TCP = 6


def l7_policies_from_compiled(endpoint_policies: Mapping[str, Any],
                              pods: Iterable[Pod]) -> tuple[L7Policy, ...]:
    """`L7Policy` entries from the policy compiler's output (``nodemesh.policy.compile_all``:
    ``"namespace/name"`` → ``EndpointPolicy``), read by attribute so this package does not
    depend on the compiler's classes.

    Kept: ingress ``l7_rules`` on TCP for one port (Cilium puts L7 rules on single ports);
    their ``remote_identities`` become the rule's identities ((0,) = any). Rules that name
    only CIDRs are left out: CIDRs select peers outside the cluster, and the clients of a
    node's proxy are its pods.
    """
    by_ref = {p.ref: p for p in pods if p.ip}
    ref_by_ip = {p.ip: ref for ref, p in by_ref.items()}
    out: dict[RedirectKey, list[L7PolicyRule]] = {}
    for ref in sorted(endpoint_policies):
        pod = by_ref.get(ref)
        if pod is None:
            continue
        ep = endpoint_policies[ref]
        names = getattr(ep, "policy_names", {}) or {}
        for r in getattr(ep, "l7_rules", ()):
            if (int(r.direction) != _POLICY_INGRESS or r.protocol != _POLICY_TCP
                    or r.port_lo != r.port_hi or not r.remote_identities):
                continue
            key = RedirectKey(pod.ip or "", r.port_lo, "TCP")
            out.setdefault(key, []).append(L7PolicyRule(
                tuple(sorted(r.remote_identities)), tuple(dict(h) for h in r.http),
                names.get(r.policy_id, "")))
    return tuple(L7Policy(k.ip, k.port, tuple(rules), k.protocol, ref_by_ip.get(k.ip, ""))
                 for k, rules in sorted(out.items()))
