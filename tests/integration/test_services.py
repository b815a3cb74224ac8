"""Services through the kernel's socket load balancer, end to end, from inside pods."""

from __future__ import annotations

import collections
import json
import sys
import time

import pytest

from tests.integration.clusterharness import Cluster

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

ECHO = "registry.k8s.io/gateway-api/conformance/echo-advanced"


def deployment(name: str, replicas: int, labels: dict[str, str], port_name: str = "http",
               port: int = 8080) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                     "name": "echo", "image": ECHO,
                     "args": [f"--port={port}", "--udp=9000", "--tcp=9090"],
                     "ports": [{"containerPort": port, "name": port_name},
                               {"containerPort": 9000, "protocol": "UDP", "name": "udp"},
                               {"containerPort": 9090, "name": "tcp"}]}]}}}}


def service(name: str, selector: dict[str, str], **spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, **spec.pop("meta", {})},
            "spec": {"selector": selector, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "udp", "port": 9000, "protocol": "UDP", "targetPort": "udp"},
                {"name": "tcp", "port": 9090, "targetPort": "tcp"}], **spec}}


CLIENT = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
          "spec": {"containers": [{"name": "c", "image": "debian", "command": ["sleep", "infinity"]}]}}

# Runs in the client pod: N new TCP connections (HTTP GET) to a target, counting which pod
# answered; optional source ports to bind (per-flow identity for Maglev).
HITS = r"""
import collections, json, socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sports = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
out = []
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # no TIME_WAIT
    if sports:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sports[i]))
    s.settimeout(3)
    s.connect((host, port))
    peer = s.getpeername()
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    out.append([json.loads(data.split(b"\r\n\r\n", 1)[1])["pod"], list(peer)])
print(json.dumps(out))
"""


def hits(c: Cluster, host: str, n: int, port: int = 80, sports: list[int] | None = None
         ) -> list[tuple[str, list]]:
    args = [sys.executable, "-c", HITS, host, str(port), str(n)] + ([json.dumps(sports)] if sports else [])
    return [tuple(x) for x in json.loads(c.exec("client", *args, timeout=120).out)]


@pytest.fixture(scope="module")
def svc(cluster: Cluster) -> Cluster:
    cluster.apply([deployment("web", 3, {"app": "web"}), service("web", {"app": "web"}), CLIENT])
    cluster.wait_pods(count=4)
    cluster.wait_synced()
    return cluster


def vip(c: Cluster, name: str) -> str:
    return c.get("svc", name)["spec"]["clusterIP"]  # type: ignore[index]


def test_tcp_by_cluster_ip_and_dns_name_peer_is_the_vip(svc: Cluster) -> None:
    ip = vip(svc, "web")
    for host in (ip, "web", "web.default", "web.default.svc.cluster.local"):
        got = hits(svc, host, 3)
        assert all(peer == [ip, 80] for _, peer in got), got  # getpeername shows the VIP
        assert all(pod.startswith("web-") for pod, _ in got)


def test_udp_by_cluster_ip_and_dns_name_replies_come_from_the_vip(svc: Cluster) -> None:
    ip = vip(svc, "web")
    code = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
for host in sys.argv[1:]:
    s.sendto(b"hostname", (host, 9000)); data, addr = s.recvfrom(200)
    print(data.decode(), addr[0], addr[1])
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3); c.connect(("web", 9000))
c.send(b"hostname"); print(c.recv(200).decode(), *c.getpeername())
"""
    out = svc.exec("client", sys.executable, "-c", code, ip, "web", "web.default").out.split("\n")
    lines = [line.split() for line in out if line]
    assert len(lines) == 4
    for pod, src, port in lines:
        assert pod.startswith("web-") and src == ip and port == "9000"


def test_300_connections_spread_across_3_backends(svc: Cluster, capsys) -> None:
    counts = collections.Counter(pod for pod, _ in hits(svc, "web", 300))
    with capsys.disabled():
        print(f"\nspread over 300 connections: {sorted(counts.values())}")
    assert len(counts) == 3
    # Random choice: each backend within 15 % of the total of its even share of 100.
    assert all(abs(n - 100) <= 45 for n in counts.values()), counts
    # And no bias a fair 1-in-3 choice would show less than once in 10,000 runs.
    chi2 = sum((n - 100) ** 2 / 100 for n in counts.values())
    assert chi2 < 18.4, counts


def test_client_ip_affinity_pins_a_client(svc: Cluster) -> None:
    svc.apply([service("sticky", {"app": "web"}, sessionAffinity="ClientIP")])
    svc.wait_synced()
    pods = {pod for pod, _ in hits(svc, "sticky", 30)}
    assert len(pods) == 1, pods


def test_named_target_port_resolves_per_pod(svc: Cluster) -> None:
    svc.apply([deployment("alt", 1, {"app": "web", "flavour": "alt"}, port=8181)])
    svc.wait_pods(selector="flavour=alt", count=1)
    svc.wait_synced()
    pods = collections.Counter(pod for pod, _ in hits(svc, "web", 60))
    assert any(p.startswith("alt-") for p in pods), pods  # reached on 8181 by the name "http"
    svc.run("delete", "deployment", "alt")
    deadline = time.monotonic() + 30
    while [p for p in svc.pods(selector="flavour=alt")]:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_no_backend_refuses_at_once(svc: Cluster) -> None:
    svc.apply([service("empty", {"app": "nothing"})])
    svc.wait_synced()
    code = r"""
import errno, socket, sys, time
t = time.monotonic()
try:
    socket.create_connection((sys.argv[1], 80), timeout=5)
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno), round(time.monotonic() - t, 3))
"""
    for host in (vip(svc, "empty"), "empty"):
        name, took = svc.exec("client", sys.executable, "-c", code, host).out.split()
        assert name == "ECONNREFUSED"
        assert float(took) < 0.5


def test_scale_3_1_3_backends_follow_within_a_second(svc: Cluster) -> None:
    def scale(n: int) -> None:
        svc.apply([deployment("web", n, {"app": "web"})])
        deadline = time.monotonic() + 60
        while True:
            pods = [p for p in svc.pods(selector="app=web,!flavour")
                    if not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                            for c in (p.get("status") or {}).get("conditions", []))]
            if len(pods) == len(ready) == n and len(svc.pods(selector="app=web,!flavour")) == n:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)

    for n in (1, 3):
        scale(n)
        took = svc.wait_synced()
        assert took < 1.0, f"backends took {took:.2f}s to follow"
        names = {p["metadata"]["name"] for p in svc.pods(selector="app=web,!flavour")}
        seen = {pod for pod, _ in hits(svc, "web", 30)}
        assert seen == names, (n, seen, names)


def test_maglev_keeps_most_flows_when_a_backend_goes(svc: Cluster, capsys) -> None:
    svc.apply([deployment("mag", 4, {"app": "mag"}),
               service("mag", {"app": "mag"},
                       meta={"annotations": {"service.cilium.io/lb-algorithm": "maglev"}})])
    svc.wait_pods(selector="app=mag", count=4)
    svc.wait_synced()
    sports = list(range(20000, 20400))
    before = dict(zip(sports, (pod for pod, _ in hits(svc, "mag", len(sports), sports=sports)),
                      strict=True))
    again = dict(zip(sports, (pod for pod, _ in hits(svc, "mag", len(sports), sports=sports)),
                     strict=True))
    assert again == before, "Maglev must be consistent for the same flow"
    assert len(set(before.values())) == 4
    gone = sorted(set(before.values()))[0]
    svc.run("delete", "pod", gone)
    svc.apply([deployment("mag", 3, {"app": "mag"})])
    deadline = time.monotonic() + 30
    while len(svc.pods(selector="app=mag")) != 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    svc.wait_synced()
    after = dict(zip(sports, (pod for pod, _ in hits(svc, "mag", len(sports), sports=sports)),
                     strict=True))
    kept = sum(1 for s in sports if after[s] == before[s]) / len(sports)
    moved_needlessly = sum(1 for s in sports if before[s] != gone and after[s] != before[s])
    with capsys.disabled():
        print(f"\nMaglev: {kept:.0%} of {len(sports)} flows kept their backend after 1 of 4 "
              f"went; {moved_needlessly} flows of surviving backends moved")
    assert kept >= 0.60
    assert gone not in after.values()
