"""Kubernetes NetworkPolicy (``networking.k8s.io/v1``) → rules for one endpoint.

Semantics follow https://kubernetes.io/docs/concepts/services-networking/network-policies/ and the
upstream e2e suite (``test/e2e/network/netpol``):

- a pod is isolated for a direction when any NetworkPolicy selecting it lists that direction in
  ``policyTypes`` (default: Ingress, plus Egress when ``egress`` has rules); its allowed traffic is
  then the union of all rules of all such policies;
- a missing or empty ``from``/``to`` means every source/destination (any identity, any address);
  a missing or empty ``ports`` means every port and protocol;
- a peer with only ``podSelector`` selects pods of the policy's namespace; with only
  ``namespaceSelector``, all pods of the selected namespaces; with both, pods matching both;
- ``ipBlock`` is matched by address, so a pod's IP in it counts (docs/datapath.md);
- a named port means the port of the pod that receives the traffic: this pod's for ingress, each
  destination pod's for egress; a name no pod has allows nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nodemesh.identity.labels import pod_labels_of
from nodemesh.policy.context import (
    ANY_PEER,
    NETWORK_POLICY,
    Builder,
    Context,
    Peers,
    cidr_peer,
    policy_namespace_name,
)
from nodemesh.policy.ids import policy_ref
from nodemesh.policy.ports import (
    ALL_PORTS,
    NamedPort,
    PortRange,
    PortSpec,
    parse_port_number,
    protocol_number,
)
from nodemesh.policy.selectors import matches
from nodemesh.policy.types import Direction, PolicyCompileError, PolicyPod, PolicyVerdict


def policy_types(spec: Mapping[str, Any]) -> list[str]:
    """``spec.policyTypes``, or the API server's default when it is absent."""
    types = spec.get("policyTypes")
    if types:
        return list(types)
    return ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]


def selects(policy: Mapping[str, Any], ep: PolicyPod) -> bool:
    ns, _ = policy_namespace_name(policy)
    spec = policy.get("spec") or {}
    # podSelector is required by the API; {} (all pods of the namespace) when a caller left it out
    return ns == ep.namespace and matches(spec.get("podSelector") or {}, ep.labels)


def _peers(ctx: Context, peers: Sequence[Mapping[str, Any]] | None, ns: str, where: str) -> Peers:
    if not peers:
        return ANY_PEER
    identities: set[int] = set()
    cidrs = []
    for i, peer in enumerate(peers):
        block = peer.get("ipBlock")
        if block:
            cp = cidr_peer(block.get("cidr"), block.get("except") or (), f"{where}[{i}].ipBlock")
            if cp is not None:
                cidrs.append(cp)
            continue
        pod_sel = peer.get("podSelector")
        ns_sel = peer.get("namespaceSelector")
        if pod_sel is None and ns_sel is None:
            continue  # an empty peer is refused by validation; it selects nothing here
        for num, labels, ident_ns in ctx.pod_identities():
            if ns_sel is None:
                if ident_ns != ns:
                    continue
            elif not matches(ns_sel, ctx.namespace_labels(ident_ns, labels)):
                continue
            if pod_sel is not None and not matches(pod_sel, pod_labels_of(labels)):
                continue
            identities.add(num)
    return Peers(frozenset(identities), tuple(sorted(set(cidrs))))


def _ports(ports: Sequence[Mapping[str, Any]] | None, where: str) -> list[PortSpec]:
    if not ports:
        return [ALL_PORTS]
    out: list[PortSpec] = []
    for i, p in enumerate(ports):
        try:
            proto = protocol_number(p.get("protocol") or "TCP")
        except KeyError:
            raise PolicyCompileError(
                f"{where}[{i}].protocol: {p.get('protocol')!r} is not TCP, UDP or SCTP"
            ) from None
        port = p.get("port")
        if port is None:
            out.append(PortRange(proto))
            continue
        number = parse_port_number(port)
        if number is None:
            out.append(NamedPort(str(port), (proto,)))
            continue
        end = p.get("endPort")
        hi = int(end) if end is not None else number
        if not 0 <= number <= hi <= 65535:
            raise PolicyCompileError(f"{where}[{i}]: bad port range {number}-{hi}")
        out.append(PortRange(proto, number, hi))
    return out


def compile_network_policy(ctx: Context, policy: Mapping[str, Any], b: Builder) -> None:
    """Add what one NetworkPolicy says about `b.ep` (nothing when it does not select it)."""
    if not selects(policy, b.ep):
        return
    ns, name = policy_namespace_name(policy)
    ref = policy_ref(NETWORK_POLICY, ns, name)
    pid = ctx.policy_ids[ref]
    b.policy_names[pid] = ref
    spec = policy.get("spec") or {}
    types = policy_types(spec)
    for direction, kind, field, peer_field in (
        (Direction.INGRESS, "Ingress", "ingress", "from"),
        (Direction.EGRESS, "Egress", "egress", "to"),
    ):
        if kind not in types:
            continue
        b.enforce(direction)
        for i, rule in enumerate(spec.get(field) or []):
            where = f"{ref}: spec.{field}[{i}]"
            peers = _peers(ctx, rule.get(peer_field), ns, f"{where}.{peer_field}")
            b.emit(direction, peers, _ports(rule.get("ports"), f"{where}.ports"), PolicyVerdict.ALLOW, pid)
