"""Services as one node's datapath sees them: ClusterIP ports → ready backends (pure).

A service port's ``targetPort`` may name a container port: it resolves per pod, as in
Kubernetes, so the backends of one service port may listen on different numbers. A Service
without a selector takes its backends from its EndpointSlices instead
(`nodemesh.model.endpointslice.slice_backends`). Pods on an unreachable node (its lease
expired, `nodemesh.model.nodes`) are no backend. Ports of services that the node Envoy takes
over (routes apply) carry that listener's port.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nodemesh.datapath.lb import LbService
from nodemesh.model.endpointslice import selects_pods, slice_backends, slices_by_service
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


def backend_pods(pods: Iterable[Mapping[str, Any]], unreachable: frozenset[str] = frozenset()
                 ) -> list[Mapping[str, Any]]:
    """The pods that may be a Service's backend: ready, not terminating, with an address, and
    not on an unreachable node."""
    return [p for p in pods if pod_ready(p) and not is_deleting(p)
            and (p.get("status") or {}).get("podIP")
            and (p.get("spec") or {}).get("nodeName") not in unreachable]


def lb_services(services: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
                redirects: Mapping[Any, int] | None = None,
                slices: Iterable[Mapping[str, Any]] = (),
                unreachable: frozenset[str] = frozenset()) -> tuple[list[LbService], ServiceNames]:
    """Every ClusterIP service port → an LbService with its ready backends, and the service
    each (ClusterIP, port) belongs to. A port in `redirects` (keys with .ip/.port/.protocol)
    goes to that node Envoy listener port instead. A Service without a selector balances to
    the ready endpoints of its `slices`; nothing on an `unreachable` node is a backend."""
    proxy_ports = {(k.ip, k.port, k.protocol): v for k, v in (redirects or {}).items()}
    pods = backend_pods(pods, unreachable)
    by_service = slices_by_service(slices)
    out: list[LbService] = []
    names: ServiceNames = {}
    for svc in services:
        spec, meta = svc["spec"], svc["metadata"]
        vip = spec.get("clusterIP")
        if not vip or vip == "None":
            continue
        from_pods = selects_pods(svc)
        selected = [p for p in pods if p["metadata"]["namespace"] == meta["namespace"]
                    and service_selects(spec.get("selector"), p["metadata"].get("labels") or {})
                    ] if from_pods else []
        own_slices = [] if from_pods else by_service.get((meta["namespace"], meta["name"]), [])
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
            backends += [(ip, n) for ip, n, _ in slice_backends(
                own_slices, port.get("name") or "", proto, unreachable)]
            out.append(LbService(vip=vip, port=port["port"], proto=proto,
                                 backends=sorted(set(backends)), algorithm=algorithm,
                                 affinity_timeout=affinity,
                                 l7_proxy_port=proxy_ports.get((vip, port["port"], proto))))
            names[(vip, port["port"])] = (meta["namespace"], meta["name"])
    return out, names
