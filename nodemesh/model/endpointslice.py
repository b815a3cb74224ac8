"""Schema of EndpointSlice (discovery.k8s.io/v1), and which slice endpoints back a Service (pure).

A Service without a selector gets no endpoints from pods; its backends are whatever the
EndpointSlices labelled ``kubernetes.io/service-name: <service>`` in its namespace list (written
by the user or by another controller), as on Kubernetes. Only IPv4 slices are accepted
(``addressType: IPv4``; nodemesh is IPv4-only). A slice without the label belongs to no Service.

`slice_backends` is the one place that reads slices for load balancing: the socket LB
(`nodemesh.node.services`) and the node Envoy's clusters (`nodemesh.route`) both use it, so the
two agree on which addresses are backends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from nodemesh.model.common import PORT
from nodemesh.model.labels import validate_label_key
from nodemesh.model.names import check_dns1123_label, check_dns1123_subdomain
from nodemesh.model.schema import (
    AnyValue,
    Bool,
    Ctx,
    Hook,
    ListOf,
    MapOf,
    Obj,
    Path,
    Str,
    format_path,
    opt,
    req,
)
from nodemesh.model.workloads import PROTOCOL

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MAX_ENDPOINTS = 1000  # Kubernetes' limit per slice
MAX_PORTS = 100


def check_ipv4(value: str) -> str | None:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return f'must be an IPv4 address (got "{value}")'
    if ip.version != 4:
        return "an IPv6 address is not supported (nodemesh is IPv4-only)"
    if ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_multicast:
        return f'may not be an unspecified, loopback, link-local or multicast address (got "{value}")'
    return None


ENDPOINT_CONDITIONS = Obj({"ready": Bool(), "serving": Bool(), "terminating": Bool()})

TARGET_REF = Obj({
    "apiVersion": Str(), "kind": Str(), "namespace": Str(), "name": Str(), "uid": Str(),
    "resourceVersion": Str(), "fieldPath": Str(),
})

ENDPOINT = Obj({
    # Kubernetes allows 1-100 addresses and uses the first; so do we.
    "addresses": req(ListOf(Str(validator=check_ipv4), min_items=1, max_items=100)),
    "conditions": ENDPOINT_CONDITIONS,
    "hostname": Str(validator=check_dns1123_label),
    "nodeName": Str(validator=check_dns1123_subdomain),
    "zone": Str(),
    "targetRef": TARGET_REF,
    "hints": AnyValue(),  # topology hints: accepted, no effect (every node balances to all)
    "deprecatedTopology": MapOf(Str()),
})

ENDPOINT_PORT = Obj({
    "name": Str(validator=lambda v: None if v == "" else check_dns1123_label(v)),
    "port": PORT,
    "protocol": opt(PROTOCOL, "TCP"),
    "appProtocol": Str(validator=validate_label_key),
})


def _ports_unique(obj: dict, path: Path, ctx: Ctx) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, p in enumerate(obj.get("ports") or []):
        key = (p.get("name") or "", p.get("protocol") or "TCP")
        if key in seen:
            first = format_path((*path, "ports", seen[key], "name"))
            ctx.error((*path, "ports", i, "name"),
                      f'duplicate port name "{key[0]}" for {key[1]} (same as {first})')
        else:
            seen[key] = i


# The top-level fields besides apiVersion/kind/metadata (an EndpointSlice has no spec).
ENDPOINTSLICE_FIELDS = {
    "addressType": req(Str(enum=("IPv4",), unsupported={
        "IPv6": "nodemesh is IPv4-only",
        "FQDN": "nodemesh balances to addresses, not to names"})),
    "endpoints": req(ListOf(ENDPOINT, max_items=MAX_ENDPOINTS)),
    "ports": ListOf(ENDPOINT_PORT, max_items=MAX_PORTS),
}
ENDPOINTSLICE_HOOKS = (Hook(_ports_unique, needs=("ports",)),)


def endpoint_ready(ep: Mapping[str, Any]) -> bool:
    """Kubernetes: an unset ``conditions.ready`` means ready."""
    return (ep.get("conditions") or {}).get("ready") is not False


def selects_pods(service: Mapping[str, Any]) -> bool:
    """A Service with a non-empty selector takes its endpoints from pods; one without, from
    EndpointSlices."""
    return bool((service.get("spec") or {}).get("selector"))


def slices_by_service(slices: Iterable[Mapping[str, Any]]
                      ) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """(namespace, service name) → its EndpointSlices (the ``kubernetes.io/service-name`` label)."""
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in slices:
        meta = s["metadata"]
        svc = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if svc:
            out.setdefault((meta.get("namespace") or "default", svc), []).append(s)
    return out


def slice_backends(slices: Iterable[Mapping[str, Any]], port_name: str, protocol: str,
                   unreachable: frozenset[str] = frozenset()
                   ) -> list[tuple[str, int, Mapping[str, Any]]]:
    """The backends a Service port gets from its slices: (address, port, endpoint) of every ready
    endpoint, at the number of the slice port whose name (and protocol) is the Service port's,
    as kube-proxy matches them. Endpoints on a node in `unreachable` (its lease expired) are
    left out, like pods on that node."""
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    for s in slices:
        if s.get("addressType", "IPv4") != "IPv4":
            continue
        numbers = [p["port"] for p in s.get("ports") or []
                   if (p.get("name") or "") == port_name and p.get("protocol", "TCP") == protocol
                   and p.get("port")]
        if not numbers:
            continue
        for ep in s.get("endpoints") or []:
            if not endpoint_ready(ep) or ep.get("nodeName") in unreachable:
                continue
            addrs = ep.get("addresses") or []
            if addrs:
                out.setdefault((addrs[0], numbers[0]), ep)
    return [(ip, port, ep) for (ip, port), ep in sorted(out.items())]
