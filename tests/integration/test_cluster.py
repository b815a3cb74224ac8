"""The local cluster end to end: pods on two nodes, reachability, restarts, adoption, cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest

from tests.integration.clusterharness import Cluster, new_cluster, pod_ready

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

ECHO = "registry.k8s.io/gateway-api/conformance/echo-advanced:v0.1.0"

APP = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      containers:
      - name: echo
        image: {ECHO}
        args: ["--port=8080"]
        ports: [{{containerPort: 8080, name: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, labels: {{app: client}}}}
spec:
  containers:
  - name: client
    image: debian
    command: ["sleep", "infinity"]
"""


@pytest.fixture(scope="module")
def app(cluster: Cluster) -> Cluster:
    cluster.apply(APP)
    cluster.wait_pods(count=4)
    return cluster


def _container_pid(pod: dict) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].split("//")[1])


def test_every_replica_reachable_from_client_across_nodes(app: Cluster) -> None:
    replicas = app.pods(selector="app=echo")
    assert len(replicas) == 3
    assert {p["spec"]["nodeName"] for p in replicas} == {"node1", "node2"}
    for p in replicas:
        r = app.exec("client", "curl", "-s", "-m", "5", f"http://{p['status']['podIP']}:8080/x")
        body = json.loads(r.out)
        assert body["pod"] == p["metadata"]["name"]
        assert body["namespace"] == "default"
        assert body["path"] == "/x"


def test_pod_ips_come_from_their_node_cidr(app: Cluster) -> None:
    cidr = {"node1": "10.244.1.", "node2": "10.244.2."}
    ips = []
    for p in app.pods():
        assert p["status"]["podIP"].startswith(cidr[p["spec"]["nodeName"]])
        ips.append(p["status"]["podIP"])
    assert len(set(ips)) == len(ips)


def test_names_resolve_to_the_cluster_ip(app: Cluster) -> None:
    svc = app.get("svc", "echo")
    ip = svc["spec"]["clusterIP"]  # type: ignore[index]
    assert ip.startswith("10.96.")
    for name in ("echo", "echo.default", "echo.default.svc.cluster.local"):
        out = app.exec("client", "getent", "hosts", name).out
        assert out.split()[0] == ip, (name, out)
    assert app.exec("client", "getent", "hosts", "nope.default", check=False).code != 0


def test_dns_follows_new_services(app: Cluster) -> None:
    app.apply("""
apiVersion: v1
kind: Service
metadata: {name: later}
spec:
  selector: {app: echo}
  ports: [{port: 81, targetPort: 8080}]
""")
    ip = app.get("svc", "later")["spec"]["clusterIP"]  # type: ignore[index]
    deadline = time.monotonic() + 2
    while True:
        r = app.exec("client", "getent", "hosts", "later", check=False)
        if r.code == 0:
            assert r.out.split()[0] == ip
            break
        assert time.monotonic() < deadline, "DNS did not pick up the new service within 2 s"
        time.sleep(0.1)
    app.run("delete", "svc", "later")


def test_agent_says_where_its_memory_is(app: Cluster) -> None:
    """GET /debug/memory: the agent's smaps_rollup; allocations only when started to trace."""
    m = app.agent("node1", "/debug/memory")
    roll = m["smaps_rollup_kib"]
    assert roll["Anonymous"] > 10_000 and roll["Pss"] >= roll["Pss_Anon"] > 0, roll
    assert m["tracing"] is False and "top" not in m


def test_exec_passes_exit_code_and_runs_in_the_pod(app: Cluster) -> None:
    assert app.exec("client", "sh", "-c", "exit 7", check=False).code == 7
    client = app.get("pod", "client")
    ip = client["status"]["podIP"]  # type: ignore[index]
    addrs = app.exec("client", "ip", "-4", "-o", "addr", "show", "dev", "eth0").out
    assert f"{ip}/32" in addrs
    assert app.exec("client", "hostname").out.strip() == "client"
    assert app.exec("client", "ip", "route", "get", "8.8.8.8", check=False).code == 0  # via node
    # The node has no uplink: the packet goes nowhere past the node.
    assert app.exec("client", "curl", "-s", "-m", "2", "http://192.0.2.1/", check=False).code != 0


def test_killed_container_restarts(app: Cluster) -> None:
    pod = app.get("pod", "client")
    pid = _container_pid(pod)  # type: ignore[arg-type]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        pod = app.get("pod", "client")
        st = pod["status"]["containerStatuses"][0]  # type: ignore[index]
        if st["restartCount"] >= 1 and "running" in st["state"]:
            assert _container_pid(pod) != pid  # type: ignore[arg-type]
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    r = app.run("describe", "pod", "client")
    assert "Restart Count: 1" in r.out.replace("  ", " ") or "Restart Count:" in r.out


def test_logs_show_container_output(app: Cluster) -> None:
    echo = app.pods(selector="app=echo")[0]["metadata"]["name"]
    assert "8080" in app.run("logs", echo).out


def test_agent_sigkill_is_adopted_without_touching_pods(app: Cluster) -> None:
    before = {p["metadata"]["name"]: (p["status"]["podIP"], p["status"]["sandbox"]["shimPID"],
                                      _container_pid(p)) for p in app.pods()}
    for node in ("node1", "node2"):
        with open(os.path.join(app.state_dir, "nodes", node, "agent.json")) as f:
            old = json.load(f)["pid"]
        os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        try:
            st = [app.run("status").out]
            if "not running" not in st[0]:
                break
        except AssertionError:
            pass
        assert time.monotonic() < deadline, "agents did not come back"
        time.sleep(0.2)
    time.sleep(1)  # give the new agents a reconcile round
    after = {p["metadata"]["name"]: (p["status"]["podIP"], p["status"]["sandbox"]["shimPID"],
                                     _container_pid(p)) for p in app.pods()}
    assert after == before
    assert all(pod_ready(p) for p in app.pods())


def test_deleted_pod_leaves_no_netns_veth_or_cgroup(app: Cluster) -> None:
    app.apply("""
apiVersion: v1
kind: Pod
metadata: {name: doomed}
spec:
  containers: [{name: c, image: debian, command: [sleep, infinity]}]
""")
    pod = app.wait_pods(count=5)
    doomed = next(p for p in pod if p["metadata"]["name"] == "doomed")
    sb = doomed["status"]["sandbox"]
    assert os.path.exists(f"/run/netns/{sb['netns']}")
    assert os.path.isdir(sb["cgroup"])
    t0 = time.monotonic()
    app.run("delete", "pod", "doomed")
    assert time.monotonic() - t0 < 10, "delete should not wait out the grace period"
    assert not os.path.exists(f"/run/netns/{sb['netns']}")
    assert not os.path.isdir(sb["cgroup"])
    node_ns = f"{app.name}-{doomed['spec']['nodeName']}"
    links = os.popen(f"ip -n {node_ns} -o link show").read()
    assert sb["hostInterface"] not in links


def test_deployment_scales_and_rolls(app: Cluster) -> None:
    app.run("apply", "-f", "-", input=APP.replace("replicas: 3", "replicas: 1"))
    app.wait_pods(selector="app=echo", count=1)
    rolled = APP.replace("replicas: 3", "replicas: 2").replace('"--port=8080"', '"--port=8080", "--tcp=9090"')
    app.run("apply", "-f", "-", input=rolled)
    deadline = time.monotonic() + 30
    while True:
        pods = [p for p in app.pods(selector="app=echo") if not p["metadata"].get("deletionTimestamp")]
        if len(pods) == 2 and all(pod_ready(p) and "--tcp=9090" in json.dumps(p["spec"]) for p in pods):
            break
        assert time.monotonic() < deadline, [p["metadata"]["name"] for p in pods]
        time.sleep(0.2)
    app.run("apply", "-f", "-", input=APP)
    app.wait_pods(selector="app=echo", count=3)


def test_hundred_pods_on_one_node(capsys: pytest.CaptureFixture[str]) -> None:
    c = new_cluster(nodes=1)
    try:
        t0 = time.monotonic()
        c.apply("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: many}
spec:
  replicas: 100
  selector: {matchLabels: {app: many}}
  template:
    metadata: {labels: {app: many}}
    spec:
      containers: [{name: c, image: debian, command: [sleep, infinity]}]
""")
        pods = c.wait_pods(count=100, timeout=120)
        took = time.monotonic() - t0
        assert len({p["status"]["podIP"] for p in pods}) == 100
        with capsys.disabled():
            print(f"\n100 pods Running on one node in {took:.1f} s")
        assert took < 60
    finally:
        c.down()
        assert not c.leftovers()


def test_up_after_crash_recovers(capsys: pytest.CaptureFixture[str]) -> None:
    c = new_cluster(nodes=1)
    try:
        c.apply("""
apiVersion: v1
kind: Pod
metadata: {name: survivor}
spec:
  containers: [{name: c, image: debian, command: [sleep, infinity]}]
""")
        c.wait_pods(count=1)
        # Everything dies at once, as in a crash: every process of the cluster, SIGKILL.
        victims = [int(line.split()[0]) for line in os.popen("ps -eo pid,args").read().splitlines()[1:]
                   if c.state_dir in line]
        cg = f"/sys/fs/cgroup/unified/{c.name}" if os.path.isdir("/sys/fs/cgroup/unified") \
            else f"/sys/fs/cgroup/{c.name}"
        with open(os.path.join(cg, "cgroup.kill"), "w") as f:
            f.write("1")
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        c.up()
        pods = c.wait_pods(count=1, timeout=30)
        assert pods[0]["metadata"]["name"] == "survivor"
        assert c.exec("survivor", "true").code == 0
    finally:
        c.down()
        assert not c.leftovers()
