"""Flows of the mutual-TLS tunnel's failures, from the node Envoy's TCP access log.

The tunnel listeners log a connection only when it fails (`nodemesh.mtls.tunnel.tcp_access_log`:
a response flag, or a TLS handshake that failed), so a working tunnel costs the agent nothing;
the kernel's events already show its connections. Each failure becomes a DROPPED flow that says
why and names the peer:

- ``AUTH_REQUIRED`` (189): a handshake failed: the server's certificate was not the identity
  the destination must prove (source node), or the client's was not the one its address belongs
  to, or it had none (destination node); or the client pod has no certificate yet; or
  plaintext that claims a mesh pod's address (whatever the mode: a pod's own traffic comes in
  the tunnel);
- ``UNENCRYPTED_TRAFFIC`` (195): plaintext from outside the mesh to a pod (or port) whose
  PeerAuthentication mode is STRICT, refused by the destination node.

Other failures (the pod refused the connection, a timeout) are what the application would see
without the mesh: they are counted, not turned into flows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nodemesh.mtls.tunnel import INBOUND_LISTENER, OUTBOUND_LISTENER
from nodemesh.observe.flow import FlowContext, rfc3339, stable_uuid

AUTH_REQUIRED = 189
UNENCRYPTED_TRAFFIC = 195
_SANS = re.compile(r"_certificate_SANs:_\[([^\]]*)\]")
_EXPECTED = re.compile(r"_expected_SANs:_\[([^\]]*)\]")
# BoringSSL's names for a first record that is not TLS at all: plaintext, not a bad handshake.
_NOT_TLS = ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER")


def _split(addr: str | None) -> tuple[str, int]:
    host, _, port = (addr or "").rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        return addr or "", 0


def _peer_sans(entry: Mapping[str, Any]) -> list[str]:
    return list((entry.get("tls") or {}).get("peer_uri_sans") or [])


def tunnel_failure(entry: Mapping[str, Any], ctx: FlowContext, raw: bytes) -> dict | None:
    """A DROPPED flow for one failure entry of a tunnel listener (`als.tcp_entry_to_dict`), or
    None when the failure is not the tunnel's business."""
    listener = (entry.get("custom_tags") or {}).get("nodemesh.listener")
    if listener not in (OUTBOUND_LISTENER, INBOUND_LISTENER):
        return None
    flags = set(entry.get("response_flags") or [])
    up_reason = entry.get("upstream_transport_failure_reason") or ""
    down_reason = entry.get("downstream_transport_failure_reason") or ""
    src_ip, src_port = _split(entry.get("downstream_remote_address"))
    dst_ip, dst_port = _split(entry.get("downstream_local_address"))
    dst_id = ctx.spiffe_id(dst_ip) if hasattr(ctx, "spiffe_id") else None
    src_id = ctx.spiffe_id(src_ip) if hasattr(ctx, "spiffe_id") else None
    outbound = listener == OUTBOUND_LISTENER
    if outbound and up_reason:
        got = _SANS.search(up_reason)
        want = _EXPECTED.search(up_reason)
        peer = got.group(1) if got else "no certificate"
        expected = want.group(1) if want else (dst_id or "a workload of the trust domain")
        why = (f"mutual TLS to {dst_ip}:{dst_port} failed: it must prove {expected}, "
               f"it presented {peer} ({_short(up_reason)})")
        reason = AUTH_REQUIRED
    elif outbound and "NR" in flags:
        why = f"{src_ip} has no workload certificate on this node yet: not sent"
        reason = AUTH_REQUIRED
    elif not outbound and _plaintext(down_reason, flags) and src_id:
        why = (f"plaintext from {src_ip}, the address of {src_id}, refused: a mesh pod's "
               "connections from another node come only in mutual TLS")
        reason = AUTH_REQUIRED
    elif not outbound and _plaintext(down_reason, flags):
        why = (f"plaintext from {src_ip} to {dst_ip}:{dst_port} refused: the destination "
               "accepts only mutual TLS (PeerAuthentication STRICT)")
        reason = UNENCRYPTED_TRAFFIC
    elif not outbound and down_reason:
        peer = ", ".join(_peer_sans(entry)) or "no certificate"
        expected = src_id or "a workload of the trust domain"
        why = (f"mutual TLS from {src_ip} refused: it must prove {expected}, "
               f"it presented {peer} ({_short(down_reason)})")
        reason = AUTH_REQUIRED
    else:
        return None
    src = ctx.endpoint_by_ip(src_ip) or ctx.endpoint_by_identity(2)
    dst = ctx.endpoint_by_ip(dst_ip) or ctx.endpoint_by_identity(0)
    t = entry.get("time")
    flow: dict = {
        "time": t if isinstance(t, str) else rfc3339(datetime.now(UTC)),
        "uuid": stable_uuid(ctx.node_name.encode(), raw),
        "verdict": "DROPPED",
        "drop_reason": reason,
        "drop_reason_desc": "AUTH_REQUIRED" if reason == AUTH_REQUIRED else "UNENCRYPTED_TRAFFIC",
        "IP": {"source": src_ip, "destination": dst_ip, "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": src_port, "destination_port": dst_port}},
        "source": src.to_json(),
        "destination": dst.to_json(),
        "Type": "L3_L4",
        "node_name": ctx.node_name,
        "event_type": {"type": 1},
        "traffic_direction": "EGRESS" if outbound else "INGRESS",
        "trace_observation_point": "TO_PROXY" if outbound else "FROM_NETWORK",
        "is_reply": False,
        "Summary": why,
        "mtls": {"mutually_authenticated": False, "reason": why,
                 **({"source_identity": src_id} if src_id else {}),
                 **({"destination_identity": dst_id} if dst_id else {})},
    }
    if reason == AUTH_REQUIRED:
        flow["auth_type"] = "MUTUAL_TLS"
    return flow


def _plaintext(down_reason: str, flags: set[str]) -> bool:
    """Whether the inbound failure is plaintext refused (no chain for it, or not TLS at all)."""
    if down_reason:
        return any(name in down_reason for name in _NOT_TLS)
    return "NR" in flags


def _short(reason: str) -> str:
    """Envoy's TLS error, without the BoringSSL framing."""
    m = re.search(r"OPENSSL_internal:([A-Z_]+)", reason)
    return m.group(1) if m else reason[:120]
