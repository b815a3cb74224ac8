"""Routes through the node Envoy: NACKs become conditions, agent restarts drop no request, and
there is one Envoy per node however many pods run there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.clusterharness import Cluster, new_cluster

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

ECHO = "registry.k8s.io/gateway-api/conformance/echo-basic"


def deployment(name: str, replicas: int = 2) -> dict:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                         "name": "echo", "image": ECHO, "args": ["--port=8080"],
                         "ports": [{"containerPort": 8080, "name": "http"}]}]}}}}


def service(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80,
                                                           "targetPort": "http"}]}}


def route(name: str, parent: str, path_type: str, value: str, header: str) -> dict:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
                     "rules": [{"matches": [{"path": {"type": path_type, "value": value}}],
                                "filters": [{"type": "ResponseHeaderModifier",
                                             "responseHeaderModifier": {"set": [
                                                 {"name": "x-route", "value": header}]}}],
                                "backendRefs": [{"name": parent, "port": 80}]}]}}


CLIENT = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
          "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "debian",
                                                        "command": ["sleep", "infinity"]}]}}


@pytest.fixture(scope="module")
def routed(cluster: Cluster) -> Cluster:
    cluster.apply([deployment("alpha"), service("alpha"), deployment("beta"), service("beta"),
                   CLIENT, route("alpha-route", "alpha", "PathPrefix", "/", "alpha")])
    cluster.wait_pods(count=5)
    cluster.wait_synced()
    _wait_header(cluster, "http://alpha/x", "alpha")
    return cluster


def _header(c: Cluster, url: str) -> str | None:
    r = c.exec("client", "curl", "-s", "-m", "3", "-D", "-", "-o", "/dev/null", url, check=False)
    for line in r.out.splitlines():
        if line.lower().startswith("x-route:"):
            return line.split(":", 1)[1].strip()
    return None


def _wait_header(c: Cluster, url: str, value: str | None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while _header(c, url) != value:
        assert time.monotonic() < deadline, f"{url}: x-route never became {value!r}"
        time.sleep(0.2)


def _accepted(c: Cluster, name: str) -> dict:
    r = c.get("httproute", name)
    for p in (r.get("status") or {}).get("parents") or []:  # type: ignore[union-attr]
        for cond in p["conditions"]:
            if cond["type"] == "Accepted":
                return cond
    return {}


def test_rejected_regex_shows_as_a_condition_and_clears(routed: Cluster) -> None:
    # Valid by the API's rules (the API does not check regular expressions), rejected by RE2:
    # nodemesh checks it with RE2 as Envoy would, so it never reaches Envoy.
    r = routed.apply([route("beta-route", "beta", "RegularExpression", "/v[0-9", "beta")])
    assert r.code == 0
    deadline = time.monotonic() + 5
    while _accepted(routed, "beta-route").get("status") != "False":
        assert time.monotonic() < deadline, _accepted(routed, "beta-route")
        time.sleep(0.1)
    cond = _accepted(routed, "beta-route")
    assert cond["reason"] == "UnsupportedValue"
    assert "missing ]" in cond["message"] or "regex" in cond["message"].lower(), cond
    assert "beta-route" in routed.run("describe", "httproute", "beta-route").out
    assert "UnsupportedValue" in routed.run("describe", "httproute", "beta-route").out
    # Traffic on the other route is unaffected.
    assert _header(routed, "http://alpha/still-fine") == "alpha"
    assert routed.agent("node1")["proxy"]["nack"] is None  # nothing Envoy would refuse was sent
    # Fixing the route clears the condition and the route takes effect.
    routed.apply([route("beta-route", "beta", "RegularExpression", "/v[0-9]+", "beta")])
    deadline = time.monotonic() + 5
    while _accepted(routed, "beta-route").get("status") != "True":
        assert time.monotonic() < deadline, _accepted(routed, "beta-route")
        time.sleep(0.1)
    _wait_header(routed, "http://beta/v2", "beta")
    assert routed.agent("node1")["proxy"]["nack"] is None


LOAD = r"""
import http.client, json, sys, time
end = time.monotonic() + float(sys.argv[1]); ok = 0; failed = []
conn = http.client.HTTPConnection("alpha", 80, timeout=3)
while time.monotonic() < end:
    try:
        conn.request("GET", "/load"); r = conn.getresponse(); r.read()
        if r.status == 200 and r.getheader("x-route") == "alpha": ok += 1
        else: failed.append([r.status, dict(r.getheaders()), time.monotonic()])
    except Exception as e:
        failed.append(repr(e)); conn.close(); conn = http.client.HTTPConnection("alpha", 80, timeout=3)
    # Every 20th request on a new connection: new connections must also work meanwhile.
    if ok % 20 == 0:
        conn.close(); conn = http.client.HTTPConnection("alpha", 80, timeout=3)
print(json.dumps({"ok": ok, "failed": failed[:10], "failures": len(failed)}))
"""


def test_agent_kill_under_load_fails_no_request(routed: Cluster) -> None:
    envoy_before = routed.agent("node1")["proxy"]["envoy"]["pid"]
    load = subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", routed.state_dir,
                             "exec", "client", "--", sys.executable, "-c", LOAD, "8"],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    for node in ("node1", "node2"):
        with open(os.path.join(routed.state_dir, "nodes", node, "agent.json")) as f:
            os.kill(json.load(f)["pid"], signal.SIGKILL)
    out, _ = load.communicate(timeout=60)
    result = json.loads(out)
    assert result["failures"] == 0, result
    assert result["ok"] > 200, result
    deadline = time.monotonic() + 15
    while True:
        try:
            st = routed.agent("node1")
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert st["proxy"]["envoy"]["pid"] == envoy_before  # adopted, not restarted


def test_one_envoy_per_node_with_100_pods(capsys: pytest.CaptureFixture[str]) -> None:
    c = new_cluster(nodes=1)
    try:
        c.apply([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "many"},
                  "spec": {"replicas": 100, "selector": {"matchLabels": {"app": "many"}},
                           "template": {"metadata": {"labels": {"app": "many"}}, "spec": {
                               "containers": [{"name": "c", "image": "debian",
                                               "command": ["sleep", "infinity"],
                                               "ports": [{"containerPort": 8080,
                                                          "name": "http"}]}]}}}},
                 service("many"), route("many-route", "many", "PathPrefix", "/", "many")])
        c.wait_pods(count=100, timeout=120)
        envoys = [p for p in os.listdir("/proc") if p.isdigit() and _is_envoy_of(p, c.state_dir)]
        with capsys.disabled():
            print(f"\n100 pods on one node: {len(envoys)} Envoy process(es)")
        assert len(envoys) == 1
    finally:
        c.down()
        assert not c.leftovers()


def _is_envoy_of(pid: str, state_dir: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and cmd[0].endswith(b"/envoy") and any(state_dir.encode() in a for a in cmd)


def test_proxy_admin_data_through_the_agent(routed: Cluster) -> None:
    """`nodemesh proxy stats|clusters|config`: the node Envoy's admin API read through the agent
    (Envoy's admin socket stays inside the node)."""
    stats = routed.run("proxy", "stats", "--node", "node1", "--filter", r"^server\.live$").out
    assert stats.strip() == "node1  server.live: 1", stats
    clusters = json.loads(routed.run("proxy", "clusters", "--node", "node1").out)
    names = [c["name"] for c in clusters["clusters"]["cluster_statuses"]]
    assert clusters["node"] == "node1" and any("alpha" in n for n in names), names
    config = json.loads(routed.run("proxy", "config", "--node", "node1").out)
    kinds = {c["@type"].rsplit(".", 1)[-1] for c in config["config"]["configs"]}
    assert {"ListenersConfigDump", "RoutesConfigDump"} <= kinds, kinds
    bad = routed.run("proxy", "stats", "--node", "node9", check=False)
    assert bad.code == 2 and "no node named 'node9'" in bad.err, bad


def test_hairpin_from_an_egress_isolated_pod(routed: Cluster) -> None:
    """A pod behind a routed Service calls that Service and lands on itself, while an egress
    policy isolates it: the call succeeds (it failed with 503: Envoy's upstream to the pod was
    held to the pod's egress policy), and the policy still denies what it denies."""
    c = routed
    c.apply([deployment("selfie", replicas=1), service("selfie"),
             route("selfie-route", "selfie", "PathPrefix", "/", "selfie"),
             {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "selfie-no-egress"},
              "spec": {"podSelector": {"matchLabels": {"app": "selfie"}},
                       "policyTypes": ["Egress"]}}])
    pod = c.wait_pods(count=1, selector="app=selfie")[0]["metadata"]["name"]
    c.wait_synced()
    vip = c.get("service", "selfie")["spec"]["clusterIP"]  # type: ignore[index]
    alpha = c.get("service", "alpha")["spec"]["clusterIP"]  # type: ignore[index]

    def code(url: str) -> str:
        return c.exec(pod, "curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}",
                      url, check=False).out

    deadline = time.monotonic() + 15
    while code(f"http://{vip}/") != "200":
        assert time.monotonic() < deadline, code(f"http://{vip}/")
        time.sleep(0.3)
    assert code(f"http://{alpha}/") in ("000", "503"), "egress to others must stay denied"
    c.run("delete", "networkpolicy", "selfie-no-egress")
    c.run("delete", "httproute", "selfie-route")
    c.run("delete", "service", "selfie")
    c.run("delete", "deployment", "selfie")
