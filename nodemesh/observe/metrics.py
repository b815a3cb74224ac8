"""Prometheus metrics of one node: flows, HTTP by workload, TCP connections and bytes, the
datapath's map fill levels, xDS pushes/ACKs/NACKs, reconcile latency and lost events.

Counters that follow flows are updated as each flow is added to the ring (`observe_flow`); the
rest is read when Prometheus scrapes (`AgentCollector`), from the datapath maps and the xDS server
the agent owns, so scraping costs nothing between scrapes.

Each connection is counted once: by the node of its source pod (the egress event), or, for a
connection from outside the node's pods, by the destination's node (the ingress event).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nodemesh.datapath.layout import Direction, Verdict
from nodemesh.observe.flow import (
    DROP_REASONS,
    EV_SOCK,
    FLOW_F_AUTH,
    FLOW_F_TUNNEL,
    PROTOCOLS,
    VERDICTS,
    FlowEvent,
    RawEvent,
)

# The `protocol` label, as `observe_flow` derives it from a flow's l4 key.
PROTOCOL_LABELS = {number: name.lower() for number, name in PROTOCOLS.items()}

# Where observe_event's label key lies in a raw event.
_KEY_OFFSETS = tuple(getattr(FlowEvent, f).offset for f in (
    "type", "verdict", "reason", "direction", "protocol", "flags"))
assert _KEY_OFFSETS == (8, 9, 10, 11, 28, 62), _KEY_OFFSETS  # the slices in observe_event
_DROPPED, _INGRESS, _SECURE = int(Verdict.DROPPED), int(Direction.INGRESS), int(
    FLOW_F_TUNNEL | FLOW_F_AUTH)


def _event_labels(typ: int, verdict_n: int, reason_n: int, direction: int, protocol: int,
                  flags: int) -> tuple[tuple[str, str, str, str], tuple | None]:
    """The flow-count key of an event of this kind, and (protocol, verdict, secure, ingress)
    when it is also a connection to count (None when it is not)."""
    verdict = VERDICTS.get(verdict_n, "VERDICT_UNKNOWN")
    proto = PROTOCOL_LABELS.get(protocol, "other")
    reason = DROP_REASONS.get(reason_n, "") if verdict_n == _DROPPED else ""
    counted = (verdict, "L3_L4", proto, reason)
    if typ == EV_SOCK or proto not in ("tcp", "udp"):
        return counted, None
    # Istio's label: "mutual_tls" for a connection carried in the tunnel (seen going in at
    # the source, or coming out authenticated at the destination), "none" otherwise.
    secure = "mutual_tls" if flags & _SECURE else "none"
    return counted, (proto, verdict, secure, direction == _INGRESS)


disable_created_metrics()  # `_created` series double the output and nobody here reads them

PAIR = ["source_namespace", "source_workload", "destination_namespace", "destination_workload"]
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def workload_of(ep: Mapping[str, Any] | None) -> tuple[str, str]:
    """(namespace, workload) of a flow endpoint: its controller (Deployment), else its pod, else
    the reserved identity (world, host, remote-node)."""
    ep = ep or {}
    ns = ep.get("namespace") or ""
    for w in ep.get("workloads") or []:
        return ns, str(w.get("name"))
    if ep.get("pod_name"):
        return ns, str(ep["pod_name"])
    for lbl in ep.get("labels") or []:
        if lbl.startswith("reserved:"):
            return "", lbl.split(":", 1)[1]
    return "", "unknown"


class AgentMetrics:
    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Counted by plain tuples as flows arrive (cheap: the datapath's events are not even
        # decoded), turned into labelled series when Prometheus scrapes (`AgentCollector`).
        self.flow_counts: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        self.conn_counts: collections.Counter[tuple[str, int, int, str, str]] = \
            collections.Counter()
        self.agent_events: collections.Counter[str] = collections.Counter()
        self._event_labels: dict[bytes, tuple] = {}  # see observe_event
        self.local_ips: frozenset[bytes] = frozenset()  # this node's pod IPs (4 raw bytes each)
        self.http_requests = Counter(
            "nodemesh_http_requests", "HTTP requests through this node's proxy.",
            [*PAIR, "destination_service", "method", "code"], registry=r)
        self.http_duration = Histogram(
            "nodemesh_http_request_duration_seconds", "HTTP request duration at the proxy.",
            [*PAIR, "destination_service"], buckets=HTTP_BUCKETS, registry=r)
        self.reconcile = Histogram(
            "nodemesh_agent_reconcile_seconds", "How long one reconcile round took.", ["loop"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r)
        self.flow_ring = Gauge("nodemesh_flow_ring_flows", "Flows held in the ring.", registry=r)

    def observe(self, entry: Any) -> None:
        """A new entry of the flow ring: a flow (dict), an access-log entry kept raw or a raw
        datapath event (`RawEvent`)."""
        if type(entry) is RawEvent:  # the common case first: it runs once per kernel event
            self.observe_event(entry)
        elif isinstance(entry, dict):
            if entry.get("Type") == "AGENT":
                self.agent_events[str((entry.get("agent_event") or {}).get("type", ""))] += 1
                return
            self.observe_flow(entry)
        elif hasattr(entry, "metric_labels"):
            self.observe_access_log(entry)
        else:
            self.observe_event(entry)

    def observe_access_log(self, entry: Any) -> None:
        """An L7 flow kept raw (`nodemesh.agent.l7flows.AccessLogFlow`): counted exactly as
        `observe_flow` counts the flow it would build."""
        src, dst, svc, method, code, seconds, denied = entry.metric_labels()
        self.flow_counts[("DROPPED" if denied else "FORWARDED", "L7", "http",
                          "POLICY_DENIED" if denied else "")] += 1
        sns, sw = workload_of(src)
        dns, dw = workload_of(dst)
        svc_name = f"{svc[0]}/{svc[1]}" if svc else ""
        self.http_requests.labels(sns, sw, dns, dw, svc_name, method, str(code)).inc()
        self.http_duration.labels(sns, sw, dns, dw, svc_name).observe(seconds)

    def observe_event(self, ev: Any) -> None:
        """A datapath event: it runs for every event the kernel sends (several per new
        connection), so it reads the few bytes it needs and looks its labels up once per
        (type, verdict, reason, direction, protocol, flags)."""
        raw = getattr(ev, "raw", None)
        if raw is not None:
            key = raw[8:12] + raw[28:29] + raw[62:63]  # offsets as _KEY_OFFSETS (checked)
        else:
            key = bytes((ev.type, ev.verdict, ev.reason, ev.direction, ev.protocol, ev.flags))
        labels = self._event_labels.get(key)
        if labels is None:
            labels = self._event_labels[key] = _event_labels(*key)
        counted, conn = labels
        self.flow_counts[counted] += 1
        if conn is None:
            return
        proto, verdict, secure, ingress = conn
        # A connection is counted where it starts: at the source pod's egress; a connection
        # from outside this node's pods at the destination's ingress.
        if ingress and verdict != "DROPPED" and ev.saddr_bytes in self.local_ips:
            return
        src, dst = ev.identities
        self.conn_counts[(proto, src, dst, verdict, secure)] += 1

    def observe_flow(self, flow: Mapping[str, Any]) -> None:
        l4 = flow.get("l4") or {}
        l7 = flow.get("l7") or {}
        proto = "http" if "http" in l7 else next(iter(l4), "other").lower()
        verdict = str(flow.get("verdict", ""))
        self.flow_counts[(verdict, str(flow.get("Type", "")), proto,
                          str(flow.get("drop_reason_desc", "")))] += 1
        if flow.get("Type") != "L7":
            return
        sns, sw = workload_of(flow.get("source"))
        dns, dw = workload_of(flow.get("destination"))
        http = l7.get("http") or {}
        svc = flow.get("destination_service") or {}
        svc_name = f"{svc.get('namespace')}/{svc.get('name')}" if svc else ""
        self.http_requests.labels(sns, sw, dns, dw, svc_name, str(http.get("method", "")),
                                  str(http.get("code", ""))).inc()
        self.http_duration.labels(sns, sw, dns, dw, svc_name).observe(
            int(l7.get("latency_ns") or 0) / 1e9)

    def timed(self, loop: str) -> _Timer:
        return _Timer(self.reconcile.labels(loop))

    def expose(self) -> bytes:
        return generate_latest(self.registry)


class _Timer:
    def __init__(self, hist: Any) -> None:
        self.hist = hist

    def __enter__(self) -> None:
        self.t0 = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.hist.observe(time.monotonic() - self.t0)


class AgentCollector(Collector):
    """Values read at scrape time from the agent's parts (each source is a callable, so a part
    that is not there — no datapath, no proxy — simply reports nothing)."""

    def __init__(self, node: str, *, metrics: AgentMetrics | None = None,
                 workloads: Callable[[int], tuple[str, str]] | None = None,
                 maps: Callable[[], Iterable[tuple[str, int, int]]] | None = None,
                 l4_bytes: Callable[[], Iterable[tuple[dict[str, str], int, int]]] | None = None,
                 xds: Callable[[], Mapping[str, Any]] | None = None,
                 lost: Callable[[], Mapping[str, int]] | None = None,
                 refused: Callable[[], Mapping[str, int]] | None = None,
                 dns: Callable[[], Mapping[str, int]] | None = None,
                 drops: Callable[[], Mapping[tuple[str, str], int]] | None = None) -> None:
        self.node = node
        self.drops = drops
        self.metrics, self.workloads = metrics, workloads
        self.maps, self.l4_bytes, self.xds, self.lost = maps, l4_bytes, xds, lost
        self.dns = dns
        self.refused = refused

    def collect(self) -> Iterable[Any]:
        if self.metrics is not None:
            flows = CounterMetricFamily("nodemesh_flows", "Flows seen by this node.",
                                        labels=["verdict", "type", "protocol", "drop_reason"])
            for key, n in sorted(self.metrics.flow_counts.items()):
                flows.add_metric(list(key), n)
            yield flows
            agent = CounterMetricFamily("nodemesh_agent_events",
                                        "Agent events (`nodemesh observe --type agent`).",
                                        labels=["type"])
            for kind, n in sorted(self.metrics.agent_events.items()):
                agent.add_metric([kind], n)
            yield agent
            name = self.workloads or (lambda ident: ("", f"identity-{ident}"))
            fams = {
                "tcp": CounterMetricFamily(
                    "nodemesh_tcp_connections",
                    "New TCP connections (one per connection, cluster-wide).",
                    labels=[*PAIR, "verdict", "connection_security_policy"]),
                "udp": CounterMetricFamily(
                    "nodemesh_udp_flows", "New UDP flows (one per flow, cluster-wide).",
                    labels=[*PAIR, "verdict", "connection_security_policy"]),
            }
            totals: collections.Counter[tuple] = collections.Counter()
            for (proto, src, dst, verdict, secure), n in self.metrics.conn_counts.items():
                totals[(proto, *name(src), *name(dst), verdict, secure)] += n
            for (proto, *labels), n in sorted(totals.items()):
                fams[proto].add_metric(labels, n)
            yield from fams.values()
        if self.maps:
            entries = GaugeMetricFamily("nodemesh_bpf_map_entries", "Entries in a datapath map.",
                                        labels=["map"])
            cap = GaugeMetricFamily("nodemesh_bpf_map_capacity", "Capacity of a datapath map.",
                                    labels=["map"])
            fill = GaugeMetricFamily("nodemesh_bpf_map_fill_ratio",
                                     "Entries / capacity of a datapath map.", labels=["map"])
            for name, n, mx in self.maps():
                entries.add_metric([name], n)
                cap.add_metric([name], mx)
                fill.add_metric([name], n / mx if mx else 0.0)
            yield from (entries, cap, fill)
        if self.l4_bytes:
            b = CounterMetricFamily("nodemesh_l4_bytes", "Bytes seen by the datapath, per "
                                    "workload pair and verdict.",
                                    labels=[*PAIR, "protocol", "verdict", "direction"])
            p = CounterMetricFamily("nodemesh_l4_packets", "Packets seen by the datapath, per "
                                    "workload pair and verdict.",
                                    labels=[*PAIR, "protocol", "verdict", "direction"])
            for labels, nbytes, npackets in self.l4_bytes():
                values = [labels[k] for k in (*PAIR, "protocol", "verdict", "direction")]
                b.add_metric(values, nbytes)
                p.add_metric(values, npackets)
            yield from (b, p)
        if self.xds:
            st = self.xds()
            for kind in ("responses", "acks", "nacks"):
                m = CounterMetricFamily(f"nodemesh_xds_{kind}",
                                        f"xDS {kind} (responses = pushes) by resource type.",
                                        labels=["type"])
                for type_url, n in (st.get(kind) or {}).items():
                    m.add_metric([type_url.rsplit(".", 1)[-1]], n)
                yield m
        if self.lost:
            lost = CounterMetricFamily("nodemesh_lost_events",
                                       "Events that could not be recorded, by where they were lost.",
                                       labels=["source"])
            for source, n in self.lost().items():
                lost.add_metric([source], n)
            yield lost
        if self.refused:
            refused = GaugeMetricFamily(
                "nodemesh_map_refused",
                "Objects left out of a datapath map that had no room for them (services, "
                "pods); raise the map's size with `nodemesh up --map-size MAP=N`.",
                labels=["map"])
            for name, n in sorted(self.refused().items()):
                refused.add_metric([name], n)
            yield refused
        if self.drops:
            drops = CounterMetricFamily(
                "nodemesh_drops", "Packets the datapath dropped, by reason (Hubble's drop "
                "reason names) and direction, as the kernel counts them: every drop, also those "
                "without a flow event (a DNS flood's, sampled).", labels=["reason", "direction"])
            for (reason, direction), n in sorted(self.drops().items()):
                drops.add_metric([reason, direction], n)
            yield drops
        if self.dns:
            dns = CounterMetricFamily("nodemesh_dns_queries",
                                      "Queries to the node-local DNS: answered, or refused because "
                                      "the client was over its per-client budget.",
                                      labels=["result"])
            for result, n in sorted(self.dns().items()):
                dns.add_metric([result], n)
            yield dns
