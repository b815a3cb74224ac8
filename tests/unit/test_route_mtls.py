"""L7 upstreams to other nodes in mutual TLS: the client pod's certificate, the endpoint's
identity checked; local endpoints in clear (the node vouches for them)."""

from __future__ import annotations

import json

from nodemesh.route import translate
from nodemesh.route.inputs import MtlsView
from nodemesh.route.protos import to_dict
from tests.unit.routes import NS, gamma_test, mesh_cluster, mesh_input

TD = "cluster.local"


def view(tunnelled: bool = True) -> MtlsView:
    _, pods = mesh_cluster()
    return MtlsView(
        trust_domain=TD,
        clients={p.ip: f"spiffe://{TD}/ns/{p.namespace}/sa/default" for p in pods
                 if p.node == "n1" and p.ip},
        servers={p.ip: f"spiffe://{TD}/ns/{p.namespace}/sa/default" for p in pods
                 if p.node == "n2" and p.ip},
        tunnelled=frozenset(p.ip for p in pods if p.node == "n2" and p.ip) if tunnelled
        else frozenset())


def first_routed_cluster(result) -> dict:
    eps = {e.cluster_name: to_dict(e) for e in result.snapshot.endpoints}
    for c in result.snapshot.clusters:
        d = to_dict(c)
        if any(ep.get("metadata", {}).get("filter_metadata", {}).get("nodemesh", {}).get("tunnel")
               for g in eps[c.name].get("endpoints", []) for ep in g["lb_endpoints"]):
            return {"cluster": d, "endpoints": eps[c.name]}
    raise AssertionError("no cluster with an endpoint reached through the tunnel")


def test_remote_endpoints_are_reached_in_mutual_tls() -> None:
    routes = gamma_test(next(n for n in ("mesh-split.yaml",)))
    result = translate(mesh_input(routes, mtls=view()))
    found = first_routed_cluster(result)
    cluster, endpoints = found["cluster"], found["endpoints"]
    tunnelled = {ep["endpoint"]["address"]["socket_address"]["address"]:
                 ep["metadata"]["filter_metadata"]["nodemesh"].get("tunnel")
                 for g in endpoints["endpoints"] for ep in g["lb_endpoints"]}
    assert {ip: t for ip, t in tunnelled.items() if ip.startswith("10.244.2.")}
    assert all(t is None for ip, t in tunnelled.items() if ip.startswith("10.244.1."))
    names = [m["name"] for m in cluster["transport_socket_matches"]]
    assert names[0] == "plain" and any(n.startswith("mtls/") for n in names)
    tls = next(m for m in cluster["transport_socket_matches"] if m["name"].startswith("mtls/"))
    ctx = tls["transport_socket"]["typed_config"]["common_tls_context"]
    assert ctx["tls_certificate_sds_secret_configs"][0]["name"].startswith(f"spiffe://{TD}/ns/")
    san = ctx["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"][0]["matcher"]
    assert san["exact"] == f"spiffe://{TD}/ns/{NS}/sa/default"
    # the upstream sockets say "authenticated client" to the destination's datapath
    assert int(cluster["upstream_bind_config"]["socket_options"][0]["int_value"]) == 0x1000
    # the listener tells the cluster who the client is
    hcm = json.dumps([to_dict(lst) for lst in result.snapshot.listeners])
    assert "nodemesh.client" in hcm and "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%" in hcm


def test_without_mtls_nothing_changes() -> None:
    routes = gamma_test("mesh-split.yaml")
    plain = translate(mesh_input(routes))
    assert all("transport_socket_matches" not in to_dict(c) for c in plain.snapshot.clusters)
    assert "nodemesh.client" not in json.dumps([to_dict(x) for x in plain.snapshot.listeners])


def test_disable_mode_endpoints_stay_plain() -> None:
    routes = gamma_test("mesh-split.yaml")
    result = translate(mesh_input(routes, mtls=view(tunnelled=False)))
    for e in result.snapshot.endpoints:
        for g in to_dict(e).get("endpoints", []):
            for ep in g["lb_endpoints"]:
                assert "tunnel" not in ep["metadata"]["filter_metadata"]["nodemesh"]
