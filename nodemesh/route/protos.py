"""Envoy protobuf plumbing: YAML-shaped dicts → typed v3 messages, deterministically.

Resources are written as the dicts one would write in an Envoy YAML file and parsed with
`json_format.ParseDict`, so a misspelt field or a wrong type fails here, loudly, instead of
in Envoy. Python does not check Envoy's value rules (PGV); `nodemesh.route.validate` runs
``envoy --mode validate`` for those.

`json_format` packs ``google.protobuf.Any`` values with a non-deterministic serializer; `parse`
re-packs every Any deterministically so the same dict always gives the same bytes (and thus
the same snapshot version).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

# Every message type that appears inside an Any must be imported once, so that ParseDict can
# find it in the default descriptor pool.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.http.set_filter_state.v3 import (  # noqa: F401
    set_filter_state_pb2,
)
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.matching.common_inputs.transport_socket.v3 import (  # noqa: F401
    transport_socket_inputs_pb2,
)
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import any_pb2, descriptor_pool, json_format, message, message_factory

Listener = listener_pb2.Listener
RouteConfiguration = route_pb2.RouteConfiguration
Cluster = cluster_pb2.Cluster
ClusterLoadAssignment = endpoint_pb2.ClusterLoadAssignment

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RESOURCE_TYPES = (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)

HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
UPSTREAM_CODEC_TYPE = ("type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3."
                       "UpstreamCodec")
ORIGINAL_SRC_TYPE = ("type.googleapis.com/envoy.extensions.filters.listener.original_src.v3."
                     "OriginalSrc")
HTTP_GRPC_ALS_TYPE = ("type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
                      "HttpGrpcAccessLogConfig")
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_PROTOCOL_OPTIONS_TYPE = "type.googleapis.com/" + HTTP_PROTOCOL_OPTIONS

RBAC_FILTER = "envoy.filters.http.rbac"
ROUTER_FILTER = "envoy.filters.http.router"
UPSTREAM_CODEC_FILTER = "envoy.filters.http.upstream_codec"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
ORIGINAL_SRC_FILTER = "envoy.filters.listener.original_src"
HTTP_GRPC_ALS = "envoy.access_loggers.http_grpc"

M = TypeVar("M", bound=message.Message)


def parse(d: Mapping[str, Any], cls: type[M]) -> M:
    """A typed message from an Envoy-YAML-shaped dict (unknown fields raise ParseError)."""
    msg = json_format.ParseDict(d, cls())
    canonicalize(msg)
    return msg


def canonicalize(msg: message.Message) -> None:
    """Re-pack every nested Any with deterministic serialization (in place)."""
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            entry_value = fd.message_type.fields_by_name["value"]
            if entry_value.message_type is not None:
                for k in value:
                    _canon_one(value[k])
            continue
        if fd.is_repeated:
            for item in value:
                _canon_one(item)
        else:
            _canon_one(value)


def _canon_one(msg: message.Message) -> None:
    if msg.DESCRIPTOR.full_name == "google.protobuf.Any":
        inner = unpack(msg)  # type: ignore[arg-type]
        canonicalize(inner)
        msg.value = inner.SerializeToString(deterministic=True)  # type: ignore[attr-defined]
    else:
        canonicalize(msg)


def unpack(a: any_pb2.Any) -> message.Message:
    name = a.type_url.rsplit("/", 1)[-1]
    desc = descriptor_pool.Default().FindMessageTypeByName(name)
    inner = message_factory.GetMessageClass(desc)()
    inner.ParseFromString(a.value)
    return inner


def to_dict(msg: message.Message) -> dict[str, Any]:
    """The Envoy-YAML shape of a message (field names as in the proto, Anys expanded)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def serialize(msg: message.Message) -> bytes:
    return msg.SerializeToString(deterministic=True)


def duration(ms: int) -> str:
    """Milliseconds as a protobuf JSON duration ("1.5s", "0s")."""
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms / 1000:.3f}s"
