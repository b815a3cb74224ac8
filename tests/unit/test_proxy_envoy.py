"""Envoy bootstrap: shape, typed parse, and Envoy's own `--mode validate` (no process left)."""

from __future__ import annotations

import os

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.resource_monitors.downstream_connections.v3 import (  # noqa: F401
    downstream_connections_pb2,
)
from envoy.extensions.resource_monitors.fixed_heap.v3 import fixed_heap_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from nodemesh.proxy.envoy import XDS_CLUSTER, bootstrap, envoy_binary, validate_config


def test_bootstrap_defaults() -> None:
    b = bootstrap("node1", "/run/nm/node1/xds.sock")
    assert b["node"] == {"id": "node1", "cluster": "nodemesh"}
    assert b["admin"]["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}
    ads = b["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "GRPC" and ads["set_node_on_first_message_only"] is True
    assert ads["grpc_services"][0]["envoy_grpc"]["cluster_name"] == XDS_CLUSTER
    (xds,) = b["static_resources"]["clusters"]
    ep = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"] == {"pipe": {"path": "/run/nm/node1/xds.sock"}}
    h2 = next(iter(xds["typed_extension_protocol_options"].values()))
    assert h2["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]
    assert "layered_runtime" not in b
    # Typed parse: every field name and type is right.
    json_format.ParseDict(b, bootstrap_pb2.Bootstrap())


def test_bootstrap_options() -> None:
    b = bootstrap("n", "/x.sock", admin_socket="/a.sock", api_type="DELTA_GRPC",
                  max_heap_bytes=1 << 30, runtime={"re2.max_program_size.error_level": 200},
                  initial_fetch_timeout=5, node_metadata={"zone": "z1"})
    assert b["admin"]["address"] == {"pipe": {"path": "/a.sock", "mode": 0o600}}
    assert b["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert b["dynamic_resources"]["cds_config"]["initial_fetch_timeout"] == "5s"
    assert b["node"]["metadata"] == {"zone": "z1"}
    assert {a["name"] for a in b["overload_manager"]["actions"]} >= {
        "envoy.overload_actions.shrink_heap", "envoy.overload_actions.stop_accepting_requests"}
    assert b["layered_runtime"]["layers"][0]["static_layer"] == {
        "re2.max_program_size.error_level": 200}
    json_format.ParseDict(b, bootstrap_pb2.Bootstrap())
    with pytest.raises(ValueError, match="api_type"):
        bootstrap("n", "/x.sock", api_type="REST")


def test_envoy_validates_the_bootstrap() -> None:
    assert os.access(envoy_binary(), os.X_OK)
    assert validate_config(bootstrap("n", "/tmp/x.sock")) is None
    assert validate_config(bootstrap("n", "/tmp/x.sock", admin_socket="/tmp/a.sock",
                                     api_type="DELTA_GRPC", max_heap_bytes=1 << 30,
                                     runtime={"a": 1})) is None
    bad = bootstrap("n", "/tmp/x.sock", xds_retry_base=5.0, xds_retry_max=1.0)
    msg = validate_config(bad)
    assert msg is not None and "max_interval" in msg
