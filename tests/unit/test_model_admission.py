"""Admission: namespaces, ClusterIP allocation and immutability, named target ports."""

from __future__ import annotations

import copy
import textwrap

import pytest

from nodemesh.errors import InvalidManifest
from nodemesh.model.admission import SERVICE_CIDR, admit, allocate_cluster_ip
from nodemesh.model.manifest import load_manifests
from nodemesh.model.validate import validate_objects


def objs(text: str) -> list[dict]:
    return validate_objects(load_manifests(textwrap.dedent(text), "t.yaml"), "t.yaml")


class FakeStore:
    def __init__(self, objects: list[dict] | None = None) -> None:
        self.objects = [copy.deepcopy(o) for o in objects or []]

    def existing(self, kind: str, namespace: str | None) -> list[dict]:
        return [copy.deepcopy(o) for o in self.objects if o["kind"] == kind
                and (namespace is None or o["metadata"].get("namespace") == namespace)]

    def apply(self, text: str) -> list[dict]:
        out = admit(objs(text), self.existing)
        for o in out:
            key = (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
            self.objects = [s for s in self.objects if (
                s["kind"], s["metadata"].get("namespace"), s["metadata"]["name"]) != key]
            self.objects.append(o)
        return out


def admit_errors(store: FakeStore, text: str) -> list[str]:
    with pytest.raises(InvalidManifest) as e:
        store.apply(text)
    return e.value.errors


def svc(name: str = "web", ns: str = "default", cluster_ip: str | None = None,
        target: str | int = 8080, selector: str = "app: web") -> str:
    ip = f"  clusterIP: {cluster_ip}\n" if cluster_ip is not None else ""
    return (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
            f"spec:\n{ip}  selector:\n    {selector}\n  ports:\n  - port: 80\n"
            f"    targetPort: {target}\n")


def deployment(ns: str = "default", port_name: str = "http", protocol: str = "TCP") -> str:
    return textwrap.dedent(f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: web
          namespace: {ns}
        spec:
          selector:
            matchLabels:
              app: web
          template:
            metadata:
              labels:
                app: web
            spec:
              containers:
              - name: web
                image: nginx
                ports:
                - name: {port_name}
                  containerPort: 8080
                  protocol: {protocol}
        """)


def test_allocate_lowest_free_address_skipping_reserved() -> None:
    assert allocate_cluster_ip(SERVICE_CIDR, set()) == "10.96.0.2"
    assert allocate_cluster_ip(SERVICE_CIDR, {"10.96.0.2", "10.96.0.3"}) == "10.96.0.4"
    used = {f"10.96.0.{i}" for i in range(2, 10)}
    assert allocate_cluster_ip(SERVICE_CIDR, used) == "10.96.0.11"


def test_allocate_in_a_full_cidr_raises() -> None:
    with pytest.raises(Exception, match="no free address"):
        allocate_cluster_ip("10.0.0.0/30", {"10.0.0.1", "10.0.0.2"})


def test_services_get_distinct_cluster_ips_in_order() -> None:
    store = FakeStore()
    out = store.apply(svc("a") + "---\n" + svc("b") + "---\n" + svc("h", cluster_ip='"None"'))
    assert [o["spec"].get("clusterIP") for o in out] == ["10.96.0.2", "10.96.0.3", "None"]
    assert out[0]["spec"]["clusterIPs"] == ["10.96.0.2"]
    assert [o["spec"]["clusterIP"] for o in store.apply(svc("c"))] == ["10.96.0.4"]


def test_explicit_cluster_ip_is_kept_and_not_allocated_to_others() -> None:
    store = FakeStore()
    out = store.apply(svc("a") + "---\n" + svc("b", cluster_ip="10.96.0.2"))
    assert [o["spec"]["clusterIP"] for o in out] == ["10.96.0.3", "10.96.0.2"]


def test_reapply_keeps_the_stored_cluster_ip() -> None:
    store = FakeStore()
    first = store.apply(svc("a"))[0]["spec"]["clusterIP"]
    store.apply(svc("b"))
    again = store.apply(svc("a", target=9090))[0]
    assert again["spec"]["clusterIP"] == first
    assert again["spec"]["ports"][0]["targetPort"] == 9090


def test_cluster_ip_change_is_refused() -> None:
    store = FakeStore()
    store.apply(svc("a"))
    assert admit_errors(store, svc("a", cluster_ip="10.96.0.50")) == [
        'Service default/a: spec.clusterIP: field is immutable (is "10.96.0.2", cannot become '
        '"10.96.0.50"; delete and re-create the Service)'
    ]


def test_cluster_ip_outside_the_cidr_or_taken_is_refused() -> None:
    store = FakeStore()
    store.apply(svc("a"))
    assert admit_errors(store, svc("b", cluster_ip="10.0.0.5") + "---\n"
                        + svc("c", cluster_ip="10.96.0.2") + "---\n"
                        + svc("d", cluster_ip="10.96.255.255")) == [
        'Service default/b: spec.clusterIP: "10.0.0.5" is outside the service CIDR 10.96.0.0/16',
        'Service default/c: spec.clusterIP: "10.96.0.2" is already allocated to Service default/a',
        'Service default/d: spec.clusterIP: "10.96.255.255" is the network or broadcast address '
        "of 10.96.0.0/16",
    ]


def test_reserved_addresses_may_be_asked_for_explicitly() -> None:
    out = FakeStore().apply(svc("dns", cluster_ip="10.96.0.10"))
    assert out[0]["spec"]["clusterIP"] == "10.96.0.10"


def test_namespace_must_exist() -> None:
    assert admit_errors(FakeStore(), svc("a", ns="prod")) == [
        'Service prod/a: metadata.namespace: namespace "prod" does not exist (create it first, or '
        "apply a Namespace prod in the same apply)"
    ]


def test_namespace_in_the_same_apply_or_stored() -> None:
    ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n---\n"
    store = FakeStore()
    assert len(store.apply(ns + svc("a", ns="prod"))) == 2
    assert len(store.apply(svc("b", ns="prod"))) == 1


def test_named_target_port_missing_in_selected_workloads() -> None:
    store = FakeStore()
    assert admit_errors(store, deployment(port_name="web") + "---\n" + svc(target="http")) == [
        'Service default/web: spec.ports[0].targetPort: no container port named "http" in the '
        "pods this service selects"
    ]


def test_named_target_port_with_another_protocol() -> None:
    store = FakeStore()
    assert admit_errors(store, deployment(protocol="UDP") + "---\n" + svc(target="http")) == [
        'Service default/web: spec.ports[0].targetPort: the container port named "http" is not '
        "TCP in the pods this service selects"
    ]


def test_named_target_port_found_in_stored_or_incoming_workloads() -> None:
    store = FakeStore()
    store.apply(deployment())
    assert store.apply(svc(target="http"))[0]["spec"]["ports"][0]["targetPort"] == "http"
    # A service that selects nothing yet is accepted: the port is resolved when pods appear.
    assert store.apply(svc("other", target="grpc", selector="app: other"))


def test_named_target_port_checks_only_the_services_namespace() -> None:
    ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n---\n"
    store = FakeStore()
    store.apply(ns + deployment(ns="prod", port_name="web"))
    assert store.apply(svc(target="http"))  # nothing in "default" is selected


def test_deployment_selector_is_immutable() -> None:
    store = FakeStore()
    store.apply(deployment())
    changed = (deployment()
               .replace("      app: web\n  template", "      app: web\n      v: '2'\n  template")
               .replace("        app: web\n    spec", "        app: web\n        v: '2'\n    spec"))
    assert admit_errors(store, changed) == [
        "Deployment default/web: spec.selector: field is immutable (delete and re-create the "
        "Deployment to change it)"
    ]
    # Other changes are fine.
    assert store.apply(deployment().replace("image: nginx", "image: nginx:2"))


POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: p
  labels:
    app: p
spec:
  containers:
  - name: c
    image: busybox
    command: ["sleep", "3600"]
"""


def test_pod_spec_is_immutable_but_labels_may_change() -> None:
    store = FakeStore()
    store.apply(POD)
    assert store.apply(POD)  # the same spec again is fine
    assert store.apply(POD.replace("app: p", "app: q"))
    assert admit_errors(store, POD.replace('"3600"', '"60"')) == [
        "Pod default/p: spec: a Pod's spec cannot be changed (delete and re-create the Pod, or use "
        "a Deployment)"
    ]


def test_admit_does_not_modify_its_input() -> None:
    incoming = objs(svc("a"))
    before = copy.deepcopy(incoming)
    admit(incoming, FakeStore().existing)
    assert incoming == before


def test_reapplying_a_scheduled_pod_keeps_its_node() -> None:
    store = FakeStore()
    store.apply(POD)
    store.objects[0]["spec"]["nodeName"] = "node-2"  # what the scheduler does
    assert store.apply(POD)[0]["spec"]["nodeName"] == "node-2"
    assert admit_errors(store, POD.replace("spec:\n", "spec:\n  nodeName: node-1\n")) == [
        "Pod default/p: spec: a Pod's spec cannot be changed (delete and re-create the Pod, or use "
        "a Deployment)"
    ]
