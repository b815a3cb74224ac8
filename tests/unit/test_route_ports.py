"""Stable listener-port allocation for redirected destinations."""

from __future__ import annotations

import pytest

from nodemesh.route import PortsExhausted, RedirectKey, allocate_listener_ports

A, B, C, D = (RedirectKey(f"10.96.0.{i}", 80) for i in range(1, 5))


def test_first_allocation_is_sorted_from_15001() -> None:
    assert allocate_listener_ports([C, A, B]) == {A: 15001, B: 15002, C: 15003}


def test_keys_keep_their_ports() -> None:
    prev = {A: 15001, B: 15002, C: 15003}
    assert allocate_listener_ports([C, A], prev) == {A: 15001, C: 15003}
    assert allocate_listener_ports([A, B, C, D], prev) == {A: 15001, B: 15002, C: 15003, D: 15004}


def test_a_freed_port_is_not_reused_in_the_same_round() -> None:
    prev = {A: 15001, B: 15002}
    now = allocate_listener_ports([B, C], prev)
    assert now == {B: 15002, C: 15003}  # 15001 was A's until just now
    assert allocate_listener_ports([B, C, D], now) == {B: 15002, C: 15003, D: 15001}


def test_same_input_same_output() -> None:
    prev = {B: 15007}
    assert allocate_listener_ports([D, A, B, C], prev) == allocate_listener_ports([C, B, A, D], prev)


def test_inconsistent_previous_never_shares_a_port() -> None:
    got = allocate_listener_ports([A, B], {A: 15001, B: 15001})
    assert got[A] == 15001 and got[B] != 15001 and len(set(got.values())) == 2


def test_protocol_is_part_of_the_key() -> None:
    tcp, udp = RedirectKey("10.0.0.1", 53, "TCP"), RedirectKey("10.0.0.1", 53, "UDP")
    assert len(set(allocate_listener_ports([tcp, udp]).values())) == 2


def test_exhausted() -> None:
    with pytest.raises(PortsExhausted):
        allocate_listener_ports([A, B, C], first=15001, last=15002)
