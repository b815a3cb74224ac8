"""Flows and metrics end to end: traffic made from inside pods shows up in `nodemesh observe`
(every filter, Hubble's JSON) and in each node's /metrics with exact counts."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from tests.integration.clusterharness import Cluster

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

ECHO = "registry.k8s.io/gateway-api/conformance/echo-basic"


def pod(name: str, node: str, labels: dict[str, str], server: bool = False) -> dict:
    c: dict = {"name": "c", "image": "debian", "command": ["sleep", "infinity"]}
    if server:
        c = {"name": "echo", "image": ECHO, "args": ["--port=8080", "--udp=9000"],
             "ports": [{"containerPort": 8080, "name": "http"},
                       {"containerPort": 9000, "name": "udp", "protocol": "UDP"}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": [c]}}


def svc(name: str, selector: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": selector, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "udp", "port": 9000, "protocol": "UDP", "targetPort": "udp"}]}}


OBJECTS = [
    pod("web-a", "node2", {"app": "web", "variant": "a"}, server=True),
    pod("web-b", "node1", {"app": "web", "variant": "b"}, server=True),
    pod("shop", "node2", {"app": "shop"}, server=True),
    pod("client", "node1", {"app": "client"}),
    pod("blocked", "node1", {"app": "blocked"}),
    svc("web", {"app": "web"}), svc("web-a", {"app": "web", "variant": "a"}),
    svc("web-b", {"app": "web", "variant": "b"}), svc("shop", {"app": "shop"}),
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
     "metadata": {"name": "web-split"},
     "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
              "rules": [{"backendRefs": [{"name": "web-a", "port": 80, "weight": 50},
                                         {"name": "web-b", "port": 80, "weight": 50}]}]}},
    {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "shop"},
     "spec": {"endpointSelector": {"matchLabels": {"app": "shop"}},
              "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                           "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                        "rules": {"http": [{"method": "GET",
                                                            "path": "/catalog.*"}]}}]}]}},
]


@pytest.fixture(scope="module")
def traffic(cluster: Cluster) -> dict:
    cluster.apply(OBJECTS)
    cluster.wait_pods(count=5)
    cluster.wait_synced()
    shop_ip = cluster.get("pod", "shop")["status"]["podIP"]  # type: ignore[index]

    def curl(pod_: str, *args: str) -> str:
        return cluster.exec(pod_, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2",
                            *args, check=False).out

    deadline = time.monotonic() + 20
    while curl("client", f"http://{shop_ip}:8080/admin") != "403":  # L7 policy in place
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.5)  # the probes' access logs (flushed every second) land before we count
    before = _metrics(cluster)
    t0 = time.time()
    codes = {"catalog": [curl("client", f"http://{shop_ip}:8080/catalog/{i}") for i in range(5)],
             "admin": [curl("client", "-X", "POST", f"http://{shop_ip}:8080/admin")
                       for _ in range(3)],
             "web": [curl("client", "http://web/split") for _ in range(10)],
             "blocked": [curl("blocked", f"http://{shop_ip}:8080/catalog")]}
    udp = cluster.exec("client", "python3", "-c",
                       "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                       "s.settimeout(2); s.sendto(b'hostname', ('web', 9000));"
                       "print(s.recvfrom(100)[0].decode())").out.strip()
    time.sleep(1.5)  # Envoy flushes access logs every second
    return {"cluster": cluster, "codes": codes, "udp": udp, "since": t0, "before": before,
            "shop_ip": shop_ip}


def observe(c: Cluster, *args: str) -> list[dict]:
    out = c.run("observe", "-o", "json", "--last", "2000", *args).out
    return [json.loads(line)["flow"] for line in out.splitlines() if line]


def test_traffic_results(traffic: dict) -> None:
    assert traffic["codes"]["catalog"] == ["200"] * 5
    assert traffic["codes"]["admin"] == ["403"] * 3
    assert traffic["codes"]["web"] == ["200"] * 10
    assert traffic["codes"]["blocked"] == ["000"]
    assert traffic["udp"] in ("web-a", "web-b")


def test_json_has_hubble_field_names(traffic: dict) -> None:
    out = traffic["cluster"].run("observe", "-o", "json", "--last", "5").out.splitlines()
    assert out
    for line in out:
        msg = json.loads(line)
        assert set(msg) >= {"flow", "node_name", "time"}
        f = msg["flow"]
        assert {"time", "uuid", "verdict", "IP", "l4", "source", "destination", "Type",
                "node_name", "traffic_direction", "is_reply", "Summary"} <= set(f), f.keys()
        assert {"source", "destination", "ipVersion"} <= set(f["IP"])
        assert f["Type"] in ("L3_L4", "L7")


def test_allowed_tcp_connection(traffic: dict) -> None:
    flows = observe(traffic["cluster"], "--from-pod", "default/client", "--to-pod", "default/shop",
                    "--protocol", "tcp", "--type", "trace", "--verdict", "FORWARDED")
    assert any(f["l4"]["TCP"]["destination_port"] == 8080 and f["source"]["pod_name"] == "client"
               and f["destination"]["pod_name"] == "shop" for f in flows)


def test_policy_drop_with_reason(traffic: dict) -> None:
    flows = observe(traffic["cluster"], "--from-pod", "default/blocked", "--type", "drop")
    assert flows and all(f["verdict"] == "DROPPED" for f in flows)
    assert flows[-1]["drop_reason_desc"] == "POLICY_DENIED"
    assert flows[-1]["traffic_direction"] == "INGRESS"
    assert flows[-1]["destination"]["pod_name"] == "shop"


def test_udp_exchange(traffic: dict) -> None:
    flows = observe(traffic["cluster"], "--from-pod", "default/client", "--protocol", "udp",
                    "--to-label", "app=web")
    assert any(f["l4"]["UDP"]["destination_port"] == 9000 for f in flows)


def test_http_200_and_403_from_l7_policy(traffic: dict) -> None:
    c = traffic["cluster"]
    ok = observe(c, "--type", "l7", "--http-status", "200", "--to-pod", "default/shop")
    assert len([f for f in ok if f["l7"]["http"]["url"].endswith(tuple(
        f"/catalog/{i}" for i in range(5)))]) == 5
    denied = observe(c, "--type", "l7", "--verdict", "DROPPED", "--http-method", "POST")
    assert len(denied) >= 3
    f = denied[-1]
    assert f["l7"]["http"]["code"] == 403 and f["l7"]["http"]["method"] == "POST"
    assert f["l7"]["http"]["url"].endswith("/admin")
    assert f["drop_reason_desc"] == "POLICY_DENIED"
    assert f["ingress_denied_by"][0]["name"] == "shop"


def test_weighted_route_flows_name_the_backend(traffic: dict) -> None:
    flows = observe(traffic["cluster"], "--type", "l7", "--http-path", "^/split$")
    assert len(flows) == 10
    backends = {f["destination_service"]["name"] for f in flows}
    assert backends <= {"web-a", "web-b"} and backends
    for f in flows:
        assert f["l7"]["route"] == "HTTPRoute/default/web-split"
        assert f["destination"]["pod_name"] == f["destination_service"]["name"]


@pytest.mark.parametrize("args,check", [
    (["--pod", "default/blocked"], lambda f: "blocked" in (f["source"].get("pod_name"),
                                                          f["destination"].get("pod_name"))),
    (["--from-pod", "default/blocked"], lambda f: f["source"]["pod_name"] == "blocked"),
    (["--to-pod", "default/web-a"], lambda f: f["destination"]["pod_name"] == "web-a"),
    (["--namespace", "default"], lambda f: "default" in (f["source"].get("namespace"),
                                                         f["destination"].get("namespace"))),
    (["--label", "app=blocked"], lambda f: "k8s:app=blocked" in f["source"].get("labels", []) + f[
        "destination"].get("labels", [])),
    (["--from-label", "app=client"], lambda f: "k8s:app=client" in f["source"]["labels"]),
    (["--to-label", "variant=a"], lambda f: "k8s:variant=a" in f["destination"]["labels"]),
    (["--service", "default/web-b"], lambda f: f["destination_service"]["name"] == "web-b"),
    (["--to-service", "web-a"], lambda f: f["destination_service"]["name"] == "web-a"),
    (["--verdict", "DROPPED"], lambda f: f["verdict"] == "DROPPED"),
    (["--type", "trace"], lambda f: f["Type"] == "L3_L4" and f["verdict"] != "DROPPED"),
    (["--type", "drop"], lambda f: f["verdict"] == "DROPPED" and f["Type"] == "L3_L4"),
    (["--type", "l7"], lambda f: f["Type"] == "L7"),
    (["--protocol", "tcp"], lambda f: "TCP" in f["l4"]),
    (["--protocol", "udp"], lambda f: "UDP" in f["l4"]),
    (["--protocol", "http"], lambda f: "http" in f.get("l7", {})),
    (["--http-status", "4+"], lambda f: 400 <= f["l7"]["http"]["code"] < 500),
    (["--http-method", "get"], lambda f: f["l7"]["http"]["method"] == "GET"),
    (["--http-path", "^/catalog/[0-4]$"], lambda f: "/catalog/" in f["l7"]["http"]["url"]),
    (["--identity", "1"], lambda f: 1 in (f["source"]["identity"], f["destination"]["identity"])),
    (["--node", "node2"], lambda f: f["node_name"] == "node2"),
    (["--until", "1d"], lambda f: False),
])
def test_each_filter(traffic: dict, args: list[str], check) -> None:
    flows = observe(traffic["cluster"], "--since", "10m", *args)
    if args == ["--until", "1d"]:
        assert flows == []  # nothing is older than a day
        return
    assert flows, f"no flows for {args}"
    assert all(check(f) for f in flows), [f.get("Summary") for f in flows if not check(f)][:3]


def test_compact_and_table_output(traffic: dict) -> None:
    c = traffic["cluster"]
    compact = c.run("observe", "--last", "3", "--from-pod", "default/blocked").out
    assert "default/blocked" in compact and "DROPPED" in compact and "\x1b[" not in compact
    table = c.run("observe", "-o", "table", "--last", "3").out
    assert table.splitlines()[0].split()[:3] == ["TIMESTAMP", "NODE", "SOURCE"]
    bad = c.run("observe", "--type", "bogus", check=False)
    assert bad.code == 2 and "--type" in bad.err


def _metrics(c: Cluster) -> dict[str, float]:
    out: dict[str, float] = {}
    for node in ("node1", "node2"):
        with open(f"{c.state_dir}/nodes/{node}/metrics.json") as f:
            port = json.load(f)["port"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            m = re.match(r"^(nodemesh_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    def match(key: str) -> bool:
        return key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items())
    return sum(v for k, v in after.items() if match(k)) - sum(v for k, v in before.items() if match(k))


def test_metrics_count_exactly_what_was_sent(traffic: dict) -> None:
    before, after = traffic["before"], _metrics(traffic["cluster"])
    pair = {"source_workload": "client", "destination_workload": "shop"}
    assert _delta(before, after, "nodemesh_http_requests_total", code="200", **pair) == 5
    assert _delta(before, after, "nodemesh_http_requests_total", code="403", method="POST",
                  **pair) == 3
    assert _delta(before, after, "nodemesh_http_requests_total",
                  destination_service="default/web-a") + _delta(
        before, after, "nodemesh_http_requests_total", destination_service="default/web-b") == 10
    assert _delta(before, after, "nodemesh_http_request_duration_seconds_count", **pair) == 8
    assert _delta(before, after, "nodemesh_tcp_connections_total", source_workload="blocked",
                  verdict="DROPPED") >= 1
    assert _delta(before, after, "nodemesh_flows_total", verdict="DROPPED") >= 4
    assert after.get('nodemesh_bpf_map_entries{map="nm_endpoints"}', 0) >= 5
    assert _delta(before, after, "nodemesh_xds_acks_total") >= 0
