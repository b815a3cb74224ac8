"""The tunnel's Envoy TLS settings: defined in `nodemesh.route.tls` (the L7 proxy's clusters use
them too, and the route compiler sits below `nodemesh.mtls`); the same names here."""

from __future__ import annotations

from nodemesh.route.tls import (
    ALPN,
    IP_BIND_ADDRESS_NO_PORT,
    ROOTS_SECRET,
    SO_MARK,
    SOL_IP,
    SOL_SOCKET,
    any_workload,
    downstream_tls,
    late_port_option,
    mark_option,
    sds,
    upstream_socket_options,
    upstream_tls,
)

__all__ = [
    "ALPN",
    "IP_BIND_ADDRESS_NO_PORT",
    "ROOTS_SECRET",
    "SOL_IP",
    "SOL_SOCKET",
    "SO_MARK",
    "any_workload",
    "downstream_tls",
    "late_port_option",
    "mark_option",
    "sds",
    "upstream_socket_options",
    "upstream_tls",
]
