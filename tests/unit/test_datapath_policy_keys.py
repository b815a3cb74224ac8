"""Policy, CIDR and ipcache key encodings, checked against a model of the kernel's LPM trie
(longest prefix over the key's data bytes, most significant bit first)."""

from __future__ import annotations

import random

import pytest

from nodemesh.datapath.layout import (
    Direction,
    IpcacheKey,
    PolicyVerdict,
    Proto,
    policy_cidr_entry,
    policy_cidr_key,
    policy_key,
    policy_keys_for_range,
    port_range_blocks,
    port_rule,
)


def lpm_match(entry: object, lookup: object) -> bool:
    """Does `entry` (an LPM key with its prefixlen) cover `lookup` (a full-length key)?"""
    e, k = bytes(entry), bytes(lookup)  # type: ignore[call-overload]
    plen = int.from_bytes(e[:4], "little")
    ebits = int.from_bytes(e[4:], "big")
    kbits = int.from_bytes(k[4:], "big")
    width = (len(e) - 4) * 8
    shift = width - plen
    return ebits >> shift == kbits >> shift


def full(endpoint: int, identity: int, direction: Direction, proto: int, port: int) -> object:
    return policy_key(endpoint, identity, direction, proto, port)


@pytest.mark.parametrize(("lo", "hi"), [(0, 65535), (80, 80), (8080, 8083), (1, 1023),
                                        (1024, 65535), (65535, 65535), (0, 0), (3, 17)])
def test_port_range_blocks_cover_exactly(lo: int, hi: int) -> None:
    blocks = port_range_blocks(lo, hi)
    covered = []
    for port, bits in blocks:
        size = 1 << (16 - bits)
        assert port % size == 0  # aligned
        covered.extend(range(port, port + size))
    assert covered == list(range(lo, hi + 1))
    assert len(blocks) <= 30


def test_port_range_blocks_random() -> None:
    rng = random.Random(7)
    for _ in range(200):
        lo = rng.randrange(0, 65536)
        hi = rng.randrange(lo, 65536)
        total = sum(1 << (16 - bits) for _, bits in port_range_blocks(lo, hi))
        assert total == hi - lo + 1


def test_port_range_blocks_refuse_bad_ranges() -> None:
    for lo, hi in ((10, 9), (-1, 5), (0, 65536)):
        with pytest.raises(ValueError):
            port_range_blocks(lo, hi)


def test_policy_key_prefix_lengths() -> None:
    assert policy_key(3, 0, Direction.INGRESS).prefixlen == 72
    assert policy_key(3, 0, Direction.INGRESS, Proto.TCP).prefixlen == 80
    assert policy_key(3, 0, Direction.INGRESS, Proto.TCP, 80).prefixlen == 96
    k = policy_key(3, 0, Direction.INGRESS, Proto.TCP, 8083, port_bits=14)
    assert (k.prefixlen, k.dport) == (94, 8080)  # masked to the block
    with pytest.raises(ValueError):
        policy_key(3, 0, Direction.INGRESS, None, 80)


def test_policy_key_bytes() -> None:
    k = policy_key(0x11223344, 256, Direction.EGRESS, Proto.UDP, 53)
    assert bytes(k) == bytes.fromhex("60000000" "44332211" "00010000" "01" "11" "0035")


def test_lpm_semantics_of_policy_keys() -> None:
    ep, ident = 7, 1001
    any_proto = policy_key(ep, ident, Direction.INGRESS)
    tcp_any = policy_key(ep, ident, Direction.INGRESS, Proto.TCP)
    block = policy_keys_for_range(ep, ident, Direction.INGRESS, Proto.TCP, 8080, 8083)
    assert len(block) == 1

    def hit(entry: object, proto: int, port: int, identity: int = ident, endpoint: int = ep,
            direction: Direction = Direction.INGRESS) -> bool:
        return lpm_match(entry, full(endpoint, identity, direction, proto, port))

    assert all(hit(block[0], 6, p) for p in range(8080, 8084))
    assert not hit(block[0], 6, 8084) and not hit(block[0], 6, 8079)
    assert not hit(block[0], 17, 8080)
    assert hit(tcp_any, 6, 1) and hit(tcp_any, 6, 65535) and not hit(tcp_any, 17, 80)
    assert hit(any_proto, 17, 53) and hit(any_proto, 1, 8)
    # endpoint, identity and direction always match in full
    for e in (any_proto, tcp_any, block[0]):
        assert not hit(e, 6, 8080, identity=ident + 1)
        assert not hit(e, 6, 8080, endpoint=ep + 1)
        assert not hit(e, 6, 8080, direction=Direction.EGRESS)


def test_cidr_keys() -> None:
    k = policy_cidr_key(7, Direction.EGRESS, "10.1.0.0/16")
    assert k.prefixlen == 64 + 16
    assert bytes(k)[4:] == bytes.fromhex("07000000" "01000000" "0a010000")

    def lookup(addr: str, ep: int = 7, d: Direction = Direction.EGRESS) -> object:
        return policy_cidr_key(ep, d, f"{addr}/32")

    assert lpm_match(k, lookup("10.1.2.3"))
    assert not lpm_match(k, lookup("10.2.0.1"))
    assert not lpm_match(k, lookup("10.1.2.3", ep=8))
    assert not lpm_match(k, lookup("10.1.2.3", d=Direction.INGRESS))
    assert policy_cidr_key(7, Direction.EGRESS, "10.1.2.3/8").addr == 0x0A000000  # host bits go


def test_cidr_entries_hold_at_most_16_rules() -> None:
    e = policy_cidr_entry([port_rule(PolicyVerdict.ALLOW, Proto.TCP, 80, 80, policy_id=4)])
    assert e.count == 1 and (e.rules[0].port_lo, e.rules[0].port_hi, e.rules[0].policy_id) == (
        80, 80, 4)
    with pytest.raises(ValueError, match="at most 16"):
        policy_cidr_entry([port_rule(PolicyVerdict.ALLOW)] * 17)


def test_ipcache_key() -> None:
    k = IpcacheKey.of("10.77.0.0/24")
    assert bytes(k) == bytes.fromhex("18000000" "0a4d0000")
    assert lpm_match(k, IpcacheKey.of("10.77.0.9/32"))
    assert lpm_match(IpcacheKey.of("0.0.0.0/0"), IpcacheKey.of("192.0.2.1/32"))
