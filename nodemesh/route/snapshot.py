"""The translation's output types: versioned Envoy resources, redirects and route statuses.

`EnvoyResources.version` is a content hash: the same resources give the same version on every
run and every node, so the xDS server can skip pushes that change nothing, and per-type
versions (`type_versions`) let it push only the types that changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message

from nodemesh.route.inputs import RedirectKey, RouteKey
from nodemesh.route.protos import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Cluster,
    ClusterLoadAssignment,
    Listener,
    RouteConfiguration,
    serialize,
)


def _hash(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:16]


def resource_name(msg: message.Message) -> str:
    return msg.cluster_name if isinstance(msg, ClusterLoadAssignment) else msg.name  # type: ignore


@dataclass(frozen=True)
class EnvoyResources:
    """One consistent set of Envoy resources for one node, sorted by name."""

    listeners: tuple[Listener, ...] = ()
    routes: tuple[RouteConfiguration, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    endpoints: tuple[ClusterLoadAssignment, ...] = ()
    version: str = field(default="", init=False)
    type_versions: Mapping[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        per_type = {}
        for t, msgs in self.by_type().items():
            per_type[t] = _hash([t.encode()] + [resource_name(m).encode() + b"\0" + serialize(m)
                                                for m in msgs])
        object.__setattr__(self, "type_versions", per_type)
        object.__setattr__(self, "version", _hash([f"{t}={v}".encode()
                                                   for t, v in sorted(per_type.items())]))

    def by_type(self) -> dict[str, tuple[message.Message, ...]]:
        return {LISTENER_TYPE: self.listeners, ROUTE_TYPE: self.routes,
                CLUSTER_TYPE: self.clusters, ENDPOINT_TYPE: self.endpoints}

    def resources(self, type_url: str) -> dict[str, message.Message]:
        """Name → message, for one resource type URL."""
        return {resource_name(m): m for m in self.by_type()[type_url]}


@dataclass(frozen=True)
class Translation:
    """Everything `translate` produces for one node.

    - `snapshot`: the Envoy resources;
    - `service_redirects`: (ClusterIP, port, protocol) → listener port, for service ports with
      routes that apply on this node;
    - `pod_redirects`: (pod IP, port, protocol) → listener port, for pod ports with L7 policy;
    - `ports`: both together — pass it back as `previous_ports` next time;
    - `route_statuses`: every route's ``status`` (``{"parents": [...]}``), node-independent;
    - `owners`: Envoy resource name → the routes it was built from, to turn a NACK of a
      resource into conditions on the right routes.
    """

    snapshot: EnvoyResources
    service_redirects: Mapping[RedirectKey, int]
    pod_redirects: Mapping[RedirectKey, int]
    ports: Mapping[RedirectKey, int]
    route_statuses: Mapping[RouteKey, dict[str, Any]]
    owners: Mapping[str, tuple[RouteKey, ...]]
