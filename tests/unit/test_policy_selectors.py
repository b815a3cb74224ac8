"""Label selectors: Kubernetes operators, Cilium source prefixes and namespace scoping."""

from __future__ import annotations

import pytest

from nodemesh.identity import reserved_labels, security_labels_from
from nodemesh.policy.selectors import (
    cilium_matches,
    matches,
    names_namespace,
    scope_peer_selector,
    scope_subject_selector,
)

LABELS = {"app": "web", "tier": "fe"}


@pytest.mark.parametrize(
    ("selector", "want"),
    [
        (None, False),
        ({}, True),
        ({"matchLabels": {"app": "web"}}, True),
        ({"matchLabels": {"app": "db"}}, False),
        ({"matchLabels": {"missing": ""}}, False),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db", "web"]}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]}, False),
        ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}, True),
        ({"matchExpressions": [{"key": "nope", "operator": "NotIn", "values": ["db"]}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, False),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "nope", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "nope", "operator": "DoesNotExist"}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, False),
        ({"matchExpressions": [{"key": "app", "operator": "Gt", "values": ["1"]}]}, False),
        ({"matchLabels": {"app": "web"},
          "matchExpressions": [{"key": "tier", "operator": "In", "values": ["be"]}]}, False),
    ],
)
def test_kubernetes_selectors(selector: dict | None, want: bool) -> None:
    assert matches(selector, LABELS) is want


def test_plain_matching_does_not_strip_prefixes() -> None:
    # a NetworkPolicy selector is plain Kubernetes: "k8s:app" is just another (invalid) key
    assert not matches({"matchLabels": {"k8s:app": "web"}}, LABELS)


def test_cilium_prefixes() -> None:
    labels = security_labels_from({"app": "web"}, "prod", {"team": "a"}, "sa1")
    for key in ("app", "k8s:app", "any:app"):
        assert cilium_matches({"matchLabels": {key: "web"}}, labels)
    assert not cilium_matches({"matchLabels": {"reserved:app": "web"}}, labels)
    assert cilium_matches({"matchLabels": {"k8s:io.kubernetes.pod.namespace": "prod"}}, labels)
    assert cilium_matches({"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "a"}}, labels)
    assert cilium_matches({"matchLabels": {"io.cilium.k8s.policy.serviceaccount": "sa1"}}, labels)
    assert cilium_matches(
        {"matchExpressions": [{"key": "k8s:app", "operator": "In", "values": ["web"]}]}, labels
    )
    host = reserved_labels(1)
    assert cilium_matches({"matchLabels": {"reserved:host": ""}}, host)
    assert not cilium_matches({"matchLabels": {"reserved:host": ""}}, labels)
    assert not cilium_matches({"matchLabels": {"k8s:host": ""}}, host)


def test_peer_scoping() -> None:
    ns_key = "k8s:io.kubernetes.pod.namespace"
    assert scope_peer_selector({}, "x") == {"matchLabels": {ns_key: "x"}}
    assert scope_peer_selector(None, "x") == {"matchLabels": {ns_key: "x"}}
    assert scope_peer_selector({"matchLabels": {"app": "a"}}, "x") == {
        "matchLabels": {"app": "a", ns_key: "x"}
    }
    for sel in (
        {"matchLabels": {ns_key: "y"}},
        {"matchLabels": {"any:io.kubernetes.pod.namespace": "y"}},
        {"matchLabels": {"io.kubernetes.pod.namespace": "y"}},
        {"matchExpressions": [{"key": ns_key, "operator": "Exists"}]},
        {"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "a"}},
        {"matchLabels": {"reserved:host": ""}},
    ):
        assert names_namespace(sel)
        assert scope_peer_selector(sel, "x") == sel
    assert not names_namespace({"matchLabels": {"app": "a"}})


def test_subject_scoping_replaces_namespace_match() -> None:
    ns_key = "k8s:io.kubernetes.pod.namespace"
    got = scope_subject_selector({"matchLabels": {ns_key: "other", "io.kubernetes.pod.namespace": "o",
                                                  "app": "a"}}, "x")
    assert got == {"matchLabels": {"app": "a", ns_key: "x"}}
    got = scope_subject_selector({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, "x")
    assert got["matchLabels"] == {ns_key: "x"}
    assert got["matchExpressions"] == [{"key": "app", "operator": "Exists"}]
