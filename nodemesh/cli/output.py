"""Printing resources the way kubectl does: tables with AGE, wide columns, YAML and JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import yaml

from nodemesh.model.nodes import node_status_text
from nodemesh.text import table


def age(ts: str | None, now: datetime | None = None) -> str:
    if not ts:
        return "<unknown>"
    try:
        t = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    return duration_text(((now or datetime.now(UTC)) - t).total_seconds())


def duration_text(seconds: float) -> str:
    """A span as kubectl prints ages: 45s, 3m20s, 5h12m, 12d."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" + (f"{s % 60}s" if s < 600 and s % 60 else "")
    if s < 86400:
        return f"{s // 3600}h" + (f"{(s % 3600) // 60}m" if s < 36000 and s % 3600 >= 60 else "")
    return f"{s // 86400}d"


def to_yaml(obj: object) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)


def to_json(obj: object) -> str:
    return json.dumps(obj, indent=2)


def order_object(obj: dict) -> dict:
    """apiVersion, kind, metadata, spec, status first, as Kubernetes prints them."""
    keys = ["apiVersion", "kind", "metadata", "spec", "status"]
    out = {k: obj[k] for k in keys if k in obj}
    out.update({k: v for k, v in obj.items() if k not in out})
    return out


def pod_status_text(pod: dict) -> str:
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    st = pod.get("status") or {}
    phase = st.get("phase", "Pending")
    if st.get("reason") and phase in ("Failed", "Pending") and st.get("message"):
        return st["reason"]
    for c in st.get("containerStatuses") or []:
        state = c.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason") not in (None, "ContainerCreating"):
            return state["waiting"]["reason"]
        if "terminated" in state and phase not in ("Succeeded",):
            return state["terminated"].get("reason", "Error")
    if phase == "Pending" and st.get("podIP"):
        return "ContainerCreating"
    if phase == "Succeeded":
        return "Completed"
    return phase


def pod_ready_text(pod: dict) -> str:
    st = (pod.get("status") or {}).get("containerStatuses") or []
    total = len(pod["spec"].get("containers") or [])
    return f"{sum(1 for c in st if c.get('ready'))}/{total}"


def pod_restarts(pod: dict) -> str:
    st = (pod.get("status") or {}).get("containerStatuses") or []
    return str(sum(int(c.get("restartCount", 0)) for c in st))


def service_ports(svc: dict) -> str:
    return ",".join(f"{p['port']}/{p.get('protocol', 'TCP')}" for p in svc["spec"].get("ports") or [])


def node_ready(node: dict) -> str:
    """Ready or NotReady, from the Ready condition the node lifecycle controller keeps (the
    lease: docs/agent.md, "Node leases")."""
    return node_status_text(node)


def _selector_text(sel: dict | None) -> str:
    if not sel:
        return "<none>"
    parts = [f"{k}={v}" for k, v in (sel.get("matchLabels") or {}).items()]
    for e in sel.get("matchExpressions") or []:
        vals = ",".join(e.get("values") or [])
        parts.append(f"{e['key']} {e['operator']} ({vals})" if vals else f"{e['operator']} {e['key']}")
    return ",".join(parts) or "<none>"


def _route_accepted(route: dict) -> str:
    parents = (route.get("status") or {}).get("parents") or []
    if not parents:
        return "Unknown"
    for p in parents:
        for c in p.get("conditions") or []:
            if c.get("type") == "Accepted" and c.get("status") != "True":
                return f"False ({c.get('reason')})"
    return "True"


Columns = tuple[list[str], Callable[[dict], list[str]], list[str], Callable[[dict], list[str]]]


def columns(kind: str) -> Columns:
    """(headers, row, wide extra headers, wide extra row) for a kind."""
    created = lambda o: age(o["metadata"].get("creationTimestamp"))  # noqa: E731
    name = lambda o: o["metadata"]["name"]  # noqa: E731
    if kind == "Pod":
        return (["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
                lambda o: [name(o), pod_ready_text(o), pod_status_text(o), pod_restarts(o),
                           created(o)],
                ["IP", "NODE"],
                lambda o: [(o.get("status") or {}).get("podIP") or "<none>",
                           o["spec"].get("nodeName") or "<none>"])
    if kind == "Deployment":
        def dep(o: dict) -> list[str]:
            st = o.get("status") or {}
            return [name(o), f"{st.get('readyReplicas', 0)}/{o['spec'].get('replicas', 1)}",
                    str(st.get("updatedReplicas", 0)), str(st.get("availableReplicas", 0)),
                    created(o)]
        return (["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"], dep,
                ["SELECTOR"], lambda o: [_selector_text(o["spec"].get("selector"))])
    if kind == "Service":
        return (["NAME", "TYPE", "CLUSTER-IP", "PORT(S)", "AGE"],
                lambda o: [name(o), o["spec"].get("type", "ClusterIP"),
                           o["spec"].get("clusterIP") or "<none>", service_ports(o), created(o)],
                ["SELECTOR"],
                lambda o: [",".join(f"{k}={v}" for k, v in (o["spec"].get("selector") or {}).items())
                           or "<none>"])
    if kind == "Node":
        def addr(o: dict) -> str:
            for a in (o.get("status") or {}).get("addresses") or []:
                if a.get("type") == "InternalIP":
                    return a["address"]
            return "<none>"
        return (["NAME", "STATUS", "AGE"], lambda o: [name(o), node_ready(o), created(o)],
                ["INTERNAL-IP", "POD-CIDR"], lambda o: [addr(o), o["spec"].get("podCIDR", "")])
    if kind == "Lease":
        def renewed(o: dict) -> list[str]:
            spec = o.get("spec") or {}
            rt = spec.get("renewTime") or ""
            return [f"{spec.get('leaseDurationSeconds', '')}s",
                    age(rt.split(".")[0] + "Z" if "." in rt else rt) + " ago" if rt else "never"]
        return (["NAME", "HOLDER", "AGE"],
                lambda o: [name(o), (o.get("spec") or {}).get("holderIdentity") or "<none>",
                           created(o)],
                ["DURATION", "RENEWED"], renewed)
    if kind == "EndpointSlice":
        def eps(o: dict) -> list[str]:
            ports = ",".join(str(p.get("port", "<unset>")) for p in o.get("ports") or [])
            addrs = [e["addresses"][0] for e in o.get("endpoints") or [] if e.get("addresses")]
            shown = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
            return [name(o), o.get("addressType", ""), ports or "<unset>", shown or "<unset>",
                    created(o)]
        return (["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"], eps,
                ["SERVICE"], lambda o: [(o["metadata"].get("labels") or {}).get(
                    "kubernetes.io/service-name", "<none>")])
    if kind == "Namespace":
        return (["NAME", "STATUS", "AGE"], lambda o: [name(o), "Active", created(o)], [],
                lambda o: [])
    if kind == "NetworkPolicy":
        return (["NAME", "POD-SELECTOR", "AGE"],
                lambda o: [name(o), _selector_text(o["spec"].get("podSelector")), created(o)],
                [], lambda o: [])
    if kind in ("HTTPRoute", "GRPCRoute"):
        return (["NAME", "HOSTNAMES", "ACCEPTED", "AGE"],
                lambda o: [name(o), ",".join(o["spec"].get("hostnames") or []) or "<none>",
                           _route_accepted(o), created(o)],
                ["PARENTS"],
                lambda o: [",".join(p["name"] for p in o["spec"].get("parentRefs") or [])])
    if kind == "Identity":
        return (["ID", "LABELS", "AGE"],
                lambda o: [name(o), ",".join(f"{k}={v}" for k, v in
                                             sorted((o["spec"].get("labels") or {}).items())),
                           created(o)], [], lambda o: [])
    return (["NAME", "AGE"], lambda o: [name(o), created(o)], [], lambda o: [])


def print_objects(objs: list[dict], kind: str, output: str | None, all_namespaces: bool,
                  namespaced: bool, out=sys.stdout) -> None:
    if output in ("yaml", "json"):
        items = [order_object(o) for o in objs]
        doc: object = items[0] if len(items) == 1 and getattr(objs, "single", False) else (
            {"apiVersion": "v1", "kind": "List", "items": items})
        out.write(to_yaml(doc) if output == "yaml" else to_json(doc) + "\n")
        return
    if output == "name":
        for o in objs:
            out.write(f"{o['kind'].lower()}/{o['metadata']['name']}\n")
        return
    headers, row, wide_h, wide_row = columns(kind)
    headers = list(headers)
    rows = []
    for o in objs:
        r = row(o)
        if output == "wide":
            r += wide_row(o)
        if all_namespaces and namespaced:
            r = [o["metadata"].get("namespace", ""), *r]
        rows.append(r)
    if output == "wide":
        headers += wide_h
    if all_namespaces and namespaced:
        headers = ["NAMESPACE", *headers]
    out.write(table(headers, rows) + "\n")


class Single(list):
    """A one-item result of `get KIND NAME`: printed as the object, not as a List."""

    single = True
