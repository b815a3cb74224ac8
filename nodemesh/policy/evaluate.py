"""A pure Python model of the datapath's policy decision, over the lowered map entries.

What the BPF programs do for a new connection, after their always-allowed shortcuts (node-local
DNS, host → pod) and before conntrack takes over:

1. look up ``nm_policy`` with the remote identity (longest prefix over protocol and port), unless
   the identity is 0;
2. look up ``nm_policy`` with identity 0 (the wildcard space);
3. look up ``nm_policy_cidr`` with the remote address and scan that entry's port rules;
4. any DENY among the hits → dropped (``POLICY_DENY``); else any REDIRECT → to the proxy; else any
   ALLOW → forwarded; else dropped (``POLICY_DENIED``) when the pod is isolated in that direction,
   forwarded when it is not. A hit that requires an authenticated peer (PolicyFlags.AUTH) counts only
   for an authenticated one; a connection only such a hit would have allowed is dropped as
   ``AUTH_REQUIRED``.

Used by the unit tests (the pure twin of the kernel test) and by ``nodemesh policy explain``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nodemesh.datapath.layout import CidrKey, DropReason, PolicyFlags, PolicyKey, Verdict
from nodemesh.policy.lower import LoweredPolicy, lower_policy
from nodemesh.policy.ports import protocol_number
from nodemesh.policy.types import Direction, EndpointPolicy, PolicyVerdict

# The flow verdicts (Hubble's names) and drop reasons the datapath reports (datapath.layout).
FORWARDED = Verdict.FORWARDED.name
DROPPED = Verdict.DROPPED.name
REDIRECTED = Verdict.REDIRECTED.name
DROP_POLICY_DENIED = int(DropReason.POLICY_DENIED)  # no rule allows it and the pod is isolated
DROP_POLICY_DENY = int(DropReason.POLICY_DENY)  # an explicit deny rule matched
# only a rule that requires an authenticated peer would allow it
DROP_AUTH_REQUIRED = int(DropReason.AUTH_REQUIRED)


@dataclass(frozen=True)
class Decision:
    """What the datapath does with a new connection, and which policy decided (0 = none)."""

    verdict: str  # FORWARDED | DROPPED | REDIRECTED
    policy_id: int = 0
    drop_reason: int = 0
    proxy_port: int = 0

    @property
    def allowed(self) -> bool:
        """Does the connection get through at L3/L4 (forwarded, or handed to the proxy)?"""
        return self.verdict != DROPPED


def _lookup_policy(
    lp: LoweredPolicy, identity: int, direction: int, protocol: int, port: int,
    authenticated: bool = True, needs_auth: list[int] | None = None,
) -> tuple[int, int, int] | None:
    for bits in range(24, -1, -1):
        if 0 < bits < 8:
            continue  # the protocol is matched whole or not at all
        key = PolicyKey.of(lp.endpoint, identity, direction, bits, (protocol << 16) | port)
        hit = lp.policy.get(key)
        if hit is not None:
            if hit.flags & PolicyFlags.AUTH and not authenticated:
                if needs_auth is not None:
                    needs_auth.append(hit.policy_id)
                return None  # the kernel takes the longest prefix only: no fallback
            return hit.verdict, hit.policy_id, hit.proxy_port
    return None


def _lookup_cidr(
    lp: LoweredPolicy, direction: int, ip: str, protocol: int, port: int
) -> list[tuple[int, int, int]]:
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        return []
    for length in range(32, -1, -1):
        key = CidrKey.of(lp.endpoint, direction, ipaddress.IPv4Network((addr, length), strict=False))
        entry = lp.cidr.get(key)
        if entry is not None:
            return [(r.verdict, r.policy_id, r.proxy_port) for r in entry.rules if r.matches(protocol, port)]
    return []


def evaluate(
    policy: EndpointPolicy | LoweredPolicy,
    direction: Direction | int,
    remote_identity: int,
    remote_ip: str,
    protocol: int | str,
    port: int,
    authenticated: bool = True,
) -> Decision:
    """The datapath's verdict for a new connection of this endpoint (see the module docstring).

    `policy` is an endpoint's compiled policy (lowered here with ifindex 1) or its lowered maps;
    `protocol` is a number or a name (``TCP``); `port` is the destination port (0 for protocols
    without ports).
    """
    lp = policy if isinstance(policy, LoweredPolicy) else lower_policy(policy, 1)
    proto = protocol if isinstance(protocol, int) else protocol_number(protocol)
    d = int(direction)
    hits: list[tuple[int, int, int]] = []
    needs_auth: list[int] = []
    if remote_identity != 0:
        exact = _lookup_policy(lp, remote_identity, d, proto, port, authenticated, needs_auth)
        if exact is not None:
            hits.append(exact)
    wildcard = _lookup_policy(lp, 0, d, proto, port, authenticated, needs_auth)
    if wildcard is not None:
        hits.append(wildcard)
    hits.extend(_lookup_cidr(lp, d, remote_ip, proto, port))
    # the first hit of the winning kind names the policy: exact identity, wildcard, then CIDR
    order = ((PolicyVerdict.DENY, DROPPED), (PolicyVerdict.REDIRECT, REDIRECTED),
             (PolicyVerdict.ALLOW, FORWARDED))
    for verdict, outcome in order:
        for v, pid, proxy in hits:
            if v == verdict:
                if outcome == DROPPED:
                    return Decision(DROPPED, pid, DROP_POLICY_DENY)
                return Decision(outcome, pid, 0, proxy if outcome == REDIRECTED else 0)
    if lp.enforced(Direction(d)):
        if needs_auth:
            return Decision(DROPPED, needs_auth[0], DROP_AUTH_REQUIRED)
        return Decision(DROPPED, 0, DROP_POLICY_DENIED)
    return Decision(FORWARDED)
