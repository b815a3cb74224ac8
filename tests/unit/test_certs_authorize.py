"""A node may only get certificates for identities of pods scheduled on it."""

from __future__ import annotations

from typing import Any

import pytest

from nodemesh.certs.authorize import authorize, pod_service_account

TD = "cluster.local"
API = "spiffe://cluster.local/ns/prod/sa/api"


def pod(name: str, node: str | None = "node1", ns: str = "prod", sa: str | None = "api",
        **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "debian"}]}
    if node is not None:
        spec["nodeName"] = node
    if sa is not None:
        spec["serviceAccountName"] = sa
    p: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
                         "spec": spec}
    for path, value in extra.items():
        section, field = path.split("__")
        p.setdefault(section, {})[field] = value
    return p


def test_a_node_running_a_pod_of_the_identity_may_have_it() -> None:
    assert authorize("node1", API, TD, [pod("other", sa="web"), pod("api-1")]) is None


@pytest.mark.parametrize("pods", [
    [],
    [pod("api-1", node="node1")],  # on another node
    [pod("api-1", node=None)],  # not scheduled yet
    [pod("api-1", node="node2", metadata__deletionTimestamp="2030-01-01T00:00:00Z")],
    [pod("api-1", node="node2", status__phase="Succeeded")],
    [pod("api-1", node="node2", status__phase="Failed")],
    [pod("api-1", node="node2", ns="dev")],
    [pod("api-1", node="node2", sa="web")],
])
def test_a_node_without_such_a_pod_is_refused(pods: list[dict[str, Any]]) -> None:
    assert authorize("node2", API, TD, pods) == f"node node2 runs no pod of {API}"


def test_running_and_pending_pods_count() -> None:
    assert authorize("node1", API, TD, [pod("a", status__phase="Running")]) is None
    assert authorize("node1", API, TD, [pod("a", status__phase="Pending")]) is None


def test_the_service_account_defaults_to_default_and_accepts_the_deprecated_field() -> None:
    assert pod_service_account(pod("a", sa=None)) == "default"
    deprecated = pod("a", sa=None, spec__serviceAccount="api")
    assert pod_service_account(deprecated) == "api"
    assert authorize("node1", API, TD, [deprecated]) is None
    assert authorize("node1", "spiffe://cluster.local/ns/prod/sa/default", TD, [pod("a", sa=None)]) is None
    assert authorize("node1", API, TD, [pod("a", sa=None)]) is not None
    # serviceAccountName wins over the deprecated field when both are set.
    both = pod("a", sa="web", spec__serviceAccount="api")
    assert authorize("node1", API, TD, [both]) is not None


def test_identities_of_other_trust_domains_and_malformed_ids_are_refused() -> None:
    assert authorize("node1", "spiffe://example.org/ns/prod/sa/api", TD, [pod("a")]) == \
        "spiffe://example.org/ns/prod/sa/api is outside the trust domain cluster.local"
    reason = authorize("node1", "spiffe://cluster.local/ns/prod", TD, [pod("a")])
    assert reason is not None and "is not a workload identity" in reason


def test_pods_may_be_any_iterable_of_mappings() -> None:
    assert authorize("node1", API, TD, (p for p in [pod("a")])) is None
    assert authorize("node1", API, TD, [{"metadata": None, "spec": None}, pod("a")]) is None
