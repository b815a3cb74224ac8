"""The Kubernetes NetworkPolicy e2e model as data, plus CiliumNetworkPolicy cases.

Ported from kubernetes/kubernetes ``test/e2e/network/netpol/network_policy.go`` (the policies and
truth tables, rewritten as Python data) and extended with nodemesh's own CiliumNetworkPolicy cases.
The pure unit test (tests/unit/test_policy_netpol_cases.py) runs every case through compile +
lower + evaluate; the real-kernel integration test runs the same cases against pods.

The model (as upstream's ``model.go``)
--------------------------------------
- namespaces ``x``, ``y``, ``z``, labelled ``ns: <name>`` and ``kubernetes.io/metadata.name:
  <name>`` (the API server's automatic label; newer upstream tests select on it);
- pods ``a``, ``b``, ``c`` in each namespace (``PODS`` = ``x/a`` ... ``z/c``), labelled
  ``pod: <name>``;
- every pod serves every port of ``Case.server_ports`` (default 80 and 81) on TCP and UDP, each in
  a container port named ``serve-<port>-<tcp|udp>`` (`pod_object` builds the Pod).

A case
------
``Case(name, upstream, steps, server_ports)``: ``upstream`` is the title of the ported ``It(...)``
(None for nodemesh's own cases). Steps run in order against one cluster, and their effects
accumulate:

``Step(description, apply, delete, delete_all_policies, pod_labels, namespace_labels, probes)``

1. ``delete`` removes policies by ``(kind, namespace, name)``; ``delete_all_policies`` removes all;
2. ``apply`` creates or replaces policies (by kind, namespace and name). A policy is a YAML dict,
   or a function ``f(ips) -> dict`` for policies that name pod IPs (``ips["x/b"]`` is x/b's IP);
3. ``pod_labels`` / ``namespace_labels`` replace a pod's / namespace's labels;
4. then every ``Probe(protocol, port, expected)`` is checked: for each ordered pair of distinct
   pods (loopback is ignored, as upstream does), the client connects to the server's IP on that
   port, and must succeed exactly when ``expected.expected(client, server)``.

``Reachability`` is upstream's helper: a default expectation plus exceptions, applied in order
(``expect``, ``expect_all_ingress``, ``expect_all_egress``, ``expect_peer``).

Helpers for runners
-------------------
``State`` replays steps (``state.run(step, ips)``) and holds the policies and labels a case has
built so far; ``state.pod_object(pod)`` / ``state.namespace_object(ns)`` give the objects to apply.
``policy_input(state, ips)`` turns the state into compiler input (identities from an in-memory
``Allocator``), which is what the pure test does with ``MODEL_IPS``; a real-cluster runner uses
its pods' actual IPs instead. ``NETPOL_CASES`` are the upstream ports, ``CILIUM_CASES`` nodemesh's
own, ``CASES`` both.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PODS = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in POD_NAMES)
DEFAULT_SERVER_PORTS = (80, 81)
SERVER_PROTOCOLS = ("TCP", "UDP")

NETWORK_POLICY = "NetworkPolicy"
CILIUM_NETWORK_POLICY = "CiliumNetworkPolicy"

Policy = dict[str, Any] | Callable[[Mapping[str, str]], dict[str, Any]]


# --- the model ---------------------------------------------------------------------------------


def namespace_labels(ns: str) -> dict[str, str]:
    return {"ns": ns, "kubernetes.io/metadata.name": ns}


def pod_labels(pod: str) -> dict[str, str]:
    return {"pod": pod.split("/")[1]}


def port_name(port: int, protocol: str) -> str:
    return f"serve-{port}-{protocol.lower()}"


def named_ports(server_ports: Sequence[int] = DEFAULT_SERVER_PORTS) -> dict[str, tuple[tuple[str, int], ...]]:
    """A model pod's named ports, in `nodemesh.policy.PolicyPod.named_ports` form."""
    return {port_name(p, proto): ((proto, p),) for p in server_ports for proto in SERVER_PROTOCOLS}


def namespace_object(ns: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": namespace_labels(ns)}}


# Upstream runs agnhost serve-hostname; nodemesh's echo server plays its part (a TCP or UDP
# listener per container, as ``cont-<port>-<proto>`` does upstream).
SERVER_IMAGE = "nodemesh/echo"


def pod_object(pod: str, server_ports: Sequence[int] = DEFAULT_SERVER_PORTS) -> dict[str, Any]:
    """The model pod: one container per (port, protocol), each port named ``serve-<port>-<proto>``."""
    ns, name = pod.split("/")
    containers = [
        {
            "name": f"cont-{p}-{proto.lower()}",
            "image": SERVER_IMAGE,
            "args": [f"--{proto.lower()}={p}"],
            "ports": [{"containerPort": p, "name": port_name(p, proto), "protocol": proto}],
        }
        for p in server_ports
        for proto in SERVER_PROTOCOLS
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": pod_labels(pod)},
        "spec": {"containers": containers},
    }


def resolve_policy(policy: Policy, ips: Mapping[str, str]) -> dict[str, Any]:
    """A case's policy as a YAML dict, given the pods' IPs."""
    return policy(ips) if callable(policy) else policy


def policy_key(policy: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = policy["metadata"]
    return policy["kind"], meta.get("namespace", "default"), meta["name"]


def large_cidr_for(ip: str) -> str:
    """The /4 around an IP (upstream's ``makeLargeCIDRForIP``)."""
    return str(ipaddress.ip_network(f"{ip}/4", strict=False))


# --- expectations (upstream's Reachability) ----------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """Matches pods by namespace and/or pod name; empty matches all (upstream's ``Peer``)."""

    namespace: str = ""
    pod: str = ""

    def matches(self, pod: str) -> bool:
        ns, name = pod.split("/")
        return (not self.namespace or self.namespace == ns) and (not self.pod or self.pod == name)


class Reachability:
    """Expected connectivity for every ordered pod pair: a default plus exceptions."""

    def __init__(self, default: bool = True, pods: Sequence[str] = PODS) -> None:
        self.pods = tuple(pods)
        self.default = default
        self._m = {(s, d): default for s in self.pods for d in self.pods}

    def expect(self, src: str, dst: str, connected: bool) -> Reachability:
        self._m[(src, dst)] = connected
        return self

    def expect_all_ingress(self, dst: str, connected: bool) -> Reachability:
        for s in self.pods:
            self._m[(s, dst)] = connected
        return self

    def expect_all_egress(self, src: str, connected: bool) -> Reachability:
        for d in self.pods:
            self._m[(src, d)] = connected
        return self

    def expect_peer(self, src: Peer, dst: Peer, connected: bool) -> Reachability:
        for s in self.pods:
            for d in self.pods:
                if src.matches(s) and dst.matches(d):
                    self._m[(s, d)] = connected
        return self

    def expected(self, src: str, dst: str) -> bool:
        return self._m[(src, dst)]

    def pairs(self) -> list[tuple[str, str]]:
        """Every ordered pair that is checked: loopback (a pod to itself) is ignored."""
        return [(s, d) for s in self.pods for d in self.pods if s != d]

    def table(self, observed: Mapping[tuple[str, str], bool] | None = None) -> str:
        """Upstream's truth table: rows are clients, columns servers; ``.`` connects, ``X`` does
        not; with `observed`, cells that differ are marked ``!``."""
        lines = ["-\t" + "\t".join(self.pods)]
        for s in self.pods:
            cells = []
            for d in self.pods:
                want = self._m[(s, d)]
                mark = "." if want else "X"
                if observed is not None and s != d and observed.get((s, d), want) != want:
                    mark = "!" + mark
                cells.append(mark)
            lines.append(s + "\t" + "\t".join(cells))
        return "\n".join(lines)


def allow_all() -> Reachability:
    return Reachability(True)


@dataclass(frozen=True)
class Probe:
    protocol: str  # TCP | UDP
    port: int
    expected: Reachability


@dataclass(frozen=True)
class Step:
    description: str
    apply: tuple[Policy, ...] = ()
    delete: tuple[tuple[str, str, str], ...] = ()
    delete_all_policies: bool = False
    pod_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    probes: tuple[Probe, ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    upstream: str | None
    steps: tuple[Step, ...]
    server_ports: tuple[int, ...] = DEFAULT_SERVER_PORTS

    @property
    def kind(self) -> str:
        return "upstream" if self.upstream else "cilium"


@dataclass
class State:
    """The cluster state a case has built so far (policies and labels), step by step."""

    server_ports: tuple[int, ...] = DEFAULT_SERVER_PORTS
    policies: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, dict[str, str]] = field(default_factory=lambda: {p: pod_labels(p) for p in PODS})
    namespaces: dict[str, dict[str, str]] = field(
        default_factory=lambda: {ns: namespace_labels(ns) for ns in NAMESPACES}
    )

    def run(self, step: Step, ips: Mapping[str, str]) -> None:
        if step.delete_all_policies:
            self.policies.clear()
        for key in step.delete:
            self.policies.pop(key, None)
        for p in step.apply:
            obj = resolve_policy(p, ips)
            self.policies[policy_key(obj)] = obj
        for pod, labels in step.pod_labels.items():
            self.pods[pod] = dict(labels)
        for ns, labels in step.namespace_labels.items():
            self.namespaces[ns] = dict(labels)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [p for (k, _, _), p in sorted(self.policies.items()) if k == kind]

    def pod_object(self, pod: str) -> dict[str, Any]:
        obj = pod_object(pod, self.server_ports)
        obj["metadata"]["labels"] = dict(self.pods[pod])
        return obj

    def namespace_object(self, ns: str) -> dict[str, Any]:
        obj = namespace_object(ns)
        obj["metadata"]["labels"] = dict(self.namespaces[ns])
        return obj


# --- the pure twin: the model as compiler input ------------------------------------------------

# Three "nodes", three pods each; all inside 10.0.0.0/8, and so inside the /4 that upstream's
# except cases build around a pod IP.
MODEL_IPS: dict[str, str] = {pod: f"10.244.{i // 3 + 1}.{10 + i}" for i, pod in enumerate(PODS)}


class Allocator:
    """Label set → identity in memory (from 256, first come first served), standing in for
    `nodemesh.store.identities.allocate_identity` and its store."""

    def __init__(self) -> None:
        self.numbers: dict[tuple[tuple[str, str], ...], int] = {}

    def __call__(self, labels: Mapping[str, str]) -> int:
        key = tuple(sorted(labels.items()))
        return self.numbers.setdefault(key, 256 + len(self.numbers))


def policy_input(state: State, ips: Mapping[str, str] = MODEL_IPS, alloc: Allocator | None = None) -> Any:
    """The model at `state` as a `nodemesh.policy.PolicyInput` (identities from `alloc`)."""
    from nodemesh.identity import security_labels
    from nodemesh.policy import PolicyInput, PolicyPod

    alloc = alloc or Allocator()
    endpoints, identities = [], {}
    for pod in PODS:
        ns, name = pod.split("/")
        labels = security_labels(state.pod_object(pod), state.namespace_object(ns))
        num = alloc(labels)
        identities[num] = labels
        endpoints.append(
            PolicyPod(ns, name, dict(state.pods[pod]), ips[pod], num, named_ports(state.server_ports))
        )
    return PolicyInput(
        endpoints=endpoints,
        namespaces={ns: dict(v) for ns, v in state.namespaces.items()},
        identities=identities,
        network_policies=state.of_kind(NETWORK_POLICY),
        cilium_policies=state.of_kind(CILIUM_NETWORK_POLICY),
    )


# --- policy builders ---------------------------------------------------------------------------


def sel(**match_labels: str) -> dict[str, Any]:
    """A LabelSelector with matchLabels (``sel()`` = ``{}``, everything)."""
    return {"matchLabels": dict(match_labels)} if match_labels else {}


def sel_labels(labels: Mapping[str, str]) -> dict[str, Any]:
    """A LabelSelector from a dict (for keys that are not Python names)."""
    return {"matchLabels": dict(labels)}


def expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    """A LabelSelector with one matchExpression."""
    e: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        e["values"] = list(values)
    return {"matchExpressions": [e]}


def netpol(
    name: str,
    pod_selector: Mapping[str, Any] | None = None,
    *,
    ingress: list[dict[str, Any]] | None = None,
    egress: list[dict[str, Any]] | None = None,
    types: list[str] | None = None,
    namespace: str = "x",
) -> dict[str, Any]:
    """A NetworkPolicy as upstream's helpers build it: ``policyTypes`` lists each given section
    (``ingress=[]`` is "Ingress, no rules": deny all ingress)."""
    spec: dict[str, Any] = {"podSelector": dict(pod_selector or {})}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    spec["policyTypes"] = types or (
        (["Ingress"] if ingress is not None else []) + (["Egress"] if egress is not None else [])
    )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": NETWORK_POLICY,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def cnp(name: str, spec: dict[str, Any] | None = None, *, specs: list[dict[str, Any]] | None = None,
        namespace: str = "x") -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "cilium.io/v2",
        "kind": CILIUM_NETWORK_POLICY,
        "metadata": {"name": name, "namespace": namespace},
    }
    if spec is not None:
        obj["spec"] = spec
    if specs is not None:
        obj["specs"] = specs
    return obj


def port(
    p: int | str | None = None, protocol: str | None = None, end_port: int | None = None
) -> dict[str, Any]:
    """A NetworkPolicyPort."""
    out: dict[str, Any] = {}
    if protocol is not None:
        out["protocol"] = protocol
    if p is not None:
        out["port"] = p
    if end_port is not None:
        out["endPort"] = end_port
    return out


POD_A = sel(pod="a")
X, Y, Z = Peer("x"), Peer("y"), Peer("z")
ANYONE = Peer()


def tcp(p: int, r: Reachability) -> Probe:
    return Probe("TCP", p, r)


def udp(p: int, r: Reachability) -> Probe:
    return Probe("UDP", p, r)


def _one(name: str, upstream: str | None, apply: Sequence[Policy], *probes: Probe,
         server_ports: tuple[int, ...] = DEFAULT_SERVER_PORTS) -> Case:
    """A single-step case."""
    return Case(name, upstream, (Step("apply", tuple(apply), probes=tuple(probes)),), server_ports)


def _all_but_xb(name: str) -> Policy:
    """x/a may reach the /4 around x/b's IP, except x/b itself (upstream's except cases)."""
    return lambda ips: netpol(name, POD_A, egress=[{"to": [{"ipBlock": {
        "cidr": large_cidr_for(ips["x/b"]), "except": [f"{ips['x/b']}/32"]}}]}])


def _only_from_y_to_xa() -> Reachability:
    return Reachability().expect_peer(X, Peer("x", "a"), False).expect_peer(Z, Peer("x", "a"), False)


# --- upstream NetworkPolicy cases ----------------------------------------------------------------

NETPOL_CASES: tuple[Case, ...] = (
    _one(
        "default-deny-ingress",
        "should support a 'default-deny-ingress' policy",
        [netpol("deny-ingress", {}, ingress=[])],
        tcp(80, Reachability().expect_peer(ANYONE, X, False)),
    ),
    _one(
        "default-deny-all",
        "should support a 'default-deny-all' policy",
        [netpol("deny-all", {}, ingress=[], egress=[])],
        tcp(80, Reachability().expect_peer(ANYONE, X, False).expect_peer(X, ANYONE, False)),
    ),
    _one(
        "pod-selector-same-namespace",
        "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        [netpol("x-a-allows-x-b", POD_A, ingress=[{"from": [{"podSelector": sel(pod="b")}]}])],
        tcp(80, Reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)),
    ),
    _one(
        "allow-ingress-for-a-target",
        "should enforce policy to allow ingress traffic for a target",
        [
            netpol("deny-all", {}, ingress=[]),
            netpol("allow-all-to-a", POD_A,
                   ingress=[{"from": [{"podSelector": {}, "namespaceSelector": {}}]}]),
        ],
        tcp(80, Reachability().expect_all_ingress("x/a", True)
            .expect_all_ingress("x/b", False).expect_all_ingress("x/c", False)),
    ),
    _one(
        "from-all-namespaces",
        "should enforce policy to allow ingress traffic from pods in all namespaces",
        [netpol("allow-from-another-ns", POD_A, ingress=[{"from": [{"namespaceSelector": {}}]}])],
        tcp(80, allow_all()),
    ),
    _one(
        "namespace-selector",
        "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        [netpol("allow-client-a-via-ns-selector", POD_A,
                ingress=[{"from": [{"namespaceSelector": sel(ns="y")}]}])],
        tcp(80, _only_from_y_to_xa()),
    ),
    _one(
        "pod-selector-match-expressions",
        "should enforce policy based on PodSelector with MatchExpressions",
        [netpol("x-a-allows-x-b", POD_A, ingress=[{"from": [{"podSelector": expr("pod", "In", "b")}]}])],
        tcp(80, Reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)),
    ),
    _one(
        "namespace-selector-match-expressions",
        "should enforce policy based on NamespaceSelector with MatchExpressions",
        [netpol("allow-ns-y-match-selector", POD_A,
                ingress=[{"from": [{"namespaceSelector": expr("ns", "In", "y")}]}])],
        tcp(80, _only_from_y_to_xa()),
    ),
    _one(
        "pod-selector-or-namespace-selector",
        "should enforce policy based on PodSelector or NamespaceSelector",
        [netpol("allow-ns-y-match-selector", POD_A, ingress=[{"from": [
            {"namespaceSelector": expr("ns", "NotIn", "x")},
            {"podSelector": sel(pod="b")},
        ]}])],
        tcp(80, Reachability().expect("x/a", "x/a", False).expect("x/c", "x/a", False)),
    ),
    _one(
        "pod-selector-and-namespace-selector",
        "should enforce policy based on PodSelector and NamespaceSelector",
        [netpol("allow-ns-y-podselector-and-nsselector", POD_A, ingress=[{"from": [
            {"namespaceSelector": expr("ns", "NotIn", "x"), "podSelector": sel(pod="b")},
        ]}])],
        tcp(80, Reachability().expect_all_ingress("x/a", False)
            .expect("y/b", "x/a", True).expect("z/b", "x/a", True)),
    ),
    _one(
        "multiple-pod-and-namespace-selectors",
        "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        [netpol("allow-ns-y-z-pod-b-c", POD_A, ingress=[{"from": [
            {"namespaceSelector": expr("ns", "NotIn", "x"), "podSelector": expr("pod", "In", "b", "c")},
        ]}])],
        tcp(80, Reachability().expect_peer(X, Peer("x", "a"), False)
            .expect("y/a", "x/a", False).expect("z/a", "x/a", False)),
    ),
    _one(
        "any-pod-selectors",
        "should enforce policy based on any PodSelectors",
        [netpol("allow-ns-x-pod-b-c", POD_A, ingress=[{"from": [
            {"podSelector": sel(pod="b")}, {"podSelector": sel(pod="c")},
        ]}])],
        tcp(80, Reachability().expect_all_ingress("x/a", False)
            .expect("x/b", "x/a", True).expect("x/c", "x/a", True)),
    ),
    _one(
        "pod-in-other-namespace",
        "should enforce policy to allow traffic only from a pod in a different namespace based on "
        "PodSelector and NamespaceSelector",
        [netpol("allow-ns-y-pod-a-via-namespace-pod-selector", POD_A, ingress=[{"from": [
            {"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="a")},
        ]}])],
        tcp(80, Reachability().expect_all_ingress("x/a", False).expect("y/a", "x/a", True)),
    ),
    _one(
        "ports",
        "should enforce policy based on Ports",
        [netpol("allow-client-a-via-ns-selector", POD_A, ingress=[{
            "from": [{"namespaceSelector": sel(ns="y")}], "ports": [port(81, "TCP")],
        }])],
        tcp(81, Reachability().expect_peer(X, Peer("x", "a"), False)
            .expect_peer(Y, Peer("x", "a"), True).expect_peer(Z, Peer("x", "a"), False)),
        tcp(80, Reachability().expect_all_ingress("x/a", False)),
    ),
    Case(
        "stacked-policies",
        "should enforce multiple, stacked policies with overlapping podSelectors",
        (
            Step(
                "allow port 81 from y",
                (netpol("allow-client-a-via-ns-selector", POD_A, ingress=[{
                    "from": [{"namespaceSelector": sel(ns="y")}], "ports": [port(81, "TCP")]}]),),
                probes=(
                    tcp(81, _only_from_y_to_xa()),
                    tcp(80, Reachability().expect_all_ingress("x/a", False)),
                ),
            ),
            Step(
                "add a policy to unblock port 80",
                (netpol("allow-client-a-via-ns-selector-80", POD_A, ingress=[{
                    "from": [{"namespaceSelector": sel(ns="y")}], "ports": [port(80, "TCP")]}]),),
                probes=(tcp(80, _only_from_y_to_xa()), tcp(81, _only_from_y_to_xa())),
            ),
        ),
    ),
    _one(
        "allow-all",
        "should support allow-all policy",
        [netpol("allow-all", {}, ingress=[{}])],
        tcp(80, allow_all()),
        tcp(81, allow_all()),
    ),
    _one(
        "ingress-named-port",
        "should allow ingress access on one named port",
        [netpol("allow-all", {}, ingress=[{"ports": [port("serve-81-tcp")]}])],
        tcp(81, allow_all()),
        tcp(80, Reachability().expect_peer(ANYONE, X, False)),
    ),
    _one(
        "ingress-named-port-from-namespace",
        "should allow ingress access from namespace on one named port",
        [netpol("allow-client-a-via-ns-selector-80", POD_A, ingress=[{
            "from": [{"namespaceSelector": sel(ns="y")}], "ports": [port("serve-80-tcp", "TCP")],
        }])],
        tcp(80, _only_from_y_to_xa()),
        tcp(81, Reachability().expect_all_ingress("x/a", False)),
    ),
    _one(
        "egress-named-port",
        "should allow egress access on one named port",
        [netpol("allow-egress", {}, egress=[{"ports": [port("serve-80-tcp")]}])],
        tcp(80, allow_all()),
        tcp(81, Reachability().expect_peer(X, ANYONE, False)),
    ),
    Case(
        "updated-policy",
        "should enforce updated policy",
        (
            Step("allow all", (netpol("allow-all-mutate-to-deny-all", {}, ingress=[{}]),),
                 probes=(tcp(81, allow_all()),)),
            Step("update to deny all", (netpol("allow-all-mutate-to-deny-all", {}, ingress=[]),),
                 probes=(tcp(81, Reachability().expect_peer(ANYONE, X, False)),)),
        ),
    ),
    Case(
        "updated-namespace",
        "should allow ingress access from updated namespace",
        (
            Step("policy selects a namespace label nobody has",
                 (netpol("allow-client-a-via-ns-selector", POD_A,
                         ingress=[{"from": [{"namespaceSelector": sel(ns2="updated")}]}]),),
                 probes=(tcp(80, Reachability().expect_all_ingress("x/a", False)),)),
            Step("label namespace y",
                 namespace_labels={"y": {**namespace_labels("y"), "ns2": "updated"}},
                 probes=(tcp(80, Reachability().expect_all_ingress("x/a", False)
                             .expect_peer(Y, ANYONE, True)),)),
        ),
    ),
    Case(
        "updated-pod",
        "should allow ingress access from updated pod",
        (
            Step("policy selects a pod label nobody has",
                 (netpol("allow-client-a-via-pod-selector", POD_A,
                         ingress=[{"from": [{"podSelector": sel(pod="b", pod2="updated")}]}]),),
                 probes=(tcp(80, Reachability().expect_all_ingress("x/a", False)),)),
            Step("label x/b",
                 pod_labels={"x/b": {"pod": "b", "pod2": "updated"}},
                 probes=(tcp(80, Reachability().expect_all_ingress("x/a", False)
                             .expect("x/b", "x/a", True)),)),
        ),
    ),
    _one(
        "deny-ingress-from-other-namespaces",
        "should deny ingress from pods on other namespaces",
        [netpol("deny-empty-policy", {}, ingress=[{"from": [{"podSelector": {}}]}])],
        tcp(80, Reachability().expect_peer(Y, X, False).expect_peer(Z, X, False)),
    ),
    Case(
        "deny-ingress-to-updated-pod",
        "should deny ingress access to updated pod",
        (
            Step("policy selects target=isolated",
                 (netpol("deny-ingress-via-label-selector", sel(target="isolated"), ingress=[]),),
                 probes=(tcp(80, allow_all()),)),
            Step("label x/a target=isolated",
                 pod_labels={"x/a": {"pod": "a", "target": "isolated"}},
                 probes=(tcp(80, Reachability().expect_all_ingress("x/a", False)),)),
        ),
    ),
    _one(
        "deny-egress-pod-selector",
        "should deny egress from pods based on PodSelector",
        [netpol("deny-egress-pod-a", POD_A, egress=[])],
        tcp(80, Reachability().expect_all_egress("x/a", False)),
    ),
    _one(
        "deny-egress-namespace",
        "should deny egress from all pods in a namespace",
        [netpol("deny-egress-ns-x", {}, egress=[])],
        tcp(80, Reachability().expect_peer(X, ANYONE, False)),
    ),
    _one(
        "ingress-and-egress-together",
        "should work with Ingress, Egress specified together",
        [netpol("allow-client-a-via-pod-selector", POD_A,
                ingress=[{"from": [{"podSelector": sel(pod="b")}]}],
                egress=[{"ports": [port(80)]}], types=["Egress", "Ingress"])],
        tcp(80, Reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)),
        tcp(81, Reachability().expect_all_ingress("x/a", False).expect_all_egress("x/a", False)
            .expect("x/b", "x/a", True)),
    ),
    _one(
        "deny-egress-on-client-side",
        "should support denying of egress traffic on the client side (even if the server explicitly "
        "allows this traffic)",
        [
            netpol("allow-to-ns-y-pod-a", POD_A,
                   egress=[{"to": [{"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="a")}]}]),
            netpol("allow-from-xa-on-ya-match-selector", POD_A, namespace="y",
                   ingress=[{"from": [{"namespaceSelector": sel(ns="x"), "podSelector": sel(pod="a")}]}]),
            netpol("allow-from-xa-on-yb-match-selector", sel(pod="b"), namespace="y",
                   ingress=[{"from": [{"namespaceSelector": sel(ns="x"), "podSelector": sel(pod="a")}]}]),
        ],
        tcp(80, Reachability()
            .expect_peer(Peer("x", "a"), ANYONE, False)
            .expect_peer(ANYONE, Peer("y", "a"), False)
            .expect_peer(Peer("x", "a"), Peer("y", "a"), True)
            .expect_peer(ANYONE, Peer("y", "b"), False)),
    ),
    _one(
        "egress-to-pod-in-other-namespace",
        "should enforce egress policy allowing traffic to a server in a different namespace based on "
        "PodSelector and NamespaceSelector",
        [netpol("allow-to-ns-y-pod-a", POD_A,
                egress=[{"to": [{"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="a")}]}])],
        tcp(80, Reachability().expect_all_egress("x/a", False).expect("x/a", "y/a", True)),
    ),
    _one(
        "any-port-one-protocol",
        "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
        [netpol("allow-ingress-by-proto", POD_A, ingress=[{"ports": [port(protocol="TCP")]}])],
        tcp(80, allow_all()),
        udp(80, Reachability().expect_peer(ANYONE, Peer("x", "a"), False)),
    ),
    Case(
        "multiple-ingress-allow-all-wins",
        "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        (
            Step("allow only port 80",
                 (netpol("allow-ingress-port-80", {}, ingress=[{"ports": [port(80)]}]),),
                 probes=(tcp(81, Reachability().expect_peer(ANYONE, X, False)),)),
            Step("allow all ports", (netpol("allow-ingress", {}, ingress=[{}]),),
                 probes=(tcp(81, allow_all()),)),
        ),
    ),
    Case(
        "multiple-egress-allow-all-wins",
        "should enforce multiple egress policies with egress allow-all policy taking precedence",
        (
            Step("allow only port 80",
                 (netpol("allow-egress-port-80", {}, egress=[{"ports": [port(80)]}]),),
                 probes=(tcp(81, Reachability().expect_peer(X, ANYONE, False)),)),
            Step("allow all ports", (netpol("allow-egress", {}, egress=[{}]),),
                 probes=(tcp(81, allow_all()),)),
        ),
    ),
    Case(
        "stop-enforcing-after-delete",
        "should stop enforcing policies after they are deleted",
        (
            Step("deny all in x", (netpol("deny-all", {}, ingress=[], egress=[]),),
                 probes=(tcp(80, Reachability().expect_peer(X, ANYONE, False)
                             .expect_peer(ANYONE, X, False)),)),
            Step("delete every policy", delete_all_policies=True, probes=(tcp(80, allow_all()),)),
        ),
    ),
    _one(
        "egress-cidr",
        "should allow egress access to server in CIDR block",
        [lambda ips: netpol("allow-client-a-via-cidr-egress-rule", POD_A,
                            egress=[{"to": [{"ipBlock": {"cidr": f"{ips['y/b']}/32"}}]}])],
        tcp(80, Reachability().expect_all_egress("x/a", False).expect("x/a", "y/b", True)),
    ),
    _one(
        "egress-cidr-except",
        "should enforce except clause while egress access to server in CIDR block",
        [_all_but_xb("allow-client-a-via-cidr-egress-rule")],
        tcp(80, Reachability().expect("x/a", "x/b", False)),
    ),
    Case(
        "cidr-and-except-overlap",
        "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        (
            Step("allow a /4 except x/b",
                 (_all_but_xb("allow-client-a-via-cidr-egress-rule"),),
                 probes=(tcp(80, Reachability().expect("x/a", "x/b", False)),)),
            Step("update it to allow exactly x/b",
                 (lambda ips: netpol("allow-client-a-via-cidr-egress-rule", POD_A,
                                     egress=[{"to": [{"ipBlock": {"cidr": f"{ips['x/b']}/32"}}]}]),),
                 probes=(tcp(80, Reachability().expect_all_egress("x/a", False)
                             .expect("x/a", "x/b", True)),)),
            # nodemesh's addition: the except of one policy does not take away what another allows
            Step("add the /4-except-x/b policy again under another name",
                 (_all_but_xb("allow-client-a-via-cidr-except"),),
                 probes=(tcp(80, allow_all()),)),
        ),
    ),
    Case(
        "ingress-egress-independent",
        "should enforce policies to check ingress and egress policies can be controlled independently "
        "based on PodSelector",
        (
            Step("allow egress of x/a", (netpol("allow-egress-for-target", POD_A, egress=[{}]),),
                 probes=(tcp(80, allow_all()),)),
            Step("deny ingress of x/a", (netpol("deny-ingress-via-label-selector", POD_A, ingress=[]),),
                 probes=(tcp(80, Reachability().expect_all_ingress("x/a", False)),)),
        ),
    ),
    _one(
        "sctp-is-not-tcp",
        "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't "
        "support SCTP",
        [
            netpol("deny-ingress", {}, ingress=[]),
            netpol("allow-only-sctp-ingress-on-port-81", POD_A, ingress=[{"ports": [port(81, "SCTP")]}]),
        ],
        tcp(81, Reachability().expect_peer(ANYONE, X, False)),
    ),
    _one(
        "sctp-policy-isolates",
        "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin "
        "doesn't support SCTP",
        [netpol("allow-only-sctp-ingress-on-port-80", POD_A, ingress=[{"ports": [port(80, "SCTP")]}])],
        tcp(81, Reachability().expect_all_ingress("x/a", False)),
    ),
    _one(
        "udp-only-policy",
        "should not allow access by TCP when a policy specifies only UDP",
        [netpol("allow-only-udp-ingress-on-port-81", POD_A, ingress=[{"ports": [port(81, "UDP")]}])],
        tcp(81, Reachability().expect_all_ingress("x/a", False)),
        udp(81, allow_all()),
    ),
    _one(
        "default-namespace-label-match-labels",
        "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using "
        "default ns label",
        [netpol("allow-client-a-via-ns-selector-for-immutable-ns-label", POD_A, ingress=[{"from": [
            {"namespaceSelector": sel_labels({"kubernetes.io/metadata.name": "y"})}]}])],
        tcp(80, _only_from_y_to_xa()),
    ),
    _one(
        "default-namespace-label-match-expressions",
        "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
        [netpol("allow-ns-y-match-selector-for-immutable-ns-label", POD_A, egress=[{"to": [
            {"namespaceSelector": expr("kubernetes.io/metadata.name", "NotIn", "y")}]}])],
        tcp(80, Reachability().expect_peer(Peer("x", "a"), Y, False)),
    ),
    Case(
        "ingress-port-range",
        "should enforce policy to allow ingress traffic using port range",
        (Step("allow 111-115", (netpol("allow-ingress-use-port-range", POD_A,
                                       ingress=[{"ports": [port(111, end_port=115)]}]),),
              probes=(*(tcp(p, allow_all()) for p in range(111, 116)),
                      tcp(116, Reachability().expect_all_ingress("x/a", False)))),),
        server_ports=(111, 112, 113, 114, 115, 116),
    ),
    Case(
        "egress-port-range",
        "should enforce policy to allow egress traffic using port range",
        (Step("allow 111-115", (netpol("allow-egress-use-port-range", POD_A,
                                       egress=[{"ports": [port(111, end_port=115)]}]),),
              probes=(*(tcp(p, allow_all()) for p in range(111, 116)),
                      tcp(116, Reachability().expect_all_egress("x/a", False)))),),
        server_ports=(111, 112, 113, 114, 115, 116),
    ),
    _one(
        "udp-default-deny-ingress",
        "should support a 'default-deny-ingress' policy (UDP)",
        [netpol("deny-all", {}, ingress=[])],
        udp(80, Reachability().expect_peer(ANYONE, X, False)),
    ),
    _one(
        "udp-ports",
        "should enforce policy based on Ports (UDP)",
        [netpol("allow-ingress-on-port-81-ns-x", POD_A, ingress=[{
            "from": [{"namespaceSelector": sel(ns="y")}], "ports": [port(81, "UDP")]}])],
        udp(81, _only_from_y_to_xa()),
    ),
    _one(
        "udp-pod-in-other-namespace",
        "should enforce policy to allow traffic only from a pod in a different namespace based on "
        "PodSelector and NamespaceSelector (UDP)",
        [netpol("allow-ns-y-pod-a-via-namespace-pod-selector", POD_A, ingress=[{"from": [
            {"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="a")}]}])],
        udp(80, Reachability().expect_all_ingress("x/a", False).expect("y/a", "x/a", True)),
    ),
)


# --- CiliumNetworkPolicy cases (nodemesh's own) ----------------------------------------------------

NS_LABEL = "k8s:io.kubernetes.pod.namespace"

CILIUM_CASES: tuple[Case, ...] = (
    _one(
        "cnp-ingress-deny-overrides-allow",
        None,
        [
            netpol("allow-all-to-a", POD_A, ingress=[{}]),
            cnp("deny-from-b", {"endpointSelector": POD_A,
                                "ingressDeny": [{"fromEndpoints": [sel(pod="b")]}]}),
        ],
        # the CNP's fromEndpoints has no namespace key: only x/b is meant, not y/b or z/b
        tcp(80, Reachability().expect("x/b", "x/a", False)),
        tcp(81, Reachability().expect("x/b", "x/a", False)),
    ),
    _one(
        "cnp-ingress-deny-alone-enforces",
        None,
        [cnp("deny-from-y", {"endpointSelector": POD_A,
                             "ingressDeny": [{"fromEndpoints": [sel_labels({NS_LABEL: "y"})]}]})],
        tcp(80, Reachability().expect_all_ingress("x/a", False)),
    ),
    _one(
        "cnp-enable-default-deny-false",
        None,
        [cnp("deny-from-y-only", {"endpointSelector": POD_A, "enableDefaultDeny": {"ingress": False},
                                  "ingressDeny": [{"fromEndpoints": [sel_labels({NS_LABEL: "y"})]}]})],
        tcp(80, Reachability().expect_peer(Y, Peer("x", "a"), False)),
    ),
    _one(
        "cnp-egress-deny-wins",
        None,
        [cnp("all-but-y", {"endpointSelector": POD_A,
                           "egress": [{"toEntities": ["all"]}],
                           "egressDeny": [{"toEndpoints": [sel_labels({NS_LABEL: "y"})]}]})],
        tcp(80, Reachability().expect_peer(Peer("x", "a"), Y, False)),
        udp(81, Reachability().expect_peer(Peer("x", "a"), Y, False)),
    ),
    _one(
        "cnp-from-entities-cluster",
        None,
        [cnp("from-cluster", {"endpointSelector": POD_A, "ingress": [{"fromEntities": ["cluster"]}]})],
        tcp(80, allow_all()),
    ),
    _one(
        "cnp-from-entities-world",
        None,
        [cnp("from-world", {"endpointSelector": POD_A, "ingress": [{"fromEntities": ["world"]}]})],
        # pods are not "world": nothing in the cluster may connect
        tcp(80, Reachability().expect_all_ingress("x/a", False)),
    ),
    _one(
        "cnp-from-entities-all-one-port",
        None,
        [cnp("all-on-81", {"endpointSelector": POD_A, "ingress": [{
            "fromEntities": ["all"], "toPorts": [{"ports": [{"port": "81", "protocol": "TCP"}]}]}]})],
        tcp(81, allow_all()),
        tcp(80, Reachability().expect_all_ingress("x/a", False)),
    ),
    _one(
        "cnp-to-cidr-set-except",
        None,
        [lambda ips: cnp("world-but-y-b", {"endpointSelector": POD_A, "egress": [{
            "toCIDRSet": [{"cidr": "0.0.0.0/0", "except": [f"{ips['y/b']}/32"]}]}]})],
        tcp(80, Reachability().expect("x/a", "y/b", False)),
    ),
    _one(
        "cnp-namespace-label-selectors",
        None,
        [cnp("x-a-from-y", {
            "endpointSelector": sel_labels({NS_LABEL: "x", "pod": "a"}),
            "ingress": [{"fromEndpoints": [sel_labels({NS_LABEL: "y"})]}],
        })],
        tcp(80, Reachability().expect_all_ingress("x/a", False).expect_peer(Y, Peer("x", "a"), True)),
    ),
    _one(
        "cnp-to-ports-any",
        None,
        [cnp("port-80-any-protocol", {"endpointSelector": POD_A, "ingress": [{
            "toPorts": [{"ports": [{"port": "80", "protocol": "ANY"}]}]}]})],
        tcp(80, allow_all()),
        udp(80, allow_all()),
        tcp(81, Reachability().expect_all_ingress("x/a", False)),
        udp(81, Reachability().expect_all_ingress("x/a", False)),
    ),
    _one(
        "cnp-empty-endpoint-selector-is-namespace",
        None,
        [cnp("from-own-namespace", {"endpointSelector": POD_A, "ingress": [{"fromEndpoints": [{}]}]})],
        tcp(80, Reachability().expect_peer(Y, Peer("x", "a"), False).expect_peer(Z, Peer("x", "a"), False)),
    ),
    _one(
        "cnp-empty-rule-enforces",
        None,
        [cnp("egress-default-deny", {"endpointSelector": POD_A, "egress": [{}]})],
        tcp(80, Reachability().expect_all_egress("x/a", False)),
    ),
    _one(
        "cnp-specs-named-ports",
        None,
        [cnp("two-rules", specs=[
            {"endpointSelector": POD_A, "ingress": [{
                "fromEndpoints": [sel(pod="b")],
                "toPorts": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}]},
            {"endpointSelector": sel(pod="b"), "egress": [{
                "toEndpoints": [{}],
                "toPorts": [{"ports": [{"port": "serve-80-tcp"}, {"port": "serve-81-udp"}]}]}]},
        ])],
        udp(81, Reachability().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)
            .expect_peer(Peer("x", "b"), Y, False).expect_peer(Peer("x", "b"), Z, False)),
        tcp(80, Reachability().expect_all_ingress("x/a", False)
            .expect_peer(Peer("x", "b"), Y, False).expect_peer(Peer("x", "b"), Z, False)),
        tcp(81, Reachability().expect_all_ingress("x/a", False).expect_all_egress("x/b", False)),
    ),
    _one(
        "cnp-deny-port-range",
        None,
        [cnp("deny-80-81-tcp", {"endpointSelector": POD_A,
                                "ingress": [{"fromEntities": ["all"]}],
                                "ingressDeny": [{"toPorts": [{"ports": [
                                    {"port": "80", "endPort": 81, "protocol": "TCP"}]}]}]})],
        tcp(80, Reachability().expect_all_ingress("x/a", False)),
        tcp(81, Reachability().expect_all_ingress("x/a", False)),
        udp(80, allow_all()),
        udp(81, allow_all()),
    ),
)

CASES: tuple[Case, ...] = NETPOL_CASES + CILIUM_CASES
