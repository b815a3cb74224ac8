"""EndpointSlices and node leases, end to end, on one cluster with 3-second node leases.

- A Service without a selector balances, by ClusterIP from a pod, to the ready endpoints of the
  EndpointSlice a user wrote: in the kernel (L4) and through an HTTPRoute (the node Envoy); an
  endpoint marked not ready gets nothing.
- SIGKILL a node's agent (held, so the daemon does not start it again): the node goes NotReady
  within the lease (3 s) + 2 s, and its pods leave every service's backends on the other node,
  those a selector picks and those a slice names; released, the agent returns and so do they.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from tests.integration.clusterharness import Cluster, running_cluster

pytestmark = pytest.mark.root

LEASE = 3
ECHO = "registry.k8s.io/gateway-api/conformance/echo-advanced"


def echo_pod(name: str, node: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{
                "name": "echo", "image": ECHO, "args": ["--port=8080"],
                "ports": [{"containerPort": 8080, "name": "http"}]}]}}


CLIENT = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
          "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "debian",
                                                        "command": ["sleep", "infinity"]}]}}
EXT = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"},
       "spec": {"ports": [{"name": "http", "port": 80}]}}  # no selector: its slices say
WEB = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
       "spec": {"selector": {"app": "srv"}, "ports": [{"name": "http", "port": 80,
                                                       "targetPort": "http"}]}}

# In the client pod: N new connections (HTTP GET through the ClusterIP), which pod answered and
# whether the request carried the route's header.
HITS = r"""
import json, socket, struct, sys
host, n = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(3)
    s.connect((host, 80))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    out.append([body["pod"], "X-Via-Route" in body.get("headers", {})])
print(json.dumps(out))
"""


def hits(c: Cluster, host: str, n: int = 40) -> list[tuple[str, bool]]:
    out = c.exec("client", sys.executable, "-c", HITS, host, str(n), timeout=60).out
    return [tuple(x) for x in json.loads(out)]


def pods_hit(c: Cluster, host: str, n: int = 40) -> collections.Counter:
    return collections.Counter(pod for pod, _ in hits(c, host, n))


def vip(c: Cluster, name: str) -> str:
    return c.get("svc", name)["spec"]["clusterIP"]  # type: ignore[index]


def ip_of(c: Cluster, pod: str) -> str:
    return c.get("pod", pod)["status"]["podIP"]  # type: ignore[index]


def slice_of(c: Cluster, not_ready: str) -> dict:
    def ep(pod: str, node: str, ready: bool = True) -> dict:
        return {"addresses": [ip_of(c, pod)], "conditions": {"ready": ready}, "nodeName": node,
                "targetRef": {"kind": "Pod", "namespace": "default", "name": pod}}

    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [ep("srv1", "node1"), ep("srv2", "node2"),
                          ep(not_ready, "node2", ready=False)]}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster(2, "--node-lease-seconds", str(LEASE), "--mtls", "off") as c:
        c.apply([echo_pod("srv1", "node1", "srv"), echo_pod("srv2", "node2", "srv"),
                 echo_pod("idle", "node2", "idle"), CLIENT, EXT, WEB])
        c.wait_pods(count=4)
        c.apply([slice_of(c, not_ready="idle")])
        c.wait_synced()
        yield c


def test_a_slice_round_trips_and_lists(cluster: Cluster) -> None:
    got = cluster.get("endpointslice", "ext-1")
    assert got["addressType"] == "IPv4"  # type: ignore[index]
    assert [e["conditions"]["ready"] for e in got["endpoints"]] == [True, True, False]  # type: ignore[index]
    table = cluster.run("get", "endpointslices", "-o", "wide").out
    assert "ext-1" in table and "IPv4" in table and "8080" in table and "ext" in table
    described = cluster.run("describe", "endpointslice", "ext-1").out
    assert "http 8080/TCP" in described and "false" in described and "idle" in described
    again = cluster.run("get", "endpointslice", "ext-1", "-o", "yaml").out
    cluster.run("apply", "-f", "-", input=again)  # what get -o yaml prints applies unchanged


def test_a_selectorless_service_balances_to_its_ready_slice_endpoints_in_the_kernel(
        cluster: Cluster) -> None:
    counts = pods_hit(cluster, vip(cluster, "ext"), 60)
    assert set(counts) == {"srv1", "srv2"}, counts  # never "idle": its endpoint is not ready
    assert not any(via for _, via in hits(cluster, "ext", 5))  # (no route yet: the kernel)


def test_a_route_to_a_selectorless_service_balances_to_the_same_endpoints(
        cluster: Cluster) -> None:
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "ext"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "ext", "port": 80}],
                      "rules": [{"filters": [{"type": "RequestHeaderModifier",
                                              "requestHeaderModifier": {"add": [
                                                  {"name": "X-Via-Route", "value": "1"}]}}],
                                 "backendRefs": [{"name": "ext", "port": 80}]}]}}
    cluster.apply([route])
    cluster.wait_synced()
    got = hits(cluster, vip(cluster, "ext"), 60)
    assert all(via for _, via in got), got  # every request went through the node Envoy
    assert {pod for pod, _ in got} == {"srv1", "srv2"}
    cluster.run("delete", "httproute", "ext")
    cluster.wait_synced()


def _node_status(c: Cluster, node: str) -> str:
    for line in c.run("get", "nodes").out.splitlines()[1:]:
        name, status, *_ = line.split()
        if name == node:
            return status
    raise AssertionError(f"no {node} in get nodes")


def _agent_pid(c: Cluster, node: str) -> int:
    with open(os.path.join(c.state_dir, "nodes", node, "agent.json")) as f:
        return int(json.load(f)["pid"])


def _wait(what: str, fn, timeout: float) -> float:
    t0 = time.monotonic()
    while not fn():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)
    return time.monotonic() - t0


def test_a_node_whose_agent_is_killed_goes_not_ready_and_its_pods_leave_every_service(
        cluster: Cluster, capsys) -> None:
    c = cluster
    leases = c.run("get", "leases", "-n", "kube-node-lease", "-o", "wide").out
    assert "node1" in leases and "node2" in leases and "HOLDER" in leases and "RENEWED" in leases
    assert f"{LEASE}s" in leases
    assert _node_status(c, "node2") == "Ready"
    assert set(pods_hit(c, "web")) == {"srv1", "srv2"}

    c.run("agent", "hold", "--node", "node2")
    pid = _agent_pid(c, "node2")
    try:
        os.kill(pid, signal.SIGKILL)
        took = _wait("node2 NotReady", lambda: _node_status(c, "node2") == "NotReady",
                     LEASE + 2)
        node = c.get("node", "node2")
        ready = next(x for x in node["status"]["conditions"] if x["type"] == "Ready")  # type: ignore[index]
        assert ready["status"] == "Unknown" and ready["reason"] == "LeaseExpired"
        assert "node.kubernetes.io/unreachable:NoExecute" in c.run("describe", "node", "node2").out
        # Its pods left the backends on node1 (the service a selector makes and the slice's);
        # they still run: the kernel of node2 would have answered.
        left = _wait("srv2 out of web on node1",
                     lambda: set(pods_hit(c, "web", 20)) == {"srv1"}, 3)
        assert set(pods_hit(c, "ext", 30)) == {"srv1"}
        assert "not running (held)" in c.run("status").out  # the daemon did not restart it
    finally:
        c.run("agent", "release", "--node", "node2")
    back = _wait("node2 Ready again", lambda: _node_status(c, "node2") == "Ready", 30)
    _wait("srv2 back in web", lambda: set(pods_hit(c, "web", 30)) == {"srv1", "srv2"}, 5)
    assert set(pods_hit(c, "ext", 40)) == {"srv1", "srv2"}
    with capsys.disabled():
        print(f"\nnode2 NotReady {took:.1f}s after its agent was killed (lease {LEASE}s); "
              f"its pods out of node1's backends {left:.1f}s later; Ready {back:.1f}s after "
              f"the release")
