"""The Gateway API mesh conformance scenarios, checked on the generated Envoy configuration.

Each test takes one upstream route YAML (tests/unit/routes/gamma/tests) on top of the upstream
manifests, translates it for node n1 and checks what the upstream Go test expects of the
traffic — which backend a request reaches, the redirect Location, the rewritten path, the
headers — with the route-matching emulator of tests/unit/routes.
"""

from __future__ import annotations

import pytest

from nodemesh.route import RedirectKey, translate
from nodemesh.route.protos import LISTENER_TYPE, to_dict
from tests.unit.routes import (
    CONSUMER_NS,
    NS,
    backend_of,
    clusters_of,
    gamma_test,
    location,
    mesh_cluster,
    mesh_input,
    pick,
    rewritten_path,
    routes_of,
    service_ip,
)

ECHO80 = f"svc/{NS}/echo/80"
APPEND = "APPEND_IF_EXISTS_OR_ADD"  # the enum's zero value: absent from dicts of messages


def run(name: str, node: str = "n1"):
    return translate(mesh_input(gamma_test(name), node=node))


def accepted(result) -> None:
    for key, status in result.route_statuses.items():
        for p in status["parents"]:
            conds = {c["type"]: c for c in p["conditions"]}
            assert conds["Accepted"]["status"] == "True", (key, conds["Accepted"])


def test_simple_same_namespace() -> None:
    r = run("httproute-simple-same-namespace.yaml")
    accepted(r)
    routes = routes_of(r, ECHO80)
    assert backend_of(pick(routes, "/")) == "echo-v1:8080"
    assert backend_of(pick(routes, "/anything/else")) == "echo-v1:8080"
    services, _ = mesh_cluster()
    assert r.service_redirects == {RedirectKey(service_ip(services, NS, "echo"), 80): 15001}


@pytest.mark.parametrize(("path", "headers", "backend"), [
    ("/", {}, "echo-v1:8080"),
    ("/example", {}, "echo-v1:8080"),
    ("/", {"Version": "one"}, "echo-v1:8080"),
    ("/v2", {}, "echo-v2:8080"),
    ("/v2/example", {}, "echo-v2:8080"),
    ("/", {"Version": "two"}, "echo-v2:8080"),
    ("/v2/", {}, "echo-v2:8080"),
    ("/v2example", {}, "echo-v1:8080"),  # not a path-segment prefix of /v2
    ("/foo/v2/example", {}, "echo-v1:8080"),
])
def test_matching(path: str, headers: dict, backend: str) -> None:
    routes = routes_of(run("httproute-matching.yaml"), ECHO80)
    assert backend_of(pick(routes, path, headers=headers)) == backend


@pytest.mark.parametrize(("path", "headers", "backend"), [
    ("/?animal=whale", {}, "echo-v1"),
    ("/?animal=dolphin", {}, "echo-v2"),
    ("/?animal=whale&otherparam=irrelevant", {}, "echo-v1"),
    ("/?animal=dolphin&color=yellow", {}, "echo-v2"),
    ("/?color=blue", {}, None),
    ("/?animal=dog", {}, None),
    ("/?animal=whaledolphin", {}, None),
    ("/", {}, None),
    ("/path1?animal=whale", {}, "echo-v1"),
    ("/?animal=whale", {"version": "one"}, "echo-v2"),
    ("/path3?animal=shark", {}, "echo-v1"),
    ("/path4?animal=kraken", {"version": "three"}, "echo-v1"),
    ("/?animal=shark", {}, None),
    ("/path4?animal=kraken", {}, None),
    ("/path5?animal=hydra", {}, "echo-v1"),  # longer prefix beats a query match
])
def test_query_param_matching(path: str, headers: dict, backend: str | None) -> None:
    routes = routes_of(run("httproute-query-param-matching.yaml"), ECHO80)
    got = pick(routes, path, headers=headers)
    if backend is None:
        assert got is None  # Envoy answers 404
    else:
        assert backend_of(got) == f"{backend}:8080"


def test_named_rule() -> None:
    routes = routes_of(run("httproute-named-rule.yaml"), ECHO80)
    named, unnamed = pick(routes, "/named"), pick(routes, "/unnamed")
    assert backend_of(named) == "echo-v1:8080" and backend_of(unnamed) == "echo-v2:8080"
    assert named["metadata"]["filter_metadata"]["nodemesh"]["rule"] == "named-rule"
    assert unnamed["metadata"]["filter_metadata"]["nodemesh"]["rule"] == "1"


def test_weight() -> None:
    routes = routes_of(run("httproute-weight.yaml"), ECHO80)
    assert clusters_of(pick(routes, "/")) == {f"svc/{NS}/echo-v1/8080": 70,
                                              f"svc/{NS}/echo-v2/8080": 30}


def test_grpc_weight() -> None:
    r = run("grpcroute-weight.yaml")
    routes = routes_of(r, f"svc/{NS}/echo/7070")
    got = pick(routes, "/grpc.Echo/Echo", method="POST",
               headers={"content-type": "application/grpc"})
    # echo-v3 does not exist and has weight 0: never chosen, and no 500 share either.
    assert clusters_of(got) == {f"svc/{NS}/echo-v1/7070": 70, f"svc/{NS}/echo-v2/7070": 30}
    assert "cluster_not_found_response_code" not in got["route"]
    (status,) = r.route_statuses.values()
    resolved = status["parents"][0]["conditions"][1]
    assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
    assert "echo-v3" in resolved["message"]
    clusters = {c.name: to_dict(c) for c in r.snapshot.clusters}
    opts = clusters[f"svc/{NS}/echo-v1/7070"]["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(opts.values()))["explicit_http_config"]


@pytest.mark.parametrize(("case", "backend", "set_", "add", "remove"), [
    ("set", "echo-v1", {"x-header-set": "set-overwrites-values"}, {}, []),
    ("add", "echo-v1", {}, {"x-header-add": "add-appends-values"}, []),
    ("remove", "echo-v1", {}, {}, ["x-header-remove"]),
    ("multi", "echo-v2", {"x-header-set-1": "header-set-1", "x-header-set-2": "header-set-2"},
     {"x-header-add-1": "header-add-1", "x-header-add-2": "header-add-2"},
     ["x-header-remove-1", "x-header-remove-2"]),
])
def test_grpc_request_header_modifier(case, backend, set_, add, remove) -> None:
    routes = routes_of(run("grpcroute-request-header-modifier.yaml"), f"svc/{NS}/echo/7070")
    got = pick(routes, "/grpc.Echo/Echo", method="POST",
               headers={"content-type": "application/grpc", "x-test-case": case})
    assert backend_of(got) == f"{backend}:7070"
    ops = got.get("request_headers_to_add", [])
    assert {o["header"]["key"]: o["header"]["value"] for o in ops
            if o.get("append_action", APPEND) == "OVERWRITE_IF_EXISTS_OR_ADD"} == set_
    assert {o["header"]["key"]: o["header"]["value"] for o in ops
            if o.get("append_action", APPEND) == "APPEND_IF_EXISTS_OR_ADD"} == add
    assert got.get("request_headers_to_remove", []) == remove
    # Not a gRPC request: a GRPCRoute does not route it.
    assert pick(routes, "/grpc.Echo/Echo", method="POST", headers={"x-test-case": case}) is None


@pytest.mark.parametrize(("name", "path", "status"), [
    ("httproute-303-redirect.yaml", "/redirect", 303),
    ("httproute-307-redirect.yaml", "/temporary", 307),
    ("httproute-308-redirect.yaml", "/permanent", 308),
])
def test_redirect_status(name: str, path: str, status: int) -> None:
    routes = routes_of(run(name), ECHO80)
    assert location(pick(routes, path), path) == (status, f"http://echo{path}")


@pytest.mark.parametrize(("name", "path", "status", "loc"), [
    ("httproute-redirect-host-and-status.yaml", "/hostname-redirect", 302,
     "http://example.org/hostname-redirect"),
    ("httproute-redirect-host-and-status.yaml", "/host-and-status", 301,
     "http://example.org/host-and-status"),
    ("httproute-redirect-path.yaml", "/original-prefix/lemon", 302,
     "http://echo/replacement-prefix/lemon"),
    ("httproute-redirect-path.yaml", "/full/path/original", 302,
     "http://echo/full-path-replacement"),
    ("httproute-redirect-path.yaml", "/path-and-host", 302,
     "http://example.org/replacement-prefix"),
    ("httproute-redirect-path.yaml", "/path-and-status", 301, "http://echo/replacement-prefix"),
    ("httproute-redirect-path.yaml", "/full-path-and-host", 302,
     "http://example.org/replacement-full"),
    ("httproute-redirect-path.yaml", "/full-path-and-status", 301,
     "http://echo/replacement-full"),
    ("httproute-redirect-port.yaml", "/port", 302, "http://echo:8083/port"),
    ("httproute-redirect-port.yaml", "/port-and-host", 302,
     "http://example.org:8083/port-and-host"),
    ("httproute-redirect-port.yaml", "/port-and-status", 301, "http://echo:8083/port-and-status"),
    ("httproute-redirect-port.yaml", "/port-and-host-and-status", 302,
     "http://example.org:8083/port-and-host-and-status"),
    ("httproute-redirect-scheme.yaml", "/scheme", 302, "https://echo/scheme"),
    ("httproute-redirect-scheme.yaml", "/scheme-and-host", 302,
     "https://example.org/scheme-and-host"),
    ("httproute-redirect-scheme.yaml", "/scheme-and-status", 301, "https://echo/scheme-and-status"),
    ("httproute-redirect-scheme.yaml", "/scheme-and-host-and-status", 302,
     "https://example.org/scheme-and-host-and-status"),
])
def test_redirects(name: str, path: str, status: int, loc: str) -> None:
    routes = routes_of(run(name), ECHO80)
    assert location(pick(routes, path), path) == (status, loc)


@pytest.mark.parametrize(("path", "expected"), [
    ("/prefix/one/two", "/one/two"),
    ("/strip-prefix/three", "/three"),
    ("/strip-prefix", "/"),
    ("/full/one/two", "/one"),
    ("/full/rewrite-path-and-modify-headers/test", "/test"),
    ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
])
def test_rewrite_path(path: str, expected: str) -> None:
    routes = routes_of(run("httproute-rewrite-path.yaml"), ECHO80)
    got = pick(routes, path)
    assert backend_of(got) == "echo-v1:80"
    assert rewritten_path(got, path) == expected


def test_rewrite_path_and_modify_headers() -> None:
    routes = routes_of(run("httproute-rewrite-path.yaml"), ECHO80)
    got = pick(routes, "/full/rewrite-path-and-modify-headers/test")
    ops = {(o["header"]["key"], o["header"]["value"], o.get("append_action", APPEND))
           for o in got["request_headers_to_add"]}
    assert ops == {("x-header-set", "set-overwrites-values", "OVERWRITE_IF_EXISTS_OR_ADD"),
                   ("x-header-add", "header-val-1", "APPEND_IF_EXISTS_OR_ADD"),
                   ("x-header-add-append", "header-val-2", "APPEND_IF_EXISTS_OR_ADD")}
    assert got["request_headers_to_remove"] == ["x-header-remove"]


@pytest.mark.parametrize("name", ["httproute-request-header-modifier.yaml",
                                  "httproute-request-header-modifier-backend.yaml"])
def test_request_header_modifier(name: str) -> None:
    routes = routes_of(run(name), ECHO80)
    got = pick(routes, "/multiple")
    if "weighted_clusters" in got["route"]:  # backendRef-level filter
        (target,) = got["route"]["weighted_clusters"]["clusters"]
    else:
        target = got
    assert target["name"] == f"svc/{NS}/echo-v1/8080" or backend_of(got) == "echo-v1:8080"
    added = {o["header"]["key"]: o.get("append_action", APPEND) for o in target["request_headers_to_add"]}
    assert added == {"x-header-set-1": "OVERWRITE_IF_EXISTS_OR_ADD",
                     "x-header-set-2": "OVERWRITE_IF_EXISTS_OR_ADD",
                     "x-header-add-1": "APPEND_IF_EXISTS_OR_ADD",
                     "x-header-add-2": "APPEND_IF_EXISTS_OR_ADD",
                     "x-header-add-3": "APPEND_IF_EXISTS_OR_ADD"}
    assert target["request_headers_to_remove"] == ["x-header-remove-1", "x-header-remove-2"]


def test_mesh_split() -> None:
    r = run("mesh-split.yaml")
    for port in (80, 8080):  # no parentRef port: every HTTP port of the Service
        routes = routes_of(r, f"svc/{NS}/echo/{port}")
        assert backend_of(pick(routes, "/v1")) == "echo-v1:80"
        assert backend_of(pick(routes, "/v2")) == "echo-v2:80"
        assert pick(routes, "/v3") is None  # the route replaces the Service's own routing
    # 443 (https) and 9090 (tcp) are not HTTP: not redirected through the proxy.
    assert sorted(k.port for k in r.service_redirects) == [80, 7070, 8080]


def test_mesh_ports() -> None:
    r = run("mesh-ports.yaml")
    services, _ = mesh_cluster()
    v1, v2 = service_ip(services, NS, "echo-v1"), service_ip(services, NS, "echo-v2")
    ports = {(k.ip, k.port) for k in r.service_redirects}
    assert (v1, 80) in ports and (v1, 8080) not in ports  # parentRef port 80 only
    assert (v2, 80) in ports and (v2, 8080) in ports
    for name, value in ((f"svc/{NS}/echo-v1/80", "v1"), (f"svc/{NS}/echo-v2/8080", "v2")):
        got = pick(routes_of(r, name), "/")
        assert got["response_headers_to_add"] == [{
            "header": {"key": "x-header-set", "value": value},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]


def test_mesh_frontend() -> None:
    r = run("mesh-frontend.yaml")
    got = pick(routes_of(r, f"svc/{NS}/echo-v2/80"), "/")
    assert backend_of(got) == "echo-v2:80"
    assert got["response_headers_to_add"][0]["header"] == {"key": "x-header-set", "value": "set"}
    # Traffic to the pod IP is not the Service frontend: no redirect for pods.
    assert r.pod_redirects == {}


def test_consumer_route() -> None:
    r = run("mesh-consumer-route.yaml")
    accepted(r)
    _services, pods = mesh_cluster()
    consumer_ip = next(p.ip for p in pods if p.namespace == CONSUMER_NS and p.node == "n1")
    lis = to_dict(r.snapshot.resources(LISTENER_TYPE)[f"svc/{NS}/echo-v1/80"])
    chains = {c["name"]: c for c in lis["filter_chains"]}
    assert set(chains) == {f"consumer/{CONSUMER_NS}", "default"}
    assert chains[f"consumer/{CONSUMER_NS}"]["filter_chain_match"] == {
        "source_prefix_ranges": [{"address_prefix": consumer_ip, "prefix_len": 32}]}
    assert "filter_chain_match" not in chains["default"]
    consumer = pick(routes_of(r, f"svc/{NS}/echo-v1/80/consumer/{CONSUMER_NS}"), "/")
    assert consumer["response_headers_to_add"][0]["header"] == {"key": "x-header-set",
                                                                "value": "set"}
    assert backend_of(consumer) == "echo-v1:80"
    # Everyone else: the Service as the kernel would route it, unmodified.
    default = pick(routes_of(r, f"svc/{NS}/echo-v1/80"), "/anything")
    assert default["name"] == f"implicit/svc/{NS}/echo-v1/80"
    assert "response_headers_to_add" not in default
    assert backend_of(default) == "echo-v1:80"


def test_consumer_route_without_local_consumers() -> None:
    # Node n3 has no pod at all: a consumer route changes nothing there, so no redirect.
    r = run("mesh-consumer-route.yaml", node="n3")
    assert r.service_redirects == {} and not r.snapshot.listeners
    accepted(r)  # the status does not depend on the node
