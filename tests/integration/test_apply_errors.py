"""Bad manifests through the real CLI: exit code 2, a message naming resource and field, and a
store that is exactly as it was (all or nothing)."""

from __future__ import annotations

import contextlib

import pytest
import yaml

from nodemesh.store import open_store
from tests.integration.clusterharness import Cluster

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

GOOD = """
apiVersion: v1
kind: Service
metadata: {name: fine}
spec:
  selector: {app: fine}
  ports: [{port: 80}]
---
"""

CASES = {
    "bad port": ("""
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 70000}]
""", "Service default/web: spec.ports[0].port: must be 1-65535"),
    "missing selector": ("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  template:
    metadata: {labels: {app: api}}
    spec: {containers: [{name: c, image: debian, command: [sleep, "1"]}]}
""", "Deployment default/api: spec.selector"),
    "unknown kind": ("""
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {a: b}
""", "ConfigMap"),
    "unknown field": ("""
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, prot: TCP}]
""", "Service default/web: spec.ports[0].prot"),
    "duplicate name in one file": ("""
apiVersion: v1
kind: Service
metadata: {name: twin}
spec: {selector: {app: a}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: twin}
spec: {selector: {app: a}, ports: [{port: 81}]}
""", "Service default/twin"),
    "broken yaml": ("""
apiVersion: v1
kind: Service
metadata: {name: web
spec: x
""", "line"),
    "wrong apiVersion": ("""
apiVersion: apps/v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80}]}
""", "Service default/web: apiVersion"),
    "bad label syntax": ("""
apiVersion: v1
kind: Pod
metadata: {name: p, labels: {"-bad-": x}}
spec: {containers: [{name: c, image: debian, command: [sleep, "1"]}]}
""", "Pod default/p: metadata.labels"),
    "targetPort name no container declares": ("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: named}
spec:
  selector: {matchLabels: {app: named}}
  template:
    metadata: {labels: {app: named}}
    spec:
      containers: [{name: c, image: debian, command: [sleep, "1"], ports: [{containerPort: 80, name: web}]}]
---
apiVersion: v1
kind: Service
metadata: {name: named}
spec:
  selector: {app: named}
  ports: [{port: 80, targetPort: nosuch}]
""", "Service default/named: spec.ports[0].targetPort"),
    "namespace that does not exist": ("""
apiVersion: v1
kind: Service
metadata: {name: web, namespace: nowhere}
spec: {selector: {app: web}, ports: [{port: 80}]}
""", "Service nowhere/web: metadata.namespace"),
    "unknown image without command": ("""
apiVersion: v1
kind: Pod
metadata: {name: img}
spec: {containers: [{name: c, image: example.com/app:1}]}
""", "Pod default/img: spec.containers[0].image"),
    "LoadBalancer service": ("""
apiVersion: v1
kind: Service
metadata: {name: lb}
spec: {type: LoadBalancer, selector: {app: web}, ports: [{port: 80}]}
""", "Service default/lb: spec.type"),
    "route with redirect and backends": ("""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: fine}]
  rules:
  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]
    backendRefs: [{name: fine, port: 80}]
""", "HTTPRoute default/r: spec.rules[0]"),
    "policy endPort without port": ("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np}
spec:
  podSelector: {}
  ingress: [{ports: [{endPort: 90}]}]
""", "NetworkPolicy default/np: spec.ingress[0].ports[0]"),
    "cilium unknown entity": ("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cnp}
spec:
  endpointSelector: {}
  ingress: [{fromEntities: [galaxy]}]
""", "CiliumNetworkPolicy default/cnp: spec.ingress[0].fromEntities[0]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_manifest_is_refused_and_nothing_is_stored(cluster: Cluster, case: str) -> None:
    manifest, message = CASES[case]
    store = open_store(cluster.state_dir)
    before = store.revision()
    # A valid object in the same apply must not be stored either.
    r = cluster.run("apply", "-f", "-", input=GOOD + manifest, check=False)
    assert r.code == 2, (case, r.out, r.err)
    assert message in r.err, (case, r.err)
    assert r.err.startswith("error: ")
    # Nothing of the manifest was written (the cluster's own writes, such as node heartbeats,
    # may move the revision meanwhile).
    applied = {("Service", "fine")}
    with contextlib.suppress(yaml.YAMLError):  # (the case of a manifest that is not YAML)
        applied |= {(d.get("kind"), (d.get("metadata") or {}).get("name"))
                    for d in yaml.safe_load_all(manifest) if isinstance(d, dict)}
    written = [(e.object.get("kind"), e.object["metadata"].get("name"))
               for e in store.events_since(before)]
    assert not applied & set(written), (case, written)
    assert store.get("Service", "default", "fine") is None


def test_errors_of_several_objects_are_all_reported(cluster: Cluster) -> None:
    r = cluster.apply(CASES["bad port"][0] + "---" + CASES["bad label syntax"][0], check=False)
    assert r.code == 2
    assert len([line for line in r.err.splitlines() if line.startswith("error: ")]) >= 2
