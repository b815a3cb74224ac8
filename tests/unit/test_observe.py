"""Flows in Hubble's shape, the observe filters, the printers, and the flow ring."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest

from nodemesh.cli.printer import as_json, as_table, compact
from nodemesh.errors import NodemeshError
from nodemesh.observe.filters import FlowFilter, matches, parse_time
from nodemesh.observe.flow import (
    EV_DROP,
    EV_SOCK,
    EV_TRACE,
    FlowEndpoint,
    StaticContext,
    flow_from_access_log,
    flow_from_event,
    labels_of,
)
from nodemesh.observe.ring import FlowRing

CLIENT = FlowEndpoint(identity=300, namespace="shop", pod_name="client",
                  labels=labels_of({"app": "client"}, "shop"), id=7)
WEB = FlowEndpoint(identity=301, namespace="shop", pod_name="web-abc-1",
               labels=labels_of({"app": "web"}, "shop"), workloads=(("Deployment", "web"),))
CTX = StaticContext(node_name="node1",
                    by_ip={"10.244.1.2": CLIENT, "10.244.2.3": WEB},
                    by_identity={300: CLIENT, 301: WEB},
                    services_by_revnat={4: ("shop", "web")},
                    services_by_address={("10.96.0.9", 80): ("shop", "web")},
                    policies={9: "NetworkPolicy shop/deny-all"},
                    boot_offset_ns=1_700_000_000 * 10**9)


def ev(**kw) -> dict:
    base = {"ts_ns": 5_000_000_000, "type": EV_TRACE, "verdict": 1, "reason": 0, "direction": 1,
            "ifindex": 7, "saddr": "10.244.1.2", "daddr": "10.244.2.3", "sport": 40000,
            "dport": 8080, "protocol": 6, "tcp_flags": 0x02, "src_identity": 300,
            "dst_identity": 301, "policy_id": 0, "len": 60}
    base.update(kw)
    return base


def test_new_connection_flow_has_hubble_fields() -> None:
    f = flow_from_event(ev(), CTX)
    assert f["verdict"] == "FORWARDED"
    assert f["Type"] == "L3_L4"
    assert f["IP"] == {"source": "10.244.1.2", "destination": "10.244.2.3", "ipVersion": "IPv4"}
    assert f["l4"]["TCP"]["destination_port"] == 8080
    assert f["l4"]["TCP"]["flags"] == {"SYN": True}
    assert f["source"]["pod_name"] == "client" and f["source"]["identity"] == 300
    assert f["destination"]["workloads"] == [{"name": "web", "kind": "Deployment"}]
    assert "k8s:app=web" in f["destination"]["labels"]
    assert f["traffic_direction"] == "EGRESS"
    assert f["node_name"] == "node1"
    assert f["time"].startswith("2023-11-14T22:13:25")
    assert f["Summary"] == "TCP Flags: SYN"


def test_drop_flow_has_reason_and_policy() -> None:
    f = flow_from_event(ev(type=EV_DROP, verdict=2, reason=133, direction=0, policy_id=9), CTX)
    assert f["verdict"] == "DROPPED"
    assert f["drop_reason_desc"] == "POLICY_DENIED"
    assert f["drop_reason"] == 133
    assert f["traffic_direction"] == "INGRESS"
    assert f["ingress_denied_by"] == [{"name": "deny-all", "namespace": "shop",
                                       "kind": "NetworkPolicy"}]


def test_udp_and_unknown_peer() -> None:
    f = flow_from_event(ev(protocol=17, tcp_flags=0, daddr="192.0.2.9", dst_identity=2), CTX)
    assert f["l4"] == {"UDP": {"source_port": 40000, "destination_port": 8080}}
    assert f["destination"]["labels"] == ["reserved:world"]


def test_socket_translation_names_the_service() -> None:
    f = flow_from_event(ev(type=EV_SOCK, verdict=4, rev_nat_index=4, orig_daddr="10.96.0.9",
                           orig_dport=80), CTX)
    assert f["destination_service"] == {"namespace": "shop", "name": "web"}
    assert f["socket_translation"]["original_destination"] == "10.96.0.9:80"


def test_access_log_flow() -> None:
    entry = {"downstream_remote_address": "10.244.1.2:5555",
             "downstream_local_address": "10.96.0.9:80", "upstream_host": "10.244.2.3:8080",
             "method": "GET", "authority": "web", "path": "/api", "protocol": "HTTP/1.1",
             "response_code": 200, "duration_ms": 3, "time": "2026-11-25T10:00:00.000000000Z",
             "request_headers": {"x-request-id": "abc"}}
    f = flow_from_access_log(entry, CTX)
    assert f["Type"] == "L7" and f["verdict"] == "FORWARDED"
    assert f["l7"]["http"] == {"code": 200, "method": "GET", "url": "http://web/api",
                               "protocol": "HTTP/1.1", "headers": [{"key": "x-request-id",
                                                                    "value": "abc"}]}
    assert f["l7"]["latency_ns"] == "3000000"
    assert f["destination"]["pod_name"] == "web-abc-1"
    assert f["destination_service"] == {"namespace": "shop", "name": "web"}
    denied = flow_from_access_log({**entry, "response_code": 403, "upstream_host": ""}, CTX,
                                  denied_by_policy=True)
    assert denied["verdict"] == "DROPPED" and denied["drop_reason_desc"] == "POLICY_DENIED"
    assert denied["l7"]["http"]["method"] == "GET"


FLOWS = [flow_from_event(ev(), CTX),
         flow_from_event(ev(type=EV_DROP, verdict=2, reason=133, protocol=17, tcp_flags=0), CTX),
         flow_from_access_log({"downstream_remote_address": "10.244.1.2:1",
                               "upstream_host": "10.244.2.3:8080", "method": "POST",
                               "path": "/v1/pay", "authority": "web", "response_code": 503,
                               "duration_ms": 1, "downstream_local_address": "10.96.0.9:80"},
                              CTX)]


@pytest.mark.parametrize("flt,expected", [
    (FlowFilter(), [0, 1, 2]),
    (FlowFilter(pod=["shop/web"]), [0, 1, 2]),
    (FlowFilter(from_pod=["shop/web"]), []),
    (FlowFilter(to_pod=["shop/web-abc"]), [0, 1, 2]),
    (FlowFilter(pod=["other/client"]), []),
    (FlowFilter(namespace=["shop"]), [0, 1, 2]),
    (FlowFilter(label=["app=client"]), [0, 1, 2]),
    (FlowFilter(from_label=["app=web"]), []),
    (FlowFilter(to_label=["app in (web,db)"]), [0, 1, 2]),
    (FlowFilter(verdict=["dropped"]), [1]),
    (FlowFilter(type=["drop"]), [1]),
    (FlowFilter(type=["trace"]), [0]),
    (FlowFilter(type=["l7"]), [2]),
    (FlowFilter(protocol=["udp"]), [1]),
    (FlowFilter(protocol=["tcp"]), [0, 2]),
    (FlowFilter(protocol=["http"]), [2]),
    (FlowFilter(http_status=["5+"]), [2]),
    (FlowFilter(http_status=["200"]), []),
    (FlowFilter(http_method=["post"]), [2]),
    (FlowFilter(http_path=["^/v1/"]), [2]),
    (FlowFilter(service=["shop/web"]), [2]),
    (FlowFilter(to_service=["web"]), [2]),
    (FlowFilter(identity=["301"]), [0, 1, 2]),
    (FlowFilter(identity=["999"]), []),
    (FlowFilter(verdict=["FORWARDED"], protocol=["http"]), [2]),
])
def test_filters(flt: FlowFilter, expected: list[int]) -> None:
    assert [i for i, f in enumerate(FLOWS) if matches(flt, f)] == expected


def test_time_filters() -> None:
    f = FLOWS[0]
    assert matches(FlowFilter(since="2023-11-14T22:13:00Z"), f)
    assert not matches(FlowFilter(since="2023-11-14T22:14:00Z"), f)
    assert matches(FlowFilter(until="2023-11-14T22:14:00Z"), f)
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_time("5m", now).startswith("2026-01-01T11:55:00")
    with pytest.raises(NodemeshError):
        parse_time("yesterday")


def test_filter_validation_and_query_round_trip() -> None:
    with pytest.raises(NodemeshError, match="--type"):
        FlowFilter(type=["bogus"]).validate()
    with pytest.raises(NodemeshError, match="--http-status"):
        FlowFilter(http_status=["2xx"]).validate()
    flt = FlowFilter(pod=["a"], verdict=["DROPPED"], since="2026-01-01T00:00:00Z")
    assert FlowFilter.from_query(flt.to_query()) == flt


def test_printers() -> None:
    line = compact(FLOWS[1])
    assert "shop/client:40000 (ID:300) -> shop/web-abc-1:8080 (ID:301)" in line
    assert "policy-denied DROPPED" in line
    assert "\033[" not in line and "\033[31mDROPPED" in compact(FLOWS[1], colour=True)
    parsed = json.loads(as_json(FLOWS[2]))
    assert parsed["flow"]["l7"]["http"]["code"] == 503 and parsed["node_name"] == "node1"
    assert "VERDICT" in as_table(FLOWS).splitlines()[0]


def test_ring_is_bounded_and_feeds_followers() -> None:
    ring = FlowRing(capacity=3)

    async def run() -> list[dict]:
        q = ring.follow()
        for i in range(5):
            ring.add({"i": i})
        await asyncio.sleep(0)
        got = [q.get_nowait() for _ in range(q.qsize())]
        ring.unfollow(q)
        return got

    got = asyncio.run(run())
    assert [f["i"] for f in ring.snapshot()] == [2, 3, 4]
    assert [f["i"] for f in got] == [0, 1, 2, 3, 4]
    assert ring.total == 5


# ---- raw datapath events ----------------------------------------------------------------------
def _raw_event(**kw) -> bytes:
    import ctypes

    from nodemesh.datapath import layout as L

    ev = L.FlowEvent()
    ev.ts_ns = kw.get("ts_ns", 5_000_000_000)
    ev.type, ev.verdict, ev.reason, ev.direction = (kw.get("type", EV_TRACE), kw.get("verdict", 1),
                                                    kw.get("reason", 0), kw.get("direction", 1))
    ev.ifindex = 7
    ev.saddr, ev.daddr = L.ip4(kw.get("saddr", "10.244.1.2")), L.ip4(kw.get("daddr", "10.244.2.3"))
    ev.sport, ev.dport = 40000, kw.get("dport", 8080)
    ev.protocol, ev.tcp_flags = kw.get("protocol", 6), 0x02
    ev.src_identity, ev.dst_identity = 300, 301
    ev.netns_cookie = kw.get("netns_cookie", 0)
    return ctypes.string_at(ctypes.addressof(ev), ctypes.sizeof(ev))


def test_raw_event_decodes_like_the_struct() -> None:
    from nodemesh.observe.flow import RawEvent, decode_event

    raw = _raw_event(dport=443)
    d = decode_event(raw)
    assert (d["saddr"], d["daddr"], d["sport"], d["dport"], d["protocol"]) == \
        ("10.244.1.2", "10.244.2.3", 40000, 443, 6)
    assert (d["src_identity"], d["dst_identity"], d["verdict"], d["direction"]) == (300, 301, 1, 1)
    flow = RawEvent(raw, CTX, {}).to_flow()
    assert flow["source"]["pod_name"] == "client" and flow["l4"]["TCP"]["destination_port"] == 443
    sock = RawEvent(_raw_event(type=EV_SOCK, verdict=4, saddr="0.0.0.0", netns_cookie=99), CTX,
                    {99: "10.244.1.2"}).to_flow()
    assert sock["IP"]["source"] == "10.244.1.2"  # the client named by its netns cookie


def test_ring_builds_flows_only_when_read() -> None:
    from nodemesh.observe.flow import RawEvent

    ring = FlowRing(capacity=10)
    ev = RawEvent(_raw_event(), CTX, {})
    ring.add(ev)
    assert ev._flow is None
    assert next(ring.newest_first())["verdict"] == "FORWARDED"
    assert ev._flow is not None


def test_metrics_count_raw_events_once_per_connection() -> None:
    import socket

    from nodemesh.observe.flow import RawEvent
    from nodemesh.observe.metrics import AgentCollector, AgentMetrics

    m = AgentMetrics("node1")
    m.local_ips = frozenset({socket.inet_aton("10.244.1.2"), socket.inet_aton("10.244.2.3")})
    m.observe(RawEvent(_raw_event(direction=1), CTX, {}))  # egress of the client: counted
    m.observe(RawEvent(_raw_event(direction=0), CTX, {}))  # ingress of a local server: not again
    m.observe(RawEvent(_raw_event(direction=0, saddr="10.244.3.9"), CTX, {}))  # from elsewhere
    m.observe(RawEvent(_raw_event(verdict=2, reason=133, direction=0), CTX, {}))  # a drop
    names = {300: ("shop", "client"), 301: ("shop", "web")}
    m.registry.register(AgentCollector("node1", metrics=m, workloads=lambda i: names[i]))
    text = m.expose().decode()
    assert ('nodemesh_tcp_connections_total{connection_security_policy="none",'
            'destination_namespace="shop",destination_workload="web",'
            'source_namespace="shop",source_workload="client",verdict="FORWARDED"} 2.0') in text
    assert 'verdict="DROPPED"} 1.0' in text
    assert ('nodemesh_flows_total{drop_reason="POLICY_DENIED",protocol="tcp",type="L3_L4",'
            'verdict="DROPPED"} 1.0') in text
