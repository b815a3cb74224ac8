"""The access-log receiver: entry → dict conversion, bounded queue, callbacks."""

from __future__ import annotations

import asyncio
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as als_config_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from nodemesh.proxy.als import (
    AccessLogReceiver,
    entry_to_dict,
    http_grpc_access_log,
    response_flags,
)
from tests.unit.test_proxy_xds import async_test


def http_entry(path: str = "/hello", code: int = 200) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry(protocol_version=accesslog_pb2.HTTPAccessLogEntry.HTTP11)
    c = e.common_properties
    c.start_time.FromSeconds(1_700_000_000)
    c.start_time.nanos = 123_000_000
    c.duration.FromMilliseconds(12)
    c.downstream_remote_address.socket_address.address = "10.0.0.5"
    c.downstream_remote_address.socket_address.port_value = 40000
    c.downstream_local_address.socket_address.address = "169.254.42.1"
    c.downstream_local_address.socket_address.port_value = 15001
    c.upstream_remote_address.socket_address.address = "::1"
    c.upstream_remote_address.socket_address.port_value = 8080
    c.upstream_cluster = "default/echo"
    c.route_name = "default/echo-route/0"
    c.response_flags.upstream_retry_limit_exceeded = True
    c.response_flags.upstream_connection_failure = True
    c.filter_state_objects["nodemesh.src"].Pack(wrappers_pb2.StringValue(value="pod-a"))
    c.filter_state_objects["opaque"].type_url = "type.googleapis.com/some.Unknown"
    c.filter_state_objects["opaque"].value = b"\x01\x02"
    md = struct_pb2.Struct()
    md.update({"shadow_engine_result": "denied"})
    c.metadata.filter_metadata["envoy.filters.http.rbac"].CopyFrom(md)
    r = e.request
    r.request_method = base_pb2.POST
    r.scheme = "http"
    r.authority = "echo.default"
    r.path = path
    r.request_id = "rid-1"
    r.request_headers["x-nodemesh"] = "1"
    e.response.response_code.value = code
    e.response.response_code_details = "via_upstream"
    e.response.response_headers["server"] = "echo"
    return e


def test_entry_to_dict() -> None:
    d = entry_to_dict(http_entry())
    assert d["kind"] == "http"
    assert d["time"] == "2023-11-14T22:13:20.123000Z"
    assert d["duration_ms"] == 12.0
    assert d["downstream_remote_address"] == "10.0.0.5:40000"
    assert d["downstream_local_address"] == "169.254.42.1:15001"
    assert d["upstream_host"] == "[::1]:8080"
    assert d["upstream_cluster"] == "default/echo"
    assert d["route_name"] == "default/echo-route/0"
    assert d["method"] == "POST" and d["path"] == "/hello" and d["authority"] == "echo.default"
    assert d["scheme"] == "http" and d["protocol"] == "HTTP/1.1"
    assert d["response_code"] == 200 and d["response_code_details"] == "via_upstream"
    assert sorted(d["response_flags"]) == ["UF", "URX"]
    assert d["request_id"] == "rid-1"
    assert d["request_headers"] == {"x-nodemesh": "1"}
    assert d["response_headers"] == {"server": "echo"}
    assert d["filter_state"]["nodemesh.src"] == "pod-a"
    assert d["filter_state"]["opaque"] == {"@type": "type.googleapis.com/some.Unknown",
                                           "value_base64": "AQI="}
    assert d["metadata"] == {"envoy.filters.http.rbac": {"shadow_engine_result": "denied"}}


def test_empty_entry_has_none_not_garbage() -> None:
    d = entry_to_dict(accesslog_pb2.HTTPAccessLogEntry())
    assert d["method"] is None and d["response_code"] is None and d["time"] is None
    assert d["upstream_host"] is None and d["response_flags"] == []


def test_response_flags_unauthorized() -> None:
    f = accesslog_pb2.ResponseFlags(no_route_found=True)
    f.unauthorized_details.reason = accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
    assert response_flags(f) == ["NR", "UAEX"]


def test_http_grpc_access_log_config() -> None:
    a = http_grpc_access_log(log_name="node1", request_headers=("x-a",), flush_interval_ms=100,
                             filter_state_objects=("nodemesh.src",))
    assert a.name == "envoy.access_loggers.http_grpc"
    cfg = als_config_pb2.HttpGrpcAccessLogConfig()
    assert a.typed_config.Unpack(cfg)
    assert cfg.common_config.log_name == "node1"
    assert cfg.common_config.grpc_service.envoy_grpc.cluster_name == "xds_cluster"
    assert cfg.common_config.buffer_flush_interval.ToMilliseconds() == 100
    assert list(cfg.additional_request_headers_to_log) == ["x-a"]
    assert list(cfg.common_config.filter_state_objects_to_log) == ["nodemesh.src"]


def _message(n: int, first: bool) -> als_pb2.StreamAccessLogsMessage:
    m = als_pb2.StreamAccessLogsMessage()
    if first:
        m.identifier.node.id = "node1"
        m.identifier.log_name = "mesh"
    for i in range(n):
        m.http_logs.log_entry.append(http_entry(f"/p{i}"))
    return m


async def _stream(*messages: als_pb2.StreamAccessLogsMessage) -> Any:
    for m in messages:
        yield m


@async_test
async def test_receiver_delivers_dicts_with_node_and_log_name() -> None:
    got: list[dict[str, Any]] = []
    rx = AccessLogReceiver(got.append)
    await rx.start()
    await rx.StreamAccessLogs(_stream(_message(2, True), _message(1, False)), None)
    await rx.stop()
    assert [d["path"] for d in got] == ["/p0", "/p1", "/p0"]
    assert {d["node"] for d in got} == {"node1"} and {d["log_name"] for d in got} == {"mesh"}
    assert rx.stats() == {"received": 3, "delivered": 3, "dropped": 0, "callback_errors": 0,
                          "streams": 0, "queued": 0}


@async_test
async def test_receiver_drops_when_full_and_never_waits() -> None:
    release = asyncio.Event()
    got: list[dict[str, Any]] = []

    async def slow(d: dict[str, Any]) -> None:
        await release.wait()
        got.append(d)

    rx = AccessLogReceiver(slow, max_queue=5)
    await rx.start()
    # The stream is read to the end at once although the consumer is stuck.
    await asyncio.wait_for(rx.StreamAccessLogs(_stream(_message(20, True)), None), 1)
    assert rx.received == 20
    assert rx.dropped >= 14  # 5 queued, at most one taken by the stuck consumer
    release.set()
    await rx.stop()
    assert len(got) == rx.delivered == 20 - rx.dropped


@async_test
async def test_receiver_survives_callback_errors() -> None:
    calls = []

    def cb(d: dict[str, Any]) -> None:
        calls.append(d)
        if len(calls) == 1:
            raise ValueError("bad consumer")

    rx = AccessLogReceiver(cb)
    await rx.start()
    await rx.StreamAccessLogs(_stream(_message(3, True)), None)
    await rx.stop()
    assert len(calls) == 3 and rx.callback_errors == 1 and rx.delivered == 2
