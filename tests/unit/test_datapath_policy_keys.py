"""Policy, CIDR and ipcache keys as the kernel sees them: the bytes of the structs the production
path writes (`lower_policy` → `policy_map_pairs`), checked against a model of the kernel's LPM
trie (longest prefix over the key's data bytes, most significant bit first)."""

from __future__ import annotations

import random

import pytest

from nodemesh.datapath.layout import (
    POLICY_KEY_BITS,
    CidrKey,
    CidrValue,
    Direction,
    IpcacheKey,
    PolicyKey,
    PolicyKeyStruct,
    PolicyVerdict,
    PortRule,
    Proto,
    policy_map_pairs,
)
from nodemesh.policy import CidrRule, EndpointPolicy, IdentityRule, lower_policy
from nodemesh.policy.evaluate import _lookup_cidr, _lookup_policy

IN, OUT = Direction.INGRESS, Direction.EGRESS
ALLOW, DENY, REDIRECT = PolicyVerdict.ALLOW, PolicyVerdict.DENY, PolicyVerdict.REDIRECT


def lpm_match(entry: object, lookup: object) -> bool:
    """Does `entry` (an LPM key with its prefixlen) cover `lookup` (a full-length key)?"""
    e, k = bytes(entry), bytes(lookup)  # type: ignore[call-overload]
    plen = int.from_bytes(e[:4], "little")
    ebits = int.from_bytes(e[4:], "big")
    kbits = int.from_bytes(k[4:], "big")
    width = (len(e) - 4) * 8
    shift = width - plen
    return ebits >> shift == kbits >> shift


def longest(pairs: list, lookup: object) -> object | None:
    """The value of the longest entry among (key, value) struct pairs that covers `lookup`."""
    best = None
    for key, value in pairs:
        if lpm_match(key, lookup) and (best is None or key.prefixlen > best[0].prefixlen):
            best = (key, value)
    return None if best is None else best[1]


def full(endpoint: int, identity: int, direction: int, proto: int, port: int) -> PolicyKeyStruct:
    """The key the datapath looks up for one connection."""
    return PolicyKeyStruct(POLICY_KEY_BITS, endpoint, identity, direction, proto, port)


def test_policy_key_prefix_lengths() -> None:
    assert PolicyKey.of(3, 0, IN, 0, 0).prefixlen == 72
    assert PolicyKey.of(3, 0, IN, 8, Proto.TCP << 16).prefixlen == 80
    assert PolicyKey.of(3, 0, IN, 24, Proto.TCP << 16 | 80).prefixlen == 96
    k = PolicyKey.of(3, 0, IN, 22, Proto.TCP << 16 | 8083)
    assert (k.prefixlen, k.protocol, k.dport) == (94, Proto.TCP, 8080)  # masked to the block
    assert PolicyKey.of(3, 0, IN, 0, Proto.TCP << 16 | 80) == PolicyKey(72, 3, 0, IN, 0, 0)
    for bits in (-1, 1, 7, 25):
        with pytest.raises(ValueError):
            PolicyKey.of(3, 0, IN, bits, 0)


def test_policy_key_bytes() -> None:
    k = PolicyKey.of(0x11223344, 256, OUT, 24, Proto.UDP << 16 | 53).struct()
    assert bytes(k) == bytes.fromhex("60000000" "44332211" "00010000" "01" "11" "0035")


def test_lpm_semantics_of_lowered_policy_keys() -> None:
    ep, ident = 7, 1001
    rules = (IdentityRule(IN, ident, Proto.ANY, 0, 65535, ALLOW, 1),
             IdentityRule(IN, ident, Proto.TCP, 0, 65535, REDIRECT, 2),
             IdentityRule(IN, ident, Proto.TCP, 8080, 8083, DENY, 3))
    pairs, _ = policy_map_pairs([lower_policy(EndpointPolicy("ns/a", 300, True, False, rules), ep)])
    assert sorted(k.prefixlen for k, _ in pairs) == [72, 80, 94]  # one block for 8080..8083

    def decide(proto: int, port: int, identity: int = ident, endpoint: int = ep,
               direction: Direction = IN) -> int | None:
        v = longest(pairs, full(endpoint, identity, direction, proto, port))
        return None if v is None else v.policy_id  # type: ignore[attr-defined]

    assert [decide(6, p) for p in range(8079, 8085)] == [2, 3, 3, 3, 3, 2]
    assert decide(17, 8080) == 1 and decide(1, 8) == 1 and decide(6, 65535) == 2
    # endpoint, identity and direction always match in full
    assert decide(6, 8080, identity=ident + 1) is None
    assert decide(6, 8080, endpoint=ep + 1) is None
    assert decide(6, 8080, direction=OUT) is None


def test_kernel_lookups_of_the_written_entries_agree_with_evaluate() -> None:
    """Random rules through the production path: the LPM lookups the kernel does over the
    written structs find what the pure evaluator finds over the compiler's values."""
    rng = random.Random(11)
    for _ in range(40):
        rules, cidrs = [], []
        for pid in range(1, rng.randrange(2, 8)):
            proto = rng.choice((Proto.ANY, Proto.TCP, Proto.UDP))
            lo = 0 if proto == Proto.ANY else rng.randrange(0, 200)
            hi = 65535 if proto == Proto.ANY else rng.randrange(lo, 220)
            verdict = rng.choice((ALLOW, DENY, REDIRECT))
            rules.append(IdentityRule(IN, rng.choice((0, 300, 301)), proto, lo, hi, verdict, pid,
                                      proxy_port=15001 if verdict == REDIRECT else 0))
            cidr = rng.choice(("10.0.0.0/8", "10.0.0.0/16", "10.1.0.0/16"))
            excepts = ("10.0.0.0/24",) if cidr != "10.1.0.0/16" and rng.random() < 0.5 else ()
            cidrs.append(CidrRule(IN, cidr, excepts,
                                  proto, lo, hi, verdict, 100 + pid))
        lp = lower_policy(EndpointPolicy("ns/a", 300, True, False, tuple(rules), tuple(cidrs)), 9)
        pairs, cidr_pairs = policy_map_pairs([lp])
        for _ in range(60):
            identity = rng.choice((0, 300, 301, 302))
            proto = rng.choice((Proto.TCP, Proto.UDP, Proto.ICMP))
            port = rng.randrange(0, 230)
            got = longest(pairs, full(9, identity, IN, proto, port))
            want = _lookup_policy(lp, identity, IN, proto, port)
            assert (None if got is None else (got.verdict, got.policy_id, got.proxy_port)) == want
            ip = rng.choice(("10.0.0.5", "10.1.2.3", "10.0.9.9", "192.0.2.1"))
            entry = longest(cidr_pairs, CidrKey.of(9, IN, f"{ip}/32").struct())
            got_rules = [] if entry is None else [
                (r.verdict, r.policy_id, r.proxy_port) for r in entry.rules[:entry.count]
                if r.protocol in (0, proto) and r.port_lo <= port <= r.port_hi]
            assert got_rules == _lookup_cidr(lp, IN, ip, proto, port)


def test_cidr_keys() -> None:
    k = CidrKey.of(7, OUT, "10.1.0.0/16").struct()
    assert k.prefixlen == 64 + 16
    assert bytes(k)[4:] == bytes.fromhex("07000000" "01000000" "0a010000")

    def lookup(addr: str, ep: int = 7, d: Direction = OUT) -> object:
        return CidrKey.of(ep, d, f"{addr}/32").struct()

    assert lpm_match(k, lookup("10.1.2.3"))
    assert not lpm_match(k, lookup("10.2.0.1"))
    assert not lpm_match(k, lookup("10.1.2.3", ep=8))
    assert not lpm_match(k, lookup("10.1.2.3", d=IN))
    assert CidrKey.of(7, OUT, "10.1.2.3/8").addr == "10.0.0.0"  # host bits go
    assert CidrKey.of(7, OUT, "10.1.2.3/8").struct().addr == 0x0A000000


def test_cidr_entries_hold_at_most_16_rules() -> None:
    e = CidrValue((PortRule(Proto.TCP, ALLOW, 0, 80, 80, 4),)).struct()
    assert e.count == 1 and (e.rules[0].port_lo, e.rules[0].port_hi, e.rules[0].policy_id) == (
        80, 80, 4)
    with pytest.raises(ValueError, match="at most 16"):
        CidrValue((PortRule(Proto.ANY, ALLOW, 0, 0, 65535, 1),) * 17).struct()


def test_ipcache_key() -> None:
    k = IpcacheKey.of("10.77.0.0/24")
    assert bytes(k) == bytes.fromhex("18000000" "0a4d0000")
    assert lpm_match(k, IpcacheKey.of("10.77.0.9/32"))
    assert lpm_match(IpcacheKey.of("0.0.0.0/0"), IpcacheKey.of("192.0.2.1/32"))
