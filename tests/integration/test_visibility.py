"""L7 visibility without enforcement: an annotated namespace's HTTP goes through the node Envoy
(L7 flows appear), nothing is denied, and an unannotated service stays in the kernel."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.clusterharness import Cluster

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: seen, annotations: {nodemesh.io/l7-visibility: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: unseen}
"""


def _objects(ns: str) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": ns,
                                                          "labels": {"app": "web"}},
         "spec": {"containers": [{"name": "echo", "image": "nodemesh/echo", "args": ["--port=8080"],
                                  "ports": [{"containerPort": 8080, "name": "http"}]}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
         "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80,
                                                         "targetPort": "http"}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": ns},
         "spec": {"containers": [{"name": "c", "image": "debian", "command": ["sleep", "infinity"]}]}},
    ]


def test_annotated_namespace_gets_l7_flows_and_nothing_is_denied(cluster: Cluster) -> None:
    cluster.apply(MANIFEST)
    cluster.apply(_objects("seen") + _objects("unseen"))
    for ns in ("seen", "unseen"):
        cluster.wait_pods(namespace=ns, count=2)
    cluster.wait_synced()
    deadline = time.monotonic() + 20
    while True:
        codes = [cluster.exec("client", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              "-X", method, f"http://web/{path}", namespace=ns).out
                 for ns in ("seen", "unseen") for method, path in (("GET", "a"), ("DELETE", "b"))]
        assert codes == ["200"] * 4  # visibility never denies
        time.sleep(1.2)  # access logs are flushed every second
        flows = [json.loads(line)["flow"] for line in cluster.run(
            "observe", "--type", "l7", "-o", "json", "--last", "100").out.splitlines() if line]
        seen = {(f["source"]["namespace"], f["l7"]["http"]["method"]) for f in flows}
        if {("seen", "GET"), ("seen", "DELETE")} <= seen:
            break
        assert time.monotonic() < deadline, seen
    assert not any(ns == "unseen" for ns, _ in seen)
    assert all(f["verdict"] == "FORWARDED" for f in flows)
