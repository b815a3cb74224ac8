"""Exhausted tables: a BPF map past its capacity refuses whole objects, says so (agent event,
metric, Node condition, status), and the objects that fit keep working (docs/reliability.md,
"Exhausted tables")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from tests.integration.clusterharness import Cluster, new_cluster
from tests.integration.test_services import CLIENT, deployment

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

SVC_MAP_SIZE = 8  # web has 2 backends: a one-port service takes 3 nm_lb4_svc entries
CT_MAP_SIZE = 256


def one_port_service(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


# Runs in the client pod: N HTTP GETs over new connections; which pods answered (or the error).
GETS = r"""
import json, socket, struct, sys
host, n = sys.argv[1], int(sys.argv[2])
out = []
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(2)
    try:
        s.connect((host, 80))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        out.append(json.loads(data.split(b"\r\n\r\n", 1)[1])["pod"])
    except OSError as e:
        out.append("error: " + type(e).__name__)
    finally:
        s.close()
print(json.dumps(out))
"""

# Runs in the client pod: a burst of short connections (each makes several flow events).
BURST = r"""
import socket, struct, sys, time
host, n = sys.argv[1], int(sys.argv[2])
pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
for i in range(n):
    time.sleep(pause)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(1)
    try:
        s.connect((host, 80))
    except OSError:
        pass
    s.close()
"""


def gets(c: Cluster, host: str, n: int) -> list[str]:
    return json.loads(c.exec("client", sys.executable, "-c", GETS, host, str(n),
                             timeout=120).out)


def metrics(c: Cluster) -> str:
    with open(os.path.join(c.state_dir, "nodes", "node1", "metrics.json")) as f:
        port = json.load(f)["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def agent_events(c: Cluster, kind: str) -> list[dict]:
    out = c.run("observe", "--type", "agent", "--node", "node1", "--last", "1000",
                "-o", "json").out
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e["flow"]["agent_event"] for e in events if e["flow"]["agent_event"]["type"] == kind]


def node_condition(c: Cluster, kind: str) -> dict:
    node = c.run("get", "nodes", "node1", "-o", "json").json()
    return next(x for x in node["status"]["conditions"] if x["type"] == kind)  # type: ignore[index]


def wait_for(what: str, fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout}s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def small() -> Cluster:
    c = new_cluster(1, "--mtls", "off", "--map-size", f"nm_lb4_svc={SVC_MAP_SIZE}",
                    "--map-size", "nm_events=4096", "--map-size", f"nm_ct={CT_MAP_SIZE}")
    try:
        c.apply([deployment("web", 2, {"app": "web"}), CLIENT,
                 one_port_service("svc-a"), one_port_service("svc-b")])
        c.wait_pods(count=3)
        c.wait_synced()
        yield c
    finally:
        c.down()
        left = c.leftovers()
        assert not left, f"cluster {c.name} left things behind: {left}"


def vip(c: Cluster, name: str) -> str:
    return c.get("svc", name)["spec"]["clusterIP"]  # type: ignore[index]


def test_cluster_json_has_the_sizes_and_says_how_to_raise_them(small: Cluster) -> None:
    with open(os.path.join(small.state_dir, "cluster.json")) as f:
        cfg = json.load(f)
    assert cfg["maps"]["nm_lb4_svc"] == SVC_MAP_SIZE
    assert cfg["maps"]["nm_events"] == 4096
    assert cfg["maps"]["nm_ct"] == CT_MAP_SIZE
    assert cfg["maps"]["nm_ipcache"] == 65536  # the default, written out
    assert "--map-size" in cfg["maps_help"]
    fill = metrics(small)
    assert metric(fill, "nodemesh_bpf_map_capacity", map="nm_lb4_svc") == SVC_MAP_SIZE


def test_a_service_past_capacity_is_refused_whole_and_reported(small: Cluster) -> None:
    c = small
    pods = {p["metadata"]["name"] for p in c.pods(selector="app=web")}
    assert set(gets(c, vip(c, "svc-a"), 20)) == pods
    c.apply([one_port_service("svc-c")])
    c.wait_synced()
    st = c.agent("node1")["datapath"]["tablesFull"]
    assert [r["map"] for r in st] == ["nm_lb4_svc"], st
    assert st[0]["capacity"] == SVC_MAP_SIZE and st[0]["needed"] == 9
    assert st[0]["objects"] == ["default/svc-c"]
    assert "nodemesh up --map-size nm_lb4_svc=N" in st[0]["message"]
    # the services that fit keep balancing over both pods; the refused one is not translated
    assert set(gets(c, vip(c, "svc-a"), 20)) == pods
    assert set(gets(c, vip(c, "svc-b"), 20)) == pods
    assert all(r.startswith("error") for r in gets(c, vip(c, "svc-c"), 2))
    # an agent event, a metric, a Node condition and `status` name the map and its size
    full = wait_for("MAP_FULL event", lambda: agent_events(c, "MAP_FULL"))
    assert full[-1]["map"] == "nm_lb4_svc" and full[-1]["size"] == SVC_MAP_SIZE
    assert full[-1]["objects"] == ["default/svc-c"]
    assert full[-1]["raise_with"] == "nodemesh up --map-size nm_lb4_svc=N"
    assert metric(metrics(c), "nodemesh_map_refused", map="nm_lb4_svc") == 1
    assert metric(metrics(c), "nodemesh_agent_events_total", type="MAP_FULL") >= 1
    cond = wait_for("condition", lambda: node_condition(c, "DatapathTablesFull")["status"]
                    == "True" and node_condition(c, "DatapathTablesFull"))
    assert "nm_lb4_svc" in cond["message"] and f"holds {SVC_MAP_SIZE}" in cond["message"]
    status = c.run("status").out
    assert "map nm_lb4_svc is full" in status and "default/svc-c" in status
    assert "DatapathTablesFull" in c.run("describe", "node", "node1").out

    # room again: svc-a goes, svc-c gets its entries (MAP_ROOM), everything clears
    c.run("delete", "svc", "svc-a")
    c.wait_synced()
    assert c.agent("node1")["datapath"]["tablesFull"] == []
    assert set(gets(c, vip(c, "svc-c"), 20)) == pods
    assert set(gets(c, vip(c, "svc-b"), 20)) == pods
    room = wait_for("MAP_ROOM event", lambda: agent_events(c, "MAP_ROOM"))
    assert room[-1]["map"] == "nm_lb4_svc"
    assert metric(metrics(c), "nodemesh_map_refused", map="nm_lb4_svc") == 0
    wait_for("condition False",
             lambda: node_condition(c, "DatapathTablesFull")["status"] == "False")
    assert "is full" not in c.run("status").out


def test_a_full_events_ring_is_counted_and_shown(small: Cluster) -> None:
    c = small
    before = c.agent("node1")["flows"]["lostEvents"]
    for _ in range(5):
        c.exec("client", sys.executable, "-c", BURST, vip(c, "svc-b"), "400", timeout=120)
        lost = c.agent("node1")["flows"]["lostEvents"]
        if lost > before:
            break
    assert lost > before, "a 4 KiB ring buffer lost no event in 2000 connections"
    assert metric(metrics(c), "nodemesh_lost_events_total", source="ringbuf_full") >= lost
    assert "events lost (the nm_events ring buffer was full)" in c.run("status").out


def test_a_full_conntrack_evicts_the_least_recently_used_and_new_connections_pass(
        small: Cluster) -> None:
    c = small
    pods = {p["metadata"]["name"] for p in c.pods(selector="app=web")}
    # 4 times the table's size of connections (each takes an entry): the LRU map evicts as it goes
    # (per-CPU free lists keep some of its room in reserve, so "full" is below its size)
    c.exec("client", sys.executable, "-c", BURST, vip(c, "svc-b"), str(4 * CT_MAP_SIZE),
           timeout=120)
    text = metrics(c)
    entries = metric(text, "nodemesh_bpf_map_entries", map="nm_ct")
    assert metric(text, "nodemesh_bpf_map_capacity", map="nm_ct") == CT_MAP_SIZE
    assert entries is not None and CT_MAP_SIZE / 2 <= entries <= CT_MAP_SIZE, entries
    # an LRU map: a new connection takes the place of the least recently used entry
    assert set(gets(c, vip(c, "svc-b"), 20)) == pods
    drops = c.run("observe", "--node", "node1", "--verdict", "DROPPED", "--last", "1000",
                  "-o", "json").out
    assert "CT_MAP_INSERTION_FAILED" not in drops


def test_a_full_flow_ring_is_counted_and_shown(small: Cluster) -> None:
    """The agent's flow ring (cluster.json extra.flow_ring_size) keeps the newest flows; the
    overwritten ones are counted and `status` says so."""
    c = small
    path = os.path.join(c.state_dir, "cluster.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["extra"]["flow_ring_size"] = 64
    with open(path + ".tmp", "w") as f:
        json.dump(cfg, f)
    os.replace(path + ".tmp", path)
    old = c.agent("node1")["pid"]
    os.kill(old, signal.SIGKILL)  # the daemon starts another, which reads cluster.json

    def new_agent() -> dict | None:
        try:
            st = c.agent("node1")
        except Exception:
            return None
        return st if st["pid"] != old else None

    assert wait_for("a new agent", new_agent, 30)["flows"]["capacity"] == 64
    # Paced, so that this cluster's tiny nm_events ring buffer (4 KiB) does not lose the events
    # first: the agent's ring of 64 flows is what must overflow here.
    c.exec("client", sys.executable, "-c", BURST, vip(c, "svc-b"), "300", "0.005", timeout=120)
    flows = wait_for("overwritten flows",
                     lambda: (f := c.agent("node1")["flows"])["overwritten"] > 0 and f)
    assert metric(metrics(c), "nodemesh_lost_events_total",
                  source="flow_ring_overwritten") >= 1, flows
    assert "overwritten in the agent's flow ring of 64" in c.run("status").out


def test_up_of_a_running_cluster_keeps_its_sizes(small: Cluster) -> None:
    c = small
    same = c.run("up", "--nodes", "1", "--name", c.name, "--map-size",
                 f"nm_lb4_svc={SVC_MAP_SIZE}", check=False)
    assert same.code == 0 and "already up" in same.out, same
    other = c.run("up", "--nodes", "1", "--name", c.name, "--map-size", "nm_lb4_svc=16",
                  check=False)
    assert other.code == 2 and "--map-size" in other.err and "down --keep-state" in other.err
    with open(os.path.join(c.state_dir, "cluster.json")) as f:
        assert json.load(f)["maps"]["nm_lb4_svc"] == SVC_MAP_SIZE


def echo_pod(name: str, labels: dict[str, str]) -> dict:
    d = deployment(name, 1, labels)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": d["spec"]["template"]["spec"]}


def client_pod(name: str, app: str) -> dict:
    return {**CLIENT, "metadata": {"name": name, "labels": {"app": app}}}


def reach(c: Cluster, client: str, ip: str) -> bool:
    code = ("import socket,sys\ns=socket.socket(); s.settimeout(1.5)\n"
            "try:\n s.connect((sys.argv[1], 8080)); print('ok')\n"
            "except OSError as e: print('no', e)")
    return c.exec(client, sys.executable, "-c", code, ip, timeout=60).out.startswith("ok")


def test_a_pod_whose_policy_does_not_fit_keeps_its_previous_entries() -> None:
    """nm_policy holds 1 entry, the policy needs 1 per web pod: web-1 (first by age, then name)
    gets its entries; web-2 keeps its previous ones (none), but the ingress the new policy
    isolates is closed: it fails closed, never open. Reported with the map and its size."""
    c = new_cluster(1, "--mtls", "off", "--map-size", "nm_policy=1")
    try:
        c.apply([echo_pod("web-1", {"app": "web"}), echo_pod("web-2", {"app": "web"}),
                 client_pod("client", "client"), client_pod("intruder", "intruder")])
        c.wait_pods(count=4)
        ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in c.pods()}
        c.apply([{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "web"},
                  "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {
                               "app": "client"}}}], "ports": [{"port": 8080}]}]}}])
        c.wait_synced()
        st = c.agent("node1")["datapath"]
        assert [(r["map"], r["capacity"], r["needed"], r["objects"])
                for r in st["tablesFull"]] == [("nm_policy", 1, 2, ["default/web-2"])]
        assert "keeping its previous entries" in st["policyErrors"]["default/web-2"]
        assert reach(c, "client", ips["web-1"]) and not reach(c, "intruder", ips["web-1"])
        assert not reach(c, "client", ips["web-2"]) and not reach(c, "intruder", ips["web-2"])
        assert metric(metrics(c), "nodemesh_map_refused", map="nm_policy") == 1
        # web-1 goes: web-2's policy fits now
        c.run("delete", "pod", "web-1")
        wait_for("room", lambda: c.agent("node1")["datapath"]["tablesFull"] == [])
        assert reach(c, "client", ips["web-2"]) and not reach(c, "intruder", ips["web-2"])
        assert wait_for("MAP_ROOM", lambda: agent_events(c, "MAP_ROOM"))[-1]["map"] == "nm_policy"
    finally:
        c.down()
        left = c.leftovers()
        assert not left, f"cluster {c.name} left things behind: {left}"


@pytest.mark.parametrize(("option", "flag"), [
    ("--map-size", "nm_nope=5"), ("--map-size", "nm_lb4_svc=0"), ("--map-size", "nm_lb4_svc=abc"),
    ("--map-size", "nm_lb4_svc"), ("--map-size", "nm_events=5000"),
    ("--limit", "events_per_second=-1"), ("--limit", "nope=5"), ("--limit", "dns_burst")])
def test_a_bad_map_size_or_limit_is_refused_before_anything_is_created(option: str,
                                                                       flag: str) -> None:
    state = tempfile.mkdtemp(prefix="nodemesh-badmap-")
    try:
        p = subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", state, "up",
                            "--nodes", "1", "--name", "nmbadmap", option, flag],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, (p.stdout, p.stderr)
        assert option in p.stderr and flag.split("=")[0] in p.stderr
        assert os.listdir(state) == []
        assert not [n for n in os.listdir("/run/netns") if n.startswith("nmbadmap")] \
            if os.path.isdir("/run/netns") else True
    finally:
        os.rmdir(state)
