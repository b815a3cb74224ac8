"""Matches → Envoy RouteMatch, and the Gateway API's precedence across rules and routes."""

from __future__ import annotations

import pytest

from nodemesh.route import translate
from nodemesh.route.matching import (
    grpc_match,
    grpc_path_match,
    http_match,
    http_precedence,
    normalize_prefix,
    re2_escape,
)
from tests.unit.routes import NS, matches, mesh_input, pick, routes_from_yaml, routes_of

ECHO80 = f"svc/{NS}/echo/80"


def route(name: str, rules: str, created: str = "2025-01-01T00:00:00Z", kind: str = "HTTPRoute",
          namespace: str = NS, parent: str = "echo", port: int | None = 80) -> str:
    port_line = f"\n    port: {port}" if port else ""
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata:
  name: {name}
  namespace: {namespace}
  annotations:
    nodemesh.test/created: "{created}"
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: {parent}{port_line}
  rules:
{rules}
---
"""


def names_in_order(*yamls: str) -> list[str]:
    r = translate(mesh_input(routes_from_yaml("".join(yamls))))
    return [x["name"] for x in routes_of(r, ECHO80)]


# -- single matches -----------------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "path", "hit"), [
    ("/foo", "/foo", True),
    ("/foo", "/foo/", True),
    ("/foo", "/foo/bar", True),
    ("/foo", "/foobar", False),
    ("/foo/", "/foo", True),  # a trailing '/' is ignored
    ("/foo/", "/foo/bar", True),
    ("/foo/", "/foobar", False),
    ("/", "/anything", True),
    ("/foo", "/foo?x=1", True),
    ("/foo", "/Foo", False),  # case-sensitive
])
def test_path_prefix_is_segment_aware(prefix: str, path: str, hit: bool) -> None:
    m = http_match({"path": {"type": "PathPrefix", "value": prefix}})
    assert matches(m, "GET", path, {}) is hit


def test_prefix_shapes() -> None:
    assert http_match({"path": {"type": "PathPrefix", "value": "/"}}) == {"prefix": "/"}
    assert http_match({"path": {"type": "PathPrefix", "value": "/a/b/"}}) == {
        "path_separated_prefix": "/a/b"}
    assert normalize_prefix("///") == "/"


def test_exact_and_regex() -> None:
    assert http_match({"path": {"type": "Exact", "value": "/a"}}) == {"path": "/a"}
    m = http_match({"path": {"type": "RegularExpression", "value": "/items/[0-9]+"}})
    assert m == {"safe_regex": {"regex": "/items/[0-9]+"}}
    assert matches(m, "GET", "/items/42?x", {}) and not matches(m, "GET", "/items/42/x", {})


def test_headers_method_and_query() -> None:
    m = http_match({"path": {"type": "PathPrefix", "value": "/"}, "method": "POST",
                    "headers": [{"type": "Exact", "name": "X-Env", "value": "prod"},
                                {"type": "RegularExpression", "name": "Host",
                                 "value": "echo(:80)?"}],
                    "queryParams": [{"type": "Exact", "name": "Q", "value": "1"}]})
    assert m["headers"][0] == {"name": ":method", "string_match": {"exact": "POST"}}
    assert m["headers"][1]["name"] == "x-env"  # header names are case-insensitive
    assert m["headers"][2]["name"] == ":authority"  # Envoy keeps Host as :authority
    assert m["query_parameters"] == [{"name": "Q", "string_match": {"exact": "1"}}]
    assert matches(m, "POST", "/x?Q=1", {"x-env": "prod"}, authority="echo:80")
    assert not matches(m, "GET", "/x?Q=1", {"x-env": "prod"})
    assert not matches(m, "POST", "/x?q=1", {"x-env": "prod"})  # query names are case-sensitive


# -- precedence ---------------------------------------------------------------------------------


def test_precedence_keys_follow_the_spec() -> None:
    exact = {"path": {"type": "Exact", "value": "/a"}}
    regex = {"path": {"type": "RegularExpression", "value": "/a.*"}}
    long_prefix = {"path": {"type": "PathPrefix", "value": "/a/b"}}
    short_prefix = {"path": {"type": "PathPrefix", "value": "/a"}}
    method = {**short_prefix, "method": "GET"}
    headers = {**short_prefix, "headers": [{"name": "x", "value": "1"}]}
    two_headers = {**short_prefix, "headers": [{"name": "x", "value": "1"},
                                               {"name": "y", "value": "1"}]}
    query = {**short_prefix, "queryParams": [{"name": "q", "value": "1"}]}
    ordered = [exact, regex, long_prefix, method, two_headers, headers, query, short_prefix]
    assert sorted(ordered, key=http_precedence) == ordered
    # method beats headers beats query params
    assert http_precedence({**method, **{"headers": two_headers["headers"]}}) < \
        http_precedence(two_headers)


def test_precedence_across_routes_exact_prefix_length() -> None:
    a = route("a", """
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: echo-v1, port: 80}]""")
    b = route("b", """
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /api/v1}}]
    backendRefs: [{name: echo-v2, port: 80}]""", created="2025-06-01T00:00:00Z")
    c = route("c", """
  - matches: [{path: {type: PathPrefix, value: /api/v1}}]
    backendRefs: [{name: echo-v1, port: 80}]""")
    assert names_in_order(a, b, c) == [
        f"HTTPRoute/{NS}/b/rule/1/match/0",  # Exact
        f"HTTPRoute/{NS}/c/rule/0/match/0",  # longest prefix
        f"HTTPRoute/{NS}/b/rule/0/match/0",
        f"HTTPRoute/{NS}/a/rule/0/match/0",
    ]


def test_precedence_ties_oldest_route_then_alphabetical_then_rule_order() -> None:
    rules = """
  - matches: [{path: {type: PathPrefix, value: /x}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /x}}]
    backendRefs: [{name: echo-v2, port: 80}]"""
    old = route("zzz-old", rules, created="2024-01-01T00:00:00Z")
    new_b = route("b-new", rules, created="2025-01-01T00:00:00Z")
    new_a = route("a-new", rules, created="2025-01-01T00:00:00Z")
    assert names_in_order(new_b, new_a, old) == [
        f"HTTPRoute/{NS}/zzz-old/rule/0/match/0",
        f"HTTPRoute/{NS}/zzz-old/rule/1/match/0",
        f"HTTPRoute/{NS}/a-new/rule/0/match/0",
        f"HTTPRoute/{NS}/a-new/rule/1/match/0",
        f"HTTPRoute/{NS}/b-new/rule/0/match/0",
        f"HTTPRoute/{NS}/b-new/rule/1/match/0",
    ]


def test_precedence_method_headers_query_across_rules() -> None:
    r = route("r", """
  - matches: [{path: {type: PathPrefix, value: /p}, queryParams: [{name: a, value: "1"}]}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /p}, headers: [{name: h, value: "1"}]}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /p}, method: GET}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /p}}]
    backendRefs: [{name: echo-v1, port: 80}]""")
    assert [n.split("/rule/")[1] for n in names_in_order(r)] == [
        "2/match/0", "1/match/0", "0/match/0", "3/match/0"]


def test_routes_without_timestamp_are_newest() -> None:
    rules = """
  - matches: [{path: {type: PathPrefix, value: /x}}]
    backendRefs: [{name: echo-v1, port: 80}]"""
    stored = route("b", rules, created="2030-01-01T00:00:00Z")
    unstored = route("a", rules).replace('nodemesh.test/created: "2025-01-01T00:00:00Z"',
                                         "other: x")
    assert names_in_order(unstored, stored)[0] == f"HTTPRoute/{NS}/b/rule/0/match/0"


def test_request_picks_most_specific_route() -> None:
    a = route("a", """
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: echo-v2, port: 80}]""")
    r = translate(mesh_input(routes_from_yaml(a)))
    routes = routes_of(r, ECHO80)
    assert pick(routes, "/api/x", headers={"x-canary": "1"})["name"].endswith("rule/1/match/0")
    assert pick(routes, "/api/x")["name"].endswith("rule/0/match/0")
    assert pick(routes, "/apix", headers={"x-canary": "1"})["name"].endswith("rule/0/match/0")


# -- gRPC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "expected"), [
    (None, {"prefix": "/"}),
    ({"type": "Exact", "service": "pkg.Svc", "method": "Get"}, {"path": "/pkg.Svc/Get"}),
    ({"type": "Exact", "service": "pkg.Svc"}, {"prefix": "/pkg.Svc/"}),
    ({"type": "Exact", "method": "Get"}, {"safe_regex": {"regex": "/[^/]+/Get"}}),
    ({"type": "RegularExpression", "service": "pkg\\..*", "method": "Get.*"},
     {"safe_regex": {"regex": "/pkg\\..*/Get.*"}}),
    ({"type": "RegularExpression", "method": "Get.*"}, {"safe_regex": {"regex": "/[^/]+/Get.*"}}),
])
def test_grpc_method_match(method, expected) -> None:
    assert grpc_path_match(method) == expected


@pytest.mark.parametrize(("method", "path", "hit"), [
    ({"type": "Exact", "service": "pkg.Svc", "method": "Get"}, "/pkg.Svc/Get", True),
    ({"type": "Exact", "service": "pkg.Svc", "method": "Get"}, "/pkg.Svc/GetAll", False),
    ({"type": "Exact", "service": "pkg.Svc"}, "/pkg.Svc/Any", True),
    ({"type": "Exact", "service": "pkg.Svc"}, "/pkg.SvcX/Any", False),
    ({"type": "Exact", "method": "Get"}, "/any.Svc/Get", True),
    ({"type": "Exact", "method": "Get"}, "/any.Svc/Gets", False),
])
def test_grpc_method_semantics(method, path, hit) -> None:
    m = grpc_match({"method": method})
    assert matches(m, "POST", path, {"content-type": "application/grpc+proto"}) is hit


def test_grpc_precedence_service_then_method_then_headers() -> None:
    r = route("g", """
  - matches: [{method: {type: Exact, method: Get}}]
    backendRefs: [{name: echo-v1, port: 7070}]
  - matches: [{method: {type: Exact, service: a.B}}]
    backendRefs: [{name: echo-v1, port: 7070}]
  - matches: [{method: {type: Exact, service: a.B, method: Get}}]
    backendRefs: [{name: echo-v1, port: 7070}]
  - matches: [{headers: [{name: x, value: "1"}]}]
    backendRefs: [{name: echo-v1, port: 7070}]""", kind="GRPCRoute", port=7070)
    res = translate(mesh_input(routes_from_yaml(r)))
    order = [x["name"].split("/rule/")[1] for x in routes_of(res, f"svc/{NS}/echo/7070")]
    assert order == ["2/match/0", "1/match/0", "0/match/0", "3/match/0"]


def test_re2_escape() -> None:
    assert re2_escape("/a.b(c)*") == "/a\\.b\\(c\\)\\*"
    assert re2_escape("plain-text_1") == "plain-text_1"
