"""Envoy's TLS settings for the mutual-TLS tunnel, shared by the tunnel listeners
(`nodemesh.mtls.tunnel`) and the L7 proxy's clusters (`nodemesh.route`): TLS 1.3 only, the
tunnel's ALPN, the workload certificate and the trust bundle over SDS, and the SPIFFE ID the
peer must present.

Here, below both, so that the route compiler needs nothing of `nodemesh.mtls` (which builds on
the route's protos).
"""

from __future__ import annotations

from typing import Any

ALPN = "nodemesh-tunnel"
ROOTS_SECRET = "nodemesh/trust-bundle"  # the SDS secret with the trust bundle (validation context)
SOL_SOCKET, SO_MARK = 1, 36
SOL_IP, IP_BIND_ADDRESS_NO_PORT = 0, 24
_TYPE = "type.googleapis.com/"
_TLS = "envoy.transport_sockets.tls"


def _ads() -> dict[str, Any]:
    return {"ads": {}, "resource_api_version": "V3"}


def sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": _ads()}


def _tls_common(identity: str, peer_san: dict[str, Any]) -> dict[str, Any]:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": [ALPN],
        "tls_certificate_sds_secret_configs": [sds(identity)],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": peer_san}]},
            "validation_context_sds_secret_config": sds(ROOTS_SECRET),
        },
    }


def any_workload(trust_domain: str) -> dict[str, Any]:
    """A SAN matcher for every workload identity of the trust domain."""
    return {"prefix": f"spiffe://{trust_domain}/ns/"}


def upstream_tls(identity: str, peer_san: dict[str, Any]) -> dict[str, Any]:
    """The transport socket that presents `identity`'s certificate and checks the server's."""
    return {"name": _TLS, "typed_config": {
        "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": _tls_common(identity, peer_san)}}


def downstream_tls(identity: str, peer_san: dict[str, Any]) -> dict[str, Any]:
    return {"name": _TLS, "typed_config": {
        "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _tls_common(identity, peer_san)}}


def mark_option(mark: int) -> dict[str, Any]:
    """SO_MARK on an upstream socket, before it binds."""
    return {"level": SOL_SOCKET, "name": SO_MARK, "int_value": mark, "state": "STATE_PREBIND"}


def late_port_option() -> dict[str, Any]:
    """IP_BIND_ADDRESS_NO_PORT on an upstream socket bound to the client's address
    (original_src): the kernel then picks the source port at connect(), for that destination,
    as the client's own kernel would; bound first with port 0 it picks one blind to the
    destination, which can meet a TIME-WAIT of an earlier connection to the same pod port."""
    return {"level": SOL_IP, "name": IP_BIND_ADDRESS_NO_PORT, "int_value": 1,
            "state": "STATE_PREBIND"}


def upstream_socket_options(mark: int = 0) -> list[dict[str, Any]]:
    return ([mark_option(mark)] if mark else []) + [late_port_option()]
