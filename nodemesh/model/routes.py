"""Schemas of HTTPRoute and GRPCRoute (gateway.networking.k8s.io/v1) in the mesh mode (GAMMA).

The fields, defaults and rules follow the Gateway API v1 types, including the rules their CRDs
check with CEL (ported here as hooks): path values, filter combinations, header-modifier
uniqueness, ReplacePrefixMatch needing one PathPrefix match, timeouts, parentRef distinctness.

nodemesh implements only the mesh mode: every parentRef must be a Service (``group: ""``,
``kind: Service``); routes attached to Gateways are refused. Regular expressions are not checked,
as the Gateway API does not check them either (their dialect is implementation-specific).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from nodemesh.model.common import PORT
from nodemesh.model.names import check_dns1123_label, check_http_header_name
from nodemesh.model.schema import (
    Ctx,
    Hook,
    Int,
    ListOf,
    Obj,
    Path,
    Str,
    Unsupported,
    format_path,
    opt,
    req,
)

GATEWAY_GROUP = "gateway.networking.k8s.io"
MESH_ONLY = ('nodemesh implements the Gateway API mesh mode (GAMMA) only: a parentRef must be '
             'a Service, with group: "" and kind: Service')
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"

HOSTNAME = Str(min_len=1, max_len=253, pattern=r"(\*\.)?" + _SUBDOMAIN,
               pattern_msg="must be a lowercase DNS name, optionally starting with a '*.' label "
                           "(no IP addresses)")
PRECISE_HOSTNAME = Str(min_len=1, max_len=253, pattern=_SUBDOMAIN,
                       pattern_msg="must be a lowercase DNS name (no wildcards, no IP addresses)")
GROUP = Str(max_len=253, pattern=f"({_SUBDOMAIN})?",
            pattern_msg='must be "" (the core group) or a DNS subdomain')
KIND = Str(min_len=1, max_len=63, pattern=r"[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?",
           pattern_msg="must be a kind name such as Service")
OBJECT_NAME = Str(min_len=1, max_len=253)
NAMESPACE = Str(validator=check_dns1123_label)
SECTION_NAME = Str(min_len=1, max_len=253, pattern=_SUBDOMAIN,
                   pattern_msg="must be a DNS subdomain: lowercase letters, digits, '-' and '.'")
HEADER_NAME = Str(validator=check_http_header_name)
DURATION = Str(pattern=r"([0-9]{1,5}(h|m|s|ms)){1,4}",
               pattern_msg='must be a Gateway API duration such as "10s", "1m30s" or "500ms"')
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_DURATION_PART = re.compile(r"([0-9]+)(h|ms|m|s)")
_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}


def duration_ms(value: str) -> int:
    """A Gateway API duration (``1m30s``, ``500ms``) in milliseconds."""
    return sum(int(n) * _UNIT_MS[u] for n, u in _DURATION_PART.findall(value))


# -- parents and backends --------------------------------------------------------------------


def _mesh_parent(ref: dict, path: Path, ctx: Ctx) -> None:
    group, kind = ref.get("group"), ref.get("kind")
    if (kind or "Gateway") == "Gateway" and (group is None or group == GATEWAY_GROUP):
        where = (*path, "kind") if kind else path
        ctx.error(where, f"a Gateway parent is not supported ({MESH_ONLY})")
    elif group is None:
        ctx.error((*path, "group"), f'must be "" for a Service parent: when omitted it is '
                  f"{GATEWAY_GROUP} ({MESH_ONLY})")
    elif group != "":
        ctx.error((*path, "group"), f'must be "" ({MESH_ONLY})')
    elif kind is None:
        ctx.error((*path, "kind"), f"required: when omitted it is Gateway ({MESH_ONLY})")
    elif kind != "Service":
        ctx.error((*path, "kind"), f'must be "Service" ({MESH_ONLY})')


PARENT_REF = Obj(
    {
        "group": GROUP,
        "kind": KIND,
        "namespace": NAMESPACE,
        "name": req(OBJECT_NAME),
        "sectionName": SECTION_NAME,
        "port": PORT,
    },
    hooks=[_mesh_parent],
)


def _distinct_parents(spec: dict, path: Path, ctx: Ctx) -> None:
    # Several parentRefs to one parent must each set the same optional fields (sectionName,
    # port) to different values, as the Gateway API's CEL rules say.
    refs = spec.get("parentRefs") or []
    by_parent: dict[tuple, list[int]] = {}
    for i, r in enumerate(refs):
        key = (r.get("group"), r.get("kind"), r.get("namespace") or "", r["name"])
        by_parent.setdefault(key, []).append(i)
    for idx in by_parent.values():
        if len(idx) < 2:
            continue
        shapes = {(bool(refs[i].get("sectionName")), bool(refs[i].get("port"))) for i in idx}
        values = [(refs[i].get("sectionName") or "", refs[i].get("port") or 0) for i in idx]
        where = (*path, "parentRefs", idx[1])
        if len(shapes) > 1 or shapes == {(False, False)}:
            ctx.error(where, "sectionName or port must be specified when parentRefs includes 2 or "
                             "more references to the same parent")
        elif len(set(values)) < len(values):
            ctx.error(where, "sectionName or port must be unique when parentRefs includes 2 or "
                             "more references to the same parent")


def _service_backend(ref: dict, path: Path, ctx: Ctx) -> None:
    if ref.get("group") != "" or ref.get("kind") != "Service":
        ctx.error((*path, "kind"), 'only Service backends are supported (group: "" and kind: '
                  f'Service; got group: "{ref.get("group")}", kind: {ref.get("kind")})')
    elif "port" not in ref:
        ctx.error((*path, "port"), "required for a Service backend (the Service's port)")


_BACKEND_OBJECT_FIELDS = {
    "group": opt(GROUP, ""),
    "kind": opt(KIND, "Service"),
    "name": req(OBJECT_NAME),
    "namespace": NAMESPACE,
    "port": PORT,
}
BACKEND_OBJECT_REF = Obj(_BACKEND_OBJECT_FIELDS,
                         hooks=[Hook(_service_backend, needs=("group", "kind", "port"))])

# -- filters ---------------------------------------------------------------------------------

HTTP_HEADER = Obj({"name": req(HEADER_NAME), "value": req(Str(min_len=1, max_len=4096))})


def _one_action_per_header(f: dict, path: Path, ctx: Ctx) -> None:
    seen: dict[str, Path] = {}
    for action in ("set", "add", "remove"):
        for i, item in enumerate(f.get(action, [])):
            name = item["name"] if isinstance(item, dict) else item
            here = (*path, action, i)
            if name.lower() in seen:
                ctx.error(here, f'header "{name}" already has an action in this filter '
                          f"(at {format_path(seen[name.lower()])})")
            else:
                seen[name.lower()] = here


HEADER_FILTER = Obj(
    {
        "set": ListOf(HTTP_HEADER, max_items=16),
        "add": ListOf(HTTP_HEADER, max_items=16),
        "remove": ListOf(HEADER_NAME, max_items=16),
    },
    hooks=[_one_action_per_header],
)


def _path_modifier(m: dict, path: Path, ctx: Ctx) -> None:
    for kind, fld in (("ReplaceFullPath", "replaceFullPath"),
                      ("ReplacePrefixMatch", "replacePrefixMatch")):
        if m["type"] == kind and fld not in m:
            ctx.error((*path, fld), f"required when type is {kind}")
        if m["type"] != kind and fld in m:
            ctx.error((*path, fld), f"may only be set when type is {kind}")


PATH_MODIFIER = Obj(
    {
        "type": req(Str(enum=("ReplaceFullPath", "ReplacePrefixMatch"))),
        "replaceFullPath": Str(max_len=1024),
        "replacePrefixMatch": Str(max_len=1024),
    },
    hooks=[_path_modifier],
)

REQUEST_REDIRECT = Obj({
    "scheme": Str(enum=("http", "https")),
    "hostname": PRECISE_HOSTNAME,
    "path": PATH_MODIFIER,
    "port": PORT,
    "statusCode": opt(Int(enum=(301, 302, 303, 307, 308)), 302),
})
URL_REWRITE = Obj({"hostname": PRECISE_HOSTNAME, "path": PATH_MODIFIER})


def _fraction(f: dict, path: Path, ctx: Ctx) -> None:
    if f["numerator"] > f["denominator"]:
        ctx.error((*path, "numerator"), f"must be <= denominator ({f['denominator']})")


def _mirror(m: dict, path: Path, ctx: Ctx) -> None:
    if "percent" in m and "fraction" in m:
        ctx.error((*path, "fraction"), "may not be set together with percent")


REQUEST_MIRROR = Obj(
    {
        "backendRef": req(BACKEND_OBJECT_REF),
        "percent": Int(0, 100),
        "fraction": Obj({"numerator": req(Int(0)), "denominator": opt(Int(1), 100)},
                        hooks=[_fraction]),
    },
    hooks=[_mirror],
)

# filter type → the field that carries its configuration
HTTP_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
}
GRPC_FILTER_FIELDS = {
    k: v for k, v in HTTP_FILTER_FIELDS.items()
    if k in ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror")
}
REFUSED_FILTERS = {
    "ExtensionRef": "nodemesh has no filter extensions",
    "CORS": "the CORS filter is not implemented",
    "ExternalAuth": "external authorization is not implemented",
}


def _filter_union(fields: Mapping[str, str]) -> Hook:
    def check(f: dict, path: Path, ctx: Ctx) -> None:
        own = fields.get(f["type"])
        for t, fld in fields.items():
            if fld in f and t != f["type"]:
                ctx.error((*path, fld), f"must not be set when type is {f['type']}")
        if own and own not in f:
            ctx.error((*path, own), f"required when type is {f['type']}")

    return Hook(check, needs=("type",))


def _filter_schema(fields: Mapping[str, str], refused: Mapping[str, str]) -> Obj:
    configs = {
        "requestHeaderModifier": HEADER_FILTER,
        "responseHeaderModifier": HEADER_FILTER,
        "requestRedirect": REQUEST_REDIRECT,
        "urlRewrite": URL_REWRITE,
        "requestMirror": REQUEST_MIRROR,
    }
    refused_fields = {"ExtensionRef": "extensionRef", "CORS": "cors",
                      "ExternalAuth": "externalAuth"}
    return Obj(
        {
            "type": req(Str(enum=tuple(fields), unsupported=refused)),
            **{fld: configs[fld] for fld in fields.values()},
            **{refused_fields[t]: Unsupported(why) for t, why in refused.items()},
        },
        hooks=[_filter_union(fields)],
    )


HTTP_FILTER = _filter_schema(HTTP_FILTER_FIELDS, REFUSED_FILTERS)
GRPC_FILTER = _filter_schema(GRPC_FILTER_FIELDS, {"ExtensionRef": REFUSED_FILTERS["ExtensionRef"]})
UNREPEATABLE = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite")


def check_filter_list(filters: list[dict], path: Path, ctx: Ctx) -> None:
    """The CEL rules on a list of filters: no repeats, not both RequestRedirect and URLRewrite."""
    types = [f.get("type") for f in filters]
    if "RequestRedirect" in types and "URLRewrite" in types:
        ctx.error((*path, types.index("URLRewrite")),
                  "may not be used together with a RequestRedirect filter")
    for t in UNREPEATABLE:
        for j in [i for i, x in enumerate(types) if x == t][1:]:
            ctx.error((*path, j, "type"), f"{t} filter cannot be repeated")


class _Filters(ListOf):
    def check(self, value: object, path: Path, ctx: Ctx) -> object:
        mark = ctx.mark()
        out = super().check(value, path, ctx)
        if isinstance(out, list) and ctx.clean_since(mark, path):
            check_filter_list(out, path, ctx)
        return out


def backend_ref(filter_schema: Obj) -> Obj:
    return Obj(
        {
            **_BACKEND_OBJECT_FIELDS,
            "weight": opt(Int(0, 1_000_000), 1),
            "filters": _Filters(filter_schema, max_items=16),
        },
        hooks=[Hook(_service_backend, needs=("group", "kind", "port"))],
    )


# -- HTTPRoute -------------------------------------------------------------------------------

_PATH_CHARS = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+")


def _path_match(m: dict, path: Path, ctx: Ctx) -> None:
    t, v = m["type"], m["value"]
    if t == "RegularExpression":
        return  # the dialect is implementation-specific: the API does not check it
    at = (*path, "value")
    if not v.startswith("/"):
        ctx.error(at, f'must start with "/" when type is {t}')
    for seq in ("//", "/./", "/../", "%2f", "%2F", "#"):
        if seq in v:
            ctx.error(at, f'must not contain "{seq}" when type is {t}')
    for suffix in ("/..", "/."):
        if v.endswith(suffix):
            ctx.error(at, f'must not end with "{suffix}" when type is {t}')
    if not _PATH_CHARS.fullmatch(v):
        ctx.error(at, "may only contain letters, digits, -/._~!$&'()*+,;=:@ and %XX escapes "
                      f"when type is {t}")


PATH_MATCH = Obj(
    {
        "type": opt(Str(enum=("Exact", "PathPrefix", "RegularExpression")), "PathPrefix"),
        "value": opt(Str(max_len=1024), "/"),
    },
    hooks=[_path_match],
)
MATCH_TYPE = opt(Str(enum=("Exact", "RegularExpression")), "Exact")
HEADER_MATCH = Obj({"type": MATCH_TYPE, "name": req(HEADER_NAME),
                    "value": req(Str(min_len=1, max_len=4096))})
QUERY_MATCH = Obj({"type": MATCH_TYPE, "name": req(HEADER_NAME),
                   "value": req(Str(min_len=1, max_len=1024))})
HEADER_MATCHES = ListOf(HEADER_MATCH, max_items=16, unique=lambda h: h["name"].lower(),
                        unique_msg="header already matched in this match", unique_at="name")
HTTP_MATCH = Obj({
    "path": opt(PATH_MATCH, {"type": "PathPrefix", "value": "/"}),
    "headers": HEADER_MATCHES,
    "queryParams": ListOf(QUERY_MATCH, max_items=16, unique=lambda q: q["name"],
                          unique_msg="query parameter already matched in this match",
                          unique_at="name"),
    "method": Str(enum=HTTP_METHODS),
})


def _timeouts(t: dict, path: Path, ctx: Ctx) -> None:
    if "request" in t and "backendRequest" in t:
        request, backend = duration_ms(t["request"]), duration_ms(t["backendRequest"])
        if request != 0 and backend > request:
            ctx.error((*path, "backendRequest"),
                      f'may not be longer than the request timeout ("{t["request"]}")')


TIMEOUTS = Obj({"request": DURATION, "backendRequest": DURATION}, hooks=[_timeouts])
RETRY = Obj({
    "codes": ListOf(Int(400, 599), unique=lambda c: c, unique_msg="duplicate status code"),
    "attempts": Int(0),
    "backoff": DURATION,
})
NO_SESSION_PERSISTENCE = "session persistence is not implemented"


def _prefix_rewrites(rule: dict) -> list[Path]:
    """Where, in a rule, a RequestRedirect or URLRewrite replaces the prefix match."""
    found: list[Path] = []
    places = [(("filters",), rule.get("filters") or [])]
    for j, b in enumerate(rule.get("backendRefs") or []):
        places.append((("backendRefs", j, "filters"), b.get("filters") or []))
    for where, filters in places:
        for k, f in enumerate(filters):
            for fld in ("requestRedirect", "urlRewrite"):
                mod = (f.get(fld) or {}).get("path") or {}
                if mod.get("type") == "ReplacePrefixMatch" and "replacePrefixMatch" in mod:
                    found.append((*where, k, fld, "path"))
    return found


def _http_rule(rule: dict, path: Path, ctx: Ctx) -> None:
    if rule.get("backendRefs"):
        for k, f in enumerate(rule.get("filters") or []):
            if f["type"] == "RequestRedirect":
                ctx.error((*path, "filters", k),
                          "a RequestRedirect filter may not be used together with backendRefs")
    matches = rule.get("matches") or []
    one_prefix = len(matches) == 1 and matches[0]["path"]["type"] == "PathPrefix"
    if not one_prefix:
        for where in _prefix_rewrites(rule):
            ctx.error((*path, *where), "ReplacePrefixMatch needs exactly one match, with a "
                      f"PathPrefix path (the rule has {len(matches)} matches)")


DEFAULT_HTTP_MATCHES = [{"path": {"type": "PathPrefix", "value": "/"}}]
HTTP_RULE = Obj(
    {
        "name": SECTION_NAME,
        "matches": opt(ListOf(HTTP_MATCH, max_items=64), DEFAULT_HTTP_MATCHES),
        "filters": _Filters(HTTP_FILTER, max_items=16),
        "backendRefs": ListOf(backend_ref(HTTP_FILTER), max_items=16),
        "timeouts": TIMEOUTS,
        "retry": RETRY,
        "sessionPersistence": Unsupported(NO_SESSION_PERSISTENCE),
    },
    hooks=[Hook(_http_rule, needs=("matches", "filters", "backendRefs"))],
)


def _total_matches(spec: dict, path: Path, ctx: Ctx) -> None:
    total = sum(len(r.get("matches") or []) for r in spec.get("rules") or [])
    if total > 128:
        ctx.error((*path, "rules"), f"may have at most 128 matches across all rules (has {total})")


RULE_NAMES = {"unique": lambda r: r.get("name"), "unique_msg": "duplicate rule name",
              "unique_at": "name"}
PARENT_REFS = ListOf(PARENT_REF, max_items=32)
HOSTNAMES = ListOf(HOSTNAME, max_items=16)

HTTPROUTE_SPEC = Obj(
    {
        "parentRefs": PARENT_REFS,
        "hostnames": HOSTNAMES,
        "rules": opt(ListOf(HTTP_RULE, min_items=1, max_items=16, **RULE_NAMES),
                     [{"matches": DEFAULT_HTTP_MATCHES}]),
    },
    hooks=[Hook(_total_matches, needs=("rules",)),
           Hook(_distinct_parents, needs=("parentRefs",))],
)

# -- GRPCRoute -------------------------------------------------------------------------------

_GRPC_SERVICE = re.compile(r"\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*", re.IGNORECASE)
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def _grpc_method(m: dict, path: Path, ctx: Ctx) -> None:
    if not m.get("service") and not m.get("method"):
        ctx.error(path, "one or both of service and method must be set")
    if m["type"] != "Exact":
        return
    if m.get("service") and not _GRPC_SERVICE.fullmatch(m["service"]):
        ctx.error((*path, "service"), "must be a gRPC service name such as "
                  '"grpc.health.v1.Health" (letters, digits, "_" and ".")')
    if m.get("method") and not _GRPC_METHOD.fullmatch(m["method"]):
        ctx.error((*path, "method"), 'must be a gRPC method name such as "Check" '
                  '(letters, digits and "_")')


GRPC_METHOD_MATCH = Obj(
    {
        "type": opt(Str(enum=("Exact", "RegularExpression")), "Exact"),
        "service": Str(max_len=1024),
        "method": Str(max_len=1024),
    },
    hooks=[_grpc_method],
)
GRPC_MATCH = Obj({"method": GRPC_METHOD_MATCH, "headers": HEADER_MATCHES})
GRPC_RULE = Obj({
    "name": SECTION_NAME,
    "matches": ListOf(GRPC_MATCH, max_items=8),
    "filters": _Filters(GRPC_FILTER, max_items=16),
    "backendRefs": ListOf(backend_ref(GRPC_FILTER), max_items=16),
    "sessionPersistence": Unsupported(NO_SESSION_PERSISTENCE),
})
GRPCROUTE_SPEC = Obj(
    {
        "parentRefs": PARENT_REFS,
        "hostnames": HOSTNAMES,
        "rules": ListOf(GRPC_RULE, max_items=16, **RULE_NAMES),
    },
    hooks=[Hook(_total_matches, needs=("rules",)),
           Hook(_distinct_parents, needs=("parentRefs",))],
)
