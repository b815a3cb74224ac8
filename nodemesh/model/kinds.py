"""The registry of kinds: API version, scope, CLI names.

One table, read by validation (which apiVersion a kind must carry), the store (scope), and the
CLI (``get svc``, ``get netpol`` ...). Kinds that only nodemesh writes (Node, Identity,
TrustBundle) are registered too, so that the CLI can show them, but `apply` refuses them.
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
    user_writable: bool = True  # False for kinds only nodemesh itself writes (Node, Identity ...)
    # Older apiVersions accepted with the same schema; objects are stored with `api_version`,
    # as the API server serves an object at its preferred version whatever version wrote it.
    older_api_versions: tuple[str, ...] = field(default=())

    @property
    def api_versions(self) -> tuple[str, ...]:
        """Every apiVersion an applied object of this kind may carry, the preferred one first."""
        return (self.api_version, *self.older_api_versions)


KINDS: dict[str, KindInfo] = {
    k.kind: k
    for k in (
        KindInfo("Namespace", "v1", False, "namespaces", ("ns",)),
        KindInfo("Pod", "v1", True, "pods", ("po",)),
        KindInfo("Service", "v1", True, "services", ("svc",)),
        KindInfo("Deployment", "apps/v1", True, "deployments", ("deploy",)),
        KindInfo("ServiceAccount", "v1", True, "serviceaccounts", ("sa",)),
        KindInfo("NetworkPolicy", "networking.k8s.io/v1", True, "networkpolicies", ("netpol",)),
        KindInfo(
            "CiliumNetworkPolicy", "cilium.io/v2", True, "ciliumnetworkpolicies", ("cnp",)
        ),
        KindInfo("PeerAuthentication", "security.istio.io/v1", True, "peerauthentications", ("pa",),
                 older_api_versions=("security.istio.io/v1beta1",)),
        KindInfo("HTTPRoute", "gateway.networking.k8s.io/v1", True, "httproutes", ()),
        KindInfo("GRPCRoute", "gateway.networking.k8s.io/v1", True, "grpcroutes", ()),
        KindInfo("EndpointSlice", "discovery.k8s.io/v1", True, "endpointslices", ()),
        KindInfo("Node", "v1", False, "nodes", ("no",), user_writable=False),
        # Each node's agent renews one (namespace kube-node-lease): the node lifecycle.
        KindInfo("Lease", "coordination.k8s.io/v1", True, "leases", (), user_writable=False),
        KindInfo("Identity", "nodemesh.io/v1", False, "identities", ("id",), user_writable=False),
        # The roots of trust of the cluster's CA (workload certificates chain up to them).
        KindInfo("TrustBundle", "nodemesh.io/v1", False, "trustbundles", (), user_writable=False),
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
