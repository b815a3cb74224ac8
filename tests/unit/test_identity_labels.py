"""Security labels and reserved identities."""

from __future__ import annotations

import pytest

from nodemesh.identity import (
    RESERVED_BY_NAME,
    RESERVED_LABELS,
    Identity,
    is_reserved,
    label_value,
    reserved_labels,
    security_labels,
    security_labels_from,
)
from nodemesh.identity.labels import (
    namespace_labels_of,
    namespace_of,
    pod_labels_of,
)


def pod(labels: dict[str, str], ns: str = "prod", sa: str | None = None) -> dict:
    spec = {"containers": [{"name": "c"}]}
    if sa:
        spec["serviceAccountName"] = sa
    return {"kind": "Pod", "metadata": {"name": "p", "namespace": ns, "labels": labels}, "spec": spec}


def ns_obj(name: str, labels: dict[str, str] | None = None) -> dict:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def test_security_labels_shape() -> None:
    got = security_labels(pod({"app": "web", "tier": "fe"}, sa="web-sa"), ns_obj("prod", {"team": "a"}))
    assert got == {
        "app": "web",
        "tier": "fe",
        "io.kubernetes.pod.namespace": "prod",
        "io.cilium.k8s.namespace.labels.team": "a",
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod",
        "io.kubernetes.pod.serviceaccount": "web-sa",
        "io.cilium.k8s.policy.serviceaccount": "web-sa",
    }
    assert list(got) == sorted(got)  # stable order: same dict for the same input


@pytest.mark.parametrize(
    "key",
    [
        "pod-template-hash",
        "controller-revision-hash",
        "statefulset.kubernetes.io/pod-name",
        "pod-template-generation",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/controller-uid",
        "controller-uid",
        "io.kubernetes.pod.namespace",  # a pod can not claim another namespace
        "io.cilium.k8s.namespace.labels.team",
        "failure-domain.beta.kubernetes.io/zone",
    ],
)
def test_volatile_and_reserved_pod_labels_are_dropped(key: str) -> None:
    got = security_labels(pod({"app": "web", key: "evil"}, ns="prod"), ns_obj("prod"))
    assert got.get(key) in (None, "prod")  # the namespace label is ours, not the pod's
    assert got["io.kubernetes.pod.namespace"] == "prod"
    assert got["app"] == "web"


def test_replicas_share_labels() -> None:
    a = security_labels(pod({"app": "web", "pod-template-hash": "abc"}), ns_obj("prod"))
    b = security_labels(pod({"app": "web", "pod-template-hash": "def"}), ns_obj("prod"))
    assert a == b


def test_namespace_changes_identity() -> None:
    a = security_labels(pod({"app": "web"}, ns="a"), ns_obj("a"))
    b = security_labels(pod({"app": "web"}, ns="b"), ns_obj("b"))
    c = security_labels(pod({"app": "web"}, ns="a"), ns_obj("a", {"env": "dev"}))
    assert len({tuple(x.items()) for x in (a, b, c)}) == 3


def test_missing_namespace_object_and_defaults() -> None:
    got = security_labels({"metadata": {"name": "p", "labels": {"x": "1"}}}, None)
    assert got["io.kubernetes.pod.namespace"] == "default"
    assert got["io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"] == "default"
    assert "io.kubernetes.pod.serviceaccount" not in got


def test_deprecated_service_account_field() -> None:
    p = pod({"app": "x"})
    p["spec"]["serviceAccount"] = "old"
    assert security_labels(p, None)["io.kubernetes.pod.serviceaccount"] == "old"


def test_security_labels_from_matches_security_labels() -> None:
    assert security_labels_from({"app": "w"}, "n", {"k": "v"}, "sa") == security_labels(
        pod({"app": "w"}, ns="n", sa="sa"), ns_obj("n", {"k": "v"})
    )


def test_label_value_sources() -> None:
    labels = {"app": "web", "io.kubernetes.pod.namespace": "prod", "reserved:host": ""}
    assert label_value(labels, "app") == "web"
    assert label_value(labels, "k8s:app") == "web"
    assert label_value(labels, "any:app") == "web"
    assert label_value(labels, "k8s:io.kubernetes.pod.namespace") == "prod"
    assert label_value(labels, "reserved:host") == ""
    assert label_value(labels, "any:host") == ""
    assert label_value(labels, "host") == ""
    assert label_value(labels, "k8s:host") is None
    assert label_value(labels, "reserved:app") is None
    assert label_value(labels, "container:app") is None
    assert label_value(labels, "k8s:reserved:host") is None


def test_label_helpers() -> None:
    labels = security_labels(pod({"app": "web"}, sa="s"), ns_obj("prod", {"team": "a"}))
    assert namespace_of(labels) == "prod"
    assert namespace_labels_of(labels) == {"team": "a", "kubernetes.io/metadata.name": "prod"}
    assert pod_labels_of(labels) == {"app": "web"}
    assert namespace_of(reserved_labels(Identity.HOST)) is None


def test_reserved_table() -> None:
    assert dict(RESERVED_BY_NAME) == {
        "host": 1, "world": 2, "unmanaged": 3, "health": 4, "init": 5, "remote-node": 6,
    }
    assert reserved_labels(Identity.WORLD) == {"reserved:world": ""}
    assert reserved_labels(6) == {"reserved:remote-node": ""}
    assert all(is_reserved(n) for n in RESERVED_LABELS)
    assert not is_reserved(0) and not is_reserved(256)
    with pytest.raises(KeyError):
        reserved_labels(256)
