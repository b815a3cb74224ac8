"""`translate`: one node's view of routes, services, pods and L7 policy → its Envoy snapshot.

The steps:

1. `attach.resolve` — which routes apply to which Service ports for which clients, and every
   route's status (node-independent);
2. plan the listeners of this node: a Service port gets one when a producer route applies to it,
   or a consumer route whose namespace has pods on this node (other consumers' clients are
   not here); its filter chains tell the consumer namespaces (by their local pods' addresses)
   from everyone else. An L7-policed pod port gets one always: every local pod may call it;
3. allocate listener ports stably (`ports.allocate_listener_ports`);
4. build routes (ordered by precedence), clusters, endpoints and listeners, and parse them into
   typed protos.

A consumer namespace without producer routes beside it: its chain has the consumer routes,
and the default chain has one *implicit* route that sends everything to the Service itself,
as the kernel would have (the redirect is per destination, not per client).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from math import lcm
from typing import Any

from nodemesh.route import names
from nodemesh.route.actions import (
    header_ops,
    merge_header_ops,
    mirror_policy,
    redirect,
    timeouts_and_retry,
    url_rewrite,
)
from nodemesh.route.attach import Attachment, Attachments, Backend, Frontend, RouteInfo, resolve
from nodemesh.route.attach import wants_h2 as port_wants_h2
from nodemesh.route.inputs import L7Input, L7Policy, Pod, RedirectKey, RouteKey, Service
from nodemesh.route.inputs import ServicePort as SvcPort
from nodemesh.route.matching import grpc_match, grpc_precedence, http_match, http_precedence
from nodemesh.route.ports import allocate_listener_ports
from nodemesh.route.protos import (
    Cluster,
    ClusterLoadAssignment,
    Listener,
    RouteConfiguration,
    parse,
)
from nodemesh.route.rbac import rbac_rules
from nodemesh.route.resources import cluster, filter_chain, listener, load_assignment, metadata
from nodemesh.route.snapshot import EnvoyResources, Translation

MAX_SPLIT_WEIGHT_TOTAL = 1_000_000  # weighted clusters scaled for per-pod splits stay below
NO_BACKEND_STATUS = 500  # HTTPRouteRule.backendRefs: no valid backend → 500


@dataclass
class _ClusterPlan:
    name: str
    h2: bool
    meta: dict[str, Any]
    endpoints: list[tuple[str, int, str]]
    rbac: dict[str, Any] | None = None  # RBAC rules of an L7-policed pod port


@dataclass
class _Chain:
    name: str
    source_ips: list[str] | None
    route_config: str
    routes: list[dict[str, Any]]
    owners: set[RouteKey] = field(default_factory=set)


@dataclass
class _ListenerPlan:
    name: str
    key: RedirectKey
    chains: list[_Chain]
    meta: dict[str, Any]


class _Builder:
    """Builds one node's routes, clusters and listener plans; clusters are registered as
    routes use them, so the snapshot holds exactly the clusters something points at."""

    def __init__(self, inp: L7Input, att: Attachments) -> None:
        self.inp = inp
        self.att = att
        self.local = inp.local_pods
        self.local_by_ns: dict[str, list[str]] = {}
        for p in self.local:
            self.local_by_ns.setdefault(p.namespace, []).append(p.ip or "")
        self.pods_by_ip = {p.ip: p for p in inp.pods if p.ip}
        self.pods_by_ns: dict[str, list[Pod]] = {}
        for p in sorted(inp.pods, key=lambda p: (p.namespace, p.name)):
            self.pods_by_ns.setdefault(p.namespace, []).append(p)
        self.l7: dict[tuple[str, int], L7Policy] = {}
        for pol in _merge_policies(inp.l7_policies):
            if pol.protocol == "TCP":
                self.l7[(pol.pod_ip, pol.port)] = pol
        self.clusters: dict[str, _ClusterPlan] = {}
        self.owners: dict[str, set[RouteKey]] = {}

    # -- clusters ----------------------------------------------------------------------------

    def endpoints(self, svc: Service, port: SvcPort) -> list[tuple[Pod, int]]:
        """Ready pods the Service selects, at the targetPort resolved for each pod; for a
        Service without a selector, the ready endpoints of its EndpointSlices (as pods: the
        pod at that address when there is one, so that L7 policy and names follow it)."""
        out = []
        if svc.slices is not None:
            for ep in svc.slice_endpoints(port):
                pod = self.pods_by_ip.get(ep.ip)
                if pod is None:
                    ns, _, name = ep.ref.rpartition("/")
                    pod = Pod(namespace=ns or svc.namespace, name=name, ip=ep.ip, node=ep.node)
                out.append((pod, ep.port))
            return out
        for pod in self.pods_by_ns.get(svc.namespace, []):
            if not (pod.ready and pod.ip and svc.selects(pod)):
                continue
            tport = pod.resolve_port(port.target_port)
            if tport is not None:
                out.append((pod, tport))
        return out

    def service_cluster(self, svc: Service, port: SvcPort, h2: bool) -> str:
        name = names.service_port(svc.namespace, svc.name, port.port)
        plan = self.clusters.get(name)
        if plan is None:
            eps = [(p.ip or "", t, p.ref) for p, t in self.endpoints(svc, port)
                   if (p.ip, t) not in self.l7]
            plan = self.clusters[name] = _ClusterPlan(
                name, port_wants_h2(port), {"service": svc.ref, "port": port.port}, eps)
        plan.h2 = plan.h2 or h2
        return name

    def pod_cluster(self, ip: str, port: int, pod: str, h2: bool,
                    via: tuple[Service, SvcPort] | None = None) -> str:
        """The cluster of one L7-policed pod port; its upstream RBAC filter enforces the
        pod port's policy on every request sent to it. Traffic that reaches the pod as a
        backend of a Service (`via`) gets a cluster of its own, so that access logs still
        name the backend Service."""
        if via is None:
            name, meta = names.pod_port(ip, port), {"pod": pod, "port": port}
        else:
            svc, sport = via
            name = names.service_pod(svc.namespace, svc.name, sport.port, ip)
            meta = {"pod": pod, "port": port, "service": svc.ref, "servicePort": sport.port}
        plan = self.clusters.get(name)
        if plan is None:
            plan = self.clusters[name] = _ClusterPlan(
                name, False, meta, [(ip, port, pod)], rbac_rules(self.l7[(ip, port)], self.local))
        plan.h2 = plan.h2 or h2
        return name

    def expand(self, svc: Service, port: SvcPort, weight: int,
               h2: bool) -> list[tuple[str, Fraction]]:
        """Where traffic for one backend goes: the Service's cluster, except that pods whose
        target port has L7 policy get their share through their own cluster, which enforces
        that policy (Envoy picks the endpoint here, so the datapath's redirect to the pod-port
        listener never sees this traffic)."""
        cname = self.service_cluster(svc, port, h2)
        eps = self.endpoints(svc, port)
        policed = [(p, t) for p, t in eps if (p.ip, t) in self.l7]
        if not policed:
            return [(cname, Fraction(weight))]
        n = len(eps)
        out: list[tuple[str, Fraction]] = []
        if n > len(policed):
            out.append((cname, Fraction(weight * (n - len(policed)), n)))
        for pod, t in policed:
            pc = self.pod_cluster(pod.ip or "", t, pod.ref, h2 or port_wants_h2(port),
                                  via=(svc, port))
            out.append((pc, Fraction(weight, n)))
        return out

    # -- routes ------------------------------------------------------------------------------

    def _own(self, resource: str, key: RouteKey) -> None:
        self.owners.setdefault(resource, set()).add(key)

    def group_routes(self, group: Sequence[Attachment], fe: Frontend) -> list[dict[str, Any]]:
        """The Envoy routes of one client group on one Service port, in precedence order."""
        entries: list[tuple[tuple, dict[str, Any]]] = []
        for a in group:
            info = a.route
            for i, rule in enumerate(info.rules):
                matches = rule.get("matches") or [{}]
                for j, m in enumerate(matches):
                    prec = grpc_precedence(m) if info.is_grpc else http_precedence(m)
                    entries.append(((prec, info.order, i, j), self.route(info, i, j, m, fe)))
        entries.sort(key=lambda e: e[0])
        return [r for _, r in entries]

    def route(self, info: RouteInfo, i: int, j: int, m: Mapping[str, Any],
              fe: Frontend) -> dict[str, Any]:
        rule = info.rules[i]
        route_ref = f"{info.key.kind}/{info.key.namespace}/{info.key.name}"
        out: dict[str, Any] = {
            "name": names.envoy_route(info.key, i, j),
            "match": grpc_match(m) if info.is_grpc else http_match(m),
            "metadata": metadata(route=route_ref, rule=rule.get("name") or str(i)),
        }
        host: str | None = None
        redirect_cfg = rewrite_cfg = None
        for f in rule.get("filters") or []:
            t = f["type"]
            if t == "RequestHeaderModifier":
                ops, h = header_ops(f["requestHeaderModifier"], request=True)
                out = merge_header_ops(out, ops)
                host = h or host
            elif t == "ResponseHeaderModifier":
                out = merge_header_ops(out, header_ops(f["responseHeaderModifier"],
                                                       request=False)[0])
            elif t == "RequestRedirect":
                redirect_cfg = f["requestRedirect"]
            elif t == "URLRewrite":
                rewrite_cfg = f["urlRewrite"]
        if redirect_cfg is not None:
            out["redirect"] = redirect(redirect_cfg, m, fe.port.port)
            return out
        action = self.forward(info, i)
        if action is None:
            out["direct_response"] = {"status": NO_BACKEND_STATUS}
            return out
        if host:
            action["host_rewrite_literal"] = host
        if rewrite_cfg is not None:
            action.update(url_rewrite(rewrite_cfg, m))
        mirrors = []
        for b, cfg in info.mirrors[i]:
            if b.ok and b.service and b.port:
                cname = self.service_cluster(b.service, b.port, info.is_grpc)
                self._own(cname, info.key)
                mirrors.append(mirror_policy(cname, cfg))
        if mirrors:
            action["request_mirror_policies"] = mirrors
        if info.is_grpc:
            action["timeout"] = "0s"  # streams: no request timeout in a GRPCRoute
        else:
            action.update(timeouts_and_retry(rule))
        out["route"] = action
        return out

    def forward(self, info: RouteInfo, i: int) -> dict[str, Any] | None:
        """The RouteAction's cluster part for rule `i`, or None: answer 500 (no backend with
        weight, or none that resolves)."""
        targets: list[tuple[str, Fraction, dict[str, Any]]] = []
        invalid = False
        for b in info.backends[i]:
            if b.weight <= 0:
                continue  # weight 0: never
            extra = _backend_filters(b)
            if not (b.ok and b.service and b.port):
                # Its share of the traffic must get 500: a cluster name that never exists,
                # with cluster_not_found_response_code INTERNAL_SERVER_ERROR.
                invalid = True
                targets.append((names.invalid_backend(info.key, i, b.index), Fraction(b.weight),
                                {}))
                continue
            for cname, w in self.expand(b.service, b.port, b.weight, info.is_grpc):
                self._own(cname, info.key)
                targets.append((cname, w, extra))
        if not targets or all(name.startswith("invalid/") for name, _, _ in targets):
            return None
        action = _cluster_action(targets)
        if invalid:
            action["cluster_not_found_response_code"] = "INTERNAL_SERVER_ERROR"
        return action

    def implicit_route(self, fe: Frontend) -> dict[str, Any]:
        """What the kernel would have done: every request to the Service's own endpoints."""
        svc, port = fe.service, fe.port
        action = _cluster_action([(c, w, {}) for c, w in self.expand(svc, port, 1, False)])
        action["timeout"] = "0s"
        return {"name": names.implicit_route(svc.namespace, svc.name, port.port),
                "match": {"prefix": "/"}, "route": action,
                "metadata": metadata(route="implicit", rule="")}

    # -- listeners ---------------------------------------------------------------------------

    def service_listeners(self) -> list[_ListenerPlan]:
        plans = []
        for fkey in sorted(self.att.by_frontend):
            groups = self.att.by_frontend[fkey]
            fe = self.att.frontends[fkey]
            svc, port = fe.service, fe.port
            lname = names.service_port(svc.namespace, svc.name, port.port)
            chains: list[_Chain] = []
            for ns in sorted(k for k in groups if k is not None):
                ips = self.local_by_ns.get(ns)
                if not groups[ns] or not ips:
                    continue  # no client of this consumer namespace on this node
                chains.append(_Chain(
                    f"consumer/{ns}", sorted(ips),
                    names.consumer_routes(svc.namespace, svc.name, port.port, ns),
                    self.group_routes(groups[ns], fe), {a.route.key for a in groups[ns]}))
            producers = groups.get(None) or []
            if not producers and not chains:
                continue
            default_routes = (self.group_routes(producers, fe) if producers
                              else [self.implicit_route(fe)])
            chains.append(_Chain("default", None, lname, default_routes,
                                 {a.route.key for a in producers}))
            assert svc.cluster_ip is not None  # attach refuses headless parents
            plans.append(_ListenerPlan(lname, RedirectKey(svc.cluster_ip, port.port, "TCP"),
                                       chains, {"service": svc.ref, "port": port.port}))
        return plans

    def pod_listeners(self) -> list[_ListenerPlan]:
        plans = []
        pods_by_ip = {p.ip: p for p in self.inp.pods if p.ip}
        for (ip, port), pol in sorted(self.l7.items()):
            pod = pol.pod or (pods_by_ip[ip].ref if ip in pods_by_ip else "")
            name = names.pod_port(ip, port)
            cname = self.pod_cluster(ip, port, pod, False)
            route = {"name": name, "match": {"prefix": "/"},
                     "route": {"cluster": cname, "timeout": "0s"},
                     "metadata": metadata(route="l7-policy", rule="")}
            plans.append(_ListenerPlan(name, pol.key, [_Chain("default", None, name, [route])],
                                       {"pod": pod, "port": port}))
        return plans


def _backend_filters(b: Backend) -> dict[str, Any]:
    """Weighted-cluster fields for the filters of one backendRef (header modifiers and a
    hostname rewrite; attach refuses the others)."""
    out: dict[str, Any] = {}
    for f in b.filters:
        t = f["type"]
        if t == "RequestHeaderModifier":
            ops, host = header_ops(f["requestHeaderModifier"], request=True)
            out = merge_header_ops(out, ops)
            if host:
                out["host_rewrite_literal"] = host
        elif t == "ResponseHeaderModifier":
            out = merge_header_ops(out, header_ops(f["responseHeaderModifier"], request=False)[0])
        elif t == "URLRewrite" and (f.get("urlRewrite") or {}).get("hostname"):
            out["host_rewrite_literal"] = f["urlRewrite"]["hostname"]
    return out


def _cluster_action(targets: list[tuple[str, Fraction, dict[str, Any]]]) -> dict[str, Any]:
    """``cluster`` for one plain target, else ``weighted_clusters`` (the per-backend fields —
    header changes of backendRef filters — live on the weighted cluster)."""
    if len(targets) == 1 and not targets[0][2]:
        return {"cluster": targets[0][0]}
    weights = _integer_weights([w for _, w, _ in targets])
    return {"weighted_clusters": {"clusters": [
        {"name": name, "weight": w, **extra}
        for (name, _, extra), w in zip(targets, weights, strict=True)]}}


def _integer_weights(weights: list[Fraction]) -> list[int]:
    """Envoy wants integer weights: exact when the fractions allow it within bounds, else
    scaled to `MAX_SPLIT_WEIGHT_TOTAL` (every non-zero share keeps at least 1)."""
    den = lcm(*(w.denominator for w in weights))
    exact = [int(w * den) for w in weights]
    if sum(exact) <= MAX_SPLIT_WEIGHT_TOTAL * 10:
        return exact
    total = sum(weights)
    return [max(1, round(w / total * MAX_SPLIT_WEIGHT_TOTAL)) for w in weights]


def _merge_policies(policies: Sequence[L7Policy]) -> list[L7Policy]:
    """One policy per pod port: rules of duplicates are ORed."""
    merged: dict[RedirectKey, L7Policy] = {}
    for p in policies:
        prev = merged.get(p.key)
        if prev is None:
            merged[p.key] = p
        else:
            merged[p.key] = L7Policy(p.pod_ip, p.port, prev.rules + p.rules, p.protocol,
                                     prev.pod or p.pod)
    return [merged[k] for k in sorted(merged)]


def translate(inp: L7Input,
              previous_ports: Mapping[RedirectKey, int] | None = None) -> Translation:
    """The Envoy snapshot, BPF redirects and route statuses of one node."""
    att = resolve(inp)
    b = _Builder(inp, att)
    svc_plans = b.service_listeners()
    pod_plans = b.pod_listeners()
    plans = svc_plans + pod_plans
    ports = allocate_listener_ports([p.key for p in plans], previous_ports)

    listeners: list[Listener] = []
    routes: list[RouteConfiguration] = []
    mtls = inp.mtls
    for plan in plans:
        chains = [filter_chain(c.name, plan.name, c.route_config, c.source_ips, mtls is not None)
                  for c in plan.chains]
        listeners.append(parse(listener(plan.name, ports[plan.key], plan.key, chains,
                                        plan.meta), Listener))
        for c in plan.chains:
            routes.append(parse({
                "name": c.route_config,
                "virtual_hosts": [{"name": c.route_config, "domains": ["*"],
                                   "routes": c.routes}],
                # Unresolvable backends point at clusters that do not exist, on purpose.
                "validate_clusters": False,
            }, RouteConfiguration))
            for k in c.owners:
                b._own(c.route_config, k)
                b._own(plan.name, k)
    clusters, endpoints = [], []
    for c in (b.clusters[n] for n in sorted(b.clusters)):
        tunnel: dict[tuple[str, int], str] = {}
        if mtls is not None:
            for ip, port, _ in c.endpoints:
                ident = mtls.server_identity(ip, port)
                if ident:
                    tunnel[(ip, port)] = ident
        sockets = (mtls.clients, sorted(set(tunnel.values()))) if mtls is not None else None
        clusters.append(parse(cluster(c.name, c.h2, c.meta, c.rbac, sockets), Cluster))
        endpoints.append(parse(load_assignment(c.name, c.endpoints, tunnel), ClusterLoadAssignment))
    snapshot = EnvoyResources(
        listeners=tuple(sorted(listeners, key=lambda m: m.name)),
        routes=tuple(sorted(routes, key=lambda m: m.name)),
        clusters=tuple(clusters),
        endpoints=tuple(endpoints),
    )
    svc_keys = {p.key for p in svc_plans}
    return Translation(
        snapshot=snapshot,
        service_redirects={k: v for k, v in ports.items() if k in svc_keys},
        pod_redirects={k: v for k, v in ports.items() if k not in svc_keys},
        ports=ports,
        route_statuses=dict(sorted(att.statuses.items())),
        owners={name: tuple(sorted(keys)) for name, keys in sorted(b.owners.items())},
    )

