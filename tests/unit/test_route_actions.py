"""Filters, timeouts and retries → Envoy route fields (redirect ports, path rewrites, ...)."""

from __future__ import annotations

import pytest

from nodemesh.route import translate
from nodemesh.route.actions import (
    UnsupportedFilter,
    header_ops,
    mirror_policy,
    redirect,
    timeouts_and_retry,
    url_rewrite,
)
from nodemesh.route.protos import CLUSTER_TYPE
from tests.unit.routes import NS, location, mesh_input, pick, rewritten_path, routes_from_yaml, routes_of


def prefix_match(value: str) -> dict:
    return {"path": {"type": "PathPrefix", "value": value}}


def envoy_route(match_prefix: str, action: dict, key: str = "route") -> dict:
    from nodemesh.route.matching import http_match

    return {"match": http_match(prefix_match(match_prefix)), key: action}


# -- RequestRedirect port rules -----------------------------------------------------------------


@pytest.mark.parametrize(("listener_port", "cfg", "host", "expected"), [
    # no scheme, no port: the listener (Service) port; no ":80" for plain http on 80
    (80, {}, "echo", "http://echo/p"),
    (8080, {}, "echo:8080", "http://echo:8080/p"),
    (8080, {}, "echo", "http://echo:8080/p"),  # even when the client left the port out
    (80, {"hostname": "example.org"}, "echo", "http://example.org/p"),
    (8080, {"hostname": "example.org"}, "echo:8080", "http://example.org:8080/p"),
    # a scheme: its well-known port, written only where Envoy cannot drop the client's port
    (80, {"scheme": "https"}, "echo", "https://echo/p"),
    (80, {"scheme": "https"}, "echo:80", "https://echo/p"),
    (8080, {"scheme": "https"}, "echo:8080", "https://echo:443/p"),
    (8080, {"scheme": "https", "hostname": "example.org"}, "echo:8080", "https://example.org/p"),
    (80, {"scheme": "http"}, "echo", "http://echo/p"),
    # an explicit port
    (80, {"port": 8083}, "echo", "http://echo:8083/p"),
    (80, {"port": 8083, "hostname": "example.org"}, "echo", "http://example.org:8083/p"),
    (80, {"scheme": "https", "port": 443}, "echo", "https://echo/p"),
    (80, {"scheme": "https", "port": 8443}, "echo", "https://echo:8443/p"),
    (80, {"port": 80, "hostname": "example.org"}, "echo", "http://example.org/p"),
])
def test_redirect_port_rules(listener_port: int, cfg: dict, host: str, expected: str) -> None:
    cfg = {"statusCode": 302, **cfg}
    r = envoy_route("/p", redirect(cfg, prefix_match("/p"), listener_port), key="redirect")
    assert location(r, "/p", host=host) == (302, expected)


@pytest.mark.parametrize(("code", "envoy"), [
    (301, "MOVED_PERMANENTLY"), (302, "FOUND"), (303, "SEE_OTHER"),
    (307, "TEMPORARY_REDIRECT"), (308, "PERMANENT_REDIRECT")])
def test_redirect_codes(code: int, envoy: str) -> None:
    assert redirect({"statusCode": code}, None, 80)["response_code"] == envoy


# -- path rewrites ------------------------------------------------------------------------------

# The Gateway API's table for ReplacePrefixMatch (HTTPPathModifier), plus the root prefix.
PREFIX_TABLE = [
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
    ("/foo/bar?q=1", "/foo", "/xyz", "/xyz/bar?q=1"),
    ("/bar", "/", "/xyz", "/xyz/bar"),
    ("/bar", "/", "/", "/bar"),
]


@pytest.mark.parametrize(("path", "prefix", "replacement", "expected"), PREFIX_TABLE)
def test_url_rewrite_replace_prefix(path, prefix, replacement, expected) -> None:
    cfg = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": replacement}}
    r = envoy_route(prefix, {"cluster": "c", **url_rewrite(cfg, prefix_match(prefix))})
    assert rewritten_path(r, path) == expected


@pytest.mark.parametrize(("path", "prefix", "replacement", "expected"), PREFIX_TABLE)
def test_redirect_replace_prefix(path, prefix, replacement, expected) -> None:
    cfg = {"statusCode": 302,
           "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": replacement}}
    r = envoy_route(prefix, redirect(cfg, prefix_match(prefix), 80), key="redirect")
    assert location(r, path) == (302, "http://echo" + expected)


def test_full_path_rewrite_keeps_query() -> None:
    cfg = {"hostname": "other.example",
           "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}}
    action = url_rewrite(cfg, prefix_match("/old"))
    assert action["host_rewrite_literal"] == "other.example"
    r = envoy_route("/old", {"cluster": "c", **action})
    assert rewritten_path(r, "/old/deep/path?x=1") == "/new?x=1"


# -- header modifiers ---------------------------------------------------------------------------


def test_header_ops() -> None:
    ops, host = header_ops({"set": [{"name": "X-A", "value": "1"}],
                            "add": [{"name": "X-B", "value": "2"}],
                            "remove": ["X-C"]}, request=True)
    assert host is None
    assert ops == {
        "request_headers_to_add": [
            {"header": {"key": "x-a", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            {"header": {"key": "x-b", "value": "2"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}],
        "request_headers_to_remove": ["x-c"]}
    resp, _ = header_ops({"set": [{"name": "X-A", "value": "1"}]}, request=False)
    assert list(resp) == ["response_headers_to_add"]


def test_setting_host_becomes_a_host_rewrite() -> None:
    ops, host = header_ops({"set": [{"name": "Host", "value": "api.internal"}]}, request=True)
    assert ops == {} and host == "api.internal"
    with pytest.raises(UnsupportedFilter):
        header_ops({"remove": ["Host"]}, request=True)


# -- mirror, timeouts, retries ------------------------------------------------------------------


@pytest.mark.parametrize(("cfg", "fraction"), [
    ({}, None),
    ({"percent": 100}, None),
    ({"percent": 25}, {"numerator": 25, "denominator": "HUNDRED"}),
    ({"fraction": {"numerator": 1, "denominator": 3}},
     {"numerator": 333333, "denominator": "MILLION"}),
    ({"fraction": {"numerator": 5, "denominator": 5}}, None),
])
def test_mirror_fraction(cfg: dict, fraction: dict | None) -> None:
    p = mirror_policy("svc/ns/m/80", cfg)
    assert p["disable_shadow_host_suffix_append"] is True
    assert p.get("runtime_fraction", {}).get("default_value") == fraction


@pytest.mark.parametrize(("rule", "expected"), [
    ({}, {"timeout": "0s"}),  # no Gateway API timeout: none (Envoy's default would be 15s)
    ({"timeouts": {"request": "10s"}}, {"timeout": "10s"}),
    ({"timeouts": {"request": "0s"}}, {"timeout": "0s"}),
    ({"timeouts": {"request": "1m30s", "backendRequest": "500ms"}},
     {"timeout": "90s", "retry_policy": {"per_try_timeout": "0.500s", "num_retries": 0}}),
    ({"retry": {}}, {"timeout": "0s", "retry_policy": {
        "retry_on": "connect-failure,refused-stream,reset", "num_retries": 1}}),
    ({"retry": {"attempts": 3, "codes": [503, 500], "backoff": "100ms"}},
     {"timeout": "0s", "retry_policy": {
         "retry_on": "connect-failure,refused-stream,reset,retriable-status-codes",
         "retriable_status_codes": [500, 503], "num_retries": 3,
         "retry_back_off": {"base_interval": "0.100s", "max_interval": "1s"}}}),
    ({"retry": {"attempts": 0}}, {"timeout": "0s", "retry_policy": {"num_retries": 0}}),
    ({"retry": {"attempts": 2}, "timeouts": {"backendRequest": "2s"}},
     {"timeout": "0s", "retry_policy": {"retry_on": "connect-failure,refused-stream,reset",
                                        "num_retries": 2, "per_try_timeout": "2s"}}),
])
def test_timeouts_and_retry(rule: dict, expected: dict) -> None:
    assert timeouts_and_retry(rule) == expected


# -- in a translation ---------------------------------------------------------------------------

ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /m}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo-v2, port: 80}, percent: 10}
    - type: RequestMirror
      requestMirror: {backendRef: {name: nowhere, port: 80}}
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example}
    backendRefs: [{name: echo-v1, port: 80}]
    timeouts: {request: 5s}
"""


def test_mirror_rewrite_and_timeout_in_a_route() -> None:
    res = translate(mesh_input(routes_from_yaml(ROUTE)))
    got = pick(routes_of(res, f"svc/{NS}/echo/80"), "/m/x")
    action = got["route"]
    assert action["cluster"] == f"svc/{NS}/echo-v1/80"
    assert action["host_rewrite_literal"] == "rewritten.example"
    assert action["timeout"] == "5s"
    # The unresolvable mirror is left out (and reported); the other is there, with its cluster.
    (mirror,) = action["request_mirror_policies"]
    assert mirror["cluster"] == f"svc/{NS}/echo-v2/80"
    assert f"svc/{NS}/echo-v2/80" in res.snapshot.resources(CLUSTER_TYPE)
    (status,) = res.route_statuses.values()
    resolved = status["parents"][0]["conditions"][1]
    assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
    assert "nowhere" in resolved["message"]


def test_removing_host_makes_the_route_unsupported() -> None:
    bad = ROUTE.replace("    - type: URLRewrite\n      urlRewrite: {hostname: rewritten.example}\n",
                        "    - type: RequestHeaderModifier\n"
                        "      requestHeaderModifier: {remove: [Host]}\n")
    res = translate(mesh_input(routes_from_yaml(bad)))
    (status,) = res.route_statuses.values()
    accepted = status["parents"][0]["conditions"][0]
    assert (accepted["status"], accepted["reason"]) == ("False", "UnsupportedValue")
    assert "Host" in accepted["message"]
    assert not res.snapshot.listeners  # an unaccepted route changes nothing
