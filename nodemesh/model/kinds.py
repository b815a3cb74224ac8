"""The registry of kinds: API version, scope, CLI names.

One table, read by validation (which apiVersion a kind must carry), the store (scope), and the
CLI (``get svc``, ``get netpol`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KindInfo:
    kind: str
    api_version: str
    namespaced: bool
    plural: str
    short_names: tuple[str, ...] = field(default=())
    user_writable: bool = True  # False for kinds only nodemesh itself writes (Node, Identity)


KINDS: dict[str, KindInfo] = {
    k.kind: k
    for k in (
        KindInfo("Namespace", "v1", False, "namespaces", ("ns",)),
        KindInfo("Pod", "v1", True, "pods", ("po",)),
        KindInfo("Service", "v1", True, "services", ("svc",)),
        KindInfo("Deployment", "apps/v1", True, "deployments", ("deploy",)),
        KindInfo("NetworkPolicy", "networking.k8s.io/v1", True, "networkpolicies", ("netpol",)),
        KindInfo(
            "CiliumNetworkPolicy", "cilium.io/v2", True, "ciliumnetworkpolicies", ("cnp",)
        ),
        KindInfo("HTTPRoute", "gateway.networking.k8s.io/v1", True, "httproutes", ()),
        KindInfo("GRPCRoute", "gateway.networking.k8s.io/v1", True, "grpcroutes", ()),
        KindInfo("Node", "v1", False, "nodes", ("no",), user_writable=False),
        KindInfo("Identity", "nodemesh.io/v1", False, "identities", ("id",), user_writable=False),
    )
}


def resolve_kind(name: str) -> KindInfo | None:
    """Map what a user types (``svc``, ``services``, ``Service``, ``httproute``) to a kind."""
    low = name.lower()
    for info in KINDS.values():
        if low in (info.kind.lower(), info.plural, info.plural.rstrip("s"), *info.short_names):
            return info
    return None


def ref(kind: str, namespace: str | None, name: str) -> str:
    """How a resource is named in messages: ``Service default/web`` or ``Namespace prod``."""
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def obj_ref(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return ref(str(obj.get("kind")), meta.get("namespace"), str(meta.get("name")))


def obj_key(obj: dict) -> tuple[str, str, str]:
    """(kind, namespace or "", name): the identity of an object in the store."""
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace") or "", meta["name"]
