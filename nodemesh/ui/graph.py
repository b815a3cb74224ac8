"""The service map's numbers: flows in a rolling window → a graph of workloads and services.

Pure functions and plain data, no I/O: `inventory_from` turns store objects into what the map knows
about workloads and services, `FlowRecord.parse` turns one Hubble flow into a compact record once
(when it arrives), `SockCorrelator` gives socket-LB events the source pod they lack, and
`build_graph` aggregates the records of one window into nodes and edges (docs/ui.md explains every
number).

Graph node ids: ``ns/name`` for a workload (the Deployment's name, or the pod's name for a bare
pod), ``service:ns/name`` for a service, and the reserved entities ``host``, ``world``,
``remote-node``, ``unknown`` (and the other reserved identities' names) when flows involve them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nodemesh.model.labels import service_selects
from nodemesh.observe.flow import RESERVED_IDENTITIES, labels_of

SERVICE_PREFIX = "service:"
UNKNOWN = "unknown"
# How long after a socket-LB event the same pod's first packet to that backend may come.
CORRELATE_S = 2.0


# ---- inventory (from the store) ---------------------------------------------------------------
@dataclass
class Inventory:
    """What the store says exists: workloads, services, and how to find a pod's workload."""

    workloads: dict[str, dict] = field(default_factory=dict)
    services: dict[str, dict] = field(default_factory=dict)
    pod_workload: dict[tuple[str, str], str] = field(default_factory=dict)
    ip_workload: dict[str, str] = field(default_factory=dict)
    labels_workload: dict[tuple[str, ...], str] = field(default_factory=dict)


def workload_of_pod(pod: Mapping) -> str:
    meta = pod.get("metadata") or {}
    ns = meta.get("namespace") or "default"
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("name"):
            return f"{ns}/{ref['name']}"
    return f"{ns}/{meta.get('name', '')}"


def _pod_ready(pod: Mapping) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def inventory_from(objects: Iterable[Mapping]) -> Inventory:
    """Pods, Deployments and Services (any other kind is ignored) → an Inventory."""
    inv = Inventory()
    pods: list[Mapping] = []
    deployments: list[Mapping] = []
    services: list[Mapping] = []
    for o in objects:
        {"Pod": pods, "Deployment": deployments, "Service": services}.get(
            str(o.get("kind")), []).append(o)
    for d in deployments:
        meta = d["metadata"]
        wid = f"{meta.get('namespace') or 'default'}/{meta['name']}"
        tmpl_labels = ((d.get("spec") or {}).get("template") or {}).get("metadata") or {}
        inv.workloads[wid] = {
            "type": "Deployment", "namespace": meta.get("namespace") or "default",
            "name": meta["name"], "replicas": int((d.get("spec") or {}).get("replicas", 1) or 0),
            "ready": 0, "total": 0, "nodes": set(), "pods": [],
            "labels": dict(tmpl_labels.get("labels") or {})}
    for p in pods:
        meta = p["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        ns = meta.get("namespace") or "default"
        wid = workload_of_pod(p)
        w = inv.workloads.setdefault(wid, {
            "type": "Deployment" if wid != f"{ns}/{meta['name']}" else "Pod", "namespace": ns,
            "name": wid.split("/", 1)[1], "replicas": 1, "ready": 0, "total": 0,
            "nodes": set(), "pods": [], "labels": dict(meta.get("labels") or {})})
        w["total"] += 1
        w["ready"] += 1 if _pod_ready(p) else 0
        w["pods"].append(meta["name"])
        node = (p.get("spec") or {}).get("nodeName")
        if node:
            w["nodes"].add(node)
        inv.pod_workload[(ns, meta["name"])] = wid
        ip = (p.get("status") or {}).get("podIP")
        if ip:
            inv.ip_workload[ip] = wid
        inv.labels_workload.setdefault(labels_of(meta.get("labels") or {}, ns), wid)
    pod_labels = [(workload_of_pod(p), (p["metadata"].get("namespace") or "default"),
                   p["metadata"].get("labels") or {}) for p in pods]
    for s in services:
        meta, spec = s["metadata"], s.get("spec") or {}
        ns = meta.get("namespace") or "default"
        sel = spec.get("selector")
        selects = {wid for wid, pns, labels in pod_labels if pns == ns and service_selects(sel, labels)}
        selects |= {wid for wid, w in inv.workloads.items()
                    if w["namespace"] == ns and w["type"] == "Deployment" and w["labels"]
                    and service_selects(sel, w["labels"])}
        ports = [f"{p.get('port')}/{p.get('protocol', 'TCP')}"
                 + (f"→{p['targetPort']}" if p.get("targetPort") not in (None, p.get("port")) else "")
                 for p in spec.get("ports") or []]
        inv.services[f"{SERVICE_PREFIX}{ns}/{meta['name']}"] = {
            "namespace": ns, "name": meta["name"], "clusterIP": spec.get("clusterIP", ""),
            "ports": ports, "selects": sorted(selects)}
    return inv


# ---- flow records --------------------------------------------------------------------------
def parse_time(text: str) -> float | None:
    """Hubble's RFC 3339 time (nanoseconds, `Z`) → seconds since the epoch."""
    try:
        base, _, frac = text.rstrip("Z").partition(".")
        t = datetime.fromisoformat(base).replace(tzinfo=UTC).timestamp()
        return t + (float("0." + frac[:9]) if frac.isdigit() else 0.0)
    except (ValueError, AttributeError):
        return None


def _reserved_name(ep: Mapping) -> str | None:
    for label in ep.get("labels") or []:
        if label.startswith("reserved:"):
            return label.split(":", 1)[1]
    ident = ep.get("identity")
    if isinstance(ident, int) and ident in RESERVED_IDENTITIES:
        return RESERVED_IDENTITIES[ident].split(":", 1)[1]
    return None


def resolve_endpoint(ep: Mapping, ip: str, inv: Inventory) -> str:
    """One side of a flow → a graph node id (`UNKNOWN` when nothing says who it is)."""
    ns = ep.get("namespace") or ""
    pod = ep.get("pod_name") or ""
    if pod:
        for w in ep.get("workloads") or []:
            if w.get("name"):
                return f"{ns}/{w['name']}"
        return inv.pod_workload.get((ns, pod), f"{ns}/{pod}")
    if ip and ip in inv.ip_workload:
        return inv.ip_workload[ip]
    reserved = _reserved_name(ep)
    if reserved:
        return reserved
    if ns:
        wid = inv.labels_workload.get(tuple(sorted(ep.get("labels") or [])))
        return wid or f"{ns}/identity-{ep.get('identity', 0)}"
    return UNKNOWN


def _l4(flow: Mapping) -> tuple[str, int, int]:
    l4 = flow.get("l4") or {}
    for proto in ("TCP", "UDP", "SCTP"):
        if proto in l4:
            d = l4[proto] or {}
            return proto, int(d.get("source_port", 0) or 0), int(d.get("destination_port", 0) or 0)
    if "ICMPv4" in l4:
        return "ICMPv4", 0, int((l4["ICMPv4"] or {}).get("type", 0) or 0)
    return "", 0, 0


@dataclass(slots=True)
class FlowRecord:
    """One flow, parsed once: what the graph needs, and the flow itself for the flow list."""

    t: float
    uuid: str
    node: str
    kind: str  # "l4" (a packet event), "sock" (a socket-LB event) or "l7" (an HTTP request)
    src: str
    dst: str
    svc: str | None
    verdict: str
    proto: str  # "TCP/8080", "UDP/53", "ICMPv4"
    conn: tuple | None = None  # the connection's 5-tuple (l4; sock once correlated)
    dst_key: tuple | None = None  # (ip, port, protocol) the connection went to
    egress: bool = False
    code: int = 0
    latency_ms: float | None = None
    reason: str | None = None
    orig: str | None = None  # socket LB: the address the application connected to
    tunnel: str | None = None  # "entry"/"exit": a leg of a connection through the mTLS tunnel
    flow: dict | None = None

    @classmethod
    def parse(cls, flow: dict, inv: Inventory, now: float) -> FlowRecord:
        ip = flow.get("IP") or {}
        sip, dip = str(ip.get("source", "") or ""), str(ip.get("destination", "") or "")
        proto, sport, dport = _l4(flow)
        t = parse_time(str(flow.get("time", ""))) or now
        svc_ref = flow.get("destination_service") or {}
        svc = (f"{SERVICE_PREFIX}{svc_ref.get('namespace') or 'default'}/{svc_ref['name']}"
               if svc_ref.get("name") else None)
        verdict = str(flow.get("verdict", ""))
        l7 = flow.get("l7") or {}
        kind = "l7" if flow.get("Type") == "L7" else (
            "sock" if "socket_translation" in flow else "l4")
        src = resolve_endpoint(flow.get("source") or {}, "" if sip == "0.0.0.0" else sip, inv)
        dst = resolve_endpoint(flow.get("destination") or {}, "" if dip == "0.0.0.0" else dip, inv)
        rec = cls(t=min(t, now), uuid=str(flow.get("uuid", "")), node=str(flow.get("node_name", "")),
                  kind=kind, src=src, dst=dst, svc=svc, verdict=verdict,
                  proto=f"{proto}/{dport}" if proto in ("TCP", "UDP", "SCTP") else proto,
                  egress=flow.get("traffic_direction") == "EGRESS", flow=flow)
        if verdict == "DROPPED":
            rec.reason = str(flow.get("drop_reason_desc") or flow.get("drop_reason") or "DROPPED")
        if kind == "l7":
            http = l7.get("http") or {}
            rec.code = int(http.get("code") or 0)
            try:
                rec.latency_ms = int(l7.get("latency_ns", 0)) / 1e6 if "latency_ns" in l7 else None
            except (TypeError, ValueError):
                rec.latency_ms = None
        elif kind == "sock":
            rec.dst_key = (dip, dport, proto)
            rec.orig = str((flow.get("socket_translation") or {}).get("original_destination") or "")
            if sport and sip and sip != "0.0.0.0":
                rec.conn = (sip, sport, dip, dport, proto)
        else:
            rec.conn = (sip, sport, dip, dport, proto)
            rec.dst_key = (dip, dport, proto)
            rec.tunnel = _tunnel_leg(flow, rec, sport)
        return rec


def _tunnel_leg(flow: Mapping, rec: FlowRecord, sport: int) -> str | None:
    """Which leg of a tunnelled connection a packet event is: "entry" where it left the source
    pod into the node's mTLS tunnel, "exit" where the destination node's Envoy opened it to the
    pod (its own source port, or none: refused at connect), else None."""
    if not rec.proto.startswith("TCP/"):
        return None
    mtls = flow.get("auth_type") == "MUTUAL_TLS"
    if rec.egress:
        return "entry" if mtls and rec.verdict == "FORWARDED" else None
    if flow.get("trace_observation_point") != "TO_ENDPOINT":
        return None
    if (mtls and rec.verdict == "FORWARDED") or (rec.verdict == "DROPPED" and sport == 0):
        return "exit"
    return None


class SockCorrelator:
    """Gives socket-LB events the connection that follows them.

    The socket hooks run before a socket has an address, so their events may name no source pod
    (and no source port). The connection's first packet leaves the same node, to the same backend
    address, right after: that packet's record names the pod and the 5-tuple. Feed records in
    the order one node reports them.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[str, tuple], list[FlowRecord]] = {}

    def feed(self, rec: FlowRecord) -> None:
        if rec.kind == "sock":
            if rec.conn is None and rec.verdict != "DROPPED":
                self._pending.setdefault((rec.node, rec.dst_key), []).append(rec)
            return
        if rec.kind != "l4" or not rec.egress or rec.dst_key is None:
            return
        waiting = self._pending.get((rec.node, rec.dst_key))
        while waiting:
            sock = waiting.pop(0)
            if 0 <= rec.t - sock.t <= CORRELATE_S:
                sock.conn = rec.conn
                if sock.src == UNKNOWN:
                    sock.src = rec.src
                break
        if waiting == []:
            self._pending.pop((rec.node, rec.dst_key), None)

    def expire(self, before: float) -> None:
        for key in list(self._pending):
            left = [r for r in self._pending[key] if r.t >= before]
            if left:
                self._pending[key] = left
            else:
                del self._pending[key]


# ---- aggregation ----------------------------------------------------------------------------
@dataclass
class _Conn:
    src: str = UNKNOWN
    dst: str = UNKNOWN
    proto: str = ""
    dropped: bool = False
    drop_flows: int = 0
    reasons: Counter = field(default_factory=Counter)
    proxied: bool = False
    first: float = math.inf
    last: float = 0.0


@dataclass
class _Edge:
    attempts: set = field(default_factory=set)  # connection keys (or flow uuids)
    dropped: set = field(default_factory=set)
    drops: int = 0
    reasons: Counter = field(default_factory=Counter)
    l7_requests: int = 0
    l7_4xx: int = 0
    l7_5xx: int = 0
    l7_denied: int = 0
    latencies: list = field(default_factory=list)
    protocols: set = field(default_factory=set)
    last: float = 0.0


def p99(values: Sequence[float]) -> float | None:
    """The nearest-rank 99th percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "n/a"
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _add(c: _Conn, r: FlowRecord) -> None:
    if c.src == UNKNOWN:
        c.src = r.src
    if c.dst == UNKNOWN:
        c.dst = r.dst
    c.first = min(c.first, r.t)
    c.last = max(c.last, r.t)
    if r.verdict == "DROPPED":
        c.dropped = True
        c.drop_flows += 1
        c.reasons[r.reason or "DROPPED"] += 1


def _pair_tunnel_exits(conns: dict[tuple, _Conn], exits: list[FlowRecord],
                       recs: list[FlowRecord]) -> None:
    """Fold each tunnel exit leg into the entry leg it continues: the same source and
    destination address and port, entered at most CORRELATE_S before (the tunnel changes the
    source port, so the 5-tuples differ). An exit with no entry in the window counts alone."""
    entries: dict[tuple, list[tuple]] = {}
    for r in sorted(recs, key=lambda r: r.t):
        if r.tunnel == "entry" and r.conn is not None:
            key = (r.conn[0], r.conn[2], r.conn[3], r.conn[4])
            queue = entries.setdefault(key, [])
            if r.conn not in queue:
                queue.append(r.conn)
    folded: dict[tuple, tuple] = {}  # an exit's own 5-tuple → the connection it joined
    for r in sorted(exits, key=lambda r: r.t):
        if r.conn is None:
            continue
        target = folded.get(r.conn) if r.conn[1] else None
        if target is None:
            queue = entries.get((r.conn[0], r.conn[2], r.conn[3], r.conn[4])) or []
            while queue and r.t - conns[queue[0]].first > CORRELATE_S:
                queue.pop(0)  # too old to be this one's entry
            if queue and conns[queue[0]].first <= r.t + 0.5:
                target = queue.pop(0)
            else:
                target = r.conn if r.conn[1] else ("exit", r.uuid)
                conns.setdefault(target, _Conn(proto=r.proto, first=r.t))
            if r.conn[1]:
                folded[r.conn] = target
        _add(conns[target], r)


def build_graph(records: Iterable[FlowRecord], inv: Inventory, window: float, now: float) -> dict:
    """Aggregate the records of the last `window` seconds (docs/ui.md: "How the numbers are
    computed")."""
    since = now - window
    recs = [r for r in records if r.t >= since]
    conns: dict[tuple, _Conn] = {}
    exits: list[FlowRecord] = []
    for r in recs:
        if r.kind != "l4" or r.conn is None:
            continue
        if r.tunnel == "exit":
            exits.append(r)
            continue
        _add(conns.setdefault(r.conn, _Conn(proto=r.proto, first=r.t)), r)
    _pair_tunnel_exits(conns, exits, recs)
    for r in recs:  # a connection the socket LB sent to the node's proxy: its L7 flows tell
        if r.kind == "sock" and r.verdict == "REDIRECTED" and r.conn in conns:
            conns[r.conn].proxied = True

    edges: dict[tuple[str, str], _Edge] = {}

    def edge(a: str, b: str) -> _Edge:
        return edges.setdefault((a, b), _Edge())

    unattributed = 0
    for key, c in conns.items():
        if c.src == UNKNOWN and c.dst == UNKNOWN:
            unattributed += c.drop_flows or 1
            continue
        if c.proxied:
            continue
        e = edge(c.src, c.dst)
        e.attempts.add(key)
        if c.dropped:
            e.dropped.add(key)
        e.drops += c.drop_flows
        e.reasons.update(c.reasons)
        e.protocols.add(c.proto)
        e.last = max(e.last, c.last)
    for r in recs:
        if r.kind == "sock" and r.svc:
            if r.src == UNKNOWN:
                unattributed += 1
                continue
            e = edge(r.src, r.svc)
            key = r.conn or r.uuid
            e.attempts.add(key)
            c = conns.get(r.conn) if r.conn else None
            if r.verdict == "DROPPED":
                e.dropped.add(key)
                e.drops += 1
                e.reasons[r.reason or "DROPPED"] += 1
            elif c is not None and c.dropped:
                e.dropped.add(key)
                e.drops += c.drop_flows
                e.reasons.update(c.reasons)
            e.protocols.add(r.proto)
            e.last = max(e.last, r.t)
        elif r.kind == "l4" and r.svc and r.conn and r.src != UNKNOWN:
            # a packet addressed to a service (it went around the socket LB)
            e = edge(r.src, r.svc)
            e.attempts.add(r.conn)
            if r.conn in conns and conns[r.conn].dropped:
                e.dropped.add(r.conn)
            e.protocols.add(r.proto)
            e.last = max(e.last, r.t)
        elif r.kind == "l7":
            for target in ([r.dst, r.svc] if r.svc else [r.dst]):
                e = edge(r.src, target)
                e.l7_requests += 1
                if r.verdict == "DROPPED":
                    e.l7_denied += 1
                    e.drops += 1
                    e.reasons[r.reason or "POLICY_DENIED"] += 1
                elif 400 <= r.code < 500:
                    e.l7_4xx += 1
                elif r.code >= 500:
                    e.l7_5xx += 1
                if r.latency_ms is not None and r.verdict != "DROPPED":
                    e.latencies.append(r.latency_ms)
                e.protocols.add(r.proto)
                e.last = max(e.last, r.t)

    out_edges = []
    seen: set[str] = set()
    for (a, b), e in sorted(edges.items()):
        if a == b == UNKNOWN:
            continue
        seen.update((a, b))
        if e.l7_requests:
            requests = e.l7_requests + len(e.dropped)
            errors = e.l7_4xx + e.l7_5xx + e.l7_denied + len(e.dropped)
            unit = "req/s"
        else:
            requests, errors, unit = len(e.attempts), len(e.dropped), "conn/s"
        lat = p99(e.latencies)
        top = e.reasons.most_common(1)
        out_edges.append({
            "id": f"{a}->{b}", "from": a, "to": b,
            "kind": "service" if b.startswith(SERVICE_PREFIX) else "workload",
            "requests": requests, "rate": requests / window, "unit": unit,
            "errors": errors, "errorRate": errors / requests if requests else 0.0,
            "p99Ms": lat, "p99": _fmt_ms(lat),
            "drops": e.drops, "dropReason": top[0][0] if top else None,
            "dropReasons": dict(e.reasons.most_common()),
            "connections": len(e.attempts), "droppedConnections": len(e.dropped),
            "l7": {"requests": e.l7_requests, "status4xx": e.l7_4xx, "status5xx": e.l7_5xx,
                   "denied": e.l7_denied} if e.l7_requests else None,
            "protocols": sorted(p for p in e.protocols if p),
            "lastSeen": _iso(e.last) if e.last else None,
        })

    nodes = _nodes(inv, seen, out_edges)
    links = [{"from": sid, "to": wid} for sid, s in sorted(inv.services.items())
             for wid in s["selects"] if wid in inv.workloads]
    return {"window": window, "generatedAt": _iso(now), "flowsInWindow": len(recs),
            "flowsPerSecond": len(recs) / window, "unattributed": unattributed,
            "nodes": nodes, "edges": out_edges, "links": links}


def _nodes(inv: Inventory, seen: set[str], edges: list[dict]) -> list[dict]:
    rate_in: Counter = Counter()
    rate_out: Counter = Counter()
    for e in edges:
        rate_out[e["from"]] += e["rate"]
        rate_in[e["to"]] += e["rate"]
    nodes = []
    for wid, w in sorted(inv.workloads.items()):
        nodes.append({
            "id": wid, "kind": "workload", "type": w["type"], "namespace": w["namespace"],
            "name": w["name"], "ready": w["ready"], "total": w["total"],
            "replicas": w["replicas"], "nodes": sorted(w["nodes"]), "pods": sorted(w["pods"]),
            "rateIn": rate_in[wid], "rateOut": rate_out[wid], "active": wid in seen})
    for sid, s in sorted(inv.services.items()):
        nodes.append({
            "id": sid, "kind": "service", "type": "Service", "namespace": s["namespace"],
            "name": s["name"], "clusterIP": s["clusterIP"], "ports": s["ports"],
            "selects": s["selects"], "rateIn": rate_in[sid], "rateOut": rate_out[sid],
            "active": sid in seen})
    known = set(inv.workloads) | set(inv.services)
    for nid in sorted(seen - known):
        if nid.startswith(SERVICE_PREFIX):
            ns, _, name = nid[len(SERVICE_PREFIX):].partition("/")
            nodes.append({"id": nid, "kind": "service", "type": "Service", "namespace": ns,
                          "name": name, "clusterIP": "", "ports": [], "selects": [],
                          "rateIn": rate_in[nid], "rateOut": rate_out[nid], "active": True,
                          "gone": True})
        elif "/" in nid:
            ns, _, name = nid.partition("/")
            nodes.append({"id": nid, "kind": "workload", "type": "Pod", "namespace": ns,
                          "name": name, "ready": 0, "total": 0, "replicas": 0, "nodes": [],
                          "pods": [], "rateIn": rate_in[nid], "rateOut": rate_out[nid],
                          "active": True, "gone": True})
        else:
            nodes.append({"id": nid, "kind": "reserved", "type": nid, "namespace": "",
                          "name": nid, "rateIn": rate_in[nid], "rateOut": rate_out[nid],
                          "active": True})
    return nodes


def involves(rec: FlowRecord, node_id: str) -> bool:
    return node_id in (rec.src, rec.dst, rec.svc)


def flow_item(rec: FlowRecord) -> dict:
    """A record for the flow list: the Hubble flow plus the graph's view of it."""
    return {"time": rec.flow.get("time") if rec.flow else _iso(rec.t), "from": rec.src,
            "to": rec.dst, "service": rec.svc, "verdict": rec.verdict, "kind": rec.kind,
            "node": rec.node, "summary": summary(rec), "dropReason": rec.reason, "flow": rec.flow}


def summary(rec: FlowRecord) -> str:
    f = rec.flow or {}
    if rec.kind == "l7":
        http = (f.get("l7") or {}).get("http") or {}
        lat = f" · {_fmt_ms(rec.latency_ms)}" if rec.latency_ms is not None else ""
        code = f" → {rec.code}" if rec.code else ""
        what = (f"{http.get('method') or ''} {http.get('url') or ''}".strip()
                or "malformed request")  # Envoy's codec refused it: no method, no URL
        return f"{http.get('protocol') or 'HTTP'} {what}{code}{lat}"
    ip = f.get("IP") or {}
    proto, sport, dport = _l4(f)
    if rec.kind == "sock":
        return f"socket LB {proto} {rec.orig} → {ip.get('destination', '')}:{dport}"
    flags = ""
    if proto == "TCP":
        names = list(((f.get("l4") or {}).get("TCP") or {}).get("flags") or {})
        flags = f" {','.join(names)}" if names else ""
    where = {"FROM_ENDPOINT": "egress", "TO_ENDPOINT": "ingress"}.get(
        str(f.get("trace_observation_point", "")), str(f.get("traffic_direction", "")).lower())
    if proto in ("TCP", "UDP", "SCTP"):
        return (f"{proto} {ip.get('source', '')}:{sport} → {ip.get('destination', '')}:{dport}"
                f"{flags} ({where})")
    return f"{proto or 'L3'} {ip.get('source', '')} → {ip.get('destination', '')} ({where})"
