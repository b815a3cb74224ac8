"""Fixtures and helpers for the route translation tests (tests/unit/test_route_*.py).

- the Gateway API mesh conformance data (manifests and one route YAML per test), which lives in
  `nodemesh/conformance/data/` (the conformance runner uses it too);
- `mesh_cluster()`: the conformance manifests as translation input — Services with ClusterIPs,
  one pod per Deployment on node ``n1`` and one on ``n2``;
- `routes_from_yaml()`: route YAML through nodemesh's model (validated and defaulted);
- `pick()` / `rewritten_path()` / `location()`: a small emulator of how Envoy uses the route
  configurations we generate (first matching route; rewrites; redirect Location). It follows
  Envoy's documented behaviour for the features we emit, which we also checked once against a
  real Envoy; the envoy-validate tests make sure Envoy accepts the configuration itself.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from nodemesh.conformance import DATA_DIR, TESTS_DIR
from nodemesh.model.manifest import load_manifests
from nodemesh.model.validate import validate_objects
from nodemesh.route import L7Input, Pod, Service, Translation
from nodemesh.route.protos import to_dict

GAMMA = DATA_DIR
GAMMA_TESTS = TESTS_DIR
NS = "gateway-conformance-mesh"
CONSUMER_NS = "gateway-conformance-mesh-consumer"


def objects(text: str, source: str = "test.yaml") -> list[dict]:
    return validate_objects(load_manifests(textwrap.dedent(text), source), source)


CREATED = "nodemesh.test/created"


def routes_from_yaml(text: str) -> list[dict]:
    """Routes as the model leaves them, plus what the store adds: the annotation
    ``nodemesh.test/created`` becomes metadata.creationTimestamp (the model drops
    server-managed metadata), and metadata.generation is 1."""
    out = []
    for o in objects(text):
        if o["kind"] not in ("HTTPRoute", "GRPCRoute"):
            continue
        meta = o["metadata"]
        created = (meta.get("annotations") or {}).get(CREATED)
        if created:
            meta["creationTimestamp"] = created
        meta.setdefault("generation", 1)
        out.append(o)
    return out


def gamma_test(name: str) -> list[dict]:
    with open(os.path.join(GAMMA_TESTS, name)) as f:
        return routes_from_yaml(f.read())


def gamma_test_names() -> list[str]:
    return sorted(os.listdir(GAMMA_TESTS))


def mesh_cluster() -> tuple[list[Service], list[Pod]]:
    """The conformance manifests: Services get ClusterIPs 10.96.0.x, every Deployment one pod
    on n1 (10.244.1.x) and one on n2 (10.244.2.x)."""
    with open(os.path.join(GAMMA, "manifests.yaml")) as f:
        objs = objects(f.read(), "manifests.yaml")
    services, pods = [], []
    n = 0
    for o in objs:
        if o["kind"] == "Service":
            n += 1
            o["spec"]["clusterIP"] = f"10.96.0.{10 + n}"
            services.append(Service.from_object(o))
    n = 0
    for o in objs:
        if o["kind"] != "Deployment":
            continue
        n += 1
        t = o["spec"]["template"]
        for node in (1, 2):
            pods.append(Pod(namespace=o["metadata"]["namespace"],
                            name=f"{o['metadata']['name']}-n{node}", ip=f"10.244.{node}.{n}",
                            node=f"n{node}", labels=t["metadata"]["labels"],
                            identity=1000 + n))
    return services, pods


def mesh_input(routes: Iterable[Mapping[str, Any]], node: str = "n1", **kw: Any) -> L7Input:
    services, pods = mesh_cluster()
    return L7Input.build(node, services, pods, routes, **kw)


def service_ip(services: Iterable[Service], namespace: str, name: str) -> str:
    return next(s.cluster_ip for s in services if (s.namespace, s.name) == (namespace, name))


# -- the emulator ----------------------------------------------------------------------------


def route_config(result: Translation, name: str) -> dict[str, Any]:
    return to_dict(result.snapshot.resources(
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration")[name])


def routes_of(result: Translation, name: str) -> list[dict[str, Any]]:
    return route_config(result, name)["virtual_hosts"][0].get("routes", [])


def _string_match(sm: Mapping[str, Any], value: str | None) -> bool:
    if value is None:
        return False
    if "exact" in sm:
        return value == sm["exact"]
    if "safe_regex" in sm:
        return re.fullmatch(sm["safe_regex"]["regex"], value) is not None
    if "prefix" in sm:
        return value.startswith(sm["prefix"])
    raise AssertionError(f"emulator: unknown string match {sm}")


def matches(match: Mapping[str, Any], method: str, path: str, headers: Mapping[str, str],
            authority: str = "echo") -> bool:
    """Does an Envoy RouteMatch (as a dict) match this request?"""
    p, _, query = path.partition("?")
    if "path" in match and p != match["path"]:
        return False
    if "prefix" in match and not p.startswith(match["prefix"]):
        return False
    if "path_separated_prefix" in match:
        pre = match["path_separated_prefix"]
        if not (p == pre or p.startswith(pre + "/")):
            return False
    if "safe_regex" in match and not re.fullmatch(match["safe_regex"]["regex"], p):
        return False
    hdrs = {k.lower(): v for k, v in headers.items()}
    hdrs.setdefault(":method", method)
    hdrs.setdefault(":authority", authority)
    hdrs.setdefault(":path", path)
    if "grpc" in match and not hdrs.get("content-type", "").startswith("application/grpc"):
        return False
    for h in match.get("headers", []):
        value = hdrs.get(h["name"])
        if h.get("present_match"):
            if value is None:
                return False
        elif not _string_match(h["string_match"], value):
            return False
    params: dict[str, str] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        params.setdefault(k, v)  # Envoy looks at the first occurrence
    return all(_string_match(q["string_match"], params.get(q["name"]))
               for q in match.get("query_parameters", []))


def pick(routes: list[dict[str, Any]], path: str, method: str = "GET",
         headers: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The first route that matches, as Envoy picks it; None means 404."""
    for r in routes:
        if matches(r["match"], method, path, headers or {}):
            return r
    return None


def clusters_of(route: Mapping[str, Any]) -> dict[str, int]:
    action = route["route"]
    if "cluster" in action:
        return {action["cluster"]: 1}
    return {c["name"]: c["weight"] for c in action["weighted_clusters"]["clusters"]}


def backend_of(route: Mapping[str, Any]) -> str:
    """The single backend Service ("name:port") a route sends to."""
    (name,) = clusters_of(route)
    _, _ns, svc, port = name.split("/")[:4]
    return f"{svc}:{port}"


def _apply_rewrite(action: Mapping[str, Any], match: Mapping[str, Any], path: str) -> str:
    p, sep, query = path.partition("?")
    if "prefix_rewrite" in action:
        prefix = match.get("path_separated_prefix") or match.get("prefix") or match.get("path")
        p = action["prefix_rewrite"] + p[len(prefix):]
    elif "regex_rewrite" in action:
        rr = action["regex_rewrite"]
        sub = re.sub(r"\\(\d)", r"\\g<\1>", rr["substitution"])
        p = re.sub(rr["pattern"]["regex"], sub, p)
    return p + sep + query


def rewritten_path(route: Mapping[str, Any], path: str) -> str:
    """The path the backend sees."""
    return _apply_rewrite(route["route"], route["match"], path)


def location(route: Mapping[str, Any], path: str, host: str = "echo") -> tuple[int, str]:
    """(status, Location) of a redirect route, as Envoy builds them: a request Host's port is
    kept unless port_redirect is set, or the scheme changes from http and the port is 80."""
    r = route["redirect"]
    codes = {"MOVED_PERMANENTLY": 301, "FOUND": 302, "SEE_OTHER": 303,
             "TEMPORARY_REDIRECT": 307, "PERMANENT_REDIRECT": 308}
    scheme = r.get("scheme_redirect", "http")
    port = f":{r['port_redirect']}" if r.get("port_redirect") else ""
    if r.get("host_redirect"):
        h = r["host_redirect"]
    else:
        name, colon, hport = host.partition(":")
        keep = colon and not port and not (scheme != "http" and hport == "80")
        h = host if keep else name
    new_path = r["path_redirect"] if r.get("path_redirect") else _apply_rewrite(r, route["match"], path)
    return codes[r.get("response_code", "MOVED_PERMANENTLY")], f"{scheme}://{h}{port}{new_path}"
