"""Choosing a node for a pod (pure): honour `spec.nodeName`, else spread.

A pod goes to the ready node with the fewest pods of the same owner (so a Deployment's replicas
spread across nodes), then the fewest pods overall, then the lowest node index.
"""

from __future__ import annotations

from collections.abc import Sequence


def owner_uid(pod: dict) -> str | None:
    for ref in pod["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def choose_node(pod: dict, nodes: Sequence[str], pods: Sequence[dict]) -> str | None:
    """The node for `pod` given the nodes (in order) and the pods already placed."""
    if not nodes:
        return None
    owner = owner_uid(pod)
    same_owner = {n: 0 for n in nodes}
    total = {n: 0 for n in nodes}
    for p in pods:
        n = p["spec"].get("nodeName")
        if n in total:
            total[n] += 1
            if owner is not None and owner_uid(p) == owner:
                same_owner[n] += 1
    return min(nodes, key=lambda n: (same_owner[n], total[n], nodes.index(n)))
