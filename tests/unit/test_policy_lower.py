"""Lowering to nm_policy / nm_policy_cidr entries: exact entries for small inputs, and a
randomized comparison of evaluate-over-entries against a direct reading of the rules."""

from __future__ import annotations

import ipaddress
import random

import pytest

from nodemesh.policy import (
    CidrKey,
    CidrRule,
    CidrValue,
    Direction,
    EndpointPolicy,
    IdentityRule,
    PolicyCompileError,
    PolicyKey,
    PolicyValue,
    PolicyVerdict,
    PortRule,
    evaluate,
    lower,
    lower_policy,
)
from nodemesh.policy.lower import simplify_rules

IN, EG = Direction.INGRESS, Direction.EGRESS
A, D, R = PolicyVerdict.ALLOW, PolicyVerdict.DENY, PolicyVerdict.REDIRECT
TCP, UDP = 6, 17


def ep(*rules: IdentityRule | CidrRule, ingress: bool = True, egress: bool = False) -> EndpointPolicy:
    return EndpointPolicy(
        "x/a", 256, ingress, egress,
        identity_rules=tuple(r for r in rules if isinstance(r, IdentityRule)),
        cidr_rules=tuple(r for r in rules if isinstance(r, CidrRule)),
    )


def idr(identity: int, proto: int, lo: int, hi: int, verdict: PolicyVerdict = A, pid: int = 1,
        direction: Direction = IN) -> IdentityRule:
    return IdentityRule(direction, identity, proto, lo, hi, verdict, pid)


def cr(cidr: str, proto: int = 0, lo: int = 0, hi: int = 65535, verdict: PolicyVerdict = A, pid: int = 1,
       excepts: tuple[str, ...] = (), direction: Direction = EG) -> CidrRule:
    return CidrRule(direction, cidr, excepts, proto, lo, hi, verdict, pid)


def pk(plen: int, identity: int, proto: int, dport: int, direction: int = 0) -> PolicyKey:
    return PolicyKey(plen, 9, identity, direction, proto, dport)


def test_prefix_lengths() -> None:
    policy, cidr = lower(ep(
        idr(256, 0, 0, 65535),
        idr(257, TCP, 0, 65535),
        idr(258, TCP, 80, 80),
        idr(0, UDP, 111, 115),
    ), 9)
    assert cidr == {}
    assert policy == {
        pk(72, 256, 0, 0): PolicyValue(1, 0, 1),
        pk(80, 257, TCP, 0): PolicyValue(1, 0, 1),
        pk(96, 258, TCP, 80): PolicyValue(1, 0, 1),
        pk(96, 0, UDP, 111): PolicyValue(1, 0, 1),
        pk(94, 0, UDP, 112): PolicyValue(1, 0, 1),
    }


def test_deny_block_removes_covered_allows() -> None:
    policy, _ = lower(ep(
        idr(256, TCP, 80, 80, A, 1),
        idr(256, TCP, 81, 81, A, 1),
        idr(256, TCP, 0, 65535, D, 2),
        idr(256, UDP, 80, 80, A, 1),
    ), 9)
    assert policy == {
        pk(80, 256, TCP, 0): PolicyValue(2, 0, 2),
        pk(96, 256, UDP, 80): PolicyValue(1, 0, 1),
    }


def test_narrow_deny_inside_allow_stays() -> None:
    policy, _ = lower(ep(idr(0, 0, 0, 65535, A, 1), idr(0, TCP, 80, 81, D, 2)), 9)
    assert policy == {pk(72, 0, 0, 0): PolicyValue(1, 0, 1), pk(95, 0, TCP, 80): PolicyValue(2, 0, 2)}


def test_redundant_children_pruned_and_spaces_separate() -> None:
    policy, _ = lower(ep(
        idr(256, TCP, 0, 65535, A, 1), idr(256, TCP, 80, 80, A, 1),  # same answer: child dropped
        idr(0, TCP, 0, 65535, D, 3),  # another space: does not prune anything in 256's
        idr(256, TCP, 80, 80, A, 1, EG),  # another direction
    ), 9)
    assert policy == {
        pk(80, 256, TCP, 0): PolicyValue(1, 0, 1),
        pk(80, 0, TCP, 0): PolicyValue(2, 0, 3),
        pk(96, 256, TCP, 80, 1): PolicyValue(1, 0, 1),
    }


def test_redirect_beats_allow_and_gets_proxy_port() -> None:
    policy, _ = lower(ep(idr(256, 0, 0, 65535, A, 1), idr(256, TCP, 80, 80, R, 2)), 9, proxy_port=15001)
    assert policy == {pk(72, 256, 0, 0): PolicyValue(1, 0, 1), pk(96, 256, TCP, 80): PolicyValue(3, 15001, 2)}
    # an allow inside a redirect adds nothing: the redirect answers for it
    policy, _ = lower(ep(idr(256, TCP, 0, 65535, R, 2), idr(256, TCP, 80, 80, A, 1)), 9)
    assert policy == {pk(80, 256, TCP, 0): PolicyValue(3, 0, 2)}


def test_policy_id_of_most_specific_allow() -> None:
    policy, _ = lower(ep(idr(256, TCP, 0, 65535, A, 5), idr(256, TCP, 80, 80, A, 7)), 9)
    assert policy[pk(96, 256, TCP, 80)] == PolicyValue(1, 0, 7)


def test_protocol_any_needs_whole_range() -> None:
    with pytest.raises(PolicyCompileError):
        lower(ep(idr(256, 0, 80, 80)), 9)


def ck(plen: int, addr: str, direction: int = 1) -> CidrKey:
    return CidrKey(plen, 9, direction, addr)


def prule(
    proto: int = 0, verdict: int = 1, lo: int = 0, hi: int = 65535, pid: int = 1, proxy: int = 0
) -> PortRule:
    return PortRule(proto, verdict, proxy, lo, hi, pid)


def test_cidr_except_becomes_empty_entry() -> None:
    _, cidr = lower(ep(cr("10.0.0.0/8", excepts=("10.1.2.3/32",))), 9)
    assert cidr == {ck(72, "10.0.0.0"): CidrValue((prule(),)), ck(96, "10.1.2.3"): CidrValue(())}


def test_cidr_folding_nested_and_except_of_one_rule_only() -> None:
    _, cidr = lower(ep(
        cr("10.0.0.0/8", TCP, 80, 80, A, 1, excepts=("10.1.0.0/16",)),
        cr("10.1.0.0/16", UDP, 53, 53, A, 2),
        cr("10.1.2.0/24", TCP, 443, 443, A, 3),
    ), 9)
    assert cidr == {
        ck(72, "10.0.0.0"): CidrValue((prule(TCP, 1, 80, 80, 1),)),
        # the /16 is excepted from the /8 rule: only its own rule
        ck(80, "10.1.0.0"): CidrValue((prule(UDP, 1, 53, 53, 2),)),
        # the /24 carries the enclosing /16's rule too
        ck(88, "10.1.2.0"): CidrValue((prule(TCP, 1, 443, 443, 3), prule(UDP, 1, 53, 53, 2))),
    }


def test_cidr_redundant_child_pruned() -> None:
    _, cidr = lower(ep(cr("10.0.0.0/8", pid=1), cr("10.1.0.0/16", TCP, 80, 80, pid=2)), 9)
    # the /16's TCP/80 allow is covered by the /8's allow-all: same rules, no entry
    assert cidr == {ck(72, "10.0.0.0"): CidrValue((prule(),))}


def test_cidr_directions_separate_and_ingress_direction_value() -> None:
    _, cidr = lower(ep(cr("10.0.0.0/8", direction=IN), cr("10.0.0.0/8", direction=EG)), 9)
    assert set(cidr) == {ck(72, "10.0.0.0", 0), ck(72, "10.0.0.0", 1)}


def test_cidr_too_many_rules_fails_loudly() -> None:
    rules = [cr("10.0.0.0/8", TCP, p, p, A, p) for p in range(1000, 1017)]
    with pytest.raises(PolicyCompileError, match="at most 16"):
        lower(ep(*rules), 9)
    lower(ep(*rules[:16]), 9)  # 16 fit


def test_simplify_rules() -> None:
    rules = [
        prule(TCP, 1, 80, 80, 5), prule(TCP, 1, 80, 80, 3),  # duplicate: lowest id kept
        prule(TCP, 1, 79, 81, 4),  # covers the 80s
        prule(TCP, 2, 0, 65535, 9),  # a TCP deny covers every TCP allow
        prule(UDP, 1, 53, 53, 1),
        prule(UDP, 3, 0, 1000, 2),  # redirect covers the UDP allow
        prule(0, 1, 0, 65535, 8),  # any-protocol allow: not covered by a TCP deny
    ]
    assert simplify_rules(rules) == (
        prule(TCP, 2, 0, 65535, 9), prule(UDP, 3, 0, 1000, 2), prule(0, 1, 0, 65535, 8),
    )


def test_flags() -> None:
    assert lower_policy(ep(ingress=True, egress=False), 1).flags == 1
    assert lower_policy(ep(ingress=False, egress=True), 1).flags == 2
    assert lower_policy(ep(ingress=True, egress=True), 1).flags == 3
    assert lower_policy(ep(ingress=False, egress=False), 1).flags == 0


# --- randomized: entries behave exactly like the rules ----------------------------------------

IDENTITIES = (0, 256, 257, 258)
CIDRS = ("0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.128/25", "10.1.2.3/32",
         "192.168.0.0/16", "10.2.0.0/16")
PROXY = 15001


def _rand_range(rng: random.Random) -> tuple[int, int, int]:
    proto = rng.choice([0, TCP, TCP, UDP])
    if proto == 0 or rng.random() < 0.15:
        return proto, 0, 65535
    lo = rng.randrange(0, 300)
    return proto, lo, min(65535, lo + rng.choice([0, 0, 1, 3, 7, 20, 200]))


def _random_policy(rng: random.Random) -> EndpointPolicy:
    rules: list[IdentityRule | CidrRule] = []
    for _ in range(rng.randrange(0, 12)):
        proto, lo, hi = _rand_range(rng)
        rules.append(IdentityRule(rng.choice([IN, EG]), rng.choice(IDENTITIES), proto, lo, hi,
                                  rng.choice([A, A, D, R]), rng.randrange(1, 6)))
    for _ in range(rng.randrange(0, 7)):
        proto, lo, hi = _rand_range(rng)
        cidr = rng.choice(CIDRS)
        excepts = tuple(sorted({c for c in rng.sample(CIDRS, rng.randrange(0, 3)) if c != cidr}))
        rules.append(CidrRule(rng.choice([IN, EG]), cidr, excepts, proto, lo, hi,
                              rng.choice([A, A, D, R]), rng.randrange(1, 6)))
    return ep(*rules, ingress=rng.random() < 0.5, egress=rng.random() < 0.5)


def _reference(p: EndpointPolicy, d: Direction, ident: int, ip: str, proto: int, port: int) -> list:
    hits = []
    for r in p.identity_rules:
        if r.direction == d and r.identity in (0, ident) and r.protocol in (0, proto) \
                and r.port_lo <= port <= r.port_hi:
            hits.append((r.verdict, r.policy_id))
    addr = ipaddress.IPv4Address(ip)
    for r in p.cidr_rules:
        if r.direction == d and addr in ipaddress.IPv4Network(r.cidr) \
                and not any(addr in ipaddress.IPv4Network(e) for e in r.excepts) \
                and r.protocol in (0, proto) and r.port_lo <= port <= r.port_hi:
            hits.append((r.verdict, r.policy_id))
    return hits


def test_random_policies_lower_faithfully() -> None:
    rng = random.Random(20250101)
    ips = ("10.1.2.3", "10.1.2.200", "10.1.2.5", "10.1.9.9", "10.2.0.1", "10.9.9.9", "192.168.1.1", "8.8.8.8")
    checked = 0
    for _ in range(300):
        p = _random_policy(rng)
        lp = lower_policy(p, 3, proxy_port=PROXY)
        interesting = {0, 1, 65535} | {x for r in p.identity_rules + p.cidr_rules
                                         for x in (r.port_lo - 1, r.port_lo, r.port_hi, r.port_hi + 1)}
        ports = sorted(x for x in interesting if 0 <= x <= 65535)
        for _ in range(40):
            d = rng.choice([IN, EG])
            ident = rng.choice((*IDENTITIES, 259))
            ip = rng.choice(ips)
            proto = rng.choice([TCP, UDP, 1])
            port = rng.choice(ports)
            got = evaluate(lp, d, ident, ip, proto, port)
            hits = _reference(p, d, ident, ip, proto, port)
            verdicts = {v for v, _ in hits}
            if D in verdicts:
                want = ("DROPPED", 181, 0)
            elif R in verdicts:
                want = ("REDIRECTED", 0, PROXY)
            elif A in verdicts:
                want = ("FORWARDED", 0, 0)
            elif p.enforced(d):
                want = ("DROPPED", 133, 0)
            else:
                want = ("FORWARDED", 0, 0)
            assert (got.verdict, got.drop_reason, got.proxy_port) == want, (p, d, ident, ip, proto, port)
            if hits and got.policy_id:
                winning = {D: D, R: R, A: A}[max(verdicts, key=lambda v: {A: 1, R: 2, D: 3}[v])]
                assert (winning, got.policy_id) in hits  # the named policy really matched
            checked += 1
    assert checked == 300 * 40
