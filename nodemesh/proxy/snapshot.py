"""One consistent, versioned set of Envoy resources for one node: what the xDS server serves.

A `Snapshot` is built once from lists of resource protos (Listener, RouteConfiguration, Cluster,
ClusterLoadAssignment and optionally Secret, or any other xDS type) and never changes after. Each
resource is packed into a `google.protobuf.Any` once, so every stream that serves the snapshot
reuses the same bytes, and gets a version that is a hash of those bytes. The version of a type is
a hash of its (name, resource version) pairs, so:

- the same content always gets the same versions, in any process: a restarted agent that serves
  the same resources again sends versions Envoy already has, and delta xDS sends nothing;
- a type whose resources did not change keeps its version when the snapshot does, so SotW does
  not resend it;
- delta xDS compares per-resource versions to find what changed.

`Snapshot.diff` tells what changed between two snapshots (for logs and tests), and
`consistency_errors` finds references that would leave Envoy waiting (an EDS cluster without a
ClusterLoadAssignment, a listener whose RDS route configuration is missing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Short names for logs, metrics and status output.
SHORT_NAMES: Mapping[str, str] = MappingProxyType(
    {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS", SECRET: "SDS"})

# The order in which a change is pushed: clusters before the endpoints that warm them, both before
# the listeners and routes that send traffic to them (Envoy's "make before break" advice).
# Secrets come right after endpoints: they, too, are only asked for by the clusters and listeners
# that reference them.
PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)

# Types Envoy subscribes to as a whole (wildcard) rather than by resource name.
WILDCARD_TYPES: frozenset[str] = frozenset({LISTENER, CLUSTER})

_HCM_TYPE = _PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def short_name(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


def type_url_of(msg: Message) -> str:
    return _PREFIX + msg.DESCRIPTOR.full_name


def resource_name(msg: Message) -> str:
    """The xDS name of a resource: `cluster_name` for a ClusterLoadAssignment, `name` otherwise."""
    if isinstance(msg, endpoint_pb2.ClusterLoadAssignment):
        return msg.cluster_name
    name = getattr(msg, "name", None)
    if not isinstance(name, str):
        raise ValueError(f"{msg.DESCRIPTOR.full_name} has no name field; it cannot be an xDS resource")
    return name


def _hash(data: bytes) -> str:
    # 16 hex digits (64 bits) are plenty to tell versions of one resource apart and keep logs short.
    return hashlib.sha256(data).hexdigest()[:16]


def pack(msg: Message) -> any_pb2.Any:
    """Pack deterministically, so equal messages give equal bytes (and equal versions)."""
    a = any_pb2.Any()
    a.Pack(msg, deterministic=True)
    return a


@dataclass(frozen=True)
class Change:
    """What changed in one type between two snapshots (resource names, sorted)."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


class Snapshot:
    """An immutable set of xDS resources, keyed by type URL and resource name, with versions.

    Build it with `Snapshot.build(listeners=..., routes=..., clusters=..., endpoints=...)` or
    `Snapshot(resources_by_type_url)`. The messages are packed at construction; later changes to
    the caller's messages do not affect the snapshot, and `get` returns a fresh copy.
    """

    __slots__ = ("_eds_names", "_packed", "_resource_versions", "_type_versions", "_version")

    def __init__(self, resources: Mapping[str, Iterable[Message]] | None = None,
                 version: str | None = None) -> None:
        packed: dict[str, Mapping[str, any_pb2.Any]] = {}
        rversions: dict[str, Mapping[str, str]] = {}
        tversions: dict[str, str] = {}
        eds_names: dict[str, str] = {}
        for type_url, msgs in (resources or {}).items():
            by_name: dict[str, any_pb2.Any] = {}
            for msg in msgs:
                actual = type_url_of(msg)
                if actual != type_url:
                    raise ValueError(f"a {actual} was given as a {type_url} resource")
                name = resource_name(msg)
                if not name:
                    raise ValueError(f"a {short_name(type_url)} resource has no name")
                if name in by_name:
                    raise ValueError(f"two {short_name(type_url)} resources are named {name!r}")
                by_name[name] = pack(msg)
                if isinstance(msg, cluster_pb2.Cluster) and msg.type == cluster_pb2.Cluster.EDS:
                    eds_names[name] = msg.eds_cluster_config.service_name or name
            names = sorted(by_name)
            packed[type_url] = MappingProxyType({n: by_name[n] for n in names})
            rv = {n: _hash(by_name[n].value) for n in names}
            rversions[type_url] = MappingProxyType(rv)
            tversions[type_url] = _hash("\n".join(f"{n} {rv[n]}" for n in names).encode())
        self._packed: Mapping[str, Mapping[str, any_pb2.Any]] = MappingProxyType(packed)
        self._resource_versions: Mapping[str, Mapping[str, str]] = MappingProxyType(rversions)
        self._type_versions: Mapping[str, str] = MappingProxyType(tversions)
        self._eds_names: Mapping[str, str] = MappingProxyType(eds_names)
        if version is None:
            version = _hash("\n".join(f"{t} {v}" for t, v in sorted(tversions.items()) if packed[t])
                            .encode())
        self._version = version

    @classmethod
    def build(cls, *, listeners: Iterable[listener_pb2.Listener] = (),
              routes: Iterable[route_pb2.RouteConfiguration] = (),
              clusters: Iterable[cluster_pb2.Cluster] = (),
              endpoints: Iterable[endpoint_pb2.ClusterLoadAssignment] = (),
              secrets: Iterable[secret_pb2.Secret] = (),
              version: str | None = None) -> Snapshot:
        """A snapshot of the four core types (always present, possibly empty) and secrets."""
        resources: dict[str, Iterable[Message]] = {
            CLUSTER: clusters, ENDPOINT: endpoints, LISTENER: listeners, ROUTE: routes}
        secrets = list(secrets)
        if secrets:
            resources[SECRET] = secrets
        return cls(resources, version)

    # ---- reading --------------------------------------------------------------------------
    @property
    def version(self) -> str:
        """The label of the whole snapshot: the caller's, or a hash of the content."""
        return self._version

    def type_urls(self) -> tuple[str, ...]:
        """The types this snapshot holds, in push order (known types first)."""
        known = [t for t in PUSH_ORDER if t in self._packed]
        return tuple(known + sorted(t for t in self._packed if t not in PUSH_ORDER))

    def type_version(self, type_url: str) -> str:
        """The version of one type: a hash of its resources (a fixed value when it has none)."""
        v = self._type_versions.get(type_url)
        return v if v is not None else _EMPTY_TYPE_VERSION

    def names(self, type_url: str) -> tuple[str, ...]:
        return tuple(self._packed.get(type_url, {}))

    def packed(self, type_url: str) -> Mapping[str, any_pb2.Any]:
        """name → packed resource (shared; callers must not modify the Any)."""
        return self._packed.get(type_url, _EMPTY)

    def resource_versions(self, type_url: str) -> Mapping[str, str]:
        """name → version (a hash of the resource's bytes)."""
        return self._resource_versions.get(type_url, _EMPTY)

    def eds_name(self, cluster: str) -> str | None:
        """The ClusterLoadAssignment name an EDS cluster asks for (None: not an EDS cluster)."""
        return self._eds_names.get(cluster)

    def get(self, type_url: str, name: str) -> Message | None:
        """A fresh copy of one resource, or None."""
        a = self._packed.get(type_url, {}).get(name)
        if a is None:
            return None
        return _unpack(a)

    def resources(self, type_url: str) -> list[Message]:
        """Fresh copies of all resources of one type, sorted by name."""
        return [_unpack(a) for a in self.packed(type_url).values()]

    def __len__(self) -> int:
        return sum(len(r) for r in self._packed.values())

    def __eq__(self, other: object) -> bool:
        # Content equality; the label is not content.
        if not isinstance(other, Snapshot):
            return NotImplemented
        return {t: v for t, v in self._type_versions.items() if self._packed[t]} == \
            {t: v for t, v in other._type_versions.items() if other._packed[t]}

    def __hash__(self) -> int:
        return hash(tuple(sorted((t, v) for t, v in self._type_versions.items() if self._packed[t])))

    def __repr__(self) -> str:
        counts = ", ".join(f"{short_name(t)}={len(self._packed[t])}" for t in self.type_urls())
        return f"Snapshot(version={self._version!r}, {counts})"

    # ---- comparing ------------------------------------------------------------------------
    @staticmethod
    def diff(old: Snapshot | None, new: Snapshot) -> dict[str, Change]:
        """Per type, the resources added, changed and removed from `old` to `new` (only types
        with a change are listed)."""
        out: dict[str, Change] = {}
        types = set(new._packed) | (set(old._packed) if old is not None else set())
        for t in types:
            before = old.resource_versions(t) if old is not None else _EMPTY
            after = new.resource_versions(t)
            ch = Change(
                added=tuple(sorted(n for n in after if n not in before)),
                changed=tuple(sorted(n for n in after if n in before and before[n] != after[n])),
                removed=tuple(sorted(n for n in before if n not in after)),
            )
            if ch:
                out[t] = ch
        return out

    def consistency_errors(self) -> list[str]:
        """References Envoy would wait for in vain: EDS clusters whose ClusterLoadAssignment is
        missing, and RDS route configurations that no RouteConfiguration provides.

        Envoy keeps such a cluster or listener warming until `initial_fetch_timeout`, so the
        agent should not ship a snapshot with errors here.
        """
        errors = []
        endpoints = set(self.names(ENDPOINT))
        for cluster, wanted in sorted(self._eds_names.items()):
            if wanted not in endpoints:
                errors.append(f"cluster {cluster!r} uses EDS but there is no "
                              f"ClusterLoadAssignment {wanted!r}")
        routes = set(self.names(ROUTE))
        for lis in self.resources(LISTENER):
            assert isinstance(lis, listener_pb2.Listener)
            for rc in sorted(_rds_names(lis)):
                if rc not in routes:
                    errors.append(f"listener {lis.name!r} uses RDS route configuration {rc!r}, "
                                  "which is not in the snapshot")
        return errors


def _unpack(a: any_pb2.Any) -> Message:
    from google.protobuf import symbol_database

    cls = symbol_database.Default().GetSymbol(a.TypeName())
    msg = cls()
    a.Unpack(msg)
    return msg


def _rds_names(lis: listener_pb2.Listener) -> set[str]:
    """Route configuration names an HTTP connection manager in the listener asks RDS for."""
    out = set()
    chains = list(lis.filter_chains)
    if lis.HasField("default_filter_chain"):
        chains.append(lis.default_filter_chain)
    for chain in chains:
        for f in chain.filters:
            if f.typed_config.type_url == _HCM_TYPE:
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                if hcm.HasField("rds"):
                    out.add(hcm.rds.route_config_name)
    return out


_EMPTY: Mapping = MappingProxyType({})
_EMPTY_TYPE_VERSION = _hash(b"")
