"""L7 visibility without enforcement: in-memory routes for annotated Services (pure).

A Service (or its Namespace) annotated `nodemesh.io/l7-visibility: "true"` gets, for each of its
HTTP ports that no route covers, an HTTPRoute that sends everything to the Service itself: its
requests then cross the client node's Envoy and become L7 flows, while nothing is filtered or
rerouted. The agent adds these routes to the stored ones before translating; they are not
stored and have no status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VISIBILITY_ANNOTATION = "nodemesh.io/l7-visibility"
_HTTP_APP_PROTOCOLS = {"http", "h2c", "kubernetes.io/h2c", "http2"}


def _wants_visibility(obj: Mapping[str, Any] | None) -> bool:
    value = ((obj or {}).get("metadata", {}).get("annotations") or {}).get(VISIBILITY_ANNOTATION)
    return str(value).lower() in ("true", "http")


def _http_port(port: Mapping[str, Any]) -> bool:
    """A port that surely carries HTTP: parsing anything else as HTTP would break it."""
    if port.get("protocol", "TCP") != "TCP":
        return False
    if port.get("appProtocol"):
        return str(port["appProtocol"]).lower() in _HTTP_APP_PROTOCOLS
    name = str(port.get("name") or "")
    return name == "http" or name.startswith(("http-", "http2")) or port.get("port") in (80, 8080)


def visibility_routes(services: list[dict], namespaces: list[dict],
                      routes: list[dict]) -> list[dict]:
    """L7 visibility without enforcement (opt-in with the annotation
    `nodemesh.io/l7-visibility: "true"` on a Service or its Namespace): for each HTTP port of
    such a service that no route covers, an in-memory HTTPRoute that sends everything to the
    service itself, so its requests cross the client node's Envoy and become L7 flows while
    nothing is filtered or rerouted. These routes are not stored and have no status."""
    by_ns = {n["metadata"]["name"]: n for n in namespaces}
    routed = {((p.get("namespace") or r["metadata"]["namespace"]), p.get("name"))
              for r in routes for p in r["spec"].get("parentRefs") or []}
    out = []
    for svc in services:
        meta = svc["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if (ns, name) in routed or (svc["spec"].get("clusterIP") or "None") == "None":
            continue
        if not (_wants_visibility(svc) or _wants_visibility(by_ns.get(ns))):
            continue
        for port in svc["spec"].get("ports") or []:
            if not _http_port(port):
                continue
            out.append({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": f"l7-visibility-{name}-{port['port']}", "namespace": ns,
                             "uid": f"visibility-{meta.get('uid', '')}-{port['port']}",
                             "generation": 1,
                             "creationTimestamp": meta.get("creationTimestamp", "")},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name,
                                         "port": port["port"]}],
                         "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                    "backendRefs": [{"group": "", "kind": "Service", "name": name,
                                                     "port": port["port"], "weight": 1}]}]},
            })
    return out
