"""Services as one node's datapath sees them: ClusterIP ports → ready backends (pure).

A service port's ``targetPort`` may name a container port: it resolves per pod, as in
Kubernetes, so the backends of one service port may listen on different numbers. Ports of
services that the node Envoy takes over (routes apply) carry that listener's port.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nodemesh.datapath.lb import LbService
from nodemesh.model.labels import service_selects
from nodemesh.model.workloads import is_deleting, pod_ready

ServiceNames = dict[tuple[str, int], tuple[str, str]]  # (ClusterIP, port) -> (namespace, name)


def named_ports(pod: Mapping[str, Any]) -> dict[str, tuple[tuple[str, int], ...]]:
    """A pod's named container ports: name → ((protocol, number), ...)."""
    out: dict[str, list[tuple[str, int]]] = {}
    for c in pod["spec"].get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name"):
                out.setdefault(p["name"], []).append((p.get("protocol", "TCP"), p["containerPort"]))
    return {k: tuple(v) for k, v in out.items()}


def resolve_target_port(pod: Mapping[str, Any], port: Mapping[str, Any]) -> int | None:
    """A service port's targetPort on one pod (a name resolves per pod, as Kubernetes does);
    None when the pod has no container port of that name and protocol."""
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    proto = port.get("protocol", "TCP")
    for c in pod["spec"].get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target and p.get("protocol", "TCP") == proto:
                return int(p["containerPort"])
    return None


def lb_services(services: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
                redirects: Mapping[Any, int] | None = None) -> tuple[list[LbService], ServiceNames]:
    """Every ClusterIP service port → an LbService with its ready backends, and the service
    each (ClusterIP, port) belongs to. A port in `redirects` (keys with .ip/.port/.protocol)
    goes to that node Envoy listener port instead."""
    proxy_ports = {(k.ip, k.port, k.protocol): v for k, v in (redirects or {}).items()}
    pods = list(pods)
    out: list[LbService] = []
    names: ServiceNames = {}
    for svc in services:
        spec, meta = svc["spec"], svc["metadata"]
        vip = spec.get("clusterIP")
        if not vip or vip == "None":
            continue
        selected = [p for p in pods if p["metadata"]["namespace"] == meta["namespace"]
                    and pod_ready(p) and not is_deleting(p) and (p.get("status") or {}).get("podIP")
                    and service_selects(spec.get("selector"), p["metadata"].get("labels") or {})]
        annotations = meta.get("annotations") or {}
        algorithm = annotations.get("service.cilium.io/lb-algorithm", "random")
        affinity = None
        if spec.get("sessionAffinity") == "ClientIP":
            affinity = int(((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
                           .get("timeoutSeconds", 10800))
        for port in spec.get("ports") or []:
            backends = []
            for p in selected:
                target = resolve_target_port(p, port)
                if target:
                    backends.append((p["status"]["podIP"], target))
            proto = port.get("protocol", "TCP")
            out.append(LbService(vip=vip, port=port["port"], proto=proto,
                                 backends=sorted(set(backends)), algorithm=algorithm,
                                 affinity_timeout=affinity,
                                 l7_proxy_port=proxy_ports.get((vip, port["port"], proto))))
            names[(vip, port["port"])] = (meta["namespace"], meta["name"])
    return out, names
