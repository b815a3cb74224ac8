"""CiliumNetworkPolicy (``cilium.io/v2``) L3/L4 (+ HTTP redirect) → rules for one endpoint.

Semantics follow Cilium (https://docs.cilium.io/en/stable/security/policy/):

- ``spec`` and every entry of ``specs`` is a rule; each rule whose ``endpointSelector`` selects the
  pod contributes. The selector always applies in the policy's namespace.
- Enforcement ("default deny") per direction: a selecting rule with at least one ``ingress`` or
  ``ingressDeny`` entry puts the pod's ingress into default deny (likewise egress), unless the
  rule's ``enableDefaultDeny.ingress`` is false. An empty list (``ingress: []``) is no entry and
  enforces nothing, whatever ``enableDefaultDeny`` says; ``ingress: [{}]`` enforces and allows
  nothing.
- Peers: ``fromEndpoints`` selectors without a namespace key select only in the policy's
  namespace (so ``[{}]`` = every pod of that namespace); ``fromEntities``; ``fromCIDR`` /
  ``fromCIDRSet`` (matched by address, pod IPs included, see docs/policy.md). An explicitly
  empty peer list selects nothing. A rule with ports but no peer field allows those ports from
  any peer; a rule with neither allows nothing.
- ``toPorts``: ports are strings (or ints); ``0`` or no ports = all; names resolve like
  NetworkPolicy named ports; protocol ``ANY`` (the default) = TCP and UDP; ``endPort`` ranges.
  ``rules.http`` makes the verdict REDIRECT and records the HTTP rules for the proxy.
- ``ingressDeny``/``egressDeny`` produce DENY rules, which win over any allow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nodemesh.datapath.layout import Identity
from nodemesh.policy.context import (
    ANY_PEER,
    CILIUM_NETWORK_POLICY,
    Builder,
    Context,
    Peers,
    cidr_peer,
    policy_namespace_name,
)
from nodemesh.policy.ids import policy_ref
from nodemesh.policy.ports import (
    ALL_PORTS,
    ANY_EXPANDS_TO,
    NamedPort,
    PortRange,
    PortSpec,
    parse_port_number,
    protocol_number,
)
from nodemesh.policy.selectors import cilium_matches, scope_peer_selector, scope_subject_selector
from nodemesh.policy.types import Direction, PolicyCompileError, PolicyVerdict

# Entities whose identity set does not depend on the cluster; "cluster" and "all" are computed.
_FIXED_ENTITIES = {
    "host": (int(Identity.HOST),),
    "world": (int(Identity.WORLD),),
    "world-ipv4": (int(Identity.WORLD),),
    "world-ipv6": (),  # no IPv6 here: selects nothing
    "remote-node": (int(Identity.REMOTE_NODE),),
    "health": (int(Identity.HEALTH),),
    "init": (int(Identity.INIT),),
    "unmanaged": (int(Identity.UNMANAGED),),
}
# Cilium's "cluster": every endpoint of the cluster plus host, remote-node, init, health and
# unmanaged (https://docs.cilium.io/en/stable/security/policy/language/#entities-based).
_CLUSTER_RESERVED = tuple(int(i) for i in (Identity.HOST, Identity.REMOTE_NODE, Identity.INIT,
                                           Identity.HEALTH, Identity.UNMANAGED))

_L7_SUPPORTED = {"http"}
_PORT_RULE_UNSUPPORTED = ("terminatingTLS", "originatingTLS", "serverNames", "listener")


def rules_of(policy: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(path, rule) for ``spec`` and each of ``specs``."""
    out = []
    if policy.get("spec"):
        out.append(("spec", policy["spec"]))
    for i, rule in enumerate(policy.get("specs") or []):
        out.append((f"specs[{i}]", rule))
    return out


def default_deny(rule: Mapping[str, Any], direction: Direction) -> bool:
    """Does this rule put a selected endpoint into default deny for `direction`?

    As Cilium's ``computePolicyEnforcementAndRules``: only a rule with entries in that direction
    (``len(Ingress) > 0 || len(IngressDeny) > 0``) counts, and ``enableDefaultDeny`` (default
    true) can then switch it off; ``enableDefaultDeny: true`` alone enforces nothing.
    """
    name = "ingress" if direction == Direction.INGRESS else "egress"
    if not (rule.get(name) or rule.get(f"{name}Deny")):
        return False
    explicit = (rule.get("enableDefaultDeny") or {}).get(name)
    return True if explicit is None else bool(explicit)


class _Rule:
    """One CNP rule being compiled for one endpoint."""

    def __init__(self, ctx: Context, b: Builder, ns: str, ref: str, pid: int) -> None:
        self.ctx, self.b, self.ns, self.ref, self.pid = ctx, b, ns, ref, pid

    def fail(self, where: str, message: str) -> PolicyCompileError:
        return PolicyCompileError(f"{self.ref}: {where}: {message}")

    def entity(self, name: str, where: str) -> set[int]:
        if name == "all":
            return {int(Identity.ANY)}
        if name == "cluster":
            return {num for num, _, _ in self.ctx.pod_identities()} | set(_CLUSTER_RESERVED)
        if name in _FIXED_ENTITIES:
            return set(_FIXED_ENTITIES[name])
        raise self.fail(where, f"entity {name!r} is not supported by nodemesh")

    def peers(self, r: Mapping[str, Any], direction: Direction, where: str) -> Peers | None:
        """The rule's peers; None when it names none (then ports apply to any peer)."""
        pre = "from" if direction == Direction.INGRESS else "to"
        unsupported = ["Requires", "Nodes", "Groups"] + (
            ["Services", "FQDNs"] if direction == Direction.EGRESS else []
        )
        for key in unsupported:
            if r.get(pre + key) is not None:
                raise self.fail(f"{where}.{pre}{key}", "not supported by nodemesh")
        if r.get("icmps") is not None:
            raise self.fail(f"{where}.icmps", "not supported by nodemesh")
        fields = {k: r.get(pre + k) for k in ("Endpoints", "Entities", "CIDR", "CIDRSet")}
        given = {k: v for k, v in fields.items() if v is not None}
        if not given:
            return None
        if any(len(v) == 0 for v in given.values()):
            # Cilium: an explicitly empty peer list selects nothing (not everything).
            return Peers()
        identities: set[int] = set()
        cidrs = []
        for sel in given.get("Endpoints") or []:
            scoped = scope_peer_selector(sel, self.ns)
            for num, labels in sorted(self.ctx.identities.items()):
                if cilium_matches(scoped, labels):
                    identities.add(num)
        for i, name in enumerate(given.get("Entities") or []):
            identities |= self.entity(str(name), f"{where}.{pre}Entities[{i}]")
        for i, c in enumerate(given.get("CIDR") or []):
            cp = cidr_peer(c, (), f"{self.ref}: {where}.{pre}CIDR[{i}]")
            if cp is not None:
                cidrs.append(cp)
        for i, item in enumerate(given.get("CIDRSet") or []):
            w = f"{where}.{pre}CIDRSet[{i}]"
            if item.get("cidr") is None:
                raise self.fail(w, "only cidr (with except) is supported, not cidrGroupRef")
            cp = cidr_peer(item["cidr"], item.get("except") or (), f"{self.ref}: {w}")
            if cp is not None:
                cidrs.append(cp)
        return Peers(frozenset(identities), tuple(sorted(set(cidrs))))

    def port_rules(
        self, to_ports: Sequence[Mapping[str, Any]], where: str, deny: bool
    ) -> list[tuple[list[PortSpec], list[Mapping[str, Any]] | None]]:
        """[(port specs, http rules or None)] for each ``toPorts`` entry."""
        out = []
        for j, pr in enumerate(to_ports):
            w = f"{where}.toPorts[{j}]"
            for key in _PORT_RULE_UNSUPPORTED:
                if pr.get(key) is not None:
                    raise self.fail(f"{w}.{key}", "not supported by nodemesh")
            specs = self.ports(pr.get("ports") or [], w)
            http = None
            rules = pr.get("rules") or {}
            if rules and deny:
                raise self.fail(f"{w}.rules", "deny rules can not have L7 rules")
            for key, value in rules.items():
                if key not in _L7_SUPPORTED and value:
                    raise self.fail(f"{w}.rules.{key}", "only http L7 rules are supported")
            if rules.get("http"):
                http = list(rules["http"])
            out.append((specs, http))
        return out

    def ports(self, ports: Sequence[Mapping[str, Any]], where: str) -> list[PortSpec]:
        if not ports:
            return [ALL_PORTS]
        out: list[PortSpec] = []
        for i, p in enumerate(ports):
            text = str(p.get("protocol") or "ANY").upper()
            if text == "ANY":
                protos: tuple[int, ...] = ANY_EXPANDS_TO
            else:
                try:
                    protos = (protocol_number(text),)
                except KeyError:
                    raise self.fail(
                        f"{where}.ports[{i}].protocol", f"{text!r} is not TCP, UDP, SCTP or ANY"
                    ) from None
            raw = p.get("port")
            number = 0 if raw in (None, "") else parse_port_number(raw)
            if number is None:
                out.append(NamedPort(str(raw), protos))
            elif number == 0:
                # port 0 = every port; with ANY that is every protocol too (an L3-only rule)
                out.extend([ALL_PORTS] if text == "ANY" else [PortRange(x) for x in protos])
            else:
                end = p.get("endPort")
                hi = int(end) if end not in (None, 0) else number
                if not 0 < number <= hi <= 65535:
                    raise self.fail(f"{where}.ports[{i}]", f"bad port range {number}-{hi}")
                out.extend(PortRange(x, number, hi) for x in protos)
        return out

    def section(self, rule: Mapping[str, Any], path: str, direction: Direction, deny: bool) -> None:
        name = ("ingress" if direction == Direction.INGRESS else "egress") + ("Deny" if deny else "")
        verdict = PolicyVerdict.DENY if deny else PolicyVerdict.ALLOW
        for i, r in enumerate(rule.get(name) or []):
            where = f"{path}.{name}[{i}]"
            peers = self.peers(r, direction, where)
            auth = self.authentication(r, where)
            to_ports = r.get("toPorts")
            if peers is None:
                if not to_ports:
                    continue  # `{}`: enforces (see default_deny) but allows nothing
                peers = ANY_PEER  # ports only: from any peer
            if peers.empty:
                continue
            if auth and peers.cidrs:
                raise self.fail(f"{where}.authentication", "applies to endpoint and entity "
                                "peers, whose identity can be proven; not to CIDR peers")
            if not to_ports:
                self.b.emit(direction, peers, [ALL_PORTS], verdict, self.pid, auth=auth)
                continue
            for specs, http in self.port_rules(to_ports, where, deny):
                self.b.emit(direction, peers, specs, verdict, self.pid, http, auth=auth)

    def authentication(self, r: Mapping[str, Any], where: str) -> bool:
        """authentication.mode: required → only authenticated peers match the rule."""
        mode = (r.get("authentication") or {}).get("mode")
        if mode in (None, "disabled"):
            return False
        if mode == "required":
            return True
        raise self.fail(f"{where}.authentication.mode", f"{mode!r} is not supported by nodemesh "
                        "(required or disabled)")


def compile_cilium_policy(ctx: Context, policy: Mapping[str, Any], b: Builder) -> None:
    """Add what one CiliumNetworkPolicy says about `b.ep` (nothing when no rule selects it)."""
    ns, name = policy_namespace_name(policy)
    if ns != b.ep.namespace:
        return
    ref = policy_ref(CILIUM_NETWORK_POLICY, ns, name)
    pid = ctx.policy_ids[ref]
    subject = ctx.subject_labels(b.ep)
    for path, rule in rules_of(policy):
        if rule.get("endpointSelector") is None:
            continue  # a nodeSelector rule (host policy) never selects a pod
        if not cilium_matches(scope_subject_selector(rule["endpointSelector"], ns), subject):
            continue
        b.policy_names[pid] = ref
        for direction in (Direction.INGRESS, Direction.EGRESS):
            if default_deny(rule, direction):
                b.enforce(direction)
        compiler = _Rule(ctx, b, ns, ref, pid)
        for direction in (Direction.INGRESS, Direction.EGRESS):
            compiler.section(rule, path, direction, deny=False)
            compiler.section(rule, path, direction, deny=True)
