"""The Gateway API mesh conformance tests as data.

One :class:`ConformanceTest` per upstream test (``conformance/tests/mesh/*.go``, read upstream
and rewritten here): its short name, features and manifests as upstream declares them, and its
checks — :class:`Expect` (upstream ``http.ExpectedResponse``: a request, the response and what the
backend must have seen) and :class:`Distribution` (a weighted split within upstream's tolerance).
:mod:`nodemesh.conformance.expect` interprets them; nothing here does I/O.

Requests are sent by the client of the echo image (``nodemesh.echo.client``) from inside a pod,
as upstream's ``echo.MeshPod`` does: ``client`` names which pod (:data:`CLIENTS`). A request's
``host`` may contain ``{v2_ip}`` (the IP of the ``echo-v2`` client pod), filled in at run time.

Where this file deviates from upstream it says so in the test's ``notes``; every deviation is
listed in ``docs/conformance/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "CLIENTS", "CONSUMER_NS", "MESH_NS", "SUPPORTED_FEATURES", "TESTS", "ConformanceTest",
    "Distribution", "Expect", "ExpectedRequest", "Redirect", "Request", "TimeoutConfig",
    "by_name",
]

MESH_NS = "gateway-conformance-mesh"
CONSUMER_NS = "gateway-conformance-mesh-consumer"

# Client pods, as upstream's echo.ConnectToApp / ConnectToAppInNamespace pick them: the first
# pod with these labels in that namespace.
CLIENTS: dict[str, tuple[str, str]] = {
    "v1": (MESH_NS, "app=echo,version=v1"),
    "v2": (MESH_NS, "app=echo,version=v2"),
    "consumer": (CONSUMER_NS, "app=echo,version=v1"),
}


@dataclass(frozen=True)
class TimeoutConfig:
    """Upstream's conformance/utils/config defaults that matter here."""

    required_consecutive_successes: int = 3
    max_time_to_consistency: float = 30.0  # seconds; upstream's maximum for a conformant run
    retry_delay: float = 1.0  # AwaitConvergence waits this long after a failed attempt
    request_timeout: float = 10.0
    route_must_have_condition: float = 60.0
    namespaces_must_be_ready: float = 300.0


@dataclass
class Request:
    """What the client sends (upstream ``http.Request``)."""

    path: str = ""  # "" is the URL without a path: the client sends "/"
    host: str = ""  # "" → "echo", like upstream's mesh makeRequest
    method: str = ""  # "" → GET for HTTP; gRPC has none
    headers: dict[str, str] = field(default_factory=dict)
    protocol: str = "http"  # "http" or "grpc" (the echo client's grpc:// URL)


@dataclass
class ExpectedRequest:
    """What the backend must have seen (upstream ``http.ExpectedRequest``)."""

    path: str | None = None  # checked when set (nodemesh: upstream's mesh compare skips it)
    headers: dict[str, str] = field(default_factory=dict)  # values of one header joined by ","
    absent_headers: list[str] = field(default_factory=list)


@dataclass
class Redirect:
    """The expected ``Location`` of a redirect (upstream ``roundtripper.RedirectRequest``).

    Empty fields take upstream's defaults: any host, the request's scheme and path, and for the
    port "absent or the scheme's well-known port"."""

    scheme: str = ""
    host: str = ""
    port: str = ""
    path: str = ""


@dataclass
class Expect:
    """One request and the answer it must (eventually, consistently) get."""

    request: Request
    status: tuple[int, ...] = (200,)
    backend: str = ""  # prefix of the answering pod's name ("" = any)
    namespace: str = ""  # namespace of the answering pod (checked when set, on 2xx answers)
    expected_request: ExpectedRequest | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    absent_response_headers: list[str] = field(default_factory=list)
    redirect: Redirect | None = None
    name: str = ""
    client: str = "v1"

    def title(self, i: int) -> str:
        """Upstream's GetTestCaseName."""
        if self.name:
            return self.name
        r = self.request
        what = f"{i} request to '{r.host or 'echo'}{r.path}'" + (" with headers" if r.headers else "")
        if self.backend:
            return f"{what} should go to {self.backend}"
        return f"{what} should receive a {self.status[0]}"


@dataclass
class Distribution:
    """A weighted split: ``total`` requests, each backend's share within ``tolerance``.

    Upstream (conformance/utils/weight): 500 requests, ±5 %, up to 10 attempts, after one
    eventually-consistent 200. HTTP requests get upstream's entropy (a random delay below 1 s
    and/or a random ``X-Jitter`` header); upstream sends 10 at a time, nodemesh 50 (see notes)."""

    request: Request
    weights: dict[str, float]
    total: int = 500
    tolerance: float = 0.05
    attempts: int = 10
    entropy: bool = True
    concurrency: int = 50
    name: str = "Requests should have a distribution that matches the weight"
    client: str = "v1"


Check = Expect | Distribution


@dataclass
class ConformanceTest:
    short_name: str
    description: str
    features: tuple[str, ...]
    manifests: tuple[str, ...]  # files in data/tests
    checks: tuple[Check, ...]
    provisional: bool = False
    # Conditions every parent of every route of the manifests must reach before traffic.
    conditions: dict[str, str] = field(default_factory=lambda: {"Accepted": "True"})
    notes: str = ""

    def clients(self) -> list[str]:
        return sorted({c.client for c in self.checks})


def _r(path: str = "", host: str = "", **kw: object) -> Request:
    return Request(path=path, host=host, **kw)  # type: ignore[arg-type]


def _to(path: str, backend: str, headers: dict[str, str] | None = None) -> Expect:
    return Expect(_r(path, headers=headers or {}), backend=backend, namespace=MESH_NS)


def _status(path: str, status: int) -> Expect:
    return Expect(_r(path), status=(status,))


def _redirect(req_path: str, status: int, **loc: str) -> Expect:
    return Expect(_r(req_path, "echo"), status=(status,), redirect=Redirect(**loc),
                  namespace=MESH_NS)


def _hm(path: str, sent: dict[str, str], seen: dict[str, str], absent: list[str] | None = None,
        seen_path: str | None = None) -> Expect:
    """A request-header-modifier case: headers sent, headers the backend must see."""
    return Expect(_r(path, "echo", headers=sent), backend="echo-v1", namespace=MESH_NS,
                  expected_request=ExpectedRequest(path=seen_path or path, headers=seen,
                                                   absent_headers=absent or []))


def _grpc_hm(case: str, client: str, backend: str, sent: dict[str, str], seen: dict[str, str],
             absent: list[str] | None = None, name: str = "") -> Expect:
    return Expect(Request(host="echo:7070", protocol="grpc", headers={"x-test-case": case, **sent}),
                  backend=backend, namespace=MESH_NS, client=client, name=name,
                  expected_request=ExpectedRequest(headers={"x-test-case": case, **seen},
                                                   absent_headers=absent or []))


_HEADER_MODIFIER_CASES: tuple[Expect, ...] = (
    _hm("/set", {"Some-Other-Header": "val"},
        {"Some-Other-Header": "val", "X-Header-Set": "set-overwrites-values"}),
    _hm("/set", {"Some-Other-Header": "val", "X-Header-Set": "some-other-value"},
        {"Some-Other-Header": "val", "X-Header-Set": "set-overwrites-values"}),
    _hm("/add", {"Some-Other-Header": "val"},
        {"Some-Other-Header": "val", "X-Header-Add": "add-appends-values"}),
    _hm("/add", {"Some-Other-Header": "val", "X-Header-Add": "some-other-value"},
        {"Some-Other-Header": "val", "X-Header-Add": "some-other-value,add-appends-values"}),
    _hm("/remove", {"X-Header-Remove": "val"}, {}, ["X-Header-Remove"]),
    _hm("/multiple",
        {"X-Header-Set-2": "set-val-2", "X-Header-Add-2": "add-val-2",
         "X-Header-Remove-2": "remove-val-2", "Another-Header": "another-header-val"},
        {"X-Header-Set-1": "header-set-1", "X-Header-Set-2": "header-set-2",
         "X-Header-Add-1": "header-add-1", "X-Header-Add-2": "add-val-2,header-add-2",
         "X-Header-Add-3": "header-add-3", "Another-Header": "another-header-val"},
        ["X-Header-Remove-1", "X-Header-Remove-2"]),
    # The filter uses canonical header names, the request lower-case ones.
    _hm("/case-insensitivity",
        {"x-header-set": "original-val-set", "x-header-add": "original-val-add",
         "x-header-remove": "original-val-remove", "Another-Header": "another-header-val"},
        {"X-Header-Set": "header-set", "X-Header-Add": "original-val-add,header-add",
         "Another-Header": "another-header-val"},
        ["x-header-remove", "X-Header-Remove"]),
)

_REWRITE_HEADERS_SENT = {"X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1",
                         "X-Header-Set": "set-val"}
_REWRITE_HEADERS_SEEN = {"X-Header-Add": "header-val-1",
                         "X-Header-Add-Append": "append-val-1,header-val-2",
                         "X-Header-Set": "set-overwrites-values"}

_MESH = ("Mesh",)
_HTTP = ("Mesh", "HTTPRoute")
_GRPC = ("Mesh", "GRPCRoute")

TESTS: tuple[ConformanceTest, ...] = (
    ConformanceTest(
        "MeshBasic",
        "A mesh client can communicate with a mesh server. This tests basic reachability with "
        "no configuration applied.",
        _MESH, (),
        (Expect(_r(host="echo", method="GET")),),
        notes="Upstream runs it without manifests; so does nodemesh (no route at all: the "
              "kernel's socket load balancing).",
    ),
    ConformanceTest(
        "MeshHTTPRouteSimpleSameNamespace",
        "A single HTTPRoute in the gateway-conformance-mesh namespace attaches to a Service in "
        "the same namespace",
        _HTTP, ("httproute-simple-same-namespace.yaml",),
        (Expect(_r("/", "echo"), backend="echo-v1", namespace=MESH_NS,
                name="Simple HTTP request should reach infra-backend"),),
    ),
    ConformanceTest(
        "MeshHTTPRouteMatching",
        "A single HTTPRoute with path and header matching for different backends",
        _HTTP, ("httproute-matching.yaml",),
        (
            _to("/", "echo-v1"),
            _to("/example", "echo-v1"),
            _to("/", "echo-v1", {"Version": "one"}),
            _to("/v2", "echo-v2"),
            _to("/v2/example", "echo-v2"),
            _to("/", "echo-v2", {"Version": "two"}),
            _to("/v2/", "echo-v2"),
            _to("/v2example", "echo-v1"),  # not a path-segment prefix of /v2
            _to("/foo/v2/example", "echo-v1"),
        ),
    ),
    ConformanceTest(
        "MeshHTTPRouteQueryParamMatching",
        "A single HTTPRoute with query param matching for different backends",
        (*_HTTP, "MeshHTTPRouteQueryParamMatching"), ("httproute-query-param-matching.yaml",),
        (
            _to("/?animal=whale", "echo-v1"),
            _to("/?animal=dolphin", "echo-v2"),
            _to("/?animal=whale&otherparam=irrelevant", "echo-v1"),
            _to("/?animal=dolphin&color=yellow", "echo-v2"),
            _status("/?color=blue", 404),
            _status("/?animal=dog", 404),
            _status("/?animal=whaledolphin", 404),
            _status("/", 404),
            # Combinations with core match types.
            _to("/path1?animal=whale", "echo-v1"),
            _to("/?animal=whale", "echo-v2", {"version": "one"}),
            # ORed matches match when only one of them is used.
            _to("/path3?animal=shark", "echo-v1"),
            _to("/path4?animal=kraken", "echo-v1", {"version": "three"}),
            # ANDed match types do not match on a subset.
            _status("/?animal=shark", 404),
            _status("/path4?animal=kraken", 404),
            # Precedence: a path match beats a query match.
            _to("/path5?animal=hydra", "echo-v1"),
        ),
    ),
    ConformanceTest(
        "MeshHTTPRouteNamedRule",
        "An HTTPRoute with a named HTTPRouteRule",
        (*_HTTP, "MeshHTTPRouteNamedRouteRule"), ("httproute-named-rule.yaml",),
        (
            Expect(_r("/named"), backend="echo-v1", namespace=MESH_NS,
                   expected_request=ExpectedRequest(path="/named")),
            Expect(_r("/unnamed"), backend="echo-v2", namespace=MESH_NS,
                   expected_request=ExpectedRequest(path="/unnamed")),
        ),
        provisional=True,
        notes="Upstream's second case expects the path '/named' for a request to '/unnamed' (a "
              "slip its mesh compare never notices: it does not check paths). nodemesh checks "
              "paths, so it expects '/unnamed'.",
    ),
    ConformanceTest(
        "MeshHTTPRouteWeight",
        "An HTTPRoute with weighted backends",
        _HTTP, ("httproute-weight.yaml",),
        (
            Expect(_r("/", "echo"), namespace=MESH_NS,
                   name="Assert request succeeds before doing our distribution check"),
            Distribution(_r("/", "echo"), {"echo-v1": 0.7, "echo-v2": 0.3}),
        ),
        notes="Requests of the distribution check: 50 at a time instead of upstream's 10 "
              "(same count, tolerance, entropy and retries; only faster).",
    ),
    ConformanceTest(
        "MeshHTTPRouteRequestHeaderModifier",
        "An HTTPRoute has request header modifier filters applied correctly",
        _HTTP, ("httproute-request-header-modifier.yaml",),
        _HEADER_MODIFIER_CASES,
    ),
    ConformanceTest(
        "MeshHTTPRouteBackendRequestHeaderModifier",
        "An HTTPRoute backend has request header modifier filters applied correctly",
        (*_HTTP, "MeshHTTPRouteBackendRequestHeaderModification"),
        ("httproute-request-header-modifier-backend.yaml",),
        _HEADER_MODIFIER_CASES,
    ),
    ConformanceTest(
        "MeshHTTPRouteRedirectHostAndStatus",
        "An HTTPRoute with hostname and statusCode redirect filters",
        _HTTP, ("httproute-redirect-host-and-status.yaml",),
        (
            _redirect("/hostname-redirect", 302, host="example.org"),
            _redirect("/host-and-status", 301, host="example.org"),
        ),
    ),
    ConformanceTest(
        "MeshHTTPRouteRedirectPath",
        "An HTTPRoute with scheme redirect filter",
        (*_HTTP, "MeshHTTPRouteRedirectPath"), ("httproute-redirect-path.yaml",),
        (
            _redirect("/original-prefix/lemon", 302, path="/replacement-prefix/lemon"),
            _redirect("/full/path/original", 302, path="/full-path-replacement"),
            _redirect("/path-and-host", 302, host="example.org", path="/replacement-prefix"),
            _redirect("/path-and-status", 301, path="/replacement-prefix"),
            _redirect("/full-path-and-host", 302, host="example.org", path="/replacement-full"),
            _redirect("/full-path-and-status", 301, path="/replacement-full"),
        ),
    ),
    ConformanceTest(
        "MeshHTTPRouteRedirectPort",
        "An HTTPRoute with a port redirect filter",
        (*_HTTP, "MeshHTTPRouteRedirectPort"), ("httproute-redirect-port.yaml",),
        (
            _redirect("/port", 302, port="8083"),
            _redirect("/port-and-host", 302, host="example.org", port="8083"),
            _redirect("/port-and-status", 301, port="8083"),
            _redirect("/port-and-host-and-status", 302, port="8083", host="example.org"),
        ),
    ),
    ConformanceTest(
        "MeshHTTPRouteSchemeRedirect",
        "An HTTPRoute with a scheme redirect filter",
        (*_HTTP, "MeshHTTPRouteSchemeRedirect"), ("httproute-redirect-scheme.yaml",),
        (
            _redirect("/scheme", 302, scheme="https"),
            _redirect("/scheme-and-host", 302, host="example.org", scheme="https"),
            _redirect("/scheme-and-status", 301, scheme="https"),
            _redirect("/scheme-and-host-and-status", 302, scheme="https", host="example.org"),
        ),
    ),
    ConformanceTest(
        "MeshHTTPRoute303Redirect",
        "An HTTPRoute with statusCode 303 redirect filter",
        (*_HTTP, "HTTPRoute303RedirectStatusCode"), ("httproute-303-redirect.yaml",),
        (Expect(_r("/redirect"), status=(303,), redirect=Redirect(path="/redirect"),
                namespace=MESH_NS),),
        provisional=True,
    ),
    ConformanceTest(
        "MeshHTTPRoute307Redirect",
        "An HTTPRoute with statusCode 307 redirect filter",
        (*_HTTP, "HTTPRoute307RedirectStatusCode"), ("httproute-307-redirect.yaml",),
        (Expect(_r("/temporary"), status=(307,), redirect=Redirect(path="/temporary"),
                namespace=MESH_NS),),
        provisional=True,
    ),
    ConformanceTest(
        "MeshHTTPRoute308Redirect",
        "An HTTPRoute with statusCode 308 redirect filter",
        (*_HTTP, "HTTPRoute308RedirectStatusCode"), ("httproute-308-redirect.yaml",),
        (Expect(_r("/permanent"), status=(308,), redirect=Redirect(path="/permanent"),
                namespace=MESH_NS),),
        provisional=True,
    ),
    ConformanceTest(
        "MeshHTTPRouteRewritePath",
        "An HTTPRoute with path rewrite filter",
        (*_HTTP, "MeshHTTPRouteRewritePath"), ("httproute-rewrite-path.yaml",),
        (
            _hm("/prefix/one/two", {}, {}, seen_path="/one/two"),
            _hm("/strip-prefix/three", {}, {}, seen_path="/three"),
            _hm("/strip-prefix", {}, {}, seen_path="/"),
            _hm("/full/one/two", {}, {}, seen_path="/one"),
            _hm("/full/rewrite-path-and-modify-headers/test", _REWRITE_HEADERS_SENT,
                _REWRITE_HEADERS_SEEN, ["X-Header-Remove"], seen_path="/test"),
            _hm("/prefix/rewrite-path-and-modify-headers/one", _REWRITE_HEADERS_SENT,
                _REWRITE_HEADERS_SEEN, ["X-Header-Remove"], seen_path="/prefix/one"),
        ),
    ),
    ConformanceTest(
        "MeshTrafficSplit",
        "A mesh client can send traffic to a Service which is split between two versions",
        _HTTP, ("mesh-split.yaml",),
        (
            Expect(_r("/v1", "echo", method="GET"), backend="echo-v1"),
            Expect(_r("/v2", "echo", method="GET"), backend="echo-v2"),
        ),
    ),
    ConformanceTest(
        "MeshPorts",
        "A mesh route can optionally configure 'port' in parentRef",
        (*_HTTP, "HTTPRouteParentRefPort", "HTTPRouteResponseHeaderModification"),
        ("mesh-ports.yaml",),
        (
            Expect(_r(host="echo-v1", method="GET"), backend="echo-v1",
                   response_headers={"X-Header-Set": "v1"},
                   name="Explicit port set, send to that port"),
            Expect(_r(host="echo-v1:8080", method="GET"), backend="echo-v1",
                   absent_response_headers=["X-Header-Set"],
                   name="Explicit port, send to an excluded port"),
            Expect(_r(host="echo-v2", method="GET"), backend="echo-v2",
                   response_headers={"X-Header-Set": "v2"}, name="No port set"),
            Expect(_r(host="echo-v2:8080", method="GET"), backend="echo-v2",
                   response_headers={"X-Header-Set": "v2"}, name="No port set (8080)"),
        ),
    ),
    ConformanceTest(
        "MeshFrontend",
        "Mesh rules should only apply to the associated frontend",
        (*_HTTP, "HTTPRouteResponseHeaderModification"), ("mesh-frontend.yaml",),
        (
            Expect(_r(host="echo-v2", method="GET"), backend="echo-v2",
                   response_headers={"X-Header-Set": "set"}, name="Send to service"),
            Expect(_r(host="{v2_ip}:8080", method="GET"), backend="echo-v2",
                   absent_response_headers=["X-Header-Set"], name="Send to pod IP"),
        ),
    ),
    ConformanceTest(
        "MeshFrontendHostname",
        "Mesh parentRef matches Service IP (not Host)",
        (*_HTTP, "MeshClusterIPMatching", "HTTPRouteResponseHeaderModification"),
        ("mesh-frontend.yaml",),
        (
            Expect(_r(host="echo-v2", method="GET", headers={"Host": "echo-v1"}),
                   backend="echo-v2", response_headers={"X-Header-Set": "set"},
                   name="Send to service with wrong hostname"),
            Expect(_r(host="echo-v1", method="GET", headers={"Host": "echo-v2"}),
                   backend="echo-v1", absent_response_headers=["X-Header-Set"],
                   name="Send to other service with matching hostname"),
        ),
        notes="Upstream runs it on mesh-frontend.yaml, which is in the data; it has no YAML of "
              "its own.",
    ),
    ConformanceTest(
        "MeshConsumerRoute",
        "An HTTPRoute in a namespace other than its parentRef's namespace only affects requests "
        "from the route's namespace",
        (*_HTTP, "MeshConsumerRoute", "HTTPRouteResponseHeaderModification"),
        ("mesh-consumer-route.yaml",),
        (
            Expect(_r("/", "echo-v1.gateway-conformance-mesh", method="GET"), backend="echo-v1",
                   response_headers={"X-Header-Set": "set"}, client="consumer",
                   name="request from consumer route's namespace modified by HTTPRoute"),
            Expect(_r("/", "echo-v1.gateway-conformance-mesh", method="GET"), backend="echo-v1",
                   absent_response_headers=["X-Header-Set"], client="v1",
                   name="request not from consumer route's namespace not modified by HTTPRoute"),
        ),
    ),
    ConformanceTest(
        "MeshGRPCRouteWeight",
        "A GRPCRoute with weighted backends in mesh mode",
        _GRPC, ("grpcroute-weight.yaml",),
        (
            Expect(Request(host="echo:7070", protocol="grpc"), namespace=MESH_NS,
                   name="Assert request succeeds before doing our distribution check"),
            Distribution(Request(host="echo:7070", protocol="grpc"),
                         {"echo-v1": 0.7, "echo-v2": 0.3}, entropy=False),
        ),
        # echo-v3 does not exist (weight 0): the route is accepted, its refs are not resolved.
        conditions={"Accepted": "True", "ResolvedRefs": "False"},
        notes="Upstream sends the 500 requests as one batch of the echo client; nodemesh sends "
              "them 50 at a time, each a new gRPC channel.",
    ),
    ConformanceTest(
        "MeshGRPCRouteRequestHeaderModifier",
        "A GRPCRoute with RequestHeaderModifier filter should modify request headers in mesh mode",
        _GRPC, ("grpcroute-request-header-modifier.yaml",),
        (
            _grpc_hm("set", "v1", "echo-v1",
                     {"some-other-header": "this-header-should-be-set",
                      "x-header-set": "this-value-should-be-overwritten"},
                     {"some-other-header": "this-header-should-be-set",
                      "x-header-set": "set-overwrites-values"},
                     name="Set headers -- overwrites existing header"),
            _grpc_hm("add", "v1", "echo-v1",
                     {"x-header-add": "this-value-should-be-appended"},
                     {"x-header-add": "this-value-should-be-appended,add-appends-values"},
                     name="Add headers -- appends to existing header"),
            _grpc_hm("remove", "v1", "echo-v1", {"x-header-remove": "this-should-be-removed"}, {},
                     ["x-header-remove"], name="Remove headers -- removes headers"),
            _grpc_hm("multi", "v2", "echo-v2",
                     {"x-header-set-2": "set-header-2", "x-header-add-2": "add-header-2",
                      "x-header-remove-2": "should-be-removed-2"},
                     {"x-header-set-1": "header-set-1", "x-header-set-2": "header-set-2",
                      "x-header-add-1": "header-add-1", "x-header-add-2": "add-header-2,header-add-2"},
                     ["x-header-remove-1", "x-header-remove-2"],
                     name="Multiple operations -- set, add, and remove headers"),
        ),
    ),
)

# Extended features nodemesh implements (docs/routes.md), by upstream's names. The Mesh* ones are
# upstream's MeshExtendedFeatures; the HTTPRoute* ones are from HTTPRouteExtendedFeatures, which
# upstream's MESH-HTTP profile includes.
SUPPORTED_FEATURES: frozenset[str] = frozenset({
    "Mesh", "HTTPRoute", "GRPCRoute",
    "MeshClusterIPMatching", "MeshConsumerRoute", "MeshHTTPRouteRewritePath",
    "MeshHTTPRouteSchemeRedirect", "MeshHTTPRouteRedirectPort", "MeshHTTPRouteRedirectPath",
    "MeshHTTPRouteBackendRequestHeaderModification", "MeshHTTPRouteQueryParamMatching",
    "MeshHTTPRouteNamedRouteRule",
    "HTTPRouteBackendRequestHeaderModification", "HTTPRouteQueryParamMatching",
    "HTTPRouteMethodMatching", "HTTPRouteResponseHeaderModification", "HTTPRoutePortRedirect",
    "HTTPRouteSchemeRedirect", "HTTPRoutePathRedirect", "HTTPRouteHostRewrite",
    "HTTPRoutePathRewrite", "HTTPRouteRequestMirror", "HTTPRouteRequestMultipleMirrors",
    "HTTPRouteRequestPercentageMirror", "HTTPRouteRequestTimeout", "HTTPRouteBackendTimeout",
    "HTTPRouteParentRefPort", "HTTPRouteBackendProtocolH2C", "HTTPRouteBackendProtocolWebSocket",
    "HTTPRouteNamedRouteRule", "HTTPRoute303RedirectStatusCode", "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
})


def by_name(name: str) -> ConformanceTest:
    for t in TESTS:
        if t.short_name == name:
            return t
    raise KeyError(f"no conformance test {name!r} (known: {', '.join(t.short_name for t in TESTS)})")
