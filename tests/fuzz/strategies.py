"""Hypothesis strategies: near-valid manifests of every user-writable kind, and garbage."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import strategies as st

SEEDS: dict[str, dict] = {
    "Namespace": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}},
    "Pod": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "1"],
                                     "ports": [{"containerPort": 80, "name": "http"}]}]}},
    "Deployment": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                   "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                            "template": {"metadata": {"labels": {"app": "web"}},
                                         "spec": {"containers": [{"name": "c", "image": "busybox",
                                                                  "command": ["sleep", "1"]}]}}}},
    "Service": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"},
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
    "ServiceAccount": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa1"}},
    "NetworkPolicy": {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                      "metadata": {"name": "np"},
                      "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                               "policyTypes": ["Ingress"],
                               "ingress": [{"from": [{"podSelector": {}}],
                                            "ports": [{"protocol": "TCP", "port": 80}]}]}},
    "CiliumNetworkPolicy": {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                            "metadata": {"name": "cnp"},
                            "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "c"}}],
                                                  "toPorts": [{"ports": [{"port": "80",
                                                                          "protocol": "TCP"}]}]}]}},
    "PeerAuthentication": {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                           "metadata": {"name": "pa"}, "spec": {"mtls": {"mode": "STRICT"}}},
    "HTTPRoute": {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                  "metadata": {"name": "hr"},
                  "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                           "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                      "backendRefs": [{"name": "web", "port": 80}]}]}},
    "GRPCRoute": {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
                  "metadata": {"name": "gr"},
                  "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                           "rules": [{"matches": [{"method": {"service": "echo.Echo"}}],
                                      "backendRefs": [{"name": "web", "port": 80}]}]}},
    "EndpointSlice": {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
                      "addressType": "IPv4",
                      "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True},
                                     "nodeName": "node1"}],
                      "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True), st.text(max_size=30),
    st.sampled_from(["", "80", "http", "TCP", "UDP", "a" * 300, "ünï\u202e", "-x", "web",
                     "/", "*", "0", "65536", "Ingress", "STRICT", "PathPrefix", "Exact", "1.2.3.4"]),
)
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, (*prefix, i)))
    return out


@st.composite
def mutated(draw: st.DrawFn, kind: str | None = None) -> dict:
    """A seed manifest with zero to three mutations: replace, delete, or add a key."""
    obj = copy.deepcopy(SEEDS[kind or draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(obj) if p]
        path = draw(st.sampled_from(paths))
        parent: Any = obj
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.text(max_size=10))] = draw(values)
        if not isinstance(obj, dict) or "kind" not in obj:
            break
    return obj


def dump(docs: list[Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True)


manifest_texts = st.one_of(
    mutated().map(lambda o: dump([o])),
    st.lists(st.one_of(mutated(), values), min_size=1, max_size=3).map(dump),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)
