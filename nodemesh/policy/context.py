"""What both policy kinds share while compiling: the cluster view (`Context`), peer sets
(`Peers`), and the per-endpoint rule accumulator (`Builder`) that turns peers x ports into rules.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodemesh.datapath.layout import Identity, Proto
from nodemesh.identity.labels import (
    NAMESPACE_NAME_LABEL,
    namespace_labels_of,
    namespace_of,
    security_labels_from,
)
from nodemesh.identity.reserved import RESERVED_LABELS
from nodemesh.policy.ids import assign_policy_ids, policy_ref
from nodemesh.policy.ports import (
    PortRange,
    PortSpec,
    canonical_cidr,
    ip_in_cidr,
    resolve_named,
)
from nodemesh.policy.types import (
    CidrRule,
    Direction,
    EndpointPolicy,
    IdentityRule,
    L7Rule,
    PolicyCompileError,
    PolicyInput,
    PolicyPod,
    PolicyVerdict,
)

NETWORK_POLICY = "NetworkPolicy"
CILIUM_NETWORK_POLICY = "CiliumNetworkPolicy"

_ANY = int(Identity.ANY)  # "any identity" (plain int: it is stored in rules)
CidrPeer = tuple[str, tuple[str, ...]]  # (cidr, excepts), canonical


@dataclass(frozen=True)
class Peers:
    """The remote side of a rule: identities (0 = any) and CIDRs (with excepts)."""

    identities: frozenset[int] = frozenset()
    cidrs: tuple[CidrPeer, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.identities and not self.cidrs


ANY_PEER = Peers(frozenset({_ANY}))


def cidr_peer(cidr: object, excepts: Iterable[object], where: str) -> CidrPeer | None:
    """A canonical (cidr, excepts) from policy text; None for an IPv6 block (never matches here)."""
    try:
        canon = canonical_cidr(str(cidr))
        exc = [canonical_cidr(str(e)) for e in excepts]
    except ValueError as e:
        raise PolicyCompileError(f"{where}: {e}") from None
    if canon is None:
        return None
    return canon, tuple(sorted({e for e in exc if e is not None}))


class Context:
    """The cluster as the compiler sees it, precomputed once per `PolicyInput`."""

    def __init__(self, inp: PolicyInput) -> None:
        self.inp = inp
        self.namespaces: dict[str, dict[str, str]] = {}
        for ns, labels in inp.namespaces.items():
            nl = dict(labels)
            nl.setdefault(NAMESPACE_NAME_LABEL, ns)
            self.namespaces[ns] = nl
        # Every identity a selector may pick: reserved ones, the known ones, and those of
        # endpoints whose identity the input forgot (rebuilt from the endpoint itself).
        self.identities: dict[int, Mapping[str, str]] = {
            num: dict(lbls) for num, lbls in RESERVED_LABELS.items()
        }
        self.identities.update({int(k): dict(v) for k, v in inp.identities.items()})
        self.endpoints_by_identity: dict[int, list[PolicyPod]] = defaultdict(list)
        for ep in inp.endpoints:
            self.endpoints_by_identity[ep.identity].append(ep)
            if ep.identity not in self.identities and ep.identity != _ANY:
                self.identities[ep.identity] = self.rebuild_labels(ep)
        refs = [
            policy_ref(NETWORK_POLICY, *policy_namespace_name(p)) for p in inp.network_policies
        ] + [policy_ref(CILIUM_NETWORK_POLICY, *policy_namespace_name(p)) for p in inp.cilium_policies]
        self.policy_ids = assign_policy_ids(refs)

    def rebuild_labels(self, ep: PolicyPod) -> dict[str, str]:
        return security_labels_from(ep.labels, ep.namespace, self.namespaces.get(ep.namespace))

    def subject_labels(self, ep: PolicyPod) -> Mapping[str, str]:
        """The security labels of the endpoint being compiled (what ``endpointSelector`` sees)."""
        labels = self.identities.get(ep.identity)
        if labels is None or namespace_of(labels) != ep.namespace:
            return self.rebuild_labels(ep)
        return labels

    def namespace_labels(self, ns: str, identity_labels: Mapping[str, str]) -> Mapping[str, str]:
        """A namespace's labels now (from the input), else as recorded in an identity."""
        if ns in self.namespaces:
            return self.namespaces[ns]
        labels = namespace_labels_of(identity_labels)
        labels.setdefault(NAMESPACE_NAME_LABEL, ns)
        return labels

    def pod_identities(self) -> Iterable[tuple[int, Mapping[str, str], str]]:
        """(identity, labels, namespace) of every pod identity (those with a namespace)."""
        for num, labels in sorted(self.identities.items()):
            ns = namespace_of(labels)
            if ns is not None:
                yield num, labels, ns

    def endpoints_in(self, cidr: CidrPeer) -> list[PolicyPod]:
        """The endpoints whose IP is in a CIDR and not in its excepts."""
        net, excepts = cidr
        out = []
        for ep in self.inp.endpoints:
            try:
                inside = ip_in_cidr(ep.ip, net) and not any(ip_in_cidr(ep.ip, e) for e in excepts)
            except ValueError:  # an endpoint without a (v4) address can not match a CIDR
                continue
            if inside:
                out.append(ep)
        return out


def policy_namespace_name(policy: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of a policy object; a missing namespace is ``default``."""
    meta = policy.get("metadata") or {}
    return meta.get("namespace") or "default", str(meta.get("name"))


@dataclass
class Builder:
    """Collects the rules of one endpoint; `emit` is where peers x ports become rules."""

    ctx: Context
    ep: PolicyPod
    ingress_enforced: bool = False
    egress_enforced: bool = False
    identity_rules: set[IdentityRule] = field(default_factory=set)
    cidr_rules: set[CidrRule] = field(default_factory=set)
    l7_rules: list[L7Rule] = field(default_factory=list)
    policy_names: dict[int, str] = field(default_factory=dict)

    def enforce(self, direction: Direction) -> None:
        if direction == Direction.INGRESS:
            self.ingress_enforced = True
        else:
            self.egress_enforced = True

    def _ports_for(
        self, spec: PortSpec, direction: Direction, peer_eps: Sequence[PolicyPod]
    ) -> list[PortRange]:
        """Concrete ports of a port spec. A named port means a port of the pod that receives the
        traffic: this endpoint for ingress, the peer pods for egress."""
        if isinstance(spec, PortRange):
            return [spec]
        if direction == Direction.INGRESS:
            return resolve_named(spec, self.ep.named_ports)
        out: set[PortRange] = set()
        for peer in peer_eps:
            out.update(resolve_named(spec, peer.named_ports))
        return sorted(out)

    def emit(
        self,
        direction: Direction,
        peers: Peers,
        ports: Sequence[PortSpec],
        verdict: PolicyVerdict,
        policy_id: int,
        http: Sequence[Mapping[str, Any]] | None = None,
        auth: bool = False,
    ) -> None:
        """Add the rules for peers x ports; with `http`, the verdict is REDIRECT and the HTTP rules
        are recorded for the proxy; with `auth`, only authenticated peers match."""
        if http is not None:
            verdict = PolicyVerdict.REDIRECT
        for spec in ports:
            self._emit_identities(direction, peers, spec, verdict, policy_id, http, auth)
            self._emit_cidrs(direction, peers, spec, verdict, policy_id, http)

    def _emit_identities(
        self,
        direction: Direction,
        peers: Peers,
        spec: PortSpec,
        verdict: PolicyVerdict,
        policy_id: int,
        http: Sequence[Mapping[str, Any]] | None,
        auth: bool = False,
    ) -> None:
        if not peers.identities:
            return
        per_identity: dict[int, list[PortRange]] = {}
        if isinstance(spec, PortRange) or direction == Direction.INGRESS:
            ports = self._ports_for(spec, direction, ())
            per_identity = dict.fromkeys(sorted(peers.identities), ports)
        else:
            # An egress named port: resolve against each destination identity's pods. "Any
            # destination" means every pod that has such a port (nothing else can have one).
            targets = (
                sorted(self.ctx.endpoints_by_identity)
                if _ANY in peers.identities
                else sorted(peers.identities)
            )
            for num in targets:
                eps = self.ctx.endpoints_by_identity.get(num, [])
                per_identity[num] = self._ports_for(spec, direction, eps)
        for num, ports in per_identity.items():
            for pr in ports:
                self.identity_rules.add(
                    IdentityRule(direction, num, pr.protocol, pr.lo, pr.hi, verdict, policy_id,
                                 auth=auth)
                )
                if http is not None:
                    self._l7(direction, pr, (num,), (), http, policy_id)

    def _emit_cidrs(
        self,
        direction: Direction,
        peers: Peers,
        spec: PortSpec,
        verdict: PolicyVerdict,
        policy_id: int,
        http: Sequence[Mapping[str, Any]] | None,
    ) -> None:
        for cidr in peers.cidrs:
            if isinstance(spec, PortRange) or direction == Direction.INGRESS:
                targets = [(cidr, self._ports_for(spec, direction, ()))]
            else:
                # An egress named port to a CIDR can only mean pods in it: one /32 per pod.
                targets = [
                    ((f"{ep.ip}/32", ()), self._ports_for(spec, direction, [ep]))
                    for ep in self.ctx.endpoints_in(cidr)
                ]
            for (net, excepts), ports in targets:
                for pr in ports:
                    self.cidr_rules.add(
                        CidrRule(direction, net, excepts, pr.protocol, pr.lo, pr.hi, verdict, policy_id)
                    )
                    if http is not None:
                        self._l7(direction, pr, (), ((net, excepts),), http, policy_id)

    def _l7(
        self,
        direction: Direction,
        pr: PortRange,
        identities: Sequence[int],
        cidrs: Sequence[CidrPeer],
        http: Sequence[Mapping[str, Any]],
        policy_id: int,
    ) -> None:
        self.l7_rules.append(
            L7Rule(direction, pr.protocol, pr.lo, pr.hi, tuple(identities), tuple(cidrs),
                   tuple(dict(h) for h in http), policy_id)
        )

    def finish(self) -> EndpointPolicy:
        l7 = self.l7_rules + _l7_allow_all(self.l7_rules, self.identity_rules, self.cidr_rules)
        uniq: dict[str, L7Rule] = {}
        for r in l7:
            uniq.setdefault(_l7_sort_key(r), r)
        return EndpointPolicy(
            endpoint=self.ep.ref,
            identity=self.ep.identity,
            ingress_enforced=self.ingress_enforced,
            egress_enforced=self.egress_enforced,
            identity_rules=tuple(sorted(self.identity_rules)),
            cidr_rules=tuple(sorted(self.cidr_rules)),
            l7_rules=tuple(uniq[k] for k in sorted(uniq)),
            policy_names=dict(sorted(self.policy_names.items())),
        )


def _l7_sort_key(r: L7Rule) -> str:
    return json.dumps(
        [r.direction, r.protocol, r.port_lo, r.port_hi, r.remote_identities, r.remote_cidrs,
         r.policy_id, list(r.http)],
        sort_keys=True,
    )


def _overlap(proto: int, lo: int, hi: int, r: L7Rule) -> tuple[int, int] | None:
    if proto not in (Proto.ANY, r.protocol):
        return None
    a, b = max(lo, r.port_lo), min(hi, r.port_hi)
    return (a, b) if a <= b else None


def _l7_allow_all(
    l7: Sequence[L7Rule], idrules: Iterable[IdentityRule], cidrrules: Iterable[CidrRule]
) -> list[L7Rule]:
    """Where a plain L4 allow overlaps a redirected port, the redirect still wins in the map (the
    proxy must see the traffic), so the proxy must allow all HTTP for that allowed peer: the union
    of an L4 rule and an L7 rule is "everything" for that peer, as in Cilium."""
    out = []
    allows_id = [r for r in idrules if r.verdict == PolicyVerdict.ALLOW]
    allows_cidr = [r for r in cidrrules if r.verdict == PolicyVerdict.ALLOW]
    for r in l7:
        if not r.http:
            continue
        for a in allows_id:
            ov = _overlap(a.protocol, a.port_lo, a.port_hi, r) if a.direction == r.direction else None
            if ov is None:
                continue
            if a.identity == _ANY:
                ids = r.remote_identities or (_ANY,)
            elif _ANY in r.remote_identities or a.identity in r.remote_identities or r.remote_cidrs:
                ids = (a.identity,)
            else:
                continue
            out.append(L7Rule(r.direction, r.protocol, ov[0], ov[1], ids, (), (), a.policy_id))
        for c in allows_cidr:
            ov = _overlap(c.protocol, c.port_lo, c.port_hi, r) if c.direction == r.direction else None
            if ov is None:
                continue
            out.append(
                L7Rule(r.direction, r.protocol, ov[0], ov[1], (), ((c.cidr, c.excepts),), (), c.policy_id)
            )
    return out

