"""Names of the Envoy resources the translation makes.

Names are part of the interface: the xDS server keys resources by them, Envoy stats and access
logs carry them, and the agent maps NACKs and flows back to routes and services with them.

- listener / route config of a service port: ``svc/<ns>/<name>/<port>``; a consumer
  namespace's route config: ``svc/<ns>/<name>/<port>/consumer/<client-ns>``
- listener / route config / cluster of an L7-policed pod port: ``pod/<ip>/<port>``
- cluster of a backend Service port: ``svc/<ns>/<name>/<port>`` (endpoints: its ready pods at
  the resolved targetPort, minus pods whose port has L7 policy); each of those pods gets
  ``svc/<ns>/<name>/<port>/pod/<ip>``, a cluster with just that pod that enforces its policy
- Envoy route of a route match: ``<Kind>/<ns>/<name>/rule/<i>/match/<j>`` (``route_name`` in
  access logs); the implicit pass-through route: ``implicit/svc/<ns>/<name>/<port>``
- a cluster name that never exists, for backends that do not resolve (Envoy then answers 500):
  ``invalid/<Kind>/<ns>/<name>/rule/<i>/backend/<k>``
"""

from __future__ import annotations

import re

from nodemesh.route.inputs import RouteKey


def service_port(namespace: str, name: str, port: int) -> str:
    return f"svc/{namespace}/{name}/{port}"


def consumer_routes(namespace: str, name: str, port: int, consumer_ns: str) -> str:
    return f"{service_port(namespace, name, port)}/consumer/{consumer_ns}"


def pod_port(ip: str, port: int) -> str:
    return f"pod/{ip}/{port}"


def service_pod(namespace: str, name: str, port: int, ip: str) -> str:
    return f"{service_port(namespace, name, port)}/pod/{ip}"


def envoy_route(key: RouteKey, rule: int, match: int) -> str:
    return f"{key.kind}/{key.namespace}/{key.name}/rule/{rule}/match/{match}"


def implicit_route(namespace: str, name: str, port: int) -> str:
    return f"implicit/{service_port(namespace, name, port)}"


def invalid_backend(key: RouteKey, rule: int, backend: int) -> str:
    return f"invalid/{key.kind}/{key.namespace}/{key.name}/rule/{rule}/backend/{backend}"


def stat_prefix(name: str) -> str:
    """Envoy splits stat names on '.'; keep a name readable and free of separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)
