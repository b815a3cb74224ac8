"""nodemesh.datapath.lb: the Maglev table and the services -> LB map entries compiler."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest

from nodemesh.datapath.layout import (
    Lb4Backend,
    Lb4Key,
    Lb4ReverseNat,
    Lb4Service,
    ServiceFlags,
    ip4,
)
from nodemesh.datapath.lb import LbService, compile_lb, is_prime, maglev_table

M = 16381


def names(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:8080" for i in range(n)]


# --- Maglev -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 100])
def test_maglev_table_is_full_and_even(n: int) -> None:
    table = maglev_table(names(n), M)
    assert len(table) == M
    counts = Counter(table)
    assert set(counts) == set(range(n))
    # the backends take turns, so the shares differ by at most one entry
    assert max(counts.values()) - min(counts.values()) <= 1


def test_maglev_removing_one_of_four_moves_few_entries() -> None:
    four = names(4)
    before = [four[i] for i in maglev_table(four, M)]
    three = four[:2] + four[3:]
    after = [three[i] for i in maglev_table(three, M)]
    changed = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    needless = sum(1 for a, b in zip(before, after, strict=True) if a != four[2] and a != b)
    assert changed / M < 0.30  # the removed backend's quarter, and little else
    assert needless / M < 0.03


def test_maglev_adding_a_backend_moves_about_its_share() -> None:
    four = names(4)
    before = [four[i] for i in maglev_table(four, M)]
    five = names(5)
    after = [five[i] for i in maglev_table(five, M)]
    changed = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    assert changed / M < 0.25  # 1/5 would be perfect


def test_maglev_does_not_depend_on_order() -> None:
    n = names(6)
    t1 = [n[i] for i in maglev_table(n, 251)]
    rev = list(reversed(n))
    t2 = [rev[i] for i in maglev_table(rev, 251)]
    assert t1 == t2


def test_maglev_is_the_same_in_every_process() -> None:
    code = ("from nodemesh.datapath.lb import maglev_table; import hashlib; "
            "print(hashlib.sha256(bytes(str(maglev_table(['a:1', 'b:1', 'c:1'], 16381)), "
            "'ascii')).hexdigest())")
    digests = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True)
        digests.add(out.stdout.strip())
    local = hashlib.sha256(bytes(str(maglev_table(["a:1", "b:1", "c:1"], M)), "ascii")).hexdigest()
    assert digests == {local}


def test_maglev_golden_table() -> None:
    # every agent of a cluster must compute the same table: a change here is a breaking change
    assert maglev_table(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], 13) == [
        0, 0, 1, 1, 0, 0, 2, 2, 2, 2, 1, 1, 0]


def test_maglev_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="prime"):
        maglev_table(["a"], 16380)
    with pytest.raises(ValueError, match="duplicate"):
        maglev_table(["a", "a"], 13)
    with pytest.raises(ValueError, match="larger"):
        maglev_table([str(i) for i in range(13)], 13)
    assert maglev_table([], 13) == []
    assert is_prime(16381) and is_prime(65537) and not is_prime(1) and not is_prime(16383)


# --- compile_lb -------------------------------------------------------------------------------
VIP = "10.96.0.10"


def svc(backends: list[tuple[str, int]], **kw: object) -> LbService:
    return LbService(VIP, 80, "TCP", backends, **kw)  # type: ignore[arg-type]


def entries(state: object) -> dict[str, dict[bytes, bytes]]:
    return {name: {k: bytes(v) for k, v in m.items()}
            for name, m in state.maps().items()}  # type: ignore[attr-defined]


def head(state: object, vip: str = VIP, port: int = 80, proto: int = 6) -> Lb4Service:
    return state.svc[bytes(Lb4Key(ip4(vip), port, 0, proto))]  # type: ignore[attr-defined]


def test_service_entries() -> None:
    state = compile_lb([svc([("10.0.0.2", 8080), ("10.0.0.1", 8080)])], maglev_m=13)
    h = head(state)
    assert (h.count, h.flags, h.backend_id) == (2, 0, 0)
    rev = h.rev_nat_index
    assert rev == 1
    slot_ids = [state.svc[bytes(Lb4Key(ip4(VIP), 80, s, 6))].backend_id for s in (1, 2)]
    # slots ordered by address; backends hold address and port
    backends = {k: state.backends[bytes(ctypes.c_uint32(k))] for k in slot_ids}
    assert [(b.address, b.port, b.protocol) for b in backends.values()] == [
        (ip4("10.0.0.1"), 8080, 6), (ip4("10.0.0.2"), 8080, 6)]
    rn = state.revnat[bytes(ctypes.c_uint16(rev))]
    assert (rn.address, rn.port) == (ip4(VIP), 80)
    assert state.maglev == {}
    assert state.service_backends == {rev: frozenset(slot_ids)}


def test_flags_affinity_maglev_l7() -> None:
    state = compile_lb([svc([("10.0.0.1", 80)], algorithm="maglev", affinity_timeout=30,
                            l7_proxy_port=15001)], maglev_m=13)
    h = head(state)
    assert h.flags == ServiceFlags.AFFINITY | ServiceFlags.MAGLEV | ServiceFlags.L7
    assert (h.affinity_timeout, h.l7_proxy_port) == (30, 15001)
    table = state.maglev[bytes(ctypes.c_uint16(h.rev_nat_index))]
    assert len(table) == 13
    assert set(table) == {state.backend_ids[("10.0.0.1", 80, 6)]}


def test_no_backends_is_a_service_with_count_zero() -> None:
    state = compile_lb([svc([], algorithm="maglev")], maglev_m=13)
    assert head(state).count == 0
    assert len(state.svc) == 1 and not state.backends and not state.maglev


def test_ids_are_stable_and_unchanged_input_gives_identical_entries() -> None:
    a = svc([("10.0.0.1", 80), ("10.0.0.2", 80)], algorithm="maglev")
    b = LbService("10.96.0.11", 53, "UDP", [("10.0.0.3", 53)])
    s1 = compile_lb([a, b], maglev_m=13)
    s2 = compile_lb([b, a], s1)
    assert entries(s1) == entries(s2)
    assert s2.maglev[bytes(ctypes.c_uint16(head(s2).rev_nat_index))] is \
        s1.maglev[bytes(ctypes.c_uint16(head(s1).rev_nat_index))]  # table reused, not rebuilt

    # a new service and a new backend: the old ids stay
    c = LbService("10.96.0.12", 443, "TCP", [("10.0.0.9", 443)])
    s3 = compile_lb([a, b, c], s2)
    for key, rev in s2.rev_nat.items():
        assert s3.rev_nat[key] == rev
    for key, bid in s2.backend_ids.items():
        assert s3.backend_ids[key] == bid


def test_freed_ids_are_not_reused_at_once() -> None:
    s1 = compile_lb([svc([("10.0.0.1", 80), ("10.0.0.2", 80)])], maglev_m=13)
    gone = s1.backend_ids[("10.0.0.2", 80, 6)]
    s2 = compile_lb([svc([("10.0.0.1", 80), ("10.0.0.3", 80)])], s1)
    assert ("10.0.0.2", 80, 6) not in s2.backend_ids
    assert s2.backend_ids[("10.0.0.3", 80, 6)] != gone
    assert bytes(ctypes.c_uint32(gone)) not in s2.backends

    r1 = compile_lb([svc([]), LbService("10.96.0.2", 80, "TCP", [])], maglev_m=13)
    old = r1.rev_nat[("10.96.0.2", 80, 6)]
    r2 = compile_lb([svc([]), LbService("10.96.0.3", 80, "TCP", [])], r1)
    assert r2.rev_nat[("10.96.0.3", 80, 6)] != old


def test_same_backend_in_two_services_has_one_id() -> None:
    s = compile_lb([svc([("10.0.0.1", 80)]), LbService("10.96.0.2", 80, "TCP", [("10.0.0.1", 80)])],
                   maglev_m=13)
    assert len(s.backends) == 1
    # but TCP and UDP backends on the same address and port are distinct
    s = compile_lb([svc([("10.0.0.1", 80)]), LbService(VIP, 80, "UDP", [("10.0.0.1", 80)])],
                   maglev_m=13)
    assert len(s.backends) == 2
    assert {b.protocol for b in s.backends.values()} == {6, 17}


def test_maglev_table_is_rebuilt_when_backends_change() -> None:
    s1 = compile_lb([svc([("10.0.0.1", 80), ("10.0.0.2", 80)], algorithm="maglev")],
                    maglev_m=13)
    s2 = compile_lb([svc([("10.0.0.1", 80)], algorithm="maglev")], s1)
    rev = bytes(ctypes.c_uint16(head(s2).rev_nat_index))
    assert set(s2.maglev[rev]) == {s2.backend_ids[("10.0.0.1", 80, 6)]}


@pytest.mark.parametrize(("service", "message"), [
    (LbService("10.96.0.300", 80, "TCP", []), "vip"),
    (LbService(VIP, 0, "TCP", []), "port must be"),
    (LbService(VIP, 80, "SCTP", []), "proto must be"),
    (LbService(VIP, 80, "TCP", [], algorithm="rr"), "algorithm"),
    (LbService(VIP, 80, "TCP", [("10.0.0.1", 70000)]), "backend 10.0.0.1:70000"),
    (LbService(VIP, 80, "TCP", [("10.0.0.1", 80), ("10.0.0.1", 80)]), "listed twice"),
    (LbService(VIP, 80, "TCP", [], affinity_timeout=0), "affinity"),
    (LbService(VIP, 80, "TCP", [], l7_proxy_port=0), "l7_proxy_port"),
])
def test_bad_services_are_refused_with_the_field(service: LbService, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        compile_lb([service], maglev_m=13)
    assert f"{service.vip}:{service.port}" in str(info.value)


def test_duplicate_service_and_bad_table_size() -> None:
    with pytest.raises(ValueError, match="defined twice"):
        compile_lb([svc([]), LbService(VIP, 80, "tcp", [])], maglev_m=13)
    with pytest.raises(ValueError, match="prime"):
        compile_lb([], maglev_m=16380)


def test_value_types_are_the_layout_structs() -> None:
    s = compile_lb([svc([("10.0.0.1", 80)], algorithm="maglev")], maglev_m=13)
    assert all(isinstance(v, Lb4Service) for v in s.svc.values())
    assert all(isinstance(v, Lb4Backend) for v in s.backends.values())
    assert all(isinstance(v, Lb4ReverseNat) for v in s.revnat.values())
    assert all(ctypes.sizeof(v) == 4 * 13 for v in s.maglev.values())
