"""Flow records in Hubble's JSON shape, built from kernel events and from Envoy access logs.

A flow is one observed connection (L3_L4: a new connection or a drop seen by the datapath) or one
HTTP request (L7: from the node Envoy's access log). Field names are Hubble's (`flow.proto` as
`hubble observe -o json` prints it), so tools and habits carry over. `FlowContext` supplies what a
raw event does not carry: which pod an address or identity belongs to, which service a socket-LB
translation went to, the node's name.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from nodemesh.datapath.layout import (
    Direction,
    DropReason,
    EventFlags,
    EventType,
    FlowEvent,
    Proto,
    Verdict,
    ip4_str,
)
from nodemesh.identity.reserved import RESERVED_LABELS

# The datapath's enumerations (nodemesh.datapath.layout) under the names Hubble gives them.
EV_TRACE, EV_DROP, EV_SOCK = EventType.TRACE, EventType.DROP, EventType.SOCK
VERDICTS = {int(v): v.name for v in Verdict}
DROP_REASONS = {int(r): r.hubble_name for r in DropReason}
PROTOCOLS = {int(Proto.TCP): "TCP", int(Proto.UDP): "UDP", int(Proto.ICMP): "ICMPv4"}  # flow.l4's keys
TCP_FLAG_NAMES = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10),
                  ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))
# reserved identity -> its label ("reserved:host"), as Hubble shows it
RESERVED_IDENTITIES = {num: label for num, labels in RESERVED_LABELS.items() for label in labels}

@dataclass(frozen=True)
class FlowEndpoint:
    """What a flow says about one side: Hubble's `Endpoint` message."""

    identity: int = 0
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()
    workloads: tuple[tuple[str, str], ...] = ()  # (kind, name)
    id: int = 0  # the local endpoint id (the veth's ifindex) when the pod is on this node

    def to_json(self) -> dict:
        d: dict = {"identity": self.identity}
        if self.id:
            d["ID"] = self.id
        if self.namespace:
            d["namespace"] = self.namespace
        if self.labels:
            d["labels"] = list(self.labels)
        if self.pod_name:
            d["pod_name"] = self.pod_name
        if self.workloads:
            d["workloads"] = [{"name": n, "kind": k} for k, n in self.workloads]
        return d


class FlowContext(Protocol):
    node_name: str

    def endpoint_by_ip(self, ip: str) -> FlowEndpoint | None: ...

    def endpoint_by_identity(self, identity: int) -> FlowEndpoint: ...

    def service_by_revnat(self, index: int) -> tuple[str, str] | None: ...

    def service_by_address(self, ip: str, port: int) -> tuple[str, str] | None: ...

    def policy_name(self, policy_id: int) -> str | None: ...

    def monotonic_to_wall(self, ns: int) -> datetime: ...

    def spiffe_id(self, ip: str) -> str | None: ...


@dataclass
class StaticContext:
    """A FlowContext over plain tables (the agent keeps one current; tests build one by hand)."""

    node_name: str = ""
    by_ip: Mapping[str, FlowEndpoint] = field(default_factory=dict)
    by_identity: Mapping[int, FlowEndpoint] = field(default_factory=dict)
    services_by_revnat: Mapping[int, tuple[str, str]] = field(default_factory=dict)
    services_by_address: Mapping[tuple[str, int], tuple[str, str]] = field(default_factory=dict)
    policies: Mapping[int, str] = field(default_factory=dict)
    boot_offset_ns: int = 0  # wall clock ns minus CLOCK_MONOTONIC ns
    spiffe_ids: Mapping[str, str] = field(default_factory=dict)  # pod IP -> workload identity

    def endpoint_by_ip(self, ip: str) -> FlowEndpoint | None:
        return self.by_ip.get(ip)

    def endpoint_by_identity(self, identity: int) -> FlowEndpoint:
        ep = self.by_identity.get(identity)
        if ep is not None:
            return ep
        label = RESERVED_IDENTITIES.get(identity)
        return FlowEndpoint(identity=identity, labels=(label,) if label else ())

    def service_by_revnat(self, index: int) -> tuple[str, str] | None:
        return self.services_by_revnat.get(index)

    def service_by_address(self, ip: str, port: int) -> tuple[str, str] | None:
        return self.services_by_address.get((ip, port))

    def policy_name(self, policy_id: int) -> str | None:
        return self.policies.get(policy_id)

    def monotonic_to_wall(self, ns: int) -> datetime:
        return datetime.fromtimestamp((ns + self.boot_offset_ns) / 1e9, UTC)

    def spiffe_id(self, ip: str) -> str | None:
        return self.spiffe_ids.get(ip)


# flow_event.flags (layout.EventFlags)
FLOW_F_TUNNEL, FLOW_F_AUTH = EventFlags.TUNNEL, EventFlags.AUTH
# Hubble's field for how a connection's peers were authenticated (flow.proto AuthType); its
# values there are DISABLED, SPIRE and TEST_ALWAYS_FAIL. nodemesh's own mutual TLS between node
# Envoys is a value of its own.
AUTH_MUTUAL_TLS = "MUTUAL_TLS"


def mutual_tls(flow: dict, ctx: FlowContext, src_ip: str, dst_ip: str) -> None:
    """Mark a flow as carried in the mutual-TLS tunnel, with both workload identities."""
    flow["auth_type"] = AUTH_MUTUAL_TLS
    ids = {}
    for side, ip in (("source", src_ip), ("destination", dst_ip)):
        ident = getattr(ctx, "spiffe_id", lambda _ip: None)(ip)
        if ident:
            ids[f"{side}_identity"] = ident
    flow["mtls"] = {"mutually_authenticated": True, **ids}


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def _uuid() -> str:
    return str(uuid.uuid4())


def stable_uuid(*parts: bytes) -> str:
    """A flow id derived from what the flow is built from: the same record read twice (a
    `--last` snapshot, then a follower) is the same flow to whoever deduplicates by uuid."""
    return str(uuid.UUID(bytes=hashlib.blake2b(b"\0".join(parts), digest_size=16).digest(),
                         version=4))


def tcp_flags(bits: int) -> dict[str, bool]:
    return {name: True for name, bit in TCP_FLAG_NAMES if bits & bit}


def _summary_l4(proto: str, flags: Mapping[str, bool]) -> str:
    if proto == "TCP":
        return "TCP Flags: " + ", ".join(flags) if flags else "TCP"
    return proto


def _side(ctx: FlowContext, ip: str, identity: int) -> FlowEndpoint:
    ep = ctx.endpoint_by_ip(ip)
    if ep is not None:
        return ep if ep.identity == identity or not identity else FlowEndpoint(
            identity=identity, namespace=ep.namespace, pod_name=ep.pod_name, labels=ep.labels,
            workloads=ep.workloads, id=ep.id)
    return ctx.endpoint_by_identity(identity)


def flow_from_event(ev: Mapping, ctx: FlowContext) -> dict:
    """A datapath ring-buffer event (decoded to plain fields, addresses as strings, ports in
    host order) → a Hubble flow."""
    proto = PROTOCOLS.get(int(ev["protocol"]), str(ev["protocol"]))
    verdict = VERDICTS.get(int(ev["verdict"]), "VERDICT_UNKNOWN")
    egress = int(ev.get("direction", Direction.EGRESS)) == Direction.EGRESS
    src = _side(ctx, ev["saddr"], int(ev.get("src_identity", 0)))
    dst = _side(ctx, ev["daddr"], int(ev.get("dst_identity", 0)))
    flags = tcp_flags(int(ev.get("tcp_flags", 0))) if proto == "TCP" else {}
    l4: dict
    if proto in ("TCP", "UDP"):
        l4 = {proto: {"source_port": int(ev["sport"]), "destination_port": int(ev["dport"])}}
        if flags:
            l4[proto]["flags"] = flags
    else:
        # The datapath puts the ICMP type where a port would be.
        l4 = {"ICMPv4": {"type": int(ev.get("dport", 0)), "code": 0}}
    flow: dict = {
        "time": rfc3339(ctx.monotonic_to_wall(int(ev["ts_ns"]))),
        "uuid": _uuid(),
        "verdict": verdict,
        "IP": {"source": ev["saddr"], "destination": ev["daddr"], "ipVersion": "IPv4"},
        "l4": l4,
        "source": src.to_json(),
        "destination": dst.to_json(),
        "Type": "L3_L4",
        "node_name": ctx.node_name,
        "event_type": {"type": 1 if verdict == "DROPPED" else 4},
        "traffic_direction": "EGRESS" if egress else "INGRESS",
        "is_reply": False,
    }
    if int(ev.get("type", 0)) == EV_SOCK:
        svc = ctx.service_by_revnat(int(ev.get("rev_nat_index", 0)))
        flow["trace_observation_point"] = "TO_STACK" if verdict != "DROPPED" else "FROM_STACK"
        flow["event_type"] = {"type": 4 if verdict != "DROPPED" else 1, "sub_type": 0}
        orig = f"{ev.get('orig_daddr')}:{ev.get('orig_dport')}"
        flow["socket_translation"] = {"original_destination": orig}
        if svc:
            flow["destination_service"] = {"namespace": svc[0], "name": svc[1]}
    else:
        flow["trace_observation_point"] = "TO_ENDPOINT" if not egress else "FROM_ENDPOINT"
        svc = ctx.service_by_address(ev["daddr"], int(ev["dport"]))
        if svc:
            flow["destination_service"] = {"namespace": svc[0], "name": svc[1]}
    if verdict == "DROPPED":
        reason = int(ev.get("reason", 0))
        flow["drop_reason"] = reason
        flow["drop_reason_desc"] = DROP_REASONS.get(reason, f"UNKNOWN_{reason}")
        if egress:
            flow["egress_denied_by"] = _policies(ctx, ev)
        else:
            flow["ingress_denied_by"] = _policies(ctx, ev)
        flow["Summary"] = _summary_l4(proto, flags)
    else:
        allowed = _policies(ctx, ev)
        if allowed:
            flow["egress_allowed_by" if egress else "ingress_allowed_by"] = allowed
        flow["Summary"] = _summary_l4(proto, flags)
    ev_flags = int(ev.get("flags", 0))
    # Into the tunnel at the source, or out of it at the destination (authenticated by a socket
    # of the node Envoy for a source of another node: it proved its identity in mutual TLS).
    src_remote = not (ctx.endpoint_by_ip(ev["saddr"]) or FlowEndpoint()).id
    if (ev_flags & FLOW_F_TUNNEL) or ((ev_flags & FLOW_F_AUTH) and src_remote):
        mutual_tls(flow, ctx, ev["saddr"], ev["daddr"])
    return {k: v for k, v in flow.items() if v != []}


def _policies(ctx: FlowContext, ev: Mapping) -> list[dict]:
    pid = int(ev.get("policy_id", 0))
    name = ctx.policy_name(pid) if pid else None
    if not name:
        return []
    kind, _, ref = name.partition(" ")
    ns, _, n = ref.rpartition("/")
    return [{"name": n, "namespace": ns, "kind": kind}]


def flow_from_access_log(entry: Mapping, ctx: FlowContext, *, denied_by_policy: bool = False,
                         backend_service: tuple[str, str] | None = None,
                         flow_id: str | None = None) -> dict:
    """An Envoy HTTP access-log entry (as the ALS receiver decodes it) → one L7 flow."""
    src_ip, src_port = _split_addr(entry.get("downstream_remote_address", ""))
    orig_ip, orig_port = _split_addr(entry.get("original_destination", "")
                                     or entry.get("downstream_local_address", ""))
    up_ip, up_port = _split_addr(entry.get("upstream_host", ""))
    dst_ip, dst_port = (up_ip, up_port) if up_ip else (orig_ip, orig_port)
    src = ctx.endpoint_by_ip(src_ip) or ctx.endpoint_by_identity(2)
    dst = (ctx.endpoint_by_ip(dst_ip) if dst_ip else None) or ctx.endpoint_by_identity(0)
    code = int(entry.get("response_code") or 0)
    # A request Envoy could not parse (its codec answered 400) has no method, authority or
    # path: the ALS gives None, and the flow says "" (never "None").
    method = entry.get("method") or ""
    authority = entry.get("authority") or ""
    path = entry.get("path") or ""
    scheme = entry.get("scheme") or "http"
    protocol = entry.get("protocol") or "HTTP/1.1"
    url = f"{scheme}://{authority}{path}" if authority or path else ""
    latency_ns = int(float(entry.get("duration_ms", 0)) * 1e6)
    verdict = "DROPPED" if denied_by_policy else "FORWARDED"
    headers = [{"key": k, "value": v} for k, v in (entry.get("request_headers") or {}).items()]
    is_grpc = protocol.startswith("HTTP/2") and (entry.get("request_headers") or {}).get(
        "content-type", "").startswith("application/grpc")
    t = entry.get("time")
    flow: dict = {
        "time": t if isinstance(t, str) else rfc3339(t or datetime.now(UTC)),
        "uuid": flow_id or _uuid(),
        "verdict": verdict,
        "IP": {"source": src_ip, "destination": dst_ip, "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": src_port, "destination_port": dst_port}},
        "source": src.to_json(),
        "destination": dst.to_json(),
        "Type": "L7",
        "node_name": ctx.node_name,
        "event_type": {"type": 129},
        "traffic_direction": "EGRESS",
        "is_reply": False,
        "l7": {
            "type": "REQUEST" if denied_by_policy else "RESPONSE",
            "latency_ns": str(latency_ns),
            "http": {"code": code, "method": method, "url": url, "protocol": protocol,
                     "headers": headers},
        },
        "trace_observation_point": "TO_PROXY",
    }
    svc = backend_service or ctx.service_by_address(orig_ip, orig_port)
    if svc:
        flow["destination_service"] = {"namespace": svc[0], "name": svc[1]}
    if entry.get("route_name"):
        flow["l7"]["route"] = entry["route_name"]
    if is_grpc:
        flow["l7"]["grpc"] = {"method": path.lstrip("/")}
    if denied_by_policy:
        flow["drop_reason"] = 133
        flow["drop_reason_desc"] = "POLICY_DENIED"
        flow["Summary"] = f"{protocol} {method} {url}"
    else:
        flow["Summary"] = f"{protocol} {code} {latency_ns // 1_000_000}ms ({method} {url})"
    return flow


def _split_addr(addr: str) -> tuple[str, int]:
    if not addr or ":" not in addr:
        return addr or "", 0
    host, _, port = addr.rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        return host, 0


def labels_of(labels: Mapping[str, str], namespace: str) -> tuple[str, ...]:
    """Hubble prints security labels as `k8s:key=value`, sorted, with the namespace label."""
    out = [f"k8s:{k}={v}" for k, v in labels.items()]
    out.append(f"k8s:io.kubernetes.pod.namespace={namespace}")
    return tuple(sorted(set(out)))


def workloads_of(owner_refs: Sequence[Mapping]) -> tuple[tuple[str, str], ...]:
    """Deployment pods are named by their Deployment (Hubble reports the top-level workload)."""
    out = []
    for ref in owner_refs:
        if ref.get("controller"):
            out.append((str(ref.get("kind")), str(ref.get("name"))))
    return tuple(out)


# ---- datapath events kept raw: decoded only when someone reads them ---------------------------
# A new connection costs the agent a few microseconds this way (one bytes copy, a few counters),
# instead of the tens of microseconds that building a Hubble flow takes; flows are built when
# `nodemesh observe`, the UI or a follower asks for them.
_EV = FlowEvent  # the one definition of `struct flow_event` (checked against the objects' BTF)
_EV_IDS = struct.Struct("<II")  # src_identity, dst_identity (adjacent u32s)


def decode_event(raw: bytes) -> dict:
    """A `struct flow_event` (its bytes) → plain fields, as `flow_from_event` takes them."""
    ev = _EV.from_buffer_copy(raw)
    fields = {name: getattr(ev, name) for name, _ in _EV._fields_ if name != "pad"}
    for addr in ("saddr", "daddr", "orig_daddr"):
        fields[addr] = ip4_str(fields[addr])
    return fields


class RawEvent:
    """One datapath event as the kernel wrote it, with the context to explain it later."""

    __slots__ = ("_flow", "cookie_ips", "ctx", "raw")

    def __init__(self, raw: bytes, ctx: FlowContext, cookie_ips: Mapping[int, str]) -> None:
        self.raw = raw
        self.ctx = ctx
        self.cookie_ips = cookie_ips
        self._flow: dict | None = None

    # The few fields the metrics need, without decoding everything.
    @property
    def type(self) -> int:
        return self.raw[_EV.type.offset]

    @property
    def verdict(self) -> int:
        return self.raw[_EV.verdict.offset]

    @property
    def reason(self) -> int:
        return self.raw[_EV.reason.offset]

    @property
    def direction(self) -> int:
        return self.raw[_EV.direction.offset]

    @property
    def protocol(self) -> int:
        return self.raw[_EV.protocol.offset]

    @property
    def identities(self) -> tuple[int, int]:
        return _EV_IDS.unpack_from(self.raw, _EV.src_identity.offset)

    @property
    def flags(self) -> int:
        return self.raw[_EV.flags.offset]

    @property
    def saddr_bytes(self) -> bytes:
        return self.raw[_EV.saddr.offset:_EV.saddr.offset + 4]

    def to_flow(self) -> dict:
        if self._flow is None:
            fields = decode_event(self.raw)
            if fields["type"] == EV_SOCK and fields["saddr"] == "0.0.0.0":
                # A socket-LB event comes before the socket has an address: its network
                # namespace says which pod it is.
                fields["saddr"] = self.cookie_ips.get(fields["netns_cookie"], "0.0.0.0")
            self._flow = flow_from_event(fields, self.ctx)
        return self._flow
