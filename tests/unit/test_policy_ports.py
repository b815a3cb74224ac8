"""Port blocks, protocols, CIDRs and named-port resolution."""

from __future__ import annotations

import itertools
import random

import pytest

from nodemesh.datapath.layout import port_blocks
from nodemesh.policy.ports import (
    NamedPort,
    PortRange,
    canonical_cidr,
    cidr_contains,
    ip_in_cidr,
    parse_port_number,
    protocol_number,
    resolve_named,
)


def _expand(blocks: list[tuple[int, int]]) -> list[int]:
    return [p for start, k in blocks for p in range(start, start + (1 << k))]


@pytest.mark.parametrize(
    ("lo", "hi", "want"),
    [
        (80, 80, [(80, 0)]),
        (0, 65535, [(0, 16)]),
        (111, 115, [(111, 0), (112, 2)]),
        (80, 81, [(80, 1)]),
        (81, 82, [(81, 0), (82, 0)]),
        (1024, 65535, [(1024, 10), (2048, 11), (4096, 12), (8192, 13), (16384, 14), (32768, 15)]),
        (0, 0, [(0, 0)]),
        (65535, 65535, [(65535, 0)]),
        (1, 65534, None),
    ],
)
def test_port_blocks(lo: int, hi: int, want: list[tuple[int, int]] | None) -> None:
    blocks = port_blocks(lo, hi)
    if want is not None:
        assert blocks == want
    assert _expand(blocks) == list(range(lo, hi + 1))
    for start, k in blocks:
        assert start % (1 << k) == 0


def test_port_blocks_random_are_exact_and_minimal() -> None:
    rng = random.Random(7)
    for _ in range(300):
        lo = rng.randrange(0, 65536)
        hi = rng.randrange(lo, min(65536, lo + rng.choice([1, 10, 1000, 70000])))
        blocks = port_blocks(lo, hi)
        assert _expand(blocks) == list(range(lo, hi + 1))
        assert len(blocks) <= 32  # a range never needs more than 2 * 16 aligned blocks
        # minimal: no two neighbouring blocks could merge into one aligned block
        for (s1, k1), (s2, k2) in itertools.pairwise(blocks):
            assert not (k1 == k2 and s1 % (1 << (k1 + 1)) == 0 and s2 == s1 + (1 << k1))


def test_port_blocks_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError):
        port_blocks(10, 9)
    with pytest.raises(ValueError):
        port_blocks(0, 65536)


def test_protocols_and_numbers() -> None:
    assert protocol_number("tcp") == 6
    assert protocol_number("UDP") == 17
    assert protocol_number("SCTP") == 132
    assert protocol_number(None) == 6
    with pytest.raises(KeyError):
        protocol_number("ICMP")
    assert parse_port_number(80) == 80
    assert parse_port_number("443") == 443
    assert parse_port_number("http") is None
    assert parse_port_number(True) is None


def test_cidrs() -> None:
    assert canonical_cidr("10.1.2.3/8") == "10.0.0.0/8"
    assert canonical_cidr("10.1.2.3") == "10.1.2.3/32"
    assert canonical_cidr("::/0") is None
    with pytest.raises(ValueError):
        canonical_cidr("10.0.0.0/33")
    assert cidr_contains("10.0.0.0/8", "10.1.0.0/16")
    assert cidr_contains("10.0.0.0/8", "10.0.0.0/8")
    assert not cidr_contains("10.1.0.0/16", "10.0.0.0/8")
    assert not cidr_contains("10.0.0.0/8", "11.0.0.0/16")
    assert ip_in_cidr("10.244.1.5", "0.0.0.0/0")


def test_resolve_named() -> None:
    ports = {"http": (("TCP", 8080),), "dns": (("UDP", 53), ("TCP", 53))}
    assert resolve_named(NamedPort("http", (6,)), ports) == [PortRange(6, 8080, 8080)]
    assert resolve_named(NamedPort("http", (17,)), ports) == []
    assert resolve_named(NamedPort("dns", (6, 17)), ports) == [PortRange(6, 53, 53), PortRange(17, 53, 53)]
    assert resolve_named(NamedPort("nope", (6,)), ports) == []
    assert resolve_named(NamedPort("x", (6,)), {"x": (("QUIC", 1),)}) == []


def test_port_range_covers() -> None:
    assert PortRange(0).covers(17, 5)
    assert PortRange(6, 80, 81).covers(6, 81)
    assert not PortRange(6, 80, 81).covers(17, 80)
    assert PortRange(6).whole and not PortRange(6, 1, 2).whole
