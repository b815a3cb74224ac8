"""Builders of the Envoy resources: listeners, HTTP connection managers, clusters, endpoints.

Everything here returns Envoy-YAML-shaped dicts; `translate` turns them into typed messages
with `protos.parse`. Choices that keep the proxy transparent to the applications (the client
believes it talks to the Service directly):

- listeners bind ``PROXY_IP:<port>`` and run the ``original_src`` listener filter without a
  mark: upstream connections leave with the client pod's address (so the server's node enforces
  its ingress policy on the real client). The datapath marks the *replies* (0x200, found by a
  socket lookup) for local delivery; a mark on the upstream socket itself would make the
  node's policy routing deliver Envoy's own SYNs locally instead of to the backend;
- HTTP/1.1 and h2c downstream (``codec_type: AUTO``), HTTP/1.0 accepted, WebSocket upgrades
  passed through; ``use_remote_address: false`` and ``skip_xff_append`` leave
  ``x-forwarded-for`` alone; the ``server`` header passes through; the router adds no
  ``x-envoy-*`` headers; an existing ``x-request-id`` is kept (one is added when missing: flows
  use it);
- upstream protocol: HTTP/2 for gRPC (a GRPCRoute backend, or a Service port with
  ``appProtocol: kubernetes.io/h2c``/``grpc``), otherwise the client's own protocol;
- L7 policy is enforced by an *upstream* RBAC filter on the cluster of the policed pod port
  (``pod/<ip>/<port>``): it sees the request as the pod will (after route rewrites), still
  knows the client's address, and applies however the request got there — through the pod
  port's own listener or through a route whose backend Service has that pod.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nodemesh.datapath.layout import NM_MARK_AUTH
from nodemesh.route.inputs import PROXY_IP, RedirectKey
from nodemesh.route.names import stat_prefix
from nodemesh.route.protos import (
    HCM_FILTER,
    HCM_TYPE,
    HTTP_GRPC_ALS,
    HTTP_GRPC_ALS_TYPE,
    HTTP_PROTOCOL_OPTIONS,
    HTTP_PROTOCOL_OPTIONS_TYPE,
    ORIGINAL_SRC_FILTER,
    ORIGINAL_SRC_TYPE,
    RBAC_FILTER,
    RBAC_TYPE,
    ROUTER_FILTER,
    ROUTER_TYPE,
    UPSTREAM_CODEC_FILTER,
    UPSTREAM_CODEC_TYPE,
)
from nodemesh.route.tls import upstream_socket_options, upstream_tls

XDS_CLUSTER = "xds_cluster"  # the bootstrap's static cluster towards the agent (xDS and ALS)
ALS_LOG_NAME = "nodemesh"
CONNECT_TIMEOUT = "2s"
STREAM_IDLE_TIMEOUT = "3600s"  # Envoy's 5 min default would cut idle gRPC streams
ACCESS_DENIED_BODY = "Access denied\r\n"  # what Cilium's proxy answers
METADATA_NS = "nodemesh"
# Circuit breakers well above what one node's pods send: Envoy's defaults (1024) would turn a
# busy client into 503s that the same traffic without the mesh would not see.
CIRCUIT_BREAKERS = {"thresholds": [{
    "priority": "DEFAULT", "max_connections": 100_000, "max_pending_requests": 100_000,
    "max_requests": 100_000, "max_retries": 1024}]}
REQUEST_HEADERS_TO_LOG = ("x-request-id", "x-forwarded-for", "content-type", "grpc-timeout",
                          "traceparent")
RESPONSE_HEADERS_TO_LOG = ("content-type", "grpc-status", "grpc-message", "location")
RESPONSE_TRAILERS_TO_LOG = ("grpc-status", "grpc-message")


def ads() -> dict[str, Any]:
    return {"ads": {}, "resource_api_version": "V3"}


def metadata(**fields: Any) -> dict[str, Any]:
    return {"filter_metadata": {METADATA_NS: dict(sorted(fields.items()))}}


def _metadata_tag(tag: str, kind: str, key: str) -> dict[str, Any]:
    return {"tag": tag, "metadata": {"kind": {kind: {}},
                                     "metadata_key": {"key": METADATA_NS, "path": [{"key": key}]}}}


def access_log(listener: str) -> dict[str, Any]:
    """gRPC access log (ALS) to the agent. Beyond the standard fields (method, path,
    authority, status, timings, upstream host and cluster, route name, response flags and
    details) it tags each entry with the listener, the Gateway API route and rule, the backend
    Service and the pod that answered, from the metadata the translation puts on routes,
    clusters and endpoints."""
    return {"name": HTTP_GRPC_ALS, "typed_config": {
        "@type": HTTP_GRPC_ALS_TYPE,
        "common_config": {
            "log_name": ALS_LOG_NAME,
            "grpc_service": {"envoy_grpc": {"cluster_name": XDS_CLUSTER}},
            "transport_api_version": "V3",
            "custom_tags": [
                {"tag": "nodemesh.listener", "literal": {"value": listener}},
                _metadata_tag("nodemesh.route", "route", "route"),
                _metadata_tag("nodemesh.rule", "route", "rule"),
                _metadata_tag("nodemesh.backend", "cluster", "service"),
                _metadata_tag("nodemesh.pod", "host", "pod"),
            ],
        },
        "additional_request_headers_to_log": list(REQUEST_HEADERS_TO_LOG),
        "additional_response_headers_to_log": list(RESPONSE_HEADERS_TO_LOG),
        "additional_response_trailers_to_log": list(RESPONSE_TRAILERS_TO_LOG),
    }}


# The client pod's address, for the upstream transport socket matcher: a connection to a pod of
# another node presents the certificate of the client's workload identity (`cluster`).
CLIENT_STATE = "nodemesh.client"
SET_FILTER_STATE_FILTER = "envoy.filters.http.set_filter_state"
SET_FILTER_STATE_TYPE = ("type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3."
                         "Config")
_TS_INPUTS = "type.googleapis.com/envoy.extensions.matching.common_inputs.transport_socket.v3."


def client_state_filter() -> dict[str, Any]:
    return {"name": SET_FILTER_STATE_FILTER, "typed_config": {
        "@type": SET_FILTER_STATE_TYPE,
        "on_request_headers": [{
            "object_key": CLIENT_STATE, "factory_key": "envoy.string",
            "format_string": {"text_format_source": {
                "inline_string": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}},
            # Part of the upstream connection's identity: pools are never shared across clients.
            "shared_with_upstream": "ONCE"}]}}


def http_connection_manager(listener: str, route_config: str,
                            mtls: bool = False) -> dict[str, Any]:
    router = {"name": ROUTER_FILTER, "typed_config": {"@type": ROUTER_TYPE,
                                                      "suppress_envoy_headers": True}}
    return {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix(listener),
        "codec_type": "AUTO",
        "rds": {"route_config_name": route_config, "config_source": ads()},
        "http_filters": [client_state_filter(), router] if mtls else [router],
        "use_remote_address": False,
        "skip_xff_append": True,
        "preserve_external_request_id": True,
        "server_header_transformation": "PASS_THROUGH",
        "stream_idle_timeout": STREAM_IDLE_TIMEOUT,
        "http_protocol_options": {"accept_http_10": True},
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "access_log": [access_log(listener)],
        "local_reply_config": {"mappers": [{
            # Envoy's own 403s on these listeners come from the RBAC filter only.
            "filter": {"status_code_filter": {"comparison": {
                "op": "EQ", "value": {"default_value": 403,
                                      "runtime_key": "nodemesh.rbac_denied_status"}}}},
            "body": {"inline_string": ACCESS_DENIED_BODY},
            "body_format_override": {"text_format": "%LOCAL_REPLY_BODY%",
                                     "content_type": "text/plain"},
        }]},
    }


def filter_chain(name: str, listener: str, route_config: str,
                 source_ips: Sequence[str] | None = None, mtls: bool = False) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "name": name,
        "filters": [{"name": HCM_FILTER,
                     "typed_config": http_connection_manager(listener, route_config, mtls)}],
    }
    if source_ips is not None:
        chain["filter_chain_match"] = {"source_prefix_ranges": [
            {"address_prefix": ip, "prefix_len": 32} for ip in sorted(source_ips)]}
    return chain


def listener(name: str, port: int, destination: RedirectKey, chains: list[dict[str, Any]],
             meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": PROXY_IP, "port_value": port}},
        "listener_filters": [{"name": ORIGINAL_SRC_FILTER, "typed_config": {
            "@type": ORIGINAL_SRC_TYPE}}],
        "filter_chains": chains,
        "traffic_direction": "OUTBOUND",
        "metadata": metadata(destination=str(destination), **meta),
    }


def cluster(name: str, h2: bool, meta: Mapping[str, Any],
            rbac: Mapping[str, Any] | None = None,
            mtls: tuple[Mapping[str, str], Sequence[str]] | None = None) -> dict[str, Any]:
    """An EDS cluster; with `rbac` (RBAC ``rules``), an upstream RBAC filter enforces them on
    every request sent to it — after routing and rewrites, as the pod will see the request.

    With `mtls` (the clients: local pod IP → workload identity; the identities of the cluster's
    endpoints on other nodes), a connection to an endpoint whose metadata names an identity
    (`load_assignment`) is made in mutual TLS: the client pod's certificate (by the
    ``nodemesh.client`` filter state the listener sets), the endpoint's identity checked. Every
    upstream socket carries NM_MARK_AUTH: the client is a pod of this node, whose identity the
    node vouches for (docs/security.md)."""
    if h2:
        proto: dict[str, Any] = {"explicit_http_config": {"http2_protocol_options": {}}}
    else:
        proto = {"use_downstream_protocol_config": {"http_protocol_options": {},
                                                    "http2_protocol_options": {}}}
    if rbac is not None:
        proto["http_filters"] = [
            {"name": RBAC_FILTER, "typed_config": {"@type": RBAC_TYPE, "rules": rbac}},
            {"name": UPSTREAM_CODEC_FILTER, "typed_config": {"@type": UPSTREAM_CODEC_TYPE}},
        ]
    out: dict[str, Any] = {
        "name": name,
        "alt_stat_name": stat_prefix(name),
        "type": "EDS",
        "eds_cluster_config": {"eds_config": ads()},
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": CIRCUIT_BREAKERS,
        "typed_extension_protocol_options": {
            HTTP_PROTOCOL_OPTIONS: {"@type": HTTP_PROTOCOL_OPTIONS_TYPE, **proto}},
        "metadata": metadata(**meta),
    }
    if mtls is not None:
        out.update(_mtls_sockets(*mtls))
    return out


def _ts_action(name: str) -> dict[str, Any]:
    return {"action": {"name": name, "typed_config": {
        "@type": _TS_INPUTS + "TransportSocketNameAction", "name": name}}}


def _mtls_sockets(clients: Mapping[str, str], servers: Sequence[str]) -> dict[str, Any]:
    """transport_socket_matches and the matcher that picks one per connection: by the
    endpoint's identity (metadata), then by the client pod's address (filter state)."""
    sockets = [{"name": "plain", "transport_socket": {
        "name": "envoy.transport_sockets.raw_buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3."
                     "RawBuffer"}}}]
    by_server: dict[str, Any] = {}
    identities = sorted(set(clients.values()))
    for server in sorted(set(servers)):
        per_client = {}
        for ident in identities:
            sname = f"mtls/{identities.index(ident)}/{len(sockets)}"
            sockets.append({"name": sname,
                            "transport_socket": upstream_tls(ident, {"exact": server})})
            for ip in sorted(i for i, c in clients.items() if c == ident):
                per_client[ip] = _ts_action(sname)
        by_server[server] = {"matcher": {
            "matcher_tree": {
                "input": {"name": "client", "typed_config": {
                    "@type": _TS_INPUTS + "FilterStateInput", "key": CLIENT_STATE}},
                "exact_match_map": {"map": per_client or {"-": _ts_action("plain")}}},
            # A client this Envoy has no certificate for: in clear, which the server's node
            # refuses (it accepts only the tunnel from pods of the mesh).
            "on_no_match": _ts_action("plain")}}
    return {
        "transport_socket_matches": sockets,
        "transport_socket_matcher": {
            "matcher_tree": {
                "input": {"name": "server", "typed_config": {
                    "@type": _TS_INPUTS + "EndpointMetadataInput", "filter": METADATA_NS,
                    "path": [{"key": "tunnel"}]}},
                "exact_match_map": {"map": by_server or {"-": _ts_action("plain")}}},
            "on_no_match": _ts_action("plain")},
        "upstream_bind_config": {"socket_options": upstream_socket_options(NM_MARK_AUTH)},
    }


def load_assignment(name: str, endpoints: Sequence[tuple[str, int, str]],
                    tunnel: Mapping[tuple[str, int], str] | None = None) -> dict[str, Any]:
    """`endpoints`: (ip, port, pod "namespace/name"); `tunnel`: (ip, port) → the workload
    identity an endpoint reached through the mutual-TLS tunnel must present."""
    tunnel = tunnel or {}

    def meta(ip: str, port: int, pod: str) -> dict[str, Any]:
        ident = tunnel.get((ip, port))
        return metadata(pod=pod, tunnel=ident) if ident else metadata(pod=pod)

    eps = [{"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
            "metadata": meta(ip, port, pod)}
           for ip, port, pod in sorted(set(endpoints))]
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}] if eps else []}
