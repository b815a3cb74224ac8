"""Socket load balancing on a real kernel: ClusterIP VIP -> backend from inside a pod."""

from __future__ import annotations

from collections import Counter

import pytest

from nodemesh.datapath import libbpf
from nodemesh.datapath.layout import DropReason, EventType, Lb4AffinityKey, Verdict, ip4
from nodemesh.datapath.lb import LbService, LbState, compile_lb
from nodemesh.datapath.loader import Datapath
from tests.integration import bpfharness
from tests.integration.bpfharness import DNS_IP, NODE_IP, Events, Topology

pytestmark = pytest.mark.root
# the shared fixtures (assigned, not imported, so that test parameters may shadow them)
bpf_objects, topo, dp = bpfharness.bpf_objects, bpfharness.topo, bpfharness.dp

VIP = "10.96.0.10"

# One TCP exchange per connection: the backend's name, and what getpeername() said.
TCP_CLIENT = """
import json, socket
out = []
for i in range({n}):
    s = socket.socket()
    {bind}
    s.settimeout(3)
    s.connect(("{vip}", {port}))
    peer = s.getpeername()
    s.sendall(b"hi")
    out.append([s.recv(100).decode().split()[0], list(peer)])
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00")
    s.close()
print(json.dumps(out))
"""


def apply(dp: Datapath, services: list[LbService], previous: LbState | None = None) -> LbState:
    state = compile_lb(services, previous, maglev_m=dp.maglev_m)
    dp.apply_lb(state)
    return state


def tcp_connections(pod: object, n: int, port: int = 80, src_port_base: int | None = None,
                    vip: str = VIP) -> list[tuple[str, tuple[str, int]]]:
    bind = ("s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('0.0.0.0', {src_port_base} + i))" if src_port_base else "pass")
    out = pod.python(TCP_CLIENT.format(n=n, bind=bind, vip=vip, port=port))  # type: ignore[attr-defined]
    return [(name, (peer[0], peer[1])) for name, peer in out]


def test_tcp_service_by_clusterip(topo: Topology, dp: Datapath) -> None:
    p1, p2, p3 = topo.pods[:3]
    p2.server("tcp", 8080)
    p3.server("tcp", 8080)
    apply(dp, [LbService(VIP, 80, "TCP", [(p2.ip, 8080), (p3.ip, 8080)])])
    events = Events(dp)

    results = tcp_connections(p1, 10)

    assert {name for name, _ in results} <= {"pod2:8080", "pod3:8080"}
    assert all(peer == (VIP, 80) for _, peer in results), results
    socks = events.where(type=EventType.SOCK)
    assert len(socks) == 10, events.dump()
    cookie = libbpf.netns_cookie(f"/run/netns/{p1.netns}")
    for e in socks:
        assert e.verdict == Verdict.TRANSLATED
        assert (e.orig_daddr, e.orig_dport) == (ip4(VIP), 80)
        assert (e.daddr, e.dport) in {(ip4(p2.ip), 8080), (ip4(p3.ip), 8080)}
        assert e.netns_cookie == cookie
        assert e.protocol == 6
        assert e.rev_nat_index == dp.revnat.items().__next__()[0].value
    # the tc programs only ever saw the backend, never the VIP
    traces = events.where(type=EventType.TRACE, saddr=ip4(p1.ip))
    assert traces and all(e.daddr != ip4(VIP) for e in traces)


def test_udp_connected_and_unconnected(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    p2.server("udp", 5353)
    apply(dp, [LbService(VIP, 53, "UDP", [(p2.ip, 5353)])])

    out = p1.python(f"""
        import json, socket
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(3)
        c.connect(("{VIP}", 53))
        peer = c.getpeername()
        c.send(b"connected")
        reply_c = c.recv(100).decode()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(3)
        u.sendto(b"unconnected", ("{VIP}", 53))
        data, addr = u.recvfrom(100)
        print(json.dumps({{"peer": list(peer), "reply_c": reply_c,
                           "reply_u": data.decode(), "from": list(addr)}}))
    """)

    assert out == {"peer": [VIP, 53], "reply_c": "pod2:5353 connected",
                   "reply_u": "pod2:5353 unconnected", "from": [VIP, 53]}


def test_random_spread_over_three_backends(topo: Topology, dp: Datapath) -> None:
    p1 = topo.pods[0]
    backends = topo.pods[1:4]
    for p in backends:
        p.server("tcp", 8080)
    apply(dp, [LbService(VIP, 80, "TCP", [(p.ip, 8080) for p in backends])])

    counts = Counter(name for name, _ in tcp_connections(p1, 300))

    assert set(counts) == {f"{p.name}:8080" for p in backends}, counts
    # Uniform random choice: each count is Binomial(300, 1/3), mean 100, sd 8.2. A per-backend
    # bound of +-15 % of the mean (85..115) fails about one run in eight for a correct picker;
    # +-15 % of the total (55..145, 5.5 sd) catches any skew that matters and never flakes. The
    # chi-square bound (p = 0.0001, 2 degrees of freedom) catches a modest bias as well.
    assert all(55 <= c <= 145 for c in counts.values()), counts
    chi2 = sum((c - 100) ** 2 / 100 for c in counts.values())
    assert chi2 < 18.4, counts


def test_client_ip_affinity_pins_a_pod(topo: Topology, dp: Datapath) -> None:
    p1 = topo.pods[0]
    backends = topo.pods[1:4]
    for p in backends:
        p.server("tcp", 8080)
    first = apply(dp, [LbService(VIP, 80, "TCP", [(p.ip, 8080) for p in backends],
                                 affinity_timeout=60)])

    counts = Counter(name for name, _ in tcp_connections(p1, 30))

    assert len(counts) == 1, counts
    cookie = libbpf.netns_cookie(f"/run/netns/{p1.netns}")
    entries = {k.netns_cookie: v for k, v in dp.affinity.items()}
    assert cookie in entries
    pinned = dp.backends.get(libbpf.ctypes.c_uint32(entries[cookie].backend_id))
    assert f"pod{int(pinned.address) & 0xff}:8080" == next(iter(counts))

    # removing the pinned backend from the service drops the affinity entry with it
    name = next(iter(counts))
    left = [p for p in backends if f"{p.name}:8080" != name]
    state = compile_lb([LbService(VIP, 80, "TCP", [(p.ip, 8080) for p in left],
                                  affinity_timeout=60)], first)
    dp.apply_lb(state)
    assert dp.affinity.get(Lb4AffinityKey(cookie, next(iter(state.rev_nat.values())))) is None
    again = Counter(n for n, _ in tcp_connections(p1, 10))
    assert len(again) == 1 and name not in again


def test_maglev_keeps_flows_when_a_backend_goes(topo: Topology, dp: Datapath) -> None:
    p1, p2, p3, p4 = topo.pods
    four = [(p2.ip, 8080), (p3.ip, 8080), (p4.ip, 8080), (p2.ip, 8081)]
    for ip, port in four:
        next(p for p in topo.pods if p.ip == ip).server("tcp", port)
    state = apply(dp, [LbService(VIP, 80, "TCP", four, algorithm="maglev")])

    flows = 200
    before = [name for name, _ in tcp_connections(p1, flows, src_port_base=41000)]
    again = [name for name, _ in tcp_connections(p1, flows, src_port_base=41000)]
    assert before == again, "Maglev is not deterministic for a bound source port"
    assert len(set(before)) == 4, Counter(before)

    apply(dp, [LbService(VIP, 80, "TCP", four[:3], algorithm="maglev")], state)
    after = [name for name, _ in tcp_connections(p1, flows, src_port_base=41000)]

    kept = sum(1 for a, b in zip(before, after, strict=True) if a == b)
    assert "pod2:8081" not in after
    assert kept / flows >= 0.6, f"kept {kept}/{flows}"
    # and every flow that did not use the removed backend stayed put (minimal disruption)
    moved_needlessly = sum(1 for a, b in zip(before, after, strict=True)
                           if a != "pod2:8081" and a != b)
    assert moved_needlessly <= flows * 0.05


def test_no_backends_refuses_at_once(topo: Topology, dp: Datapath) -> None:
    p1 = topo.pods[0]
    apply(dp, [LbService(VIP, 80, "TCP", []), LbService(VIP, 53, "UDP", [])])
    events = Events(dp)

    out = p1.python(f"""
        import errno, json, socket, time
        res = {{}}
        t = time.monotonic()
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("{VIP}", 80))
            res["tcp"] = "connected"
        except OSError as e:
            res["tcp"] = errno.errorcode[e.errno]
        res["tcp_s"] = time.monotonic() - t
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.sendto(b"x", ("{VIP}", 53))
            res["udp"] = "sent"
        except OSError as e:
            res["udp"] = errno.errorcode[e.errno]
        print(json.dumps(res))
    """)

    assert out["tcp"] == "ECONNREFUSED"
    assert out["tcp_s"] < 0.5
    assert out["udp"] == "ECONNREFUSED"
    drops = events.where(type=EventType.DROP, reason=DropReason.NO_SERVICE)
    assert {(e.protocol, e.orig_daddr, e.orig_dport) for e in drops} == {
        (6, ip4(VIP), 80), (17, ip4(VIP), 53)}, events.dump()
    assert all(e.verdict == Verdict.DROPPED for e in drops)
    metrics = dp.read_metrics()
    assert any(k.reason == DropReason.NO_SERVICE and v.packets == 2 for k, v in metrics.items())


def test_service_changes_apply_by_diff(topo: Topology, dp: Datapath) -> None:
    p1, p2, p3 = topo.pods[:3]
    p2.server("tcp", 8080)
    p3.server("tcp", 8080)
    svc = LbService(VIP, 80, "TCP", [(p2.ip, 8080)])
    state = compile_lb([svc], maglev_m=dp.maglev_m)
    first = dp.apply_lb(state)
    assert first["nm_lb4_svc"] == (2, 0)
    # the same desired state writes nothing
    assert all(w == 0 and d == 0 for w, d in dp.apply_lb(compile_lb([svc], state)).values())

    state2 = compile_lb([LbService(VIP, 80, "TCP", [(p3.ip, 8080)])], state)
    dp.apply_lb(state2)
    assert {n for n, _ in tcp_connections(p1, 5)} == {"pod3:8080"}

    # a restarted agent has no `previous`: it reads the ids back from the pinned maps
    recovered = dp.current_lb_state()
    assert recovered.rev_nat == state2.rev_nat
    assert recovered.backend_ids == state2.backend_ids
    again = compile_lb([LbService(VIP, 80, "TCP", [(p3.ip, 8080)])], recovered)
    assert all(w == 0 and d == 0 for w, d in dp.apply_lb(again).values())

    # removing the service: the VIP is no longer translated, and reverse translation stops
    dp.apply_lb(compile_lb([], state2))
    assert not list(dp.services.keys()) and not list(dp.backends.keys())
    assert not list(dp.revnat.keys())


def test_l7_service_goes_to_the_node_proxy(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    p2.server("tcp", 8080)
    dp.set_config(NODE_IP, DNS_IP, proxy_ip=NODE_IP)
    topo.node_server("tcp", NODE_IP, 15001, "envoy")
    apply(dp, [LbService(VIP, 80, "TCP", [(p2.ip, 8080)], l7_proxy_port=15001)])
    events = Events(dp)

    results = tcp_connections(p1, 3)

    assert results == [("envoy", (VIP, 80))] * 3  # the proxy answers; the app still sees the VIP
    socks = events.where(type=EventType.SOCK)
    assert [(e.verdict, e.daddr, e.dport) for e in socks] == [
        (Verdict.REDIRECTED, ip4(NODE_IP), 15001)] * 3

    # without a proxy address configured, the service is balanced as usual
    dp.set_config(NODE_IP, DNS_IP)
    assert {name for name, _ in tcp_connections(p1, 3)} == {"pod2:8080"}
