"""Label syntax, selector parsing and matching (the one matcher every caller uses)."""

from __future__ import annotations

import pytest

from nodemesh.errors import NodemeshError
from nodemesh.model.labels import (
    bare_label,
    parse_selector,
    plain_label,
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


def test_an_unknown_operator_selects_nothing() -> None:
    assert not selector_matches({"matchExpressions": [{"key": "app", "operator": "Gt"}]}, LABELS)


def test_lookups_decide_how_keys_find_labels() -> None:
    prefixed = {"matchLabels": {"k8s:app": "web"}}
    assert bare_label(LABELS, "k8s:app") == "web" and plain_label(LABELS, "k8s:app") is None
    assert selector_matches(prefixed, LABELS)  # the default strips Cilium's sources
    assert not selector_matches(prefixed, LABELS, plain_label)
    # Any lookup: here every key is looked up upper-cased.
    assert selector_matches({"matchLabels": {"app": "WEB"}}, {"app": "web"},
                            lambda labels, key: (labels.get(key) or "").upper() or None)


def test_the_callers_share_the_matcher() -> None:
    """The policy compiler, the route inputs and the mTLS modes match through model.labels."""
    from nodemesh.mtls.peerauth import resolve_modes
    from nodemesh.policy.selectors import cilium_matches, matches
    from nodemesh.route.inputs import Pod, Service

    sel = {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}
    assert matches(sel, LABELS) is selector_matches(sel, LABELS, plain_label) is True
    assert not matches({"matchLabels": {"k8s:app": "web"}}, LABELS)
    assert cilium_matches({"matchLabels": {"k8s:app": "web"}}, {"app": "web"})
    assert cilium_matches({"matchLabels": {"reserved:host": ""}}, {"reserved:host": ""})
    assert not cilium_matches({"matchLabels": {"k8s:host": ""}}, {"reserved:host": ""})
    svc = Service(namespace="a", name="s", cluster_ip="10.96.0.1", ports=(), selector={"app": "web"})
    pod = {"namespace": "a", "name": "p", "ip": "10.0.0.1", "node": "n1", "labels": LABELS}
    assert svc.selects(Pod(**pod))
    assert not svc.selects(Pod(**{**pod, "namespace": "b"}))
    assert not Service(namespace="a", name="s", cluster_ip="10.96.0.1", ports=()).selects(Pod(**pod))
    pa = {"metadata": {"namespace": "a", "name": "strict"},
          "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}}
    pods = [{"metadata": {"namespace": "a", "name": n, "labels": {"app": app}}}
            for n, app in (("w", "web"), ("x", "api"))]
    modes = resolve_modes(pods, [pa], default="PERMISSIVE")
    assert modes[("a", "w")].mode == "STRICT" and modes[("a", "x")].mode == "PERMISSIVE"


@pytest.mark.parametrize(("text", "expected"), [
    ("app=web", {"matchLabels": {"app": "web"}, "matchExpressions": []}),
    ("app==web,tier!=db", {"matchLabels": {"app": "web"}, "matchExpressions": [
        {"key": "tier", "operator": "NotIn", "values": ["db"]}]}),
    ("canary,!legacy", {"matchLabels": {}, "matchExpressions": [
        {"key": "canary", "operator": "Exists"}, {"key": "legacy", "operator": "DoesNotExist"}]}),
    ("env in (a, b),x notin (c)", {"matchLabels": {}, "matchExpressions": [
        {"key": "env", "operator": "In", "values": ["a", "b"]},
        {"key": "x", "operator": "NotIn", "values": ["c"]}]}),
])
def test_parse_selector(text: str, expected: dict) -> None:
    assert parse_selector(text) == expected


def test_parse_selector_refuses_what_it_cannot_read() -> None:
    with pytest.raises(NodemeshError, match="cannot parse") as e:
        parse_selector("app=web,=x")
    assert e.value.exit_code == 2


def test_the_cli_parser_is_the_model_one() -> None:
    from nodemesh.cli.selectors import parse_selector as cli_parse

    assert cli_parse is parse_selector
