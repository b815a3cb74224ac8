"""Istio's PeerAuthentication semantics: the effective mutual-TLS mode of every pod and port.

A PeerAuthentication says what a workload accepts from its peers: STRICT (mutual TLS only),
PERMISSIVE (mutual TLS or plaintext) or DISABLE (plaintext only). Policies exist at three
levels and the most specific level that has a mode decides, as in Istio
(pilot/pkg/security/authn, ``ComposePeerAuthentication``):

1. workload-specific: a selector whose matchLabels all appear on the pod, in the pod's namespace;
2. namespace-wide: no selector (or a selector without matchLabels), in the pod's namespace;
3. mesh-wide: no selector, in the root namespace (`ROOT_NAMESPACE`, as istio-system in Istio);

and below them `default` (STRICT). A level whose mode is UNSET, or that has no policy, takes the
mode of the broader level. Of several policies of one level that apply to a pod, the oldest
(``metadata.creationTimestamp``, then namespace and name) wins. Port-level modes
(``portLevelMtls``, keyed by container port) come from the chosen workload-specific policy only;
a port-level UNSET takes the pod's mode. A policy with a selector in the root namespace applies
to no pod at all: Istio ignores those, and nodemesh's validation refuses them, so only objects
that bypassed validation can carry one here.

`resolve_modes` is a pure function of plain dicts (Pods and PeerAuthentications as stored).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType

from nodemesh.model.labels import service_selects
from nodemesh.model.security import ROOT_NAMESPACE

DEFAULT_NAMESPACE = "default"  # of an object whose metadata names none, as the store fills it
UNSET = "UNSET"  # an input value only: "take the mode of the broader level"


class Mode(StrEnum):
    """An effective mTLS mode: what a workload's port accepts from its peers.

    A str and an Enum (StrEnum, as ruff's UP042 asks of ``(str, Enum)``): ``Mode.STRICT ==
    "STRICT"`` and ``str(Mode.STRICT) == "STRICT"``.
    """

    STRICT = "STRICT"  # mutual TLS only: plaintext (from outside the mesh) is refused
    PERMISSIVE = "PERMISSIVE"  # mutual TLS or plaintext
    DISABLE = "DISABLE"  # plaintext: no mutual TLS is sent or accepted


@dataclass(frozen=True)
class WorkloadMode:
    """The effective modes of one pod: `mode` for every port but those in `ports` (container
    port numbers) that a workload-specific policy sets on their own."""

    mode: Mode
    ports: Mapping[int, Mode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A read-only copy: one result is shared by its readers and must not change under them.
        object.__setattr__(self, "ports", MappingProxyType(dict(self.ports)))

    def __hash__(self) -> int:
        return hash((self.mode, frozenset(self.ports.items())))

    def for_port(self, port: int) -> Mode:
        """The mode of one container port of the pod."""
        return self.ports.get(port, self.mode)


@dataclass(frozen=True)
class _Policy:
    """One PeerAuthentication, read: None stands for UNSET (and for "no selector labels")."""

    namespace: str
    name: str
    created: datetime | None
    match_labels: Mapping[str, str] | None
    mode: Mode | None
    ports: Mapping[int, Mode | None]

    def age_order(self) -> tuple:
        # Oldest first. An object without a (readable) creationTimestamp has not been stored
        # yet, so it counts as the newest: a stored policy is never displaced by it.
        created = self.created or datetime.max.replace(tzinfo=UTC)
        return (self.created is None, created, self.namespace, self.name)


def _mode(value: object, where: str) -> Mode | None:
    if value is None or value == UNSET:
        return None
    if isinstance(value, str) and value in Mode.__members__:
        return Mode(value)
    raise ValueError(f"{where}: unknown mTLS mode {value!r} (expected UNSET, DISABLE, PERMISSIVE or "
                     "STRICT)")


def _port(key: object, where: str) -> int:
    # Stored objects have string keys (JSON); YAML read directly gives numbers.
    if isinstance(key, str) and key.isascii() and key.isdigit():
        port = int(key)
    elif isinstance(key, int) and not isinstance(key, bool):
        port = key
    else:
        raise ValueError(f"{where}: spec.portLevelMtls[{key}]: not a port number")
    if not 1 <= port <= 65535:
        raise ValueError(f"{where}: spec.portLevelMtls[{key}]: must be 1-65535")
    return port


def _created(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _read(pa: Mapping) -> _Policy:
    meta = pa.get("metadata") or {}
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    name = str(meta.get("name") or "")
    where = f"PeerAuthentication {namespace}/{name}"
    spec = pa.get("spec") or {}
    ports: dict[int, Mode | None] = {}
    for key, value in (spec.get("portLevelMtls") or {}).items():
        ports[_port(key, where)] = _mode((value or {}).get("mode"),
                                         f"{where}: spec.portLevelMtls[{key}].mode")
    return _Policy(
        namespace=namespace,
        name=name,
        created=_created(meta.get("creationTimestamp")),
        # Istio: a selector without matchLabels selects like no selector (namespace-wide).
        match_labels=(spec.get("selector") or {}).get("matchLabels") or None,
        mode=_mode((spec.get("mtls") or {}).get("mode"), f"{where}: spec.mtls.mode"),
        ports=ports,
    )


def resolve_modes(
    pods: Iterable[Mapping],
    peer_authentications: Iterable[Mapping],
    default: Mode = Mode.STRICT,
    root_namespace: str = ROOT_NAMESPACE,
) -> dict[tuple[str, str], WorkloadMode]:
    """The effective mTLS modes of every pod, keyed by (namespace, pod name).

    `pods` and `peer_authentications` are objects as stored (metadata.namespace, .name,
    .labels, .creationTimestamp; the PeerAuthentication's spec). `default` is the mode when no
    level sets one. Raises ValueError naming the policy when a mode or a port key is invalid
    (validation refuses both, so stored objects never carry them).
    """
    default = Mode(default)
    mesh: _Policy | None = None
    namespace_wide: dict[str, _Policy] = {}
    workload: dict[str, list[_Policy]] = {}  # per namespace, oldest first
    for p in sorted((_read(pa) for pa in peer_authentications), key=_Policy.age_order):
        if p.match_labels is None:
            if p.namespace == root_namespace:
                mesh = mesh or p
            else:
                namespace_wide.setdefault(p.namespace, p)
        elif p.namespace != root_namespace:
            workload.setdefault(p.namespace, []).append(p)
        # A selector in the root namespace: ignored, as Istio does (see the module docstring).

    mesh_mode = mesh.mode if mesh is not None and mesh.mode is not None else default
    out: dict[tuple[str, str], WorkloadMode] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        namespace = meta.get("namespace") or DEFAULT_NAMESPACE
        labels = meta.get("labels") or {}
        mode = mesh_mode
        ns_policy = namespace_wide.get(namespace)
        if ns_policy is not None and ns_policy.mode is not None:
            mode = ns_policy.mode
        chosen = next((p for p in workload.get(namespace, ())
                       if p.match_labels is not None and service_selects(p.match_labels, labels)), None)
        ports: dict[int, Mode] = {}
        if chosen is not None:
            if chosen.mode is not None:
                mode = chosen.mode
            ports = {port: m if m is not None else mode for port, m in chosen.ports.items()}
        out[(namespace, str(meta.get("name")))] = WorkloadMode(mode, ports)
    return out
