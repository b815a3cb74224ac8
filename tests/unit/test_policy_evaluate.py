"""evaluate(): the datapath's decision over lowered entries (exact, wildcard, CIDR; deny wins)."""

from __future__ import annotations

from nodemesh.policy import (
    DROP_POLICY_DENIED,
    DROP_POLICY_DENY,
    DROPPED,
    FORWARDED,
    REDIRECTED,
    CidrRule,
    Decision,
    Direction,
    EndpointPolicy,
    IdentityRule,
    PolicyVerdict,
    evaluate,
    lower_policy,
)

IN, EG = Direction.INGRESS, Direction.EGRESS
A, D, R = PolicyVerdict.ALLOW, PolicyVerdict.DENY, PolicyVerdict.REDIRECT


def ep(
    identity_rules: tuple[IdentityRule, ...] | list[IdentityRule] = (),
    cidr_rules: tuple[CidrRule, ...] | list[CidrRule] = (),
    ingress: bool = True,
    egress: bool = True,
) -> EndpointPolicy:
    return EndpointPolicy("x/a", 256, ingress, egress, tuple(identity_rules), tuple(cidr_rules))


def test_nothing_enforced_forwards() -> None:
    p = ep(ingress=False, egress=False)
    assert evaluate(p, IN, 300, "10.0.0.1", "TCP", 80) == Decision(FORWARDED)


def test_enforced_without_rules_drops_with_policy_denied() -> None:
    d = evaluate(ep(), IN, 300, "10.0.0.1", 6, 80)
    assert d == Decision(DROPPED, 0, DROP_POLICY_DENIED)
    assert not d.allowed


def test_exact_identity_and_wildcard() -> None:
    p = ep([IdentityRule(IN, 300, 6, 80, 80, A, 11), IdentityRule(IN, 0, 17, 53, 53, A, 12)])
    assert evaluate(p, IN, 300, "1.1.1.1", 6, 80) == Decision(FORWARDED, 11)
    assert evaluate(p, IN, 301, "1.1.1.1", 6, 80).verdict == DROPPED
    assert evaluate(p, IN, 301, "1.1.1.1", 17, 53) == Decision(FORWARDED, 12)
    assert evaluate(p, EG, 300, "1.1.1.1", 6, 80).verdict == DROPPED  # direction matters


def test_deny_wins_across_lookups() -> None:
    p = ep(
        [IdentityRule(IN, 300, 0, 0, 65535, A, 1), IdentityRule(IN, 0, 6, 80, 80, D, 2)],
        [CidrRule(IN, "10.0.0.0/8", (), 0, 0, 65535, A, 3)],
    )
    assert evaluate(p, IN, 300, "10.0.0.1", 6, 80) == Decision(DROPPED, 2, DROP_POLICY_DENY)
    assert evaluate(p, IN, 300, "10.0.0.1", 6, 81) == Decision(FORWARDED, 1)
    p2 = ep([IdentityRule(IN, 300, 0, 0, 65535, A, 1)], [CidrRule(IN, "10.0.0.0/8", (), 6, 80, 80, D, 4)])
    assert evaluate(p2, IN, 300, "10.0.0.1", 6, 80) == Decision(DROPPED, 4, DROP_POLICY_DENY)
    assert evaluate(p2, IN, 300, "11.0.0.1", 6, 80) == Decision(FORWARDED, 1)


def test_deny_applies_even_when_not_enforced() -> None:
    p = ep([IdentityRule(IN, 300, 0, 0, 65535, D, 5)], ingress=False)
    assert evaluate(p, IN, 300, "1.1.1.1", 6, 80).drop_reason == DROP_POLICY_DENY
    assert evaluate(p, IN, 301, "1.1.1.1", 6, 80) == Decision(FORWARDED)


def test_redirect_beats_allow() -> None:
    p = ep([IdentityRule(IN, 300, 0, 0, 65535, A, 1), IdentityRule(IN, 0, 6, 80, 80, R, 2)])
    lp = lower_policy(p, 4, proxy_port=15001)
    assert evaluate(lp, IN, 300, "1.1.1.1", 6, 80) == Decision(REDIRECTED, 2, 0, 15001)
    assert evaluate(lp, IN, 300, "1.1.1.1", 6, 81) == Decision(FORWARDED, 1)
    assert evaluate(lp, IN, 300, "1.1.1.1", 6, 80).allowed


def test_identity_zero_only_uses_wildcard_space() -> None:
    p = ep([IdentityRule(IN, 0, 6, 80, 80, A, 1)])
    assert evaluate(p, IN, 0, "1.1.1.1", 6, 80) == Decision(FORWARDED, 1)


def test_cidr_longest_prefix_and_excepts() -> None:
    p = ep(cidr_rules=[
        CidrRule(EG, "10.0.0.0/8", ("10.1.0.0/16",), 6, 80, 80, A, 1),
        CidrRule(EG, "10.1.2.0/24", (), 17, 53, 53, A, 2),
    ])
    assert evaluate(p, EG, 0, "10.9.9.9", 6, 80) == Decision(FORWARDED, 1)
    assert evaluate(p, EG, 0, "10.1.9.9", 6, 80).verdict == DROPPED  # in the except
    assert evaluate(p, EG, 0, "10.1.2.9", 17, 53) == Decision(FORWARDED, 2)
    assert evaluate(p, EG, 0, "10.1.2.9", 6, 80).verdict == DROPPED
    assert evaluate(p, EG, 0, "not-an-ip", 6, 80).verdict == DROPPED


def test_protocol_names_and_portless_protocols() -> None:
    p = ep([IdentityRule(IN, 0, 0, 0, 65535, A, 1)])
    assert evaluate(p, IN, 300, "1.1.1.1", "udp", 9).allowed
    assert evaluate(p, IN, 300, "1.1.1.1", 1, 0).allowed  # ICMP: port 0, any-protocol rule
