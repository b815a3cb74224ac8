"""L7 policy (CiliumNetworkPolicy `rules.http`) enforced in the node Envoy, from inside pods.

Three clients on both nodes: `alpha` may use several HTTP rules, `beta` only `GET /public/...`,
`gamma` is not allowed at all (L3/L4 drop in the kernel, not a 403). Every request is made with
curl from inside a pod; denied requests must show as DROPPED L7 flows with method and path.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.clusterharness import Cluster

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

SERVER = {"apiVersion": "v1", "kind": "Pod",
          "metadata": {"name": "server", "labels": {"app": "server"}},
          "spec": {"nodeName": "node2", "containers": [{
              "name": "echo", "image": "registry.k8s.io/gateway-api/conformance/echo-basic",
              "args": ["--port=8080"], "ports": [{"containerPort": 8080, "name": "http"}]}]}}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server"},
           "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": "http"}]}}


def client(name: str, node: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "debian",
                                                       "command": ["sleep", "infinity"]}]}}


POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "server-l7"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "server"}},
        "ingress": [
            {"fromEndpoints": [{"matchLabels": {"app": "alpha"}}],
             "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}], "rules": {"http": [
                 {"method": "GET", "path": "/public/.*"},
                 {"method": "POST", "path": "/submit", "headers": ["X-Token: secret"]},
                 {"method": "PUT", "path": "/admin/.*", "host": "admin\\.example"},
                 {"method": "GET", "path": "/headers",
                  "headerMatches": [{"name": "X-Env", "value": "prod"}]},
             ]}}]},
            {"fromEndpoints": [{"matchLabels": {"app": "beta"}}],
             "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}], "rules": {"http": [
                 {"method": "GET", "path": "/public/.*"}]}}]},
        ],
    },
}

# (client, method, path, extra curl args, target, expected HTTP code; "000" = no connection)
CASES = [
    ("alpha", "GET", "/public/x", [], "pod", "200"),
    ("alpha", "GET", "/public/", [], "pod", "200"),
    ("alpha", "GET", "/publicity", [], "pod", "403"),
    ("alpha", "GET", "/private", [], "pod", "403"),
    ("alpha", "POST", "/public/x", [], "pod", "403"),
    ("alpha", "DELETE", "/public/x", [], "pod", "403"),
    ("alpha", "POST", "/submit", ["-H", "X-Token: secret"], "pod", "200"),
    ("alpha", "POST", "/submit", [], "pod", "403"),
    ("alpha", "POST", "/submit", ["-H", "X-Token: wrong"], "pod", "403"),
    ("alpha", "PUT", "/admin/users", ["-H", "Host: admin.example"], "pod", "200"),
    ("alpha", "PUT", "/admin/users", ["-H", "Host: other.example"], "pod", "403"),
    ("alpha", "GET", "/headers", ["-H", "X-Env: prod"], "pod", "200"),
    ("alpha", "GET", "/headers", ["-H", "X-Env: dev"], "pod", "403"),
    ("alpha", "GET", "/public/via-service", [], "svc", "200"),
    ("alpha", "GET", "/private", [], "svc", "403"),
    ("beta", "GET", "/public/x", [], "pod", "200"),
    ("beta", "POST", "/submit", ["-H", "X-Token: secret"], "pod", "403"),
    ("beta", "GET", "/headers", ["-H", "X-Env: prod"], "pod", "403"),
    ("beta", "GET", "/public/x", [], "svc", "200"),
    ("gamma", "GET", "/public/x", [], "pod", "000"),
]


@pytest.fixture(scope="module")
def l7(cluster: Cluster) -> Cluster:
    cluster.apply([SERVER, SERVICE, client("alpha", "node1"), client("beta", "node2"),
                   client("gamma", "node1"), POLICY])
    cluster.wait_pods(count=4)
    cluster.wait_synced()
    deadline = time.monotonic() + 20
    while True:  # the proxies have the policy when alpha's allowed request passes and a bad one fails
        if (_curl(cluster, "alpha", "GET", "/public/ready", [], "pod") == "200"
                and _curl(cluster, "alpha", "GET", "/private", [], "pod") == "403"):
            return cluster
        assert time.monotonic() < deadline, "L7 policy never took effect"
        time.sleep(0.2)


def _curl(c: Cluster, pod: str, method: str, path: str, extra: list[str], target: str) -> str:
    ip = c.get("pod", "server")["status"]["podIP"]  # type: ignore[index]
    url = f"http://{ip}:8080{path}" if target == "pod" else f"http://server{path}"
    r = c.exec(pod, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2", "-X", method,
               *extra, url, check=False)
    return r.out.strip() or "000"


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[4]}-{c[5]}" for c in CASES])
def test_l7_policy_case(l7: Cluster, case: tuple) -> None:
    pod, method, path, extra, target, expected = case
    assert _curl(l7, pod, method, path, extra, target) == expected


def test_denied_requests_are_dropped_l7_flows(l7: Cluster) -> None:
    _curl(l7, "alpha", "DELETE", "/forbidden/thing", [], "pod")
    deadline = time.monotonic() + 5
    while True:  # Envoy flushes access logs every second
        flows = [line for line in l7.run("observe", "--type", "l7", "--verdict", "DROPPED",
                                         "--from-pod", "default/alpha", "--http-method", "DELETE",
                                         "--http-path", "^/forbidden/thing$",
                                         "-o", "json", "--last", "50").out.splitlines() if line]
        if flows:
            break
        assert time.monotonic() < deadline, "no DROPPED L7 flow for the denied DELETE"
        time.sleep(0.3)
    import json

    flow = json.loads(flows[-1])["flow"]
    assert flow["verdict"] == "DROPPED"
    assert flow["drop_reason_desc"] == "POLICY_DENIED"
    assert flow["l7"]["http"]["method"] == "DELETE"
    assert flow["l7"]["http"]["url"].endswith("/forbidden/thing")
    assert flow["l7"]["http"]["code"] == 403
    assert flow["source"]["pod_name"] == "alpha"
    assert flow["ingress_denied_by"] == [{"kind": "CiliumNetworkPolicy", "namespace": "default",
                                          "name": "server-l7"}]


def test_l3_denied_client_is_a_kernel_drop(l7: Cluster) -> None:
    _curl(l7, "gamma", "GET", "/public/x", [], "pod")
    out = l7.run("observe", "--from-pod", "default/gamma", "--verdict", "DROPPED", "--type",
                 "drop", "-o", "json", "--last", "5").out
    assert '"drop_reason_desc":"POLICY_DENIED"' in out.replace(" ", "")
