"""Which workload identities a node may get certificates for (a pure function).

As istiod does for ztunnel: a node's agent may only obtain the certificate of an identity that
some pod scheduled on that node runs as, so a compromised node cannot impersonate workloads that
live elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nodemesh.certs.spiffe import parse_workload_id

FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


def pod_service_account(pod: Mapping[str, Any]) -> str:
    """spec.serviceAccountName, else the deprecated spec.serviceAccount, else "default"."""
    spec = pod.get("spec") or {}
    return spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"


def pod_runs_on(pod: Mapping[str, Any], node: str) -> bool:
    """Scheduled on `node`, not being deleted and not finished: its processes may run there."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    return (spec.get("nodeName") == node and not meta.get("deletionTimestamp")
            and status.get("phase") not in FINISHED_PHASES)


def authorize(node: str, spiffe_id: str, trust_domain: str, pods: Iterable[Mapping[str, Any]]) -> str | None:
    """None when `node` runs a pod of workload identity `spiffe_id`, else why it may not have it."""
    try:
        td, namespace, service_account = parse_workload_id(spiffe_id)
    except ValueError as e:
        return str(e)
    if td != trust_domain:
        return f"{spiffe_id} is outside the trust domain {trust_domain}"
    for pod in pods:
        meta = pod.get("metadata") or {}
        if (pod_runs_on(pod, node) and (meta.get("namespace") or "default") == namespace
                and pod_service_account(pod) == service_account):
            return None
    return f"node {node} runs no pod of {spiffe_id}"
