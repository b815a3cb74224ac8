"""The compiler's plain data: what goes in (`PolicyPod`, `PolicyInput`) and what comes out
(`EndpointPolicy` with identity, CIDR and L7 rules).

Everything here is immutable plain data with no behaviour beyond small conveniences, so the
compiler stays a pure function and its output can be compared, printed and diffed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodemesh.datapath.layout import Direction, PolicyVerdict, Proto
from nodemesh.errors import NodemeshError

# The protocol names a policy may write (Kubernetes' `protocol`), as the datapath's numbers.
PROTOCOLS: Mapping[str, Proto] = {p.name: p for p in (Proto.TCP, Proto.UDP, Proto.SCTP)}


# When several rules match one packet: an explicit deny beats everything; a redirect beats a
# plain allow (the proxy then sees the traffic; an overlapping L4 allow becomes an L7 allow-all
# for that peer, see `L7Rule`). Higher wins.
PRECEDENCE: Mapping[PolicyVerdict, int] = {
    PolicyVerdict.ALLOW: 1, PolicyVerdict.REDIRECT: 2, PolicyVerdict.DENY: 3}


class PolicyCompileError(NodemeshError):
    """A policy uses something the compiler can not honour (the message names policy and field),
    or the result does not fit the datapath's maps."""


@dataclass(frozen=True)
class PolicyPod:
    """A pod as policy sees it."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    ip: str
    identity: int
    # port name -> ((protocol, number), ...), from the pod's containers[].ports[].name
    named_ports: Mapping[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PolicyInput:
    """Everything the compiler may look at; no store, no I/O."""

    endpoints: Sequence[PolicyPod]  # every pod in the cluster (selectors, named ports, identities)
    namespaces: Mapping[str, Mapping[str, str]]  # namespace -> its labels
    identities: Mapping[int, Mapping[str, str]]  # every known identity -> security labels
    network_policies: Sequence[dict] = ()
    cilium_policies: Sequence[dict] = ()


@dataclass(frozen=True, order=True)
class IdentityRule:
    """One L3/L4 rule against a remote identity: becomes `nm_policy` entries."""

    direction: Direction
    identity: int  # remote identity, 0 = any
    protocol: int  # 0 = any protocol (and then any port)
    port_lo: int
    port_hi: int
    verdict: PolicyVerdict
    policy_id: int
    proxy_port: int = 0  # REDIRECT only; 0 = the placeholder `lower` fills in
    # CiliumNetworkPolicy authentication.mode: required: only a peer whose identity was proven
    # (docs/security.md) matches this rule.
    auth: bool = False


@dataclass(frozen=True, order=True)
class CidrRule:
    """One rule against addresses: becomes (folded) `nm_policy_cidr` entries."""

    direction: Direction
    cidr: str  # canonical "a.b.c.d/n"
    excepts: tuple[str, ...]  # canonical sub-CIDRs the rule does not cover
    protocol: int
    port_lo: int
    port_hi: int
    verdict: PolicyVerdict
    policy_id: int
    proxy_port: int = 0


@dataclass(frozen=True)
class L7Rule:
    """HTTP rules of a CiliumNetworkPolicy port: the map says REDIRECT; Envoy enforces these.

    ``http`` is the CNP's ``rules.http`` list as written; an empty tuple means "allow all HTTP"
    (added for peers that another rule allows at L4 on the same port, as Cilium does).
    """

    direction: Direction
    protocol: int
    port_lo: int
    port_hi: int
    remote_identities: tuple[int, ...]  # (0,) = any identity; () = only the CIDRs below
    remote_cidrs: tuple[tuple[str, tuple[str, ...]], ...]  # (cidr, excepts)
    http: tuple[Mapping[str, Any], ...]
    policy_id: int


@dataclass(frozen=True)
class EndpointPolicy:
    """The compiled policy of one endpoint (pod)."""

    endpoint: str  # "namespace/name"
    identity: int
    ingress_enforced: bool
    egress_enforced: bool
    identity_rules: tuple[IdentityRule, ...] = ()
    cidr_rules: tuple[CidrRule, ...] = ()
    l7_rules: tuple[L7Rule, ...] = ()
    # policy id -> "NetworkPolicy ns/name" / "CiliumNetworkPolicy ns/name", for every policy
    # that selects this endpoint
    policy_names: Mapping[int, str] = field(default_factory=dict)

    def enforced(self, direction: Direction) -> bool:
        return self.ingress_enforced if direction == Direction.INGRESS else self.egress_enforced
