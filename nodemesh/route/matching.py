"""Route matches → Envoy ``RouteMatch``, and the Gateway API's precedence between them.

Envoy tries the routes of a virtual host in order and takes the first that matches, so the
order of the list *is* the precedence. The Gateway API defines it across all rules of all routes
attached to the same parent (here: one Service port, for one group of clients):

HTTPRoute (``HTTPRouteRule.matches``): an Exact path; then the PathPrefix with the most
characters; then a method match; then the most header matches; then the most query-parameter
matches; then the oldest route (creationTimestamp); then ``namespace/name`` alphabetically; then
rule order and match order within the route. RegularExpression paths are implementation-specific:
nodemesh puts them after Exact and before every PathPrefix, longer patterns first (a regex is
written to single out particular paths, a prefix to catch a subtree).

GRPCRoute (``GRPCRouteRule.matches``): the most characters in a matching service, then in a
matching method, then the most header matches; ties as above. Hostnames play no part in the
mesh (GEP-1426: "GAMMA implementations SHOULD NOT infer any functionality from hostnames").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# RE2 metacharacters: escaping these (and only these) keeps a literal literal.
_RE2_META = set("\\.+*?()|[]{}^$")


def re2_escape(s: str) -> str:
    return "".join("\\" + c if c in _RE2_META else c for c in s)


def normalize_prefix(value: str) -> str:
    """PathPrefix semantics: element-wise, a trailing '/' is ignored (``/abc/`` ≡ ``/abc``)."""
    stripped = value.rstrip("/")
    return stripped or "/"


def string_match(match_type: str, value: str) -> dict[str, Any]:
    if match_type == "RegularExpression":
        return {"safe_regex": {"regex": value}}
    return {"exact": value}


def header_name(name: str) -> str:
    """Header names are case-insensitive; Envoy wants them lower-case, and it keeps HTTP/1's
    Host as HTTP/2's ``:authority`` (GEP-1426 suggests Host header matches in the mesh)."""
    low = name.lower()
    return ":authority" if low == "host" else low


def _headers(headers: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": header_name(h["name"]),
             "string_match": string_match(h.get("type", "Exact"), h["value"])}
            for h in headers]


def http_match(m: Mapping[str, Any]) -> dict[str, Any]:
    """One HTTPRouteMatch → an Envoy RouteMatch (all conditions ANDed)."""
    path = m.get("path") or {"type": "PathPrefix", "value": "/"}
    out: dict[str, Any] = {}
    ptype, pvalue = path.get("type", "PathPrefix"), path.get("value", "/")
    if ptype == "Exact":
        out["path"] = pvalue
    elif ptype == "RegularExpression":
        out["safe_regex"] = {"regex": pvalue}
    else:
        prefix = normalize_prefix(pvalue)
        # path_separated_prefix matches /foo and /foo/... but not /foobar; it cannot be "/".
        out["prefix" if prefix == "/" else "path_separated_prefix"] = prefix
    headers = _headers(m.get("headers") or [])
    if m.get("method"):
        headers.insert(0, {"name": ":method", "string_match": {"exact": m["method"]}})
    if headers:
        out["headers"] = headers
    if m.get("queryParams"):
        # Query parameter names are case-sensitive in the Gateway API, as in Envoy.
        out["query_parameters"] = [
            {"name": q["name"], "string_match": string_match(q.get("type", "Exact"), q["value"])}
            for q in m["queryParams"]]
    return out


def http_precedence(m: Mapping[str, Any]) -> tuple:
    """Sort key of one HTTPRouteMatch (smaller sorts first = wins)."""
    path = m.get("path") or {"type": "PathPrefix", "value": "/"}
    ptype, pvalue = path.get("type", "PathPrefix"), path.get("value", "/")
    rank = {"Exact": 0, "RegularExpression": 1}.get(ptype, 2)
    length = len(normalize_prefix(pvalue)) if rank == 2 else len(pvalue)
    return (rank, -length, 0 if m.get("method") else 1, -len(m.get("headers") or []),
            -len(m.get("queryParams") or []))


def grpc_path_match(method: Mapping[str, Any] | None) -> dict[str, Any]:
    """A GRPCMethodMatch as a match on ``:path`` (``/<service>/<method>``)."""
    if not method:
        return {"prefix": "/"}
    service, name = method.get("service"), method.get("method")
    if method.get("type", "Exact") == "RegularExpression":
        return {"safe_regex": {"regex": f"/{service or '[^/]+'}/{name or '[^/]+'}"}}
    if service and name:
        return {"path": f"/{service}/{name}"}
    if service:
        return {"prefix": f"/{service}/"}
    return {"safe_regex": {"regex": f"/[^/]+/{re2_escape(name or '')}"}}


def grpc_match(m: Mapping[str, Any]) -> dict[str, Any]:
    out = grpc_path_match(m.get("method"))
    # A GRPCRoute only routes gRPC: requests with content-type application/grpc*.
    out["grpc"] = {}
    headers = _headers(m.get("headers") or [])
    if headers:
        out["headers"] = headers
    return out


def grpc_precedence(m: Mapping[str, Any]) -> tuple:
    method = m.get("method") or {}
    return (-len(method.get("service") or ""), -len(method.get("method") or ""),
            -len(m.get("headers") or []))
