"""L7 policy → RBAC, with Cilium's semantics (anchored regexes, header forms)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from nodemesh.route import L7Policy, L7PolicyRule, Pod
from nodemesh.route.rbac import http_permission, principals, rbac_rules

LOCAL = [Pod("a", "p1", "10.0.0.1", "n1", identity=5), Pod("a", "p2", "10.0.0.2", "n1", identity=5),
         Pod("b", "p3", "10.0.0.3", "n1", identity=6)]


def allowed(perm: dict[str, Any], method: str, path: str, headers: dict[str, str] | None = None,
            host: str = "api") -> bool:
    """Evaluate an RBAC permission the way Envoy does for these shapes."""
    hdrs = {":method": method, ":path": path, ":authority": host,
            **{k.lower(): v for k, v in (headers or {}).items()}}
    if perm.get("any"):
        return True
    if "and_rules" in perm:
        return all(allowed(p, method, path, headers, host) for p in perm["and_rules"]["rules"])
    h = perm["header"]
    value = hdrs.get(h["name"])
    if h.get("present_match"):
        return value is not None
    if value is None:
        return False
    sm = h["string_match"]
    if "exact" in sm:
        return value == sm["exact"]
    return re.fullmatch(sm["safe_regex"]["regex"], value) is not None


@pytest.mark.parametrize(("rule", "method", "path", "headers", "ok"), [
    ({"path": "/foo"}, "GET", "/foo", {}, True),
    ({"path": "/foo"}, "GET", "/foo/bar", {}, False),  # anchored: ^/foo$
    ({"path": "/foo"}, "GET", "/foo?x=1", {}, False),  # :path carries the query, as in Cilium
    ({"path": "/foo.*"}, "GET", "/foo/bar?x=1", {}, True),
    ({"method": "GET|HEAD"}, "HEAD", "/", {}, True),
    ({"method": "GET"}, "GETX", "/", {}, False),
    ({"method": "GET", "path": "/public/.*"}, "POST", "/public/x", {}, False),
    ({"host": "api(:8080)?"}, "GET", "/", {}, True),
    ({"headers": ["X-Token: s3cret"]}, "GET", "/", {"X-Token": "s3cret"}, True),
    ({"headers": ["X-Token: s3cret"]}, "GET", "/", {"X-Token": "other"}, False),
    ({"headers": ["X-Token"]}, "GET", "/", {"X-Token": "anything"}, True),
    ({"headers": ["X-Token"]}, "GET", "/", {}, False),
    ({"headerMatches": [{"name": "X-Env", "value": "prod"}]}, "GET", "/", {"x-env": "prod"}, True),
    ({"headerMatches": [{"name": "X-Env"}]}, "GET", "/", {}, False),
    ({}, "DELETE", "/anything", {}, True),
])
def test_http_rule_semantics(rule, method, path, headers, ok) -> None:
    assert allowed(http_permission(rule), method, path, headers) is ok


def test_principals() -> None:
    assert principals((5,), LOCAL) == [
        {"direct_remote_ip": {"address_prefix": "10.0.0.1", "prefix_len": 32}},
        {"direct_remote_ip": {"address_prefix": "10.0.0.2", "prefix_len": 32}}]
    assert principals((0,), LOCAL) == [{"any": True}]
    assert principals((7,), LOCAL) == []


def test_rules_are_an_allow_list_of_rules_with_local_clients() -> None:
    pol = L7Policy("10.1.0.1", 80, (
        L7PolicyRule((6,), ({"method": "GET"}, {"method": "POST", "path": "/submit"})),
        L7PolicyRule((7,), ()),  # nobody here has identity 7
        L7PolicyRule((5,), ()),  # identity 5 may send anything
    ))
    rules = rbac_rules(pol, LOCAL)
    assert rules["action"] == "ALLOW"
    assert sorted(rules["policies"]) == ["rule-0", "rule-2"]
    assert len(rules["policies"]["rule-0"]["permissions"]) == 2  # ORed
    assert rules["policies"]["rule-2"]["permissions"] == [{"any": True}]


def test_no_local_client_allowed_means_deny_all() -> None:
    pol = L7Policy("10.1.0.1", 80, (L7PolicyRule((7,), ()),))
    assert rbac_rules(pol, LOCAL) == {"action": "ALLOW", "policies": {}}
