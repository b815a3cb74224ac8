"""The node-local DNS server's per-client cap (hostile neighbours): token buckets and REFUSED."""

from __future__ import annotations

import struct

from nodemesh.cluster.dns import RCODE_REFUSED, DnsServer, TokenBuckets, refused


def query(name: str, qid: int = 0x4242) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def test_bucket_allows_burst_then_rate():
    b = TokenBuckets(rate=10, burst=5)
    assert [b.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.allow("a", 0.05)          # half a token
    assert b.allow("a", 0.15)              # 1.5 tokens refilled since 0.0 → one
    assert [b.allow("a", 10.0) for _ in range(6)] == [True] * 5 + [False]  # capped at burst


def test_buckets_are_per_client():
    b = TokenBuckets(rate=1, burst=1)
    assert b.allow("flood", 0.0) and not b.allow("flood", 0.0)
    assert b.allow("victim", 0.0)


def test_zero_rate_is_no_cap():
    b = TokenBuckets(rate=0, burst=0)
    assert all(b.allow("a", 0.0) for _ in range(10000))


def test_table_is_bounded():
    b = TokenBuckets(rate=1, burst=1, max_keys=100)
    for i in range(1000):
        b.allow(i, float(i))
    assert len(b._b) <= 100


def test_refused_keeps_id_and_question():
    q = query("web.default.svc.cluster.local")
    r = refused(q)
    qid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", r[:12])
    assert qid == 0x4242 and flags & 0x8000 and flags & 0xF == RCODE_REFUSED
    assert (qd, an) == (1, 0) and r[12:] == q[12:]
    assert refused(b"short") == b"" and refused(q[:15]) == b""


def test_server_refuses_over_budget_and_counts():
    s = DnsServer("127.0.0.1", qps_per_client=1, burst_per_client=3)
    q = query("nothing.example")
    resps = [s.respond(q, "10.244.1.5") for _ in range(3 + 130)]
    assert all(struct.unpack("!H", r[2:4])[0] & 0xF != RCODE_REFUSED for r in resps[:3])
    over = resps[3:]
    refusals = [r for r in over if r]
    assert len(refusals) == 3 and all(struct.unpack("!H", r[2:4])[0] & 0xF == RCODE_REFUSED
                                      for r in refusals)  # 1 in 64 told REFUSED, the rest dropped
    assert s.refused == 130 and s.answered == 3
    assert struct.unpack("!H", s.respond(q, "10.244.1.6")[2:4])[0] & 0xF != RCODE_REFUSED


def test_metric_counts_refused_queries():
    from prometheus_client import generate_latest

    from nodemesh.observe.metrics import AgentCollector, AgentMetrics
    m = AgentMetrics("node1")
    m.registry.register(AgentCollector("node1", metrics=m,
                                       dns=lambda: {"answered": 7, "refused": 3}))
    text = generate_latest(m.registry).decode()
    assert 'nodemesh_dns_queries_total{result="refused"} 3.0' in text
    assert 'nodemesh_dns_queries_total{result="answered"} 7.0' in text
