"""Which route applies where: parentRefs → Service ports, backendRefs → Services, and statuses.

This is the part of the translation that does not depend on the node: the same routes and
services give the same attachments and the same route statuses on every node. The node-specific
part (which clients are local, the Envoy resources) is in `translate`.

Semantics (GEP-1426 and the Gateway API spec; decisions in docs/routes.md):

- A parentRef is a Service (``namespace`` defaults to the route's). With ``port`` (and/or
  ``sectionName``, which names a Service port) the route attaches to that port only; without,
  to every TCP port of the Service that may carry HTTP — ports whose ``appProtocol`` (or, when
  unset, whose name by the ``<protocol>[-suffix]`` convention) says TLS, raw TCP or another
  non-HTTP protocol are skipped, since sending them through an HTTP proxy would break them.
- A route in the Service's namespace is a *producer* route (all clients); in another namespace a
  *consumer* route (clients in the route's namespace only, replacing the producer routes for
  them).
- Within one group (producers, or one consumer namespace), if GRPCRoutes and HTTPRoutes attach
  to the same port, the GRPCRoutes win and the HTTPRoutes get Accepted=False/Conflicted there.
- backendRefs may point into any namespace without a ReferenceGrant (GEP-1426: mesh routes
  only reshape traffic a client could already send; nodemesh keeps the client's identity on
  the upstream connection, so network policy still decides). `L7Input.require_reference_grants`
  turns the Gateway (north/south) rule back on; a backendRef to the route's own parent Service
  stays allowed even then (the consumer-route case of the mesh conformance tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nodemesh.route import status as st
from nodemesh.route.actions import UnsupportedFilter, header_ops
from nodemesh.route.inputs import L7Input, RouteKey, Service, ServicePort
from nodemesh.route.matching import grpc_path_match
from nodemesh.route.validate import check_regex

ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
HTTP_APP_PROTOCOLS = {"http", "http2", "h2c", "grpc", "grpc-web", "kubernetes.io/h2c",
                      "kubernetes.io/ws"}
# Port names that say "not plain HTTP" (Istio's <protocol>[-<suffix>] naming convention).
NON_HTTP_NAMES = {"https", "tls", "tcp", "udp", "sctp", "mongo", "mysql", "redis", "kafka",
                  "amqp", "postgres", "dns", "ssh", "wss"}
H2_APP_PROTOCOLS = {"kubernetes.io/h2c", "grpc", "h2c", "http2"}
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Frontend:
    """A Service port a route attaches to: what the client addressed."""

    service: Service
    port: ServicePort

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.service.namespace, self.service.name, self.port.port)


@dataclass(frozen=True)
class Backend:
    """One backendRef (or mirror target), resolved — or not, then `problem` says why."""

    index: int
    weight: int
    service: Service | None
    port: ServicePort | None
    filters: tuple[Mapping[str, Any], ...] = ()
    problem: tuple[str, str] | None = None  # (reason, message)

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class RouteInfo:
    """A route with its backends resolved and its parents looked at."""

    key: RouteKey
    obj: Mapping[str, Any]
    created: datetime
    generation: int
    rules: list[Mapping[str, Any]]
    backends: list[list[Backend]] = field(default_factory=list)  # per rule
    mirrors: list[list[tuple[Backend, Mapping[str, Any]]]] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    ref_problems: list[tuple[str, str]] = field(default_factory=list)
    parents: list[tuple[list[Frontend], str | None]] = field(default_factory=list)

    @property
    def is_grpc(self) -> bool:
        return self.key.kind == "GRPCRoute"

    @property
    def order(self) -> tuple:
        """Precedence between routes: oldest first, then namespace/name."""
        return (self.created, self.key.namespace, self.key.name, self.key.kind)


@dataclass(frozen=True)
class Attachment:
    route: RouteInfo
    frontend: Frontend
    consumer_ns: str | None  # None: a producer route
    parent_index: int


@dataclass
class Attachments:
    """The result: per Service port, the routes per client group, and every route's status."""

    by_frontend: dict[tuple[str, str, int], dict[str | None, list[Attachment]]]
    frontends: dict[tuple[str, str, int], Frontend]
    routes: dict[RouteKey, RouteInfo]
    statuses: dict[RouteKey, dict[str, Any]]


def _created(obj: Mapping[str, Any]) -> datetime:
    ts = (obj.get("metadata") or {}).get("creationTimestamp")
    if not ts:
        return _FAR_FUTURE  # not stored yet: the newest of all
    try:
        t = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    except ValueError:
        return _FAR_FUTURE
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def may_carry_http(port: ServicePort) -> bool:
    """Whether a route attached to a whole Service applies to this port."""
    if port.protocol != "TCP":
        return False
    if port.app_protocol:
        return port.app_protocol.lower() in HTTP_APP_PROTOCOLS
    return port.name.split("-", 1)[0].lower() not in NON_HTTP_NAMES


def wants_h2(port: ServicePort) -> bool:
    return (port.app_protocol or "").lower() in H2_APP_PROTOCOLS


class _Resolver:
    def __init__(self, inp: L7Input) -> None:
        self.inp = inp
        self.services = {(s.namespace, s.name): s for s in inp.services}

    # -- parents ---------------------------------------------------------------------------

    def parent(self, ref: Mapping[str, Any], route_ns: str) -> tuple[list[Frontend], str]:
        """The Service ports a parentRef attaches to, or ([], why not)."""
        group, kind = ref.get("group", ""), ref.get("kind", "Service")
        ns = ref.get("namespace") or route_ns
        where = f"Service {ns}/{ref['name']}"
        if group != "" or kind != "Service":
            return [], (f"parentRef {group or 'core'}/{kind} {ns}/{ref['name']}: the mesh mode "
                        "accepts Service parents only")
        svc = self.services.get((ns, ref["name"]))
        if svc is None:
            return [], f"{where} not found"
        if svc.cluster_ip is None:
            return [], (f"{where} is headless (no ClusterIP): it has no frontend a route can "
                        "apply to")
        ports = [p for p in svc.ports if p.protocol == "TCP"]
        if ref.get("port") is not None:
            ports = [p for p in ports if p.port == ref["port"]]
        if ref.get("sectionName"):
            ports = [p for p in ports if p.name == ref["sectionName"]]
        if ref.get("port") is None and not ref.get("sectionName"):
            ports = [p for p in ports if may_carry_http(p)]
            if not ports:
                return [], f"{where} has no port that may carry HTTP"
        if not ports:
            want = " and ".join(x for x in (
                f"port {ref['port']}" if ref.get("port") is not None else "",
                f'port name "{ref["sectionName"]}"' if ref.get("sectionName") else "") if x)
            return [], f"{where} has no TCP port with {want}"
        return [Frontend(svc, p) for p in ports], ""

    # -- backends --------------------------------------------------------------------------

    def backend(self, ref: Mapping[str, Any], index: int, route: RouteInfo,
                parent_services: set[tuple[str, str]]) -> Backend:
        weight = ref.get("weight", 1)
        filters = tuple(ref.get("filters") or ())
        group, kind = ref.get("group", ""), ref.get("kind", "Service")
        ns = ref.get("namespace") or route.key.namespace
        name = ref["name"]
        if group != "" or kind != "Service":
            return Backend(index, weight, None, None, filters, (
                st.R_INVALID_KIND, f"backendRef {group or 'core'}/{kind} {ns}/{name}: only "
                "Services are supported"))
        if (ns != route.key.namespace and self.inp.require_reference_grants
                and (ns, name) not in parent_services
                and not self._granted(route.key, ns, name)):
            return Backend(index, weight, None, None, filters, (
                st.R_REF_NOT_PERMITTED, f"backendRef Service {ns}/{name}: no ReferenceGrant in "
                f"namespace {ns} allows {route.key.kind}s from {route.key.namespace}"))
        svc = self.services.get((ns, name))
        if svc is None:
            return Backend(index, weight, None, None, filters, (
                st.R_BACKEND_NOT_FOUND, f"backendRef Service {ns}/{name} not found"))
        port = svc.port_by_number(ref.get("port", 0))
        if port is None:
            return Backend(index, weight, svc, None, filters, (
                st.R_BACKEND_NOT_FOUND, f"backendRef Service {ns}/{name} has no TCP port "
                f"{ref.get('port')}"))
        return Backend(index, weight, svc, port, filters)

    def _granted(self, key: RouteKey, ns: str, name: str) -> bool:
        for g in self.inp.reference_grants:
            meta, spec = g.get("metadata") or {}, g.get("spec") or {}
            if meta.get("namespace") != ns:
                continue
            froms = any(f.get("group") == "gateway.networking.k8s.io" and f.get("kind") == key.kind
                        and f.get("namespace") == key.namespace for f in spec.get("from") or [])
            tos = any((t.get("group") or "") == "" and t.get("kind") == "Service"
                      and t.get("name") in (None, "", name) for t in spec.get("to") or [])
            if froms and tos:
                return True
        return False


def _check_filters(info: RouteInfo) -> None:
    """Filters nodemesh cannot do where they are placed make the route unsupported."""
    for i, rule in enumerate(info.rules):
        for f in rule.get("filters") or []:
            try:
                if f["type"] == "RequestHeaderModifier":
                    header_ops(f["requestHeaderModifier"], request=True)
            except UnsupportedFilter as e:
                info.unsupported.append(f"rules[{i}]: {e}")
        for k, b in enumerate(rule.get("backendRefs") or []):
            for f in b.get("filters") or []:
                where = f"rules[{i}].backendRefs[{k}].filters"
                t = f["type"]
                if t in ("RequestHeaderModifier", "ResponseHeaderModifier"):
                    try:
                        header_ops(f[t[0].lower() + t[1:]], request=t.startswith("Request"))
                    except UnsupportedFilter as e:
                        info.unsupported.append(f"{where}: {e}")
                elif t == "URLRewrite" and not (f.get("urlRewrite") or {}).get("path"):
                    continue  # a hostname rewrite works per backend
                else:
                    info.unsupported.append(
                        f"{where}: a {t} filter on a single backendRef is not supported; put it "
                        "on the rule")


def _regex_problem(where: str, value: str) -> str | None:
    why = check_regex(value)
    if why is None:
        return None
    return f"{where}: '{value}' is not a regular expression Envoy's RE2 accepts: {why}"


def _check_regexes(info: RouteInfo) -> None:
    """Regular expressions Envoy's RE2 refuses make the route unsupported.

    Sent to Envoy, one bad regex gets the whole route configuration NACKed, so the node keeps its
    last accepted configuration for every route on it. The model does not check them (the
    Gateway API leaves the dialect to the implementation); here they are checked as Envoy will
    compile them, with the same words as its NACK.
    """
    for i, rule in enumerate(info.rules):
        for j, m in enumerate(rule.get("matches") or []):
            at = f"rules[{i}].matches[{j}]"
            problems: list[str | None] = []
            if not info.is_grpc:
                path = m.get("path") or {}
                if path.get("type") == "RegularExpression":
                    problems.append(_regex_problem(f"{at}.path.value", path.get("value", "/")))
                for k, q in enumerate(m.get("queryParams") or []):
                    if q.get("type", "Exact") == "RegularExpression":
                        problems.append(_regex_problem(f"{at}.queryParams[{k}].value", q["value"]))
            else:
                # Service and method are joined into one regex on :path: check what Envoy gets,
                # since two parts that are each fine may not be together (program size), and a
                # method without a service becomes a regex even when its type is Exact.
                method = m.get("method")
                rx = grpc_path_match(method).get("safe_regex", {}).get("regex")
                if rx is not None and (why := check_regex(rx)):
                    made = ("service and method make" if (method or {}).get("type") == "RegularExpression"
                            else "a method without a service makes")
                    problems.append(f"{at}.method: {made} the regular expression '{rx}', which "
                                    f"Envoy's RE2 does not accept: {why}")
            for k, h in enumerate(m.get("headers") or []):
                if h.get("type", "Exact") == "RegularExpression":
                    problems.append(_regex_problem(f"{at}.headers[{k}].value", h["value"]))
            info.unsupported.extend(p for p in problems if p)


def resolve(inp: L7Input) -> Attachments:
    """Attach every route and compute every route's status (node-independent)."""
    r = _Resolver(inp)
    routes: dict[RouteKey, RouteInfo] = {}
    for obj in inp.routes:
        if obj.get("kind") not in ROUTE_KINDS:
            continue
        key = RouteKey.of(obj)
        spec = obj.get("spec") or {}
        rules = list(spec.get("rules") or [])
        if key.kind == "HTTPRoute" and "rules" not in spec:
            rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]
        routes[key] = RouteInfo(key=key, obj=obj, created=_created(obj),
                                generation=int((obj.get("metadata") or {}).get("generation") or 0),
                                rules=rules)

    by_frontend: dict[tuple[str, str, int], dict[str | None, list[Attachment]]] = {}
    frontends: dict[tuple[str, str, int], Frontend] = {}
    for key in sorted(routes):
        info = routes[key]
        refs = list((info.obj.get("spec") or {}).get("parentRefs") or [])
        parent_services = {(p.get("namespace") or key.namespace, p["name"]) for p in refs}
        for rule in info.rules:
            bes = [r.backend(b, k, info, parent_services)
                   for k, b in enumerate(rule.get("backendRefs") or [])]
            mir = []
            for f in rule.get("filters") or []:
                if f["type"] == "RequestMirror":
                    cfg = f["requestMirror"]
                    mir.append((r.backend(cfg["backendRef"], -1, info, parent_services), cfg))
            info.backends.append(bes)
            info.mirrors.append(mir)
            for b in [*bes, *(m for m, _ in mir)]:
                if b.problem:
                    info.ref_problems.append(b.problem)
        _check_filters(info)
        _check_regexes(info)
        for pi, ref in enumerate(refs):
            fronts, why = r.parent(ref, key.namespace)
            info.parents.append((fronts, why or None))
            if info.unsupported:
                continue
            parent_ns = ref.get("namespace") or key.namespace
            consumer = None if parent_ns == key.namespace else key.namespace
            for fe in fronts:
                groups = by_frontend.setdefault(fe.key, {})
                frontends[fe.key] = fe
                group = groups.setdefault(consumer, [])
                if not any(a.route.key == key for a in group):
                    group.append(Attachment(info, fe, consumer, pi))

    conflicted = _resolve_conflicts(by_frontend)
    statuses = {key: _status(info, conflicted) for key, info in routes.items()}
    for groups in by_frontend.values():
        for group in groups.values():
            group.sort(key=lambda a: a.route.order)
    by_frontend = {k: v for k, v in by_frontend.items() if any(v.values())}
    return Attachments(by_frontend, frontends, routes, statuses)


def _resolve_conflicts(
    by_frontend: dict[tuple[str, str, int], dict[str | None, list[Attachment]]],
) -> set[tuple[RouteKey, tuple[str, str, int]]]:
    """GEP-1426 "Route types": on one Service port, GRPCRoutes win over HTTPRoutes."""
    lost: set[tuple[RouteKey, tuple[str, str, int]]] = set()
    for fkey, groups in by_frontend.items():
        for consumer, group in list(groups.items()):
            if any(a.route.is_grpc for a in group) and not all(a.route.is_grpc for a in group):
                for a in group:
                    if not a.route.is_grpc:
                        lost.add((a.route.key, fkey))
                groups[consumer] = [a for a in group if a.route.is_grpc]
    return lost


def _port_list(fronts: list[Frontend]) -> str:
    return ", ".join(str(f.port.port) for f in fronts)


def _status(info: RouteInfo, conflicted: set[tuple[RouteKey, tuple[str, str, int]]]) -> dict:
    refs = list((info.obj.get("spec") or {}).get("parentRefs") or [])
    if info.ref_problems:
        reason = info.ref_problems[0][0]
        resolved = (False, reason, "; ".join(m for _, m in info.ref_problems))
    else:
        resolved = (True, st.R_RESOLVED_REFS, "all backendRefs resolved")
    parents = []
    for ref, (fronts, why) in zip(refs, info.parents, strict=True):
        if info.unsupported:
            accepted = (False, st.R_UNSUPPORTED_VALUE, "; ".join(info.unsupported))
        elif why:
            accepted = (False, st.R_NO_MATCHING_PARENT, why)
        else:
            lost = [f for f in fronts if (info.key, f.key) in conflicted]
            kept = [f for f in fronts if (info.key, f.key) not in conflicted]
            svc = f"Service {fronts[0].service.ref}"
            if not kept:
                accepted = (False, st.R_CONFLICTED, f"a GRPCRoute is attached to {svc} port(s) "
                            f"{_port_list(lost)}; GRPCRoutes take precedence over HTTPRoutes")
            else:
                msg = f"applies to {svc} port(s) {_port_list(kept)}"
                if fronts[0].service.namespace != info.key.namespace:
                    msg += (f" for clients in namespace {info.key.namespace} (consumer route)")
                if lost:
                    msg += (f"; not to port(s) {_port_list(lost)}, where a GRPCRoute takes "
                            "precedence")
                accepted = (True, st.R_ACCEPTED, msg)
        parents.append(st.parent_status(ref, accepted, resolved, info.generation))
    return {"parents": parents}
