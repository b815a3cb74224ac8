"""Label syntax and selector matching."""

from __future__ import annotations

import pytest

from nodemesh.model.labels import (
    selector_matches,
    service_selects,
    validate_cilium_label_key,
    validate_label_key,
    validate_label_value,
)


@pytest.mark.parametrize("key", [
    "app", "app.kubernetes.io/name", "a", "A_b-c.d", "k8s.io/x", "x" * 63,
    "io.kubernetes.pod.namespace", ("a" * 63 + ".") * 3 + "b/c",
])
def test_valid_label_keys(key: str) -> None:
    assert validate_label_key(key) is None


@pytest.mark.parametrize(("key", "fragment"), [
    ("", "must not be empty"),
    ("a/b/c", 'more than one "/"'),
    ("/a", "empty prefix"),
    ("a/", "empty name"),
    ("-a", "must be a name"),
    ("a-", "must be a name"),
    ("x" * 64, "must be a name"),
    ("Example.com/a", "prefix"),
    ("a b", "must be a name"),
    ("k8s:app", "must be a name"),  # plain Kubernetes keys have no sources
])
def test_invalid_label_keys(key: str, fragment: str) -> None:
    problem = validate_label_key(key)
    assert problem is not None and fragment in problem


@pytest.mark.parametrize("value", ["", "a", "v1.2.3", "A_b-c", "x" * 63])
def test_valid_label_values(value: str) -> None:
    assert validate_label_value(value) is None


@pytest.mark.parametrize("value", ["-a", "a-", "x" * 64, "a b", "a/b"])
def test_invalid_label_values(value: str) -> None:
    assert validate_label_value(value) is not None


def test_cilium_keys_may_name_a_source() -> None:
    assert validate_cilium_label_key("k8s:io.kubernetes.pod.namespace") is None
    assert validate_cilium_label_key("any:app") is None
    assert validate_cilium_label_key("app") is None
    problem = validate_cilium_label_key("reserved:host")
    assert problem is not None and "not supported by nodemesh" in problem


LABELS = {"app": "web", "tier": "front", "env": "prod"}


@pytest.mark.parametrize(("selector", "expected"), [
    (None, False),
    ({}, True),
    ({"matchLabels": {"app": "web"}}, True),
    ({"matchLabels": {"app": "web", "tier": "back"}}, False),
    ({"matchLabels": {"k8s:app": "web", "any:env": "prod"}}, True),
    ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "dev"]}]}, True),
    ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["dev"]}]}, False),
    ({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]}, True),
    ({"matchExpressions": [{"key": "missing", "operator": "NotIn", "values": ["x"]}]}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, False),
    ({"matchExpressions": [{"key": "gone", "operator": "DoesNotExist"}]}, True),
    ({"matchLabels": {"app": "web"},
      "matchExpressions": [{"key": "tier", "operator": "In", "values": ["back"]}]}, False),
])
def test_selector_matches(selector: dict | None, expected: bool) -> None:
    assert selector_matches(selector, LABELS) is expected


def test_service_selects() -> None:
    assert service_selects({"app": "web"}, LABELS)
    assert not service_selects({"app": "api"}, LABELS)
    assert not service_selects({}, LABELS)
    assert not service_selects(None, LABELS)
