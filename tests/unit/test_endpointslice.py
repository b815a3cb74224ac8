"""EndpointSlice: validation, and selector-less Services balancing to their slices' ready
endpoints in the socket LB and the node Envoy alike (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from nodemesh.errors import InvalidManifest
from nodemesh.model.endpointslice import slice_backends
from nodemesh.model.validate import validate_objects
from nodemesh.node.services import lb_services
from nodemesh.node.snapshot import build_node_snapshot
from tests.unit.test_node_snapshot import inputs, objects, pod, route, service


def eps(name: str, svc: str, endpoints: list, ports: list | None = None, ns: str = "default",
        **extra) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": ports if ports is not None else [{"name": "http", "port": 8080}], **extra}


def ep(ip: str, ready: bool | None = True, node: str | None = None) -> dict:
    out: dict = {"addresses": [ip]}
    if ready is not None:
        out["conditions"] = {"ready": ready}
    if node:
        out["nodeName"] = node
    return out


def selectorless(name: str = "ext", vip: str = "10.96.0.20", ports: list | None = None) -> dict:
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": vip, "ports": ports or [{"name": "http", "port": 80}]}}


# ---- validation -----------------------------------------------------------------------------
def test_a_slice_validates_and_gets_kubernetes_defaults():
    [obj] = validate_objects([eps("ext-1", "ext", [ep("10.244.1.5")],
                                  ports=[{"name": "http", "port": 8080}])], "f.yaml")
    assert obj["metadata"]["namespace"] == "default"
    assert obj["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]


@pytest.mark.parametrize(("change", "message"), [
    ({"addressType": "IPv6"}, "addressType: IPv6 is not supported (nodemesh is IPv4-only)"),
    ({"addressType": "FQDN"}, "addressType: FQDN is not supported"),
    ({"addressType": None}, "addressType: required"),
    ({"endpoints": None}, "endpoints: required"),
    ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses: must not be empty"),
    ({"endpoints": [{"addresses": ["10.1.2"]}]},
     'endpoints[0].addresses[0]: must be an IPv4 address (got "10.1.2")'),
    ({"endpoints": [{"addresses": ["127.0.0.1"]}]}, "endpoints[0].addresses[0]: may not be"),
    ({"endpoints": [{"addresses": ["10.1.2.3"], "conditions": {"ready": "yes"}}]},
     "endpoints[0].conditions.ready: must be true or false (got a string)"),
    ({"endpoints": [{"addresses": ["10.1.2.3"], "zoen": "a"}]},
     'endpoints[0].zoen: unknown field (did you mean "zone"?)'),
    ({"ports": [{"name": "http", "port": 0}]}, "ports[0].port: must be 1-65535"),
    ({"ports": [{"name": "http", "port": 80, "protocol": "SCTP"}]},
     "ports[0].protocol: SCTP is not supported"),
    ({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]},
     'ports[1].name: duplicate port name "a" for TCP (same as ports[0].name)'),
    ({"spec": {}}, "spec: unknown field"),
])
def test_bad_slices_are_refused_naming_the_field(change: dict, message: str):
    doc = eps("ext-1", "ext", [ep("10.244.1.5")])
    for k, v in change.items():
        if v is None:
            doc.pop(k)
        else:
            doc[k] = v
    with pytest.raises(InvalidManifest) as e:
        validate_objects([doc], "f.yaml")
    assert any(line.startswith("error: EndpointSlice default/ext-1: " + message)
               for line in e.value.message.splitlines()), e.value.message


# ---- which endpoints are backends ----------------------------------------------------------
def test_slice_backends_match_the_port_by_name_and_take_ready_endpoints_only():
    s = [eps("a", "ext", [ep("10.0.0.1"), ep("10.0.0.2", ready=False), ep("10.0.0.3", None)],
             ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                    {"name": "metrics", "port": 9090, "protocol": "TCP"}]),
         eps("b", "ext", [ep("10.0.0.4")], ports=[{"name": "http", "port": 8081,
                                                  "protocol": "TCP"}])]
    got = [(ip, port) for ip, port, _ in slice_backends(s, "http", "TCP")]
    # unset ready counts as ready (Kubernetes); each slice carries its own number for the port
    assert got == [("10.0.0.1", 8080), ("10.0.0.3", 8080), ("10.0.0.4", 8081)]
    assert [ip for ip, _, _ in slice_backends(s, "metrics", "TCP")] == ["10.0.0.1", "10.0.0.3"]
    assert slice_backends(s, "http", "UDP") == []
    assert slice_backends(s, "", "TCP") == []  # an unnamed service port wants an unnamed one


def test_an_unreachable_node_s_endpoints_are_no_backend():
    s = [eps("a", "ext", [ep("10.0.0.1", node="node1"), ep("10.0.0.2", node="node2")])]
    assert [ip for ip, _, _ in slice_backends(s, "http", "TCP", frozenset({"node2"}))] == \
        ["10.0.0.1"]


def test_lb_services_uses_slices_only_for_services_without_a_selector():
    slices = [eps("ext-1", "ext", [ep("10.244.1.5"), ep("10.244.2.6", ready=False)]),
              eps("web-1", "web", [ep("10.9.9.9")]),  # web has a selector: ignored
              eps("other", "ext", [ep("10.8.8.8")], ns="prod")]  # another namespace's ext
    pods = [pod("w", "10.244.1.7", labels={"app": "web"},
                ports=[{"name": "http", "containerPort": 8080}])]
    svcs = [selectorless(),
            service("web", "10.96.0.10", {"app": "web"}, [{"name": "http", "port": 80,
                                                           "targetPort": "http"}])]
    out, names = lb_services(svcs, pods, None, slices)
    by_vip = {s.vip: s.backends for s in out}
    assert by_vip == {"10.96.0.20": [("10.244.1.5", 8080)], "10.96.0.10": [("10.244.1.7", 8080)]}
    assert names[("10.96.0.20", 80)] == ("default", "ext")


def test_pods_on_an_unreachable_node_leave_every_service():
    pods = [pod("a", "10.244.1.2", node="node1", labels={"app": "web"}),
            pod("b", "10.244.2.2", node="node2", labels={"app": "web"})]
    svcs = [service("web", "10.96.0.10", {"app": "web"}, [{"port": 80}])]
    [both], _ = lb_services(svcs, pods)
    [one], _ = lb_services(svcs, pods, unreachable=frozenset({"node2"}))
    assert both.backends == [("10.244.1.2", 80), ("10.244.2.2", 80)]
    assert one.backends == [("10.244.1.2", 80)]


def node(name: str, unreachable: bool = False) -> dict:
    spec: dict = {"podCIDR": "10.244.1.0/24"}
    if unreachable:
        spec["taints"] = [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]
    return {"kind": "Node", "metadata": {"name": name}, "spec": spec}


def _cluster_endpoints(snap, name_part: str) -> list[tuple[str, int]]:
    out = []
    for cla in snap.envoy.result.snapshot.endpoints:
        if name_part in cla.cluster_name:
            for group in cla.endpoints:
                for lb in group.lb_endpoints:
                    a = lb.endpoint.address.socket_address
                    out.append((a.address, a.port_value))
    return sorted(out)


def test_a_route_to_a_selectorless_service_gets_the_slice_endpoints_in_envoy():
    objs = objects(
        Pod=[pod("c", "10.244.1.9", labels={"app": "client"}),
             pod("s1", "10.244.1.5", labels={"app": "srv"}),
             pod("s2", "10.244.2.6", node="node2", labels={"app": "srv"})],
        Service=[selectorless("ext", "10.96.0.20", [{"name": "http", "port": 80}])],
        EndpointSlice=[eps("ext-1", "ext", [ep("10.244.1.5", node="node1"),
                                            ep("10.244.2.6", node="node2"),
                                            ep("10.244.2.7", ready=False, node="node2")])],
        HTTPRoute=[route("r", "ext", "ext")],
        Node=[node("node1"), node("node2")])
    snap = build_node_snapshot(dataclasses.replace(inputs(objs), proxy=True))
    assert _cluster_endpoints(snap, "ext") == [("10.244.1.5", 8080), ("10.244.2.6", 8080)]
    # the socket LB (the datapath's backend table) has the same two
    assert sorted(k[:2] for k in snap.lb.backend_ids) == [("10.244.1.5", 8080),
                                                          ("10.244.2.6", 8080)]
    # node2 goes out of service: its endpoint leaves Envoy's cluster too
    objs["Node"] = [node("node1"), node("node2", unreachable=True)]
    snap = build_node_snapshot(dataclasses.replace(inputs(objs), proxy=True))
    assert _cluster_endpoints(snap, "ext") == [("10.244.1.5", 8080)]
