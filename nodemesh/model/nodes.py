"""Nodes and their leases, as Kubernetes' node lifecycle has them (pure).

Each node's agent holds a ``Lease`` (``coordination.k8s.io/v1``) named after its node in the
namespace ``kube-node-lease`` and renews it; the cluster daemon's node lifecycle controller
(`nodemesh.cluster.controllers.plan_node_lifecycle`) sets the Node's ``Ready`` condition to
``Unknown`` and taints the Node ``node.kubernetes.io/unreachable`` when the lease has not been
renewed for its ``leaseDurationSeconds``, and takes both back when it is renewed again.

A tainted node is *unreachable*: its pods (and EndpointSlice endpoints naming it) are no
backend of any Service on any node (`unreachable_nodes`). The taint, a spec change, is what
the agents follow; the condition is what users read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

LEASE_NAMESPACE = "kube-node-lease"
LEASE_API_VERSION = "coordination.k8s.io/v1"
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
OUT_OF_SERVICE_TAINTS = (UNREACHABLE_TAINT, NOT_READY_TAINT)
DEFAULT_LEASE_SECONDS = 15


def node_unreachable(node: Mapping[str, Any]) -> bool:
    """The node lifecycle controller has taken this node out of service (its lease expired)."""
    return any(t.get("key") in OUT_OF_SERVICE_TAINTS
               for t in (node.get("spec") or {}).get("taints") or [])


def unreachable_nodes(nodes: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """Names of the nodes whose pods are no backend of any Service."""
    return frozenset(n["metadata"]["name"] for n in nodes if node_unreachable(n))


def ready_condition(node: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c
    return None


def node_status_text(node: Mapping[str, Any]) -> str:
    """What ``get nodes`` shows: Ready or NotReady (and SchedulingDisabled never: no cordon)."""
    c = ready_condition(node)
    return "Ready" if c is not None and c.get("status") == "True" else "NotReady"


def lease_object(node: str, holder: str, seconds: int, renew_time: str,
                 acquire_time: str) -> dict[str, Any]:
    """A node's Lease as its agent writes it (Kubernetes' MicroTime strings)."""
    return {"apiVersion": LEASE_API_VERSION, "kind": "Lease",
            "metadata": {"name": node, "namespace": LEASE_NAMESPACE},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": int(seconds),
                     "acquireTime": acquire_time, "renewTime": renew_time}}
