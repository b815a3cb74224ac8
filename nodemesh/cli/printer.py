"""Printing flows as `hubble observe` does: compact lines (coloured on a terminal), JSON, table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

from nodemesh.text import table

COLOURS = {"FORWARDED": "\033[32m", "DROPPED": "\033[31m", "REDIRECTED": "\033[33m",
           "TRANSLATED": "\033[36m"}
RESET = "\033[0m"


def _when(flow: Mapping) -> str:
    t = str(flow.get("time", ""))
    try:
        base, _, frac = t.rstrip("Z").partition(".")
        dt = datetime.fromisoformat(base).replace(tzinfo=UTC)
        return dt.strftime("%b %d %H:%M:%S") + "." + (frac + "000")[:3]
    except ValueError:
        return t


def endpoint_text(ep: Mapping, ip: str, port: int | None) -> str:
    where = f"{ep['namespace']}/{ep['pod_name']}" if ep.get("pod_name") else ip
    if not ep.get("pod_name"):
        names = [lbl.split(":", 1)[1] for lbl in ep.get("labels") or [] if lbl.startswith("reserved:")]
        if names:
            where = f"{ip} ({names[0]})"
    port_text = f":{port}" if port else ""
    ident = f" (ID:{ep['identity']})" if ep.get("identity") else ""
    return f"{where}{port_text}{ident}"


def _ports(flow: Mapping) -> tuple[int | None, int | None]:
    for proto in ("TCP", "UDP"):
        l4 = (flow.get("l4") or {}).get(proto)
        if l4:
            return l4.get("source_port"), l4.get("destination_port")
    return None, None


def _observation(flow: Mapping) -> str:
    if flow.get("Type") == "AGENT":
        return "agent-event"
    if flow.get("Type") == "L7":
        return "http-request" if (flow.get("l7") or {}).get("type") == "REQUEST" else "http-response"
    if flow.get("verdict") == "DROPPED":
        return str(flow.get("drop_reason_desc", "DROPPED")).lower().replace("_", "-")
    if flow.get("socket_translation"):
        return "to-service"
    return "to-endpoint" if flow.get("traffic_direction") == "INGRESS" else "from-endpoint"


def compact(flow: Mapping, colour: bool = False) -> str:
    node = f"[{flow['node_name']}] " if flow.get("node_name") else ""
    if flow.get("Type") == "AGENT":
        ev = flow.get("agent_event") or {}
        return f"{_when(flow)} {node}agent {ev.get('type', '')}: {ev.get('message', '')}"
    ip = flow.get("IP") or {}
    sport, dport = _ports(flow)
    src = endpoint_text(flow.get("source") or {}, ip.get("source", ""), sport)
    dst = endpoint_text(flow.get("destination") or {}, ip.get("destination", ""), dport)
    svc = flow.get("destination_service")
    if svc:
        dst += f" [svc {svc['namespace']}/{svc['name']}]"
    verdict = str(flow.get("verdict", ""))
    if colour and verdict in COLOURS:
        verdict = COLOURS[verdict] + verdict + RESET
    return (f"{_when(flow)} {node}{src} -> {dst} {_observation(flow)} {verdict} "
            f"({flow.get('Summary', '')})")


def as_json(flow: Mapping) -> str:
    """One line, shaped like `hubble observe -o json` (a GetFlowsResponse)."""
    return json.dumps({"flow": flow, "node_name": flow.get("node_name", ""),
                       "time": flow.get("time", "")}, separators=(",", ":"))


def as_table(flows: list[Mapping]) -> str:
    rows = []
    for f in flows:
        ip = f.get("IP") or {}
        sport, dport = _ports(f)
        rows.append([_when(f), str(f.get("node_name", "")),
                     endpoint_text(f.get("source") or {}, ip.get("source", ""), sport),
                     endpoint_text(f.get("destination") or {}, ip.get("destination", ""), dport),
                     _observation(f), str(f.get("verdict", "")), str(f.get("Summary", ""))])
    return table(["TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"], rows)
