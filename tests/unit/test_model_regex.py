"""CiliumNetworkPolicy HTTP rules: ``method``, ``path`` and ``host`` must be regexes Envoy's RE2 takes.

They reach Envoy as they are written (route/rbac.py: a ``safe_regex`` per field), so one RE2
refuses would get the node's listener NACKed; `apply` refuses it instead, with RE2's words.
Route regexes are a different matter: the Gateway API leaves them to the implementation, so the
model accepts them and the route's status says what is wrong (tests/unit/test_route_regex_status.py).
"""

from __future__ import annotations

import textwrap

import pytest

from nodemesh.errors import InvalidManifest
from nodemesh.model.manifest import load_manifests
from nodemesh.model.validate import validate_objects
from nodemesh.route.rbac import http_permission

CNP = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api-l7
  namespace: shop
spec:
  endpointSelector:
    matchLabels: {app: api}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: "8080", protocol: TCP}
      rules:
        http:
        - HTTP
"""
WHERE = "CiliumNetworkPolicy shop/api-l7: spec.ingress[0].toPorts[0].rules.http[0]"


def cnp(http: str) -> str:
    return CNP.replace("- HTTP", http)


def validate(text: str) -> list[dict]:
    return validate_objects(load_manifests(textwrap.dedent(text), "p.yaml"), "p.yaml")


def errors(text: str) -> list[str]:
    with pytest.raises(InvalidManifest) as e:
        validate(text)
    return e.value.errors


def test_unclosed_group_in_path_is_refused_with_re2s_reason() -> None:
    assert errors(cnp('- {method: GET, path: "/items/(unclosed"}')) == [
        f'{WHERE}.path: "/items/(unclosed" is not a regular expression Envoy\'s RE2 accepts: '
        "missing ): /items/(unclosed"]


@pytest.mark.parametrize(("http", "field", "reason"), [
    ('- {method: "GET|(POST"}', "method", "missing ): GET|(POST"),
    ('- {host: "api[.example"}', "host", "missing ]: [.example"),
    ('- {path: "/a++"}', "path", "bad repetition operator: ++"),
    ('- {path: "/(?=x)"}', "path", "invalid perl operator: (?="),  # lookahead: not in RE2
    ('- {path: "(a)\\\\1"}', "path", "invalid escape sequence: \\1"),  # backreference
])
def test_other_regexes_re2_refuses(http: str, field: str, reason: str) -> None:
    (line,) = errors(cnp(http))
    assert line.startswith(f"{WHERE}.{field}: ")
    assert line.endswith(f"is not a regular expression Envoy's RE2 accepts: {reason}")


def test_regex_over_envoys_program_size_limit_is_refused() -> None:
    (line,) = errors(cnp('- {path: "/x.{60}"}'))
    assert line.startswith(f'{WHERE}.path: "/x.{{60}}" is not a regular expression Envoy\'s RE2 '
                           "accepts: regex '/x.{60}' RE2 program size of ")
    assert "> max program size of 100" in line


def test_every_bad_field_of_every_rule_is_reported() -> None:
    text = cnp('- {method: "(", path: /ok}\n        - {path: "[", host: ")"}') + """\
  egress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{path: "*"}]
"""
    lines = errors(text)
    assert [line.split(": ", 2)[1] for line in lines] == [
        "spec.ingress[0].toPorts[0].rules.http[0].method",
        "spec.ingress[0].toPorts[0].rules.http[1].path",
        "spec.ingress[0].toPorts[0].rules.http[1].host",
        "spec.egress[0].toPorts[0].rules.http[0].path",
    ]


def test_specs_are_checked_too() -> None:
    text = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-l7, namespace: shop}
specs:
- endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{path: "/items/(unclosed"}]
"""
    (line,) = errors(text)
    assert line.startswith("CiliumNetworkPolicy shop/api-l7: specs[0].ingress[0].toPorts[0].rules"
                           ".http[0].path: ")


@pytest.mark.parametrize("http", [
    "- {}",  # no fields: any request
    '- {method: "", path: "", host: ""}',  # empty fields match everything, no regex is sent
    "- {method: GET, path: /public/.*, host: api.example.com}",
    '- {method: "GET|HEAD", path: "/items/[0-9]+(/.*)?", host: "api(-v1)?(:80)?"}',
    '- {path: "^/anchored$"}',
    '- {path: "\\\\pL+"}',  # Unicode classes: RE2 has them
    '- {path: "/items/(?P<id>[0-9]+)"}',
])
def test_valid_regexes_are_accepted_as_written(http: str) -> None:
    (obj,) = validate(cnp(http))
    rule = obj["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]
    # Kept as written, and the regex Envoy gets for each field is exactly the value checked.
    perm = http_permission(rule)
    parts = perm["and_rules"]["rules"] if "and_rules" in perm else [perm]
    sent = {p["header"]["name"]: p["header"]["string_match"] for p in parts if "header" in p}
    for fld, header in (("method", ":method"), ("path", ":path"), ("host", ":authority")):
        if rule.get(fld):
            assert sent[header] == {"safe_regex": {"regex": rule[fld]}}
        else:
            assert header not in sent
