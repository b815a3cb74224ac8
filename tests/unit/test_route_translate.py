"""`translate`: listeners, chains, clusters, endpoints, weights, statuses, determinism."""

from __future__ import annotations

import random

import pytest

from nodemesh.route import (
    L7Input,
    L7Policy,
    L7PolicyRule,
    Pod,
    RedirectKey,
    RouteKey,
    Service,
    ServicePort,
    translate,
)
from nodemesh.route.protos import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, serialize, to_dict
from tests.unit.routes import clusters_of, pick, routes_from_yaml, routes_of

WEB = Service("shop", "web", "10.96.0.10", (
    ServicePort(80, "http", name="http"),
    ServicePort(9000, 9000, name="grpc", app_protocol="kubernetes.io/h2c"),
    ServicePort(443, 8443, name="https"),
    ServicePort(5432, 5432, name="db", app_protocol="postgresql"),
    ServicePort(53, 53, name="dns-udp", protocol="UDP"),
), {"app": "web"})
API = Service("shop", "api", "10.96.0.11", (ServicePort(8080, 8080, name="http"),),
              {"app": "api"})
HEADLESS = Service("shop", "db", None, (ServicePort(5432, 5432),), {"app": "db"})
OTHER = Service("other", "svc", "10.96.0.12", (ServicePort(80, 8080),), {"app": "o"})

PODS = (
    Pod("shop", "web-1", "10.0.1.1", "n1", {"app": "web"}, identity=11, named_ports={"http": 8080}),
    Pod("shop", "web-2", "10.0.2.1", "n2", {"app": "web"}, identity=11, named_ports={"http": 8081}),
    Pod("shop", "web-3", "10.0.2.2", "n2", {"app": "web"}, ready=False, identity=11,
        named_ports={"http": 8080}),
    Pod("shop", "web-4", "10.0.2.3", "n2", {"app": "web"}, identity=11),  # no "http" port
    Pod("shop", "api-1", "10.0.1.2", "n1", {"app": "api"}, identity=12),
    Pod("shop", "api-2", "10.0.2.4", "n2", {"app": "api"}, identity=12),
    Pod("client", "c-1", "10.0.1.3", "n1", {"app": "c"}, identity=21),
    Pod("client", "c-2", "10.0.1.4", "n1", {"app": "c"}, identity=22),
    Pod("client", "c-3", "10.0.2.5", "n2", {"app": "c"}, identity=21),
    Pod("other", "o-1", "10.0.2.6", "n2", {"app": "o"}, identity=31),
)
SERVICES = (WEB, API, HEADLESS, OTHER)


def http_route(name: str, parent: str = "web", port: int | None = 80, ns: str = "shop",
               parent_ns: str | None = None, rules: str | None = None,
               kind: str = "HTTPRoute", extra_parent: str = "") -> str:
    port_line = f", port: {port}" if port else ""
    ns_line = f", namespace: {parent_ns}" if parent_ns else ""
    rules = rules or """
  - backendRefs: [{name: api, namespace: shop, port: 8080}]"""
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs:
  - {{group: "", kind: Service, name: {parent}{ns_line}{port_line}}}{extra_parent}
  rules:{rules}
---
"""


def run(*yamls: str, node: str = "n1", policies=(), previous=None, pods=PODS,
        services=SERVICES, **kw):
    inp = L7Input.build(node, services, pods, routes_from_yaml("".join(yamls)), policies, **kw)
    return translate(inp, previous)


def conditions(result, name: str, kind: str = "HTTPRoute", ns: str = "shop", parent: int = 0):
    status = result.route_statuses[RouteKey(kind, ns, name)]
    return {c["type"]: (c["status"], c["reason"], c["message"])
            for c in status["parents"][parent]["conditions"]}


def endpoints(result, cluster: str) -> list[tuple[str, int]]:
    cla = to_dict(result.snapshot.resources(ENDPOINT_TYPE)[cluster])
    return [(e["endpoint"]["address"]["socket_address"]["address"],
             e["endpoint"]["address"]["socket_address"]["port_value"])
            for group in cla.get("endpoints", []) for e in group["lb_endpoints"]]


# -- listeners and redirects -------------------------------------------------------------------


def test_no_routes_no_listeners() -> None:
    r = run()
    assert not r.snapshot.listeners and not r.snapshot.clusters
    assert r.service_redirects == {} and r.pod_redirects == {}


def test_listener_shape() -> None:
    r = run(http_route("r"))
    assert r.service_redirects == {RedirectKey("10.96.0.10", 80, "TCP"): 15001}
    lis = to_dict(r.snapshot.resources(LISTENER_TYPE)["svc/shop/web/80"])
    assert lis["address"] == {"socket_address": {"address": "169.254.42.1", "port_value": 15001}}
    (lf,) = lis["listener_filters"]
    assert lf["name"] == "envoy.filters.listener.original_src"
    # No mark on the upstream socket: the datapath marks the replies (see resources.py).
    assert "mark" not in lf["typed_config"]
    (chain,) = lis["filter_chains"]
    hcm = chain["filters"][0]["typed_config"]
    assert hcm.get("codec_type", "AUTO") == "AUTO"  # the enum's zero value
    assert hcm["rds"]["route_config_name"] == "svc/shop/web/80"
    assert hcm.get("use_remote_address", False) is False and hcm["skip_xff_append"] is True
    (als,) = hcm["access_log"]
    common = als["typed_config"]["common_config"]
    assert common["log_name"] == "nodemesh"
    assert common["grpc_service"]["envoy_grpc"]["cluster_name"] == "xds_cluster"
    tags = {t["tag"] for t in common["custom_tags"]}
    assert {"nodemesh.route", "nodemesh.backend", "nodemesh.pod", "nodemesh.listener"} <= tags
    assert "x-request-id" in als["typed_config"]["additional_request_headers_to_log"]


def test_parent_without_port_attaches_to_http_ports_only() -> None:
    r = run(http_route("r", port=None))
    # 80 (http name) and 9000 (h2c) yes; 443 ("https"), 5432 (postgresql), 53/UDP no.
    assert sorted(k.port for k in r.service_redirects) == [80, 9000]
    assert "port(s) 80, 9000" in conditions(r, "r")["Accepted"][2]


def test_parent_port_and_section_name() -> None:
    r = run(http_route("r", port=443))  # an explicit port is honoured, even a TLS-looking one
    assert [k.port for k in r.service_redirects] == [443]
    by_name = http_route("r", port=None).replace("name: web}", "name: web, sectionName: grpc}")
    assert [k.port for k in run(by_name).service_redirects] == [9000]


@pytest.mark.parametrize(("yaml", "why"), [
    (http_route("r", parent="nope"), "Service shop/nope not found"),
    (http_route("r", parent="db", port=5432), "headless"),
    (http_route("r", port=81), "no TCP port with port 81"),
    (http_route("r", port=53), "no TCP port with port 53"),
])
def test_unmatched_parent(yaml: str, why: str) -> None:
    r = run(yaml)
    status, reason, message = conditions(r, "r")["Accepted"]
    assert (status, reason) == ("False", "NoMatchingParent") and why in message
    assert not r.snapshot.listeners


def test_one_status_per_parent_ref() -> None:
    yaml = http_route("r", extra_parent='\n  - {group: "", kind: Service, name: nope}')
    r = run(yaml)
    status = r.route_statuses[RouteKey("HTTPRoute", "shop", "r")]
    assert [p["parentRef"]["name"] for p in status["parents"]] == ["web", "nope"]
    assert conditions(r, "r", parent=0)["Accepted"][0] == "True"
    assert conditions(r, "r", parent=1)["Accepted"][:2] == ("False", "NoMatchingParent")
    p = status["parents"][0]
    assert p["controllerName"] == "nodemesh.io/mesh"
    for c in p["conditions"]:
        assert c["observedGeneration"] == 1 and c["lastTransitionTime"] == "1970-01-01T00:00:00Z"


def test_stable_ports_across_changes() -> None:
    first = run(http_route("a"), http_route("b", parent="api", port=8080))
    assert first.ports == {RedirectKey("10.96.0.10", 80): 15001,
                           RedirectKey("10.96.0.11", 8080): 15002}
    # web's route goes, other's arrives: api keeps 15002, the new key does not take 15001 yet.
    second = run(http_route("b", parent="api", port=8080),
                 http_route("c", parent="svc", ns="other"), previous=first.ports)
    assert second.ports == {RedirectKey("10.96.0.11", 8080): 15002,
                            RedirectKey("10.96.0.12", 80): 15003}
    third = run(http_route("b", parent="api", port=8080), http_route("c", parent="svc", ns="other"),
                http_route("a"), previous=second.ports)
    assert third.ports[RedirectKey("10.96.0.10", 80)] == 15001  # free again, reused


# -- producers and consumers -------------------------------------------------------------------


def consumer_route(name: str = "cr", port: int | None = 80) -> str:
    return http_route(name, ns="client", parent_ns="shop", port=port, rules="""
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-consumer, value: "1"}]}
    backendRefs: [{name: web, namespace: shop, port: 80}]""")


def test_consumer_and_producer_chains() -> None:
    r = run(http_route("prod"), consumer_route())
    lis = to_dict(r.snapshot.resources(LISTENER_TYPE)["svc/shop/web/80"])
    chains = {c["name"]: c for c in lis["filter_chains"]}
    assert list(chains) == ["consumer/client", "default"]
    ranges = chains["consumer/client"]["filter_chain_match"]["source_prefix_ranges"]
    assert [x["address_prefix"] for x in ranges] == ["10.0.1.3", "10.0.1.4"]  # n1's client pods
    consumer = pick(routes_of(r, "svc/shop/web/80/consumer/client"), "/")
    assert consumer["name"] == "HTTPRoute/client/cr/rule/0/match/0"  # the producer's is not there
    default = pick(routes_of(r, "svc/shop/web/80"), "/")
    assert default["name"] == "HTTPRoute/shop/prod/rule/0/match/0"
    assert "consumer route" in conditions(r, "cr", ns="client")["Accepted"][2]


def test_consumer_chain_only_where_its_namespace_has_pods() -> None:
    r = run(http_route("prod"), consumer_route(), node="n2")
    lis = to_dict(r.snapshot.resources(LISTENER_TYPE)["svc/shop/web/80"])
    chains = {c["name"]: c for c in lis["filter_chains"]}
    assert chains["consumer/client"]["filter_chain_match"]["source_prefix_ranges"] == [
        {"address_prefix": "10.0.2.5", "prefix_len": 32}]
    r3 = run(http_route("prod"), consumer_route(), node="n3")
    (chain,) = to_dict(r3.snapshot.resources(LISTENER_TYPE)["svc/shop/web/80"])["filter_chains"]
    assert chain["name"] == "default"


def test_consumer_route_alone_gets_an_implicit_default() -> None:
    r = run(consumer_route())
    default = routes_of(r, "svc/shop/web/80")
    assert [x["name"] for x in default] == ["implicit/svc/shop/web/80"]
    assert clusters_of(default[0]) == {"svc/shop/web/80": 1}
    assert default[0]["route"]["timeout"] == "0s"


def test_statuses_do_not_depend_on_the_node() -> None:
    yamls = (http_route("prod"), consumer_route(), http_route("x", parent="nope"))
    assert run(*yamls, node="n1").route_statuses == run(*yamls, node="n3").route_statuses


def test_grpc_route_wins_over_http_route_on_a_port() -> None:
    grpc = http_route("g", port=9000, kind="GRPCRoute", rules="""
  - backendRefs: [{name: web, port: 9000}]""")
    r = run(http_route("h", port=None), grpc)
    status, _reason, message = conditions(r, "h")["Accepted"]
    assert status == "True" and "not to port(s) 9000" in message
    routes = routes_of(r, "svc/shop/web/9000")
    assert [x["name"] for x in routes] == ["GRPCRoute/shop/g/rule/0/match/0"]
    only_9000 = run(http_route("h", port=9000), grpc)
    assert conditions(only_9000, "h")["Accepted"][:2] == ("False", "Conflicted")


# -- backends, weights and endpoints -----------------------------------------------------------


def test_endpoints_ready_pods_and_named_target_ports() -> None:
    r = run(http_route("r", rules="""
  - backendRefs: [{name: web, port: 80}]"""))
    # web-1: 8080, web-2: 8081 (named port per pod); web-3 not ready; web-4 lacks the port.
    assert endpoints(r, "svc/shop/web/80") == [("10.0.1.1", 8080), ("10.0.2.1", 8081)]
    cla = to_dict(r.snapshot.resources(ENDPOINT_TYPE)["svc/shop/web/80"])
    pods = [e["metadata"]["filter_metadata"]["nodemesh"]["pod"]
            for e in cla["endpoints"][0]["lb_endpoints"]]
    assert pods == ["shop/web-1", "shop/web-2"]


def test_cluster_shape_and_protocols() -> None:
    r = run(http_route("r", rules="""
  - backendRefs: [{name: web, port: 9000, weight: 1}, {name: api, port: 8080, weight: 1}]"""))
    clusters = {c.name: to_dict(c) for c in r.snapshot.clusters}
    api = clusters["svc/shop/api/8080"]
    assert api["type"] == "EDS" and api["connect_timeout"] == "2s"
    assert api["eds_cluster_config"]["eds_config"]["ads"] == {}
    assert api["circuit_breakers"]["thresholds"][0]["max_requests"] == 100000
    opts = next(iter(api["typed_extension_protocol_options"].values()))
    assert "use_downstream_protocol_config" in opts  # the client's own protocol
    web = next(iter(clusters["svc/shop/web/9000"]["typed_extension_protocol_options"].values()))
    assert web["explicit_http_config"] == {"http2_protocol_options": {}}  # appProtocol h2c


def test_grpc_route_backends_use_http2() -> None:
    r = run(http_route("g", kind="GRPCRoute", rules="""
  - backendRefs: [{name: api, port: 8080}]"""))
    api = to_dict(r.snapshot.resources(CLUSTER_TYPE)["svc/shop/api/8080"])
    opts = next(iter(api["typed_extension_protocol_options"].values()))
    assert opts["explicit_http_config"] == {"http2_protocol_options": {}}
    route = routes_of(r, "svc/shop/web/80")[0]
    assert route["match"]["grpc"] == {} and route["route"]["timeout"] == "0s"


@pytest.mark.parametrize(("rules", "expected"), [
    ("""
  - backendRefs: [{name: api, port: 8080, weight: 3}, {name: web, port: 80, weight: 1}]""",
     {"svc/shop/api/8080": 3, "svc/shop/web/80": 1}),
    ("""
  - backendRefs: [{name: api, port: 8080, weight: 3}, {name: web, port: 80, weight: 0}]""",
     {"svc/shop/api/8080": 1}),
])
def test_weights(rules: str, expected: dict) -> None:
    route = routes_of(run(http_route("r", rules=rules)), "svc/shop/web/80")[0]
    got = clusters_of(route)
    assert got == expected or (len(expected) == 1 and set(got) == set(expected))


@pytest.mark.parametrize("rules", [
    """
  - backendRefs: [{name: api, port: 8080, weight: 0}]""",
    """
  - backendRefs: [{name: gone, port: 80}]""",
    """
  - backendRefs: [{name: api, port: 1234}]""",
    """
  - matches: [{path: {type: PathPrefix, value: /}}]""",
    """
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: a, value: b}]}""",
])
def test_nothing_to_forward_to_is_500(rules: str) -> None:
    route = routes_of(run(http_route("r", rules=rules)), "svc/shop/web/80")[0]
    assert route["direct_response"] == {"status": 500}


def test_invalid_backend_share_gets_500() -> None:
    r = run(http_route("r", rules="""
  - backendRefs: [{name: api, port: 8080, weight: 1}, {name: gone, port: 80, weight: 1}]"""))
    route = routes_of(r, "svc/shop/web/80")[0]
    assert clusters_of(route) == {"svc/shop/api/8080": 1,
                                  "invalid/HTTPRoute/shop/r/rule/0/backend/1": 1}
    assert route["route"]["cluster_not_found_response_code"] == "INTERNAL_SERVER_ERROR"
    assert "invalid/HTTPRoute/shop/r/rule/0/backend/1" not in r.snapshot.resources(CLUSTER_TYPE)
    assert conditions(r, "r")["ResolvedRefs"][:2] == ("False", "BackendNotFound")


def test_backend_in_another_namespace() -> None:
    rules = """
  - backendRefs: [{name: svc, namespace: other, port: 80}]"""
    r = run(http_route("r", rules=rules))
    assert conditions(r, "r")["ResolvedRefs"][0] == "True"  # GEP-1426: no grant needed
    strict = run(http_route("r", rules=rules), require_reference_grants=True)
    assert conditions(strict, "r")["ResolvedRefs"][:2] == ("False", "RefNotPermitted")
    grant = {"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
             "metadata": {"namespace": "other", "name": "g"},
             "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                "namespace": "shop"}],
                      "to": [{"group": "", "kind": "Service"}]}}
    granted = run(http_route("r", rules=rules), require_reference_grants=True,
                  reference_grants=(grant,))
    assert conditions(granted, "r")["ResolvedRefs"][0] == "True"
    # A consumer route to its own parent Service never needs one.
    assert conditions(run(consumer_route(), require_reference_grants=True), "cr",
                      ns="client")["ResolvedRefs"][0] == "True"


def test_backend_level_filters_on_weighted_clusters() -> None:
    r = run(http_route("r", rules="""
  - backendRefs:
    - name: api
      port: 8080
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {add: [{name: x-b, value: "1"}]}
      - type: ResponseHeaderModifier
        responseHeaderModifier: {remove: [x-secret]}"""))
    (wc,) = routes_of(r, "svc/shop/web/80")[0]["route"]["weighted_clusters"]["clusters"]
    assert wc["request_headers_to_add"][0]["header"] == {"key": "x-b", "value": "1"}
    assert wc["response_headers_to_remove"] == ["x-secret"]


def test_backend_level_mirror_is_unsupported() -> None:
    r = run(http_route("r", rules="""
  - backendRefs:
    - name: api
      port: 8080
      filters:
      - type: RequestMirror
        requestMirror: {backendRef: {name: web, port: 80}}"""))
    assert conditions(r, "r")["Accepted"][:2] == ("False", "UnsupportedValue")


# -- L7 policy ----------------------------------------------------------------------------------

API_POLICY = L7Policy("10.0.1.2", 8080, (
    L7PolicyRule((21,), ({"method": "GET", "path": "/public/.*"},)),
    L7PolicyRule((99,), ()),  # an identity with no pod on n1
), pod="shop/api-1")


def rbac_of(result, cluster: str) -> dict:
    c = to_dict(result.snapshot.resources(CLUSTER_TYPE)[cluster])
    opts = next(iter(c["typed_extension_protocol_options"].values()))
    filters = opts["http_filters"]
    assert [f["name"] for f in filters] == ["envoy.filters.http.rbac",
                                            "envoy.filters.http.upstream_codec"]
    return filters[0]["typed_config"]["rules"]


def test_pod_port_policy_listener() -> None:
    r = run(policies=[API_POLICY])
    assert r.pod_redirects == {RedirectKey("10.0.1.2", 8080, "TCP"): 15001}
    assert r.service_redirects == {}
    route = routes_of(r, "pod/10.0.1.2/8080")[0]
    assert route["match"] == {"prefix": "/"} and clusters_of(route) == {"pod/10.0.1.2/8080": 1}
    assert endpoints(r, "pod/10.0.1.2/8080") == [("10.0.1.2", 8080)]
    rules = rbac_of(r, "pod/10.0.1.2/8080")
    assert rules.get("action", "ALLOW") == "ALLOW"
    assert list(rules["policies"]) == ["rule-0"]  # identity 99 has no pod here
    p = rules["policies"]["rule-0"]
    assert p["principals"] == [{"direct_remote_ip": {"address_prefix": "10.0.1.3",
                                                     "prefix_len": 32}}]


def test_routed_traffic_to_a_policed_pod_goes_through_its_policy() -> None:
    r = run(http_route("r", rules="""
  - backendRefs: [{name: api, port: 8080, weight: 4}]"""), policies=[API_POLICY])
    route = routes_of(r, "svc/shop/web/80")[0]
    # api has two ready pods; api-1's port is policed: half of the weight goes to its own
    # cluster (with the policy), half to the Service's cluster, which no longer has api-1.
    assert clusters_of(route) == {"svc/shop/api/8080": 2, "svc/shop/api/8080/pod/10.0.1.2": 2}
    assert endpoints(r, "svc/shop/api/8080") == [("10.0.2.4", 8080)]
    assert rbac_of(r, "svc/shop/api/8080/pod/10.0.1.2") == rbac_of(r, "pod/10.0.1.2/8080")
    meta = to_dict(r.snapshot.resources(CLUSTER_TYPE)["svc/shop/api/8080/pod/10.0.1.2"])
    assert meta["metadata"]["filter_metadata"]["nodemesh"]["service"] == "shop/api"


def test_rbac_any_identity() -> None:
    pol = L7Policy("10.0.1.2", 8080, (L7PolicyRule((0,), ({"path": "/x"},)),))
    p = rbac_of(run(policies=[pol]), "pod/10.0.1.2/8080")["policies"]["rule-0"]
    assert p["principals"] == [{"any": True}]


# -- determinism and bookkeeping ----------------------------------------------------------------


def everything() -> list[str]:
    return [http_route("prod", port=None), consumer_route(),
            http_route("g", port=9000, kind="GRPCRoute", rules="""
  - matches: [{method: {service: a.B}}]
    backendRefs: [{name: web, port: 9000}]"""),
            http_route("w", parent="api", port=8080, rules="""
  - matches: [{path: {type: Exact, value: /x}}, {headers: [{name: a, value: b}]}]
    backendRefs: [{name: api, port: 8080, weight: 2}, {name: svc, namespace: other, port: 80}]""")]


def test_same_input_same_bytes_and_version() -> None:
    a = run(*everything(), policies=[API_POLICY])
    shuffled = list(PODS)
    random.Random(7).shuffle(shuffled)
    yamls = everything()
    random.Random(3).shuffle(yamls)
    b = run(*yamls, policies=[API_POLICY], pods=tuple(shuffled),
            services=tuple(reversed(SERVICES)))
    assert a.snapshot.version == b.snapshot.version
    assert a.snapshot.type_versions == b.snapshot.type_versions
    for t in (LISTENER_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE):
        ra, rb = a.snapshot.resources(t), b.snapshot.resources(t)
        assert list(ra) == list(rb)
        assert [serialize(m) for m in ra.values()] == [serialize(m) for m in rb.values()]
    assert a.route_statuses == b.route_statuses and a.owners == b.owners


def test_version_changes_with_content_only_where_it_changed() -> None:
    a = run(*everything())
    pods = tuple(p for p in PODS if p.name != "api-2")
    b = run(*everything(), pods=pods)
    assert a.snapshot.version != b.snapshot.version
    changed = {t for t in a.snapshot.type_versions
               if a.snapshot.type_versions[t] != b.snapshot.type_versions[t]}
    assert changed == {ENDPOINT_TYPE}


def test_owners_name_routes_of_each_resource() -> None:
    r = run(http_route("prod"), consumer_route())
    assert r.owners["svc/shop/web/80"] == (RouteKey("HTTPRoute", "client", "cr"),
                                           RouteKey("HTTPRoute", "shop", "prod"))
    assert r.owners["svc/shop/web/80/consumer/client"] == (RouteKey("HTTPRoute", "client", "cr"),)
    assert RouteKey("HTTPRoute", "shop", "prod") in r.owners["svc/shop/api/8080"]


# -- inputs -------------------------------------------------------------------------------------


def test_l7_policies_from_the_policy_compiler() -> None:
    from nodemesh.policy.types import CidrRule, Direction, EndpointPolicy, L7Rule  # noqa: F401
    from nodemesh.route.inputs import l7_policies_from_compiled

    http = ({"method": "GET", "path": "/x"},)
    ep = EndpointPolicy(
        endpoint="shop/api-1", identity=12, ingress_enforced=True, egress_enforced=False,
        l7_rules=(
            L7Rule(Direction.INGRESS, 6, 8080, 8080, (21,), (), http, 7),
            L7Rule(Direction.INGRESS, 6, 8080, 8080, (22,), (), (), 7),
            L7Rule(Direction.INGRESS, 6, 9000, 9000, (), (("1.2.3.0/24", ()),), http, 7),
            L7Rule(Direction.EGRESS, 6, 80, 80, (0,), (), http, 7),
            L7Rule(Direction.INGRESS, 17, 53, 53, (0,), (), http, 7),
        ),
        policy_names={7: "CiliumNetworkPolicy shop/l7"})
    (pol,) = l7_policies_from_compiled({"shop/api-1": ep, "shop/gone": ep}, PODS)
    assert (pol.pod_ip, pol.port, pol.protocol, pol.pod) == ("10.0.1.2", 8080, "TCP", "shop/api-1")
    assert [(r.identities, r.http, r.policy) for r in pol.rules] == [
        ((21,), http, "CiliumNetworkPolicy shop/l7"), ((22,), (), "CiliumNetworkPolicy shop/l7")]


def test_service_and_pod_from_objects() -> None:
    svc = Service.from_object({"metadata": {"name": "s", "namespace": "n"}, "spec": {
        "clusterIP": "None", "selector": {"a": "b"},
        "ports": [{"name": "h", "port": 80, "targetPort": "http", "appProtocol": "http"}]}})
    assert svc.cluster_ip is None and svc.ports[0] == ServicePort(80, "http", "h", "TCP", "http")
    pod = Pod.from_object({"metadata": {"name": "p", "namespace": "n", "labels": {"a": "b"}},
                           "spec": {"nodeName": "n1", "containers": [{"ports": [
                               {"name": "http", "containerPort": 8080},
                               {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
                           "status": {"podIP": "10.0.0.9", "conditions": [
                               {"type": "Ready", "status": "True"}]}}, identity=4)
    assert (pod.ip, pod.node, pod.ready, pod.identity) == ("10.0.0.9", "n1", True, 4)
    assert dict(pod.named_ports) == {"http": 8080} and svc.selects(pod)
    assert pod.resolve_port("http") == 8080 and pod.resolve_port("nope") is None


def test_uneven_split_weights_stay_exact_or_bounded() -> None:
    from fractions import Fraction

    from nodemesh.route.translate import MAX_SPLIT_WEIGHT_TOTAL, _integer_weights

    assert _integer_weights([Fraction(2, 3), Fraction(1, 3), Fraction(5)]) == [2, 1, 15]
    big = [Fraction(1_000_000, 7), Fraction(1, 9_999_991), Fraction(3)]
    got = _integer_weights(big)
    assert sum(got) <= MAX_SPLIT_WEIGHT_TOTAL + len(got) and min(got) >= 1
