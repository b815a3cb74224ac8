"""Gateway API filters, timeouts and retries → the parts of an Envoy route that do them.

Each function takes the filter's configuration as the model left it (defaults filled) and
returns Envoy-YAML-shaped fragments. Decisions (docs/routes.md has the full table):

- RequestHeaderModifier / ResponseHeaderModifier: ``set`` overwrites
  (``OVERWRITE_IF_EXISTS_OR_ADD``), ``add`` appends (``APPEND_IF_EXISTS_OR_ADD``), ``remove``
  removes. Envoy may not touch ``Host`` through header lists; setting or adding Host becomes
  ``host_rewrite_literal``, removing it is refused (`UnsupportedFilter`).
- PathPrefix rewrites respect path elements: the prefix is replaced by the replacement with its
  trailing '/' dropped, and an empty remainder becomes '/' (the Gateway API's table for
  ``ReplacePrefixMatch``).
- RequestRedirect: the port follows the spec's defaulting rules (see `redirect`).
- No ``timeouts.request`` means no timeout (Envoy's own default is 15 s; a transparent mesh
  must not add one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodemesh.model.routes import duration_ms
from nodemesh.route.matching import normalize_prefix, re2_escape
from nodemesh.route.protos import duration

WELL_KNOWN_PORTS = {"http": 80, "https": 443}
REDIRECT_CODES = {301: "MOVED_PERMANENTLY", 302: "FOUND", 303: "SEE_OTHER",
                  307: "TEMPORARY_REDIRECT", 308: "PERMANENT_REDIRECT"}
DEFAULT_RETRY_ATTEMPTS = 1  # GEP-1731 leaves it to the implementation: Envoy's default
# A retry stanza retries connection failures too (GEP-1731: implementations SHOULD).
RETRY_ON_CONNECTION = "connect-failure,refused-stream,reset"


class UnsupportedFilter(Exception):
    """A filter (or filter value) nodemesh cannot do where it is used; the route's Accepted
    condition becomes False/UnsupportedValue with this message."""


def header_ops(cfg: Mapping[str, Any], request: bool) -> tuple[dict[str, Any], str | None]:
    """Fields of a Route (or a weighted cluster) for a Request/ResponseHeaderModifier, and the
    Host to rewrite to (a RouteAction field) when the filter sets Host."""
    side = "request" if request else "response"
    add: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    host: str | None = None
    for action, how in (("set", "OVERWRITE_IF_EXISTS_OR_ADD"), ("add", "APPEND_IF_EXISTS_OR_ADD")):
        for h in cfg.get(action) or []:
            name = h["name"].lower()
            if request and name == "host":
                host = h["value"]
                continue
            add.append({"header": {"key": name, "value": h["value"]}, "append_action": how})
    remove = [n.lower() for n in cfg.get("remove") or []]
    if request and "host" in remove:
        raise UnsupportedFilter("RequestHeaderModifier: the Host header can not be removed")
    if add:
        out[f"{side}_headers_to_add"] = add
    if remove:
        out[f"{side}_headers_to_remove"] = remove
    return out, host


def merge_header_ops(*parts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if isinstance(v, list):
                out.setdefault(k, []).extend(v)
            else:
                out[k] = v
    return out


def _prefix_rewrite(prefix: str, replacement: str) -> dict[str, Any]:
    """Replace the matched PathPrefix element-wise (fields of RouteAction or RedirectAction)."""
    p = normalize_prefix(prefix)
    r = replacement.rstrip("/")
    sub = r.replace("\\", "\\\\")
    if p == "/":
        # Everything matched: put the replacement in front of the whole path.
        return {"regex_rewrite": {"pattern": {"regex": "^/"}, "substitution": sub + "/"}} if r \
            else {}
    if not r:
        # "/foo/bar" → "/bar", "/foo" and "/foo/" → "/" (a plain prefix_rewrite gives "//bar").
        return {"regex_rewrite": {"pattern": {"regex": "^" + re2_escape(p) + "/*"},
                                  "substitution": "/"}}
    return {"prefix_rewrite": r}


def _full_path_rewrite(path: str) -> dict[str, Any]:
    # regex_rewrite acts on the path without the query string, which is kept.
    return {"regex_rewrite": {"pattern": {"regex": "^.*$"},
                              "substitution": path.replace("\\", "\\\\")}}


def _matched_prefix(match: Mapping[str, Any] | None) -> str:
    path = (match or {}).get("path") or {}
    return path.get("value", "/")


def url_rewrite(cfg: Mapping[str, Any], match: Mapping[str, Any] | None) -> dict[str, Any]:
    """RouteAction fields for a URLRewrite filter (`match`: the rule's only match, which the
    model guarantees to be a PathPrefix when ReplacePrefixMatch is used)."""
    out: dict[str, Any] = {}
    if cfg.get("hostname"):
        out["host_rewrite_literal"] = cfg["hostname"]
    mod = cfg.get("path")
    if mod and mod["type"] == "ReplaceFullPath":
        out.update(_full_path_rewrite(mod["replaceFullPath"]))
    elif mod and mod["type"] == "ReplacePrefixMatch":
        out.update(_prefix_rewrite(_matched_prefix(match), mod["replacePrefixMatch"]))
    return out


def redirect(cfg: Mapping[str, Any], match: Mapping[str, Any] | None,
             listener_port: int) -> dict[str, Any]:
    """An Envoy RedirectAction for a RequestRedirect filter on a Service port.

    The port of the Location header (HTTPRequestRedirectFilter.port): the given port; else
    the well-known port of the given scheme; else the "listener" port — in the mesh, the
    Service port the client called. The port is left out of Location when it is the well-known
    port of the resulting scheme (the spec's SHOULD NOT), as far as Envoy allows: Envoy keeps
    the port of the request's Host when it has no port_redirect, so the port can be left out
    only when the hostname is replaced or the client called port 80 (whose Host has no port).
    Otherwise port_redirect is set and Envoy writes it, e.g. ``https://echo:443/``.
    """
    out: dict[str, Any] = {"response_code": REDIRECT_CODES[cfg.get("statusCode", 302)]}
    scheme = cfg.get("scheme")
    if scheme:
        out["scheme_redirect"] = scheme
    if cfg.get("hostname"):
        out["host_redirect"] = cfg["hostname"]
    target_scheme = scheme or "http"  # the mesh listener speaks plain HTTP
    if cfg.get("port"):
        target_port = cfg["port"]
    elif scheme:
        target_port = WELL_KNOWN_PORTS.get(scheme, listener_port)
    else:
        target_port = listener_port
    default_port = WELL_KNOWN_PORTS.get(target_scheme) == target_port
    if not (default_port and (cfg.get("hostname") or listener_port == 80)):
        out["port_redirect"] = target_port
    mod = cfg.get("path")
    if mod and mod["type"] == "ReplaceFullPath":
        out["path_redirect"] = mod["replaceFullPath"]
    elif mod and mod["type"] == "ReplacePrefixMatch":
        out.update(_prefix_rewrite(_matched_prefix(match), mod["replacePrefixMatch"]))
    return out


def mirror_policy(cluster: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A RequestMirrorPolicy; mirrored requests keep their Host (no "-shadow" suffix), as a
    transparent mesh should."""
    out: dict[str, Any] = {"cluster": cluster, "disable_shadow_host_suffix_append": True}
    if "percent" in cfg and cfg["percent"] < 100:
        out["runtime_fraction"] = {"default_value": {"numerator": cfg["percent"],
                                                     "denominator": "HUNDRED"}}
    elif "fraction" in cfg:
        f = cfg["fraction"]
        den = f.get("denominator", 100)
        if f["numerator"] < den:
            out["runtime_fraction"] = {"default_value": {
                "numerator": f["numerator"] * 1_000_000 // den, "denominator": "MILLION"}}
    return out


def timeouts_and_retry(rule: Mapping[str, Any]) -> dict[str, Any]:
    """RouteAction fields for ``timeouts`` and the (experimental) ``retry`` of an HTTPRoute
    rule. ``0s`` disables a timeout in both APIs."""
    timeouts = rule.get("timeouts") or {}
    out: dict[str, Any] = {"timeout": duration(duration_ms(timeouts["request"]))
                           if "request" in timeouts else "0s"}
    policy: dict[str, Any] = {}
    retry = rule.get("retry")
    if retry is not None:
        attempts = retry.get("attempts", DEFAULT_RETRY_ATTEMPTS)
        codes = sorted(retry.get("codes") or [])
        if attempts > 0:
            policy["retry_on"] = RETRY_ON_CONNECTION + (",retriable-status-codes" if codes else "")
            if codes:
                policy["retriable_status_codes"] = codes
            if retry.get("backoff") and duration_ms(retry["backoff"]) > 0:
                base = duration_ms(retry["backoff"])
                policy["retry_back_off"] = {"base_interval": duration(base),
                                            "max_interval": duration(base * 10)}
        policy["num_retries"] = attempts
    backend = timeouts.get("backendRequest")
    if backend and duration_ms(backend) > 0:
        # Envoy's per-try timeout covers the first attempt too, even without retries.
        policy["per_try_timeout"] = duration(duration_ms(backend))
        policy.setdefault("num_retries", 0)
    if policy:
        out["retry_policy"] = policy
    return out
