"""`EndpointPolicy` → the exact entries of ``nm_policy`` and ``nm_policy_cidr`` (docs/datapath.md).

The entries are the plain values of `nodemesh.datapath.layout` (`PolicyKey`, `PolicyValue`,
`CidrKey`, `CidrValue`, `PortRule`: hashable twins of the kernel's structs, with the key
encodings); `layout.policy_map_pairs` turns a `LoweredPolicy` into the structs the maps take.

``nm_policy`` (LPM over endpoint, identity, direction, protocol, dport): per (endpoint, remote
identity or 0, direction) "space", every rule becomes one or more prefixes: 72 = any protocol and
port, 80 = one protocol, 96 - k = an aligned block of 2**k ports (a range is cut into the fewest
such blocks). The kernel returns the *longest* matching prefix, so each stored prefix carries the
verdict that wins over all rules covering it and its enclosing prefixes (deny > redirect > allow,
then the most specific rule, then the lowest policy id); a prefix whose winner equals that of the
nearest enclosing stored prefix is redundant and left out. In particular an allow block inside a
deny block of the same space disappears.

``nm_policy_cidr`` (LPM over endpoint, direction, address): every CIDR and every ``except`` becomes
a prefix, and each carries *all* port rules that apply to addresses under it: those of every
enclosing CIDR rule that does not except it. An ``except`` of the only rule around it thus becomes
an entry with no rules (which hides the enclosing entry). Rules an entry does not need (duplicates,
allows covered by a deny or by another allow) are dropped; more than 16 is an error.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from nodemesh.datapath.layout import (
    POLICY_CIDR_MAX_RULES,
    PORT_MAX,
    PORT_MIN,
    CidrKey,
    CidrValue,
    EndpointFlags,
    PolicyFlags,
    PolicyKey,
    PolicyValue,
    PortRule,
    Proto,
    port_blocks,
)
from nodemesh.policy.ports import cidr_contains
from nodemesh.policy.types import (
    PRECEDENCE,
    CidrRule,
    Direction,
    EndpointPolicy,
    IdentityRule,
    PolicyCompileError,
    PolicyVerdict,
)


@dataclass(frozen=True)
class LoweredPolicy:
    """One endpoint's map entries plus the ``nm_endpoints`` enforcement flags."""

    endpoint: int
    ingress_enforced: bool
    egress_enforced: bool
    policy: dict[PolicyKey, PolicyValue]
    cidr: dict[CidrKey, CidrValue]

    @property
    def flags(self) -> EndpointFlags:
        """``endpoint_info.flags``."""
        return (EndpointFlags.INGRESS_ENFORCED if self.ingress_enforced else EndpointFlags.NONE) | (
            EndpointFlags.EGRESS_ENFORCED if self.egress_enforced else EndpointFlags.NONE
        )

    def enforced(self, direction: Direction) -> bool:
        return self.ingress_enforced if direction == Direction.INGRESS else self.egress_enforced


# --- nm_policy -------------------------------------------------------------------------------
# A prefix over the 24 variable bits (protocol << 16 | port): (bits, value), bits in 0 or 8..24.


def _prefixes(rule: IdentityRule) -> list[tuple[int, int]]:
    whole = rule.port_lo == PORT_MIN and rule.port_hi == PORT_MAX
    if rule.protocol == Proto.ANY:
        if not whole:
            raise PolicyCompileError(
                f"rule {rule}: a port range needs a protocol (the map can not wildcard the "
                "protocol and match a port)"
            )
        return [(0, 0)]
    if whole:
        return [(8, rule.protocol << 16)]
    return [(24 - k, (rule.protocol << 16) | start) for start, k in port_blocks(rule.port_lo, rule.port_hi)]


def _mask(value: int, bits: int) -> int:
    return value & ~((1 << (24 - bits)) - 1) & 0xFFFFFF


def _ancestors(bits: int, value: int) -> Iterable[tuple[int, int]]:
    """Shorter prefixes that contain (bits, value), longest first."""
    for b in range(bits - 1, 7, -1):
        yield b, _mask(value, b)
    if bits > 0:
        yield 0, 0


@dataclass(frozen=True)
class _Cand:
    verdict: PolicyVerdict
    bits: int
    policy_id: int
    proxy_port: int
    auth: bool = False

    def rank(self) -> tuple[int, bool, int, int, int]:
        # the winner sorts first: highest precedence; a rule that asks no proof of identity
        # before one that does (the kernel looks up one prefix per space, and rules are ORed: a
        # peer any of them allows is allowed); most specific; lowest policy id
        return (-PRECEDENCE[self.verdict], self.auth, -self.bits, self.policy_id,
                self.proxy_port)


def _value(c: _Cand) -> PolicyValue:
    return PolicyValue(int(c.verdict), c.proxy_port, c.policy_id,
                       int(PolicyFlags.AUTH) if c.auth else 0)


def _lower_space(rules: list[IdentityRule], proxy_port: int) -> dict[tuple[int, int], PolicyValue]:
    """One (identity, direction) space → {(bits, value): entry}."""
    cands: dict[tuple[int, int], list[_Cand]] = defaultdict(list)
    for r in rules:
        proxy = (r.proxy_port or proxy_port) if r.verdict == PolicyVerdict.REDIRECT else 0
        for bits, value in _prefixes(r):
            cands[(bits, value)].append(_Cand(r.verdict, bits, r.policy_id, proxy, r.auth))
    winner: dict[tuple[int, int], _Cand] = {}
    for p in sorted(cands):  # shorter first: ancestors are decided before their children
        pool = list(cands[p])
        for a in _ancestors(*p):
            if a in cands:
                pool.extend(cands[a])
        winner[p] = min(pool, key=_Cand.rank)
    out = {}
    for p, w in winner.items():
        parent = next((winner[a] for a in _ancestors(*p) if a in winner), None)
        if parent is not None and _value(parent) == _value(w):
            continue  # the enclosing entry already answers the same
        out[p] = _value(w)
    return out


def lower_identity_rules(
    rules: Iterable[IdentityRule], endpoint: int, proxy_port: int = 0
) -> dict[PolicyKey, PolicyValue]:
    spaces: dict[tuple[int, int], list[IdentityRule]] = defaultdict(list)
    for r in rules:
        spaces[(r.identity, int(r.direction))].append(r)
    out: dict[PolicyKey, PolicyValue] = {}
    for (identity, direction), space in sorted(spaces.items()):
        for (bits, value), entry in _lower_space(space, proxy_port).items():
            key = PolicyKey.of(endpoint, identity, direction, bits, value)
            out[key] = entry
    return dict(sorted(out.items()))


# --- nm_policy_cidr --------------------------------------------------------------------------


def _width(r: PortRule) -> int:
    return (256 if r.protocol == Proto.ANY else 1) * (r.port_hi - r.port_lo + 1)


def _covers(outer: PortRule, inner: PortRule) -> bool:
    return (
        outer.protocol in (Proto.ANY, inner.protocol)
        and outer.port_lo <= inner.port_lo
        and inner.port_hi <= outer.port_hi
    )


def simplify_rules(rules: Iterable[PortRule]) -> tuple[PortRule, ...]:
    """The rules one CIDR entry needs: a rule is dropped when a kept rule of the same or higher
    precedence covers all its (protocol, port) points, since it could never change the verdict."""
    best: dict[tuple[int, int, int, int, int], PortRule] = {}
    for r in rules:  # duplicates from different policies: keep the lowest policy id
        k = (r.protocol, r.verdict, r.proxy_port, r.port_lo, r.port_hi)
        if k not in best or r.policy_id < best[k].policy_id:
            best[k] = r
    ordered = sorted(
        best.values(),
        key=lambda r: (-PRECEDENCE[PolicyVerdict(r.verdict)], -_width(r), r.protocol, r.port_lo, r.policy_id),
    )
    kept: list[PortRule] = []
    for r in ordered:
        if any(_covers(k, r) for k in kept):
            continue
        kept.append(r)
    return tuple(kept)


def _cidr_bits(cidr: str) -> int:
    return int(cidr.split("/")[1])


def _cidr_parent(cidr: str, present: set[str]) -> str | None:
    net = ipaddress.IPv4Network(cidr)
    for length in range(net.prefixlen - 1, -1, -1):
        sup = str(net.supernet(new_prefix=length))
        if sup in present:
            return sup
    return None


def lower_cidr_rules(
    rules: Iterable[CidrRule], endpoint: int, proxy_port: int = 0, where: str = ""
) -> dict[CidrKey, CidrValue]:
    by_dir: dict[int, list[CidrRule]] = defaultdict(list)
    for r in rules:
        by_dir[int(r.direction)].append(r)
    out: dict[CidrKey, CidrValue] = {}
    for direction, drules in sorted(by_dir.items()):
        prefixes = {r.cidr for r in drules} | {e for r in drules for e in r.excepts}
        values: dict[str, tuple[PortRule, ...]] = {}
        for p in prefixes:
            applicable = [
                PortRule(
                    r.protocol,
                    int(r.verdict),
                    (r.proxy_port or proxy_port) if r.verdict == PolicyVerdict.REDIRECT else 0,
                    r.port_lo,
                    r.port_hi,
                    r.policy_id,
                )
                for r in drules
                if cidr_contains(r.cidr, p) and not any(cidr_contains(e, p) for e in r.excepts)
            ]
            values[p] = simplify_rules(applicable)
        for p, value in values.items():
            parent = _cidr_parent(p, prefixes)
            if value == (values[parent] if parent is not None else ()):
                continue  # a lookup would find the same rules one level up (or none at all)
            if len(value) > POLICY_CIDR_MAX_RULES:
                raise PolicyCompileError(
                    f"{where}{Direction(direction).name.lower()} CIDR {p}: {len(value)} port rules "
                    f"apply, the datapath holds at most {POLICY_CIDR_MAX_RULES} per CIDR"
                )
            out[CidrKey.of(endpoint, direction, p)] = CidrValue(value)
    return dict(sorted(out.items()))


# --- both --------------------------------------------------------------------------------------


def lower_policy(ep_policy: EndpointPolicy, endpoint_ifindex: int, proxy_port: int = 0) -> LoweredPolicy:
    """All map entries of one endpoint, with its enforcement flags. `proxy_port` fills the
    placeholder of REDIRECT verdicts (the node Envoy's port; 0 until the L7 work sets it)."""
    return LoweredPolicy(
        endpoint=endpoint_ifindex,
        ingress_enforced=ep_policy.ingress_enforced,
        egress_enforced=ep_policy.egress_enforced,
        policy=lower_identity_rules(ep_policy.identity_rules, endpoint_ifindex, proxy_port),
        cidr=lower_cidr_rules(
            ep_policy.cidr_rules, endpoint_ifindex, proxy_port, where=f"{ep_policy.endpoint}: "
        ),
    )


def lower(
    ep_policy: EndpointPolicy, endpoint_ifindex: int, proxy_port: int = 0
) -> tuple[dict[PolicyKey, PolicyValue], dict[CidrKey, CidrValue]]:
    """(nm_policy entries, nm_policy_cidr entries) of one endpoint."""
    lp = lower_policy(ep_policy, endpoint_ifindex, proxy_port)
    return lp.policy, lp.cidr


__all__ = [
    "POLICY_CIDR_MAX_RULES",
    "CidrKey",
    "CidrValue",
    "LoweredPolicy",
    "PolicyKey",
    "PolicyValue",
    "PortRule",
    "lower",
    "lower_cidr_rules",
    "lower_identity_rules",
    "lower_policy",
    "simplify_rules",
]
