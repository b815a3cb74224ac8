"""The node snapshot (pure): services, target ports, ipcache, identities, policy, redirects."""

from __future__ import annotations

import dataclasses

import pytest

from nodemesh.datapath import layout as L
from nodemesh.node.services import lb_services, named_ports, resolve_target_port
from nodemesh.node.snapshot import (
    Endpoint,
    NodeInputs,
    Redirects,
    build_node_snapshot,
    ipcache_entries,
    known_identities,
    label_key,
    label_sets,
    missing_identities,
    pods_with_address,
)
from nodemesh.route import RedirectKey


def pod(name: str, ip: str | None, node: str = "node1", labels: dict | None = None,
        ports: list | None = None, ready: bool = True, ns: str = "default",
        deleting: bool = False) -> dict:
    meta = {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels or {"app": name}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports or []}]},
            "status": status}


def service(name: str, vip: str, selector: dict, ports: list, ns: str = "default",
            **spec) -> dict:
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": vip, "selector": selector, "ports": ports, **spec}}


NS = [{"kind": "Namespace", "metadata": {"name": "default", "labels": {}}}]


def objects(**kinds) -> dict:
    base = {k: [] for k in ("Pod", "Service", "Namespace", "NetworkPolicy", "CiliumNetworkPolicy",
                            "Identity", "PeerAuthentication", "HTTPRoute", "GRPCRoute",
                            "TrustBundle")}
    base["Namespace"] = list(NS)
    base.update(kinds)
    return base


def inputs(objs: dict, **kw) -> NodeInputs:
    inp = NodeInputs(node="node1", node_ip="172.30.0.1",
                     node_ips={"node1": "172.30.0.1", "node2": "172.30.0.2"}, objects=objs,
                     proxy=False, **kw)
    ids = {label_key(labels): 256 + i
           for i, labels in enumerate(sorted(missing_identities(inp), key=str))}
    return dataclasses.replace(inp, identities={**inp.identities, **ids})


# ---- services ---------------------------------------------------------------------------------
def test_named_target_port_resolves_per_pod():
    a = pod("a", "10.244.1.2", ports=[{"name": "http", "containerPort": 8080}])
    b = pod("b", "10.244.1.3", ports=[{"name": "http", "containerPort": 9090}])
    port = {"port": 80, "targetPort": "http"}
    assert resolve_target_port(a, port) == 8080
    assert resolve_target_port(b, port) == 9090
    assert resolve_target_port(pod("c", "10.244.1.4"), port) is None
    assert resolve_target_port(a, {"port": 80}) == 80
    assert resolve_target_port(a, {"port": 80, "targetPort": "http", "protocol": "UDP"}) is None


def test_named_ports_by_name_and_protocol():
    p = pod("a", "10.244.1.2", ports=[{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                      {"name": "dns", "containerPort": 53},
                                      {"containerPort": 9}])
    assert named_ports(p) == {"dns": (("UDP", 53), ("TCP", 53))}


def test_lb_services_takes_ready_selected_pods_only():
    pods = [pod("web-1", "10.244.1.2", labels={"app": "web"}),
            pod("web-2", "10.244.2.2", labels={"app": "web"}, ready=False),
            pod("web-3", "10.244.2.3", labels={"app": "web"}, deleting=True),
            pod("web-4", None, labels={"app": "web"}),
            pod("db", "10.244.1.9", labels={"app": "db"}),
            pod("web-x", "10.244.1.7", labels={"app": "web"}, ns="other")]
    svcs, names = lb_services([service("web", "10.96.0.10", {"app": "web"}, [{"port": 80}])],
                              pods)
    assert [(s.vip, s.port, list(s.backends)) for s in svcs] == [
        ("10.96.0.10", 80, [("10.244.1.2", 80)])]
    assert names == {("10.96.0.10", 80): ("default", "web")}


def test_lb_services_headless_skipped_and_affinity_and_redirect():
    svc = service("web", "10.96.0.10", {"app": "web"}, [{"port": 80, "targetPort": 8080}],
                  sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}})
    svc["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "maglev"}
    headless = service("h", "None", {"app": "web"}, [{"port": 80}])
    key = RedirectKey("10.96.0.10", 80, "TCP")
    svcs, _ = lb_services([svc, headless], [pod("w", "10.244.1.2", labels={"app": "web"})],
                          {key: 15001})
    (s,) = svcs
    assert s.affinity_timeout == 30 and s.algorithm == "maglev" and s.l7_proxy_port == 15001
    assert list(s.backends) == [("10.244.1.2", 8080)]


# ---- pods, identities, ipcache ---------------------------------------------------------------------
def test_pods_with_address_overlays_attached_and_starting():
    stored = pod("a", None)
    inp = NodeInputs(node="node1", node_ip="172.30.0.1", node_ips={}, objects=objects(
        Pod=[stored, pod("b", "10.244.2.2", node="node2"), pod("gone", "10.244.1.8", deleting=True)]),
        attached={"uid-a": Endpoint("uid-a", "default", "a", "10.244.1.2", 7)},
        starting={"uid-c": (pod("c", None), "10.244.1.3")})
    got = {uid: ip for uid, (_, ip) in pods_with_address(inp).items()}
    assert got == {"uid-a": "10.244.1.2", "uid-b": "10.244.2.2", "uid-c": "10.244.1.3"}


def test_missing_identities_and_build_refuses_without_them():
    objs = objects(Pod=[pod("a", "10.244.1.2"), pod("a2", "10.244.1.3", labels={"app": "a"})])
    inp = NodeInputs(node="node1", node_ip="172.30.0.1", node_ips={}, objects=objs, proxy=False)
    missing = missing_identities(inp)
    assert len(missing) == 1 and missing[0]["app"] == "a"  # one label set for both pods
    with pytest.raises(ValueError, match="no identity"):
        build_node_snapshot(inp)
    known = known_identities([{"metadata": {"name": "300"}, "spec": {"labels": missing[0]}}])
    snap = build_node_snapshot(dataclasses.replace(inp, identities=known))
    assert snap.identity_of == {"uid-a": 300, "uid-a2": 300}
    assert set(label_sets(inp)) == {"uid-a", "uid-a2"}


def test_ipcache_has_world_nodes_node_addresses_and_pods():
    pods = {"u1": (pod("a", "10.244.1.2"), "10.244.1.2"),
            "u2": (pod("b", "10.244.2.2", node="node2"), "10.244.2.2")}
    entries = ipcache_entries("node1", "172.30.0.1", {"node1": "172.30.0.1", "node2": "172.30.0.2"},
                              pods, {"u1": 300, "u2": 301}, {"10.244.2.2": 1})
    by = {(L.ip4_str(k.addr), k.prefixlen): v for k, v in entries}
    assert by[("0.0.0.0", 0)].identity == L.Identity.WORLD
    assert by[("172.30.0.1", 32)].identity == L.Identity.HOST
    assert by[("172.30.0.2", 32)].identity == L.Identity.REMOTE_NODE
    assert by[("169.254.20.10", 32)].identity == L.Identity.HOST
    assert by[("10.244.1.2", 32)].identity == 300
    assert by[("10.244.1.2", 32)].node_ip == L.ip4("172.30.0.1")
    assert by[("10.244.2.2", 32)].node_ip == L.ip4("172.30.0.2")
    assert by[("10.244.2.2", 32)].flags == 1


# ---- the whole snapshot -------------------------------------------------------------------------
def test_snapshot_programs_attached_pods_only_and_names_services():
    objs = objects(Pod=[pod("a", "10.244.1.2", labels={"app": "web"}),
                        pod("b", "10.244.2.2", node="node2", labels={"app": "web"})],
                   Service=[service("web", "10.96.0.10", {"app": "web"}, [{"port": 80}])])
    inp = inputs(objs, attached={"uid-a": Endpoint("uid-a", "default", "a", "10.244.1.2", 7,
                                                      netns_cookie=99)})
    snap = build_node_snapshot(inp)
    assert snap.programmed == {"uid-a"}
    assert [int(k.value) for k, _ in snap.endpoints] == [7]
    assert [k.value for k, _ in snap.netns] == [99]
    assert set(snap.policy) == {7}
    assert not snap.policy_entries()[0]  # no policy: nothing in nm_policy (allow all)
    assert snap.context.services_by_address == {("10.96.0.10", 80): ("default", "web")}
    assert snap.context.by_ip["10.244.1.2"].pod_name == "a"
    assert snap.envoy is None and snap.redirects == Redirects()
    assert len(snap.lb.backend_ids) == 2


def test_policy_that_does_not_compile_keeps_the_previous_one():
    a = Endpoint("uid-a", "default", "a", "10.244.1.2", 7)
    objs = objects(Pod=[pod("a", "10.244.1.2")])
    first = build_node_snapshot(inputs(objs, attached={"uid-a": a}))
    bad = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "bad", "namespace": "default"},
           "spec": {"endpointSelector": {}, "ingress": [{"fromCIDR": [
               f"10.{i}.0.0/16" for i in range(40)], "toPorts": [{"ports": [
                   {"port": str(p), "protocol": "TCP"} for p in range(1, 20)]}]}]}}
    second = build_node_snapshot(inputs(objects(Pod=[pod("a", "10.244.1.2")],
                                                CiliumNetworkPolicy=[bad]),
                                        attached={"uid-a": a}, previous_policy=first.policy))
    assert "16 per CIDR" in second.policy_errors["default/a"]
    # the previous entries stay, but the ingress the new policy isolates is closed
    kept = second.policy[7]
    assert (kept.policy, kept.cidr) == (first.policy[7].policy, first.policy[7].cidr)
    assert (first.policy[7].ingress_enforced, kept.ingress_enforced) == (False, True)
    assert second.programmed == {"uid-a"}


def test_redirects_that_move_or_go_are_not_kept_during_the_change():
    k1, k2, k3 = (RedirectKey("10.96.0.10", 80, "TCP"), RedirectKey("10.96.0.11", 80, "TCP"),
                  RedirectKey("10.244.1.2", 8080, "TCP"))
    applied = Redirects({k1: 15001, k2: 15002}, {k3: 15003}, {k3: frozenset({0})})
    new = Redirects({k1: 15001, k2: 15009}, {}, {})
    kept = applied.kept_while_changing_to(new)
    assert kept == Redirects({k1: 15001}, {}, {})
    assert applied.kept_while_changing_to(applied) == applied


def test_l7_redirect_entries_per_client_identity():
    k = RedirectKey("10.244.1.2", 8080, "TCP")
    udp = RedirectKey("10.244.1.2", 53, "UDP")
    entries = Redirects({}, {k: 15003, udp: 15004}, {k: frozenset({300, 301})}).l7_redir_entries()
    assert [(kk.identity, v.proxy_port) for kk, v in entries] == [(300, 15003), (301, 15003)]
    anyone = Redirects({}, {k: 15003}, {}).l7_redir_entries()
    assert [kk.identity for kk, _ in anyone] == [0]


def test_interim_lb_keeps_ids_of_final_lb():
    objs = objects(Pod=[pod("a", "10.244.1.2", labels={"app": "web"})],
                   Service=[service("web", "10.96.0.10", {"app": "web"}, [{"port": 80}])])
    key = RedirectKey("10.96.0.10", 80, "TCP")
    inp = inputs(objs, applied=Redirects({key: 15001}, {}, {}))
    snap = build_node_snapshot(inp)  # no Envoy: the redirect goes
    assert snap.redirects_interim == Redirects() and snap.lb is snap.lb_interim
    assert all(v.l7_proxy_port == 0 for v in snap.lb.svc.values())


def route(name: str, parent: str, backend: str, port: int = 80) -> dict:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}",
                         "generation": 1},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent,
                                     "port": port}],
                     "rules": [{"backendRefs": [{"name": backend, "port": port}]}]}}


def routed_objects(with_route: bool = True) -> dict:
    return objects(
        Pod=[pod("a", "10.244.1.2", labels={"app": "web"}),
             pod("b", "10.244.1.3", labels={"app": "api"})],
        Service=[service("web", "10.96.0.10", {"app": "web"}, [{"port": 80}]),
                 service("api", "10.96.0.11", {"app": "api"}, [{"port": 80}])],
        HTTPRoute=[route("r", "web", "api")] if with_route else [])


def test_a_route_gives_envoy_resources_and_a_service_redirect_that_waits_for_envoy():
    inp = dataclasses.replace(inputs(routed_objects()), proxy=True)
    snap = build_node_snapshot(inp)
    assert snap.envoy is not None and snap.envoy.snapshot.names(
        "type.googleapis.com/envoy.config.listener.v3.Listener")
    key = RedirectKey("10.96.0.10", 80, "TCP")
    assert set(snap.redirects.service) == {key}
    # Nothing was redirected before: the datapath first gets the services without it ...
    assert snap.redirects_interim == Redirects()
    assert all(v.l7_proxy_port == 0 for v in snap.lb_interim.svc.values())
    # ... and the redirect once Envoy has the listener, with the same service ids.
    port = snap.redirects.service[key]
    assert port in {v.l7_proxy_port for v in snap.lb.svc.values()}
    assert snap.lb.rev_nat == snap.lb_interim.rev_nat
    assert snap.envoy.listener_targets[port] == key
    # The route's status comes with it.
    assert any(k.name == "r" for k in snap.envoy.result.route_statuses)


def test_a_redirect_already_in_the_kernel_stays_while_envoy_changes():
    inp = dataclasses.replace(inputs(routed_objects()), proxy=True)
    first = build_node_snapshot(inp)
    again = build_node_snapshot(dataclasses.replace(
        inp, applied=first.redirects, proxy_ports=first.envoy.result.ports,
        previous_lb=first.lb))
    assert again.redirects_interim == first.redirects == again.redirects
    gone = build_node_snapshot(dataclasses.replace(
        inputs(routed_objects(with_route=False)), proxy=True, applied=first.redirects,
        proxy_ports=first.envoy.result.ports, previous_lb=first.lb))
    assert gone.redirects == Redirects() == gone.redirects_interim  # removed before Envoy changes
