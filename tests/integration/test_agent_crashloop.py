"""Agent crash loops (issue 12, docs/reliability.md "Agent crash loops"): both nodes' agents are
SIGKILLed every 2 s for a minute while L4 and L7 traffic runs and policies and routes change in
between. Nothing fails, nothing denied gets through, and at the end every node's maps and its
Envoy's configuration are exactly what a fresh agent programs (the last, unhurried restart)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from nodemesh.host.procs import ProcRef
from nodemesh.store import open_store
from tests.integration.clusterharness import Cluster
from tests.integration.test_datapath_restart import LOAD as L4_LOAD
from tests.integration.test_datapath_restart import POLICY as SERVER_POLICY  # only app=friend
from tests.integration.test_datapath_restart import SERVER, client
from tests.integration.test_envoy_crash import POLICY as L7_POLICY  # GET /public/.* on alpha
from tests.integration.test_routes import CLIENT, deployment, route, service

# real clusters; serial: its figures (rates, recovery times, load it must carry) need the CPUs
# to itself, so `make test` runs it after the parallel part, alone
pytestmark = [pytest.mark.root, pytest.mark.serial]

LOOP_SECONDS = 60.0
KILL_EVERY = 2.0

# What changes during the loop: a policy on a bystander (applied and deleted in turn) and the
# route's response header (a new value every time); neither changes the load's answers.
BYSTANDER = {**SERVER, "metadata": {"name": "bystander", "labels": {"app": "bystander"}}}
BYSTANDER_POLICY = {
    **SERVER_POLICY, "metadata": {"name": "bystander-only-from-friend"},
    "spec": {**SERVER_POLICY["spec"], "podSelector": {"matchLabels": {"app": "bystander"}}}}

# In the client pod: a new connection per request to alpha's ClusterIP, alternating an allowed
# path and a denied one; counts by outcome. (Name lookups are measured apart: DNS_LOAD.)
L7_LOAD = r"""
import http.client, json, sys, time
end = time.monotonic() + float(sys.argv[2]); ok = denied = 0; bad = []; opened = []
i = 0
while time.monotonic() < end:
    path = "/public/x" if i % 2 == 0 else "/private"
    i += 1
    try:
        c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
        c.request("GET", path, headers={"Host": "alpha"}); r = c.getresponse(); r.read()
        c.close()
        if path == "/private" and r.status == 200: opened.append(path)
        elif r.status == (200 if path == "/public/x" else 403):
            ok += path == "/public/x"; denied += path == "/private"
        else: bad.append([time.monotonic(), path, r.status])
    except Exception as e:
        bad.append([time.monotonic(), path, repr(e)])
    time.sleep(0.01)
print(json.dumps({"ok": ok, "denied": denied, "bad": bad[:10], "nbad": len(bad),
                  "opened": opened}))
"""

# In a pod: look the service up by name every 50 ms (the node-local DNS, which the cluster
# daemon serves: no agent is in the way).
DNS_LOAD = r"""
import json, socket, sys, time
end = time.monotonic() + float(sys.argv[1]); ok = 0; bad = []; slow = 0
while time.monotonic() < end:
    t = time.monotonic()
    try:
        socket.getaddrinfo("alpha", 80, socket.AF_INET, socket.SOCK_STREAM); ok += 1
        slow += time.monotonic() - t > 1.0
    except OSError as e:
        bad.append(repr(e))
    time.sleep(0.05)
print(json.dumps({"ok": ok, "bad": bad[:5], "nbad": len(bad), "slow": slow}))
"""

# The maps whose content the agent decides (not conntrack, counters, events or affinity).
PROGRAMMED_MAPS = ("nm_config", "nm_endpoints", "nm_lxc", "nm_netns", "nm_ipcache", "nm_policy",
                   "nm_policy_cidr", "nm_lb4_svc", "nm_lb4_be", "nm_lb4_revnat", "nm_lb4_maglev",
                   "nm_l7_redir", "nm_tunnel_port")


def _agent_ref(c: Cluster, node: str) -> ProcRef | None:
    try:
        with open(os.path.join(c.state_dir, "nodes", node, "agent.json")) as f:
            return ProcRef.from_json(json.load(f))
    except (OSError, ValueError):
        return None


def _kill_agents(c: Cluster) -> int:
    killed = 0
    for node in ("node1", "node2"):
        ref = _agent_ref(c, node)
        if ref is not None and ref.signal(signal.SIGKILL):
            killed += 1
    return killed


def _maps(c: Cluster, node: str) -> dict[str, list]:
    out = {}
    for name in PROGRAMMED_MAPS:
        path = os.path.join(c.state_dir, "bpf", node, name)
        r = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", path],
                           capture_output=True, text=True, check=True)
        entries = json.loads(r.stdout)
        out[name] = sorted((json.dumps(e.get("key")), json.dumps(e.get("value")))
                           for e in entries)
    return out


def _strip(obj: object) -> object:
    """Envoy's config dump without what differs between two pushes of the same configuration."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if k not in ("version_info", "last_updated", "version")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _envoy(c: Cluster, node: str) -> dict:
    dump = json.loads(c.run("proxy", "config", "--node", node).out)["config"]
    keep = {}
    for section in dump.get("configs", []):
        kind = section.get("@type", "").rsplit(".", 1)[-1]
        if kind in ("ListenersConfigDump", "ClustersConfigDump", "RoutesConfigDump"):
            keep[kind] = _strip({k: v for k, v in section.items() if k.startswith("dynamic")})
        elif kind == "SecretsConfigDump":  # certificates are renewed: their names must match
            keep[kind] = sorted(s.get("name", "") for s in section.get("dynamic_active_secrets", []))
    for value in keep.values():
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, list):
                    value[k] = sorted(v, key=lambda x: json.dumps(x, sort_keys=True))
    return keep


def _programmed(c: Cluster) -> dict:
    return {node: {"maps": _maps(c, node), "envoy": _envoy(c, node)}
            for node in ("node1", "node2")}


def _wait_everything_synced(c: Cluster, timeout: float = 30.0) -> None:
    """The datapath and the node Envoy of both nodes at the store's revision."""
    target = open_store(c.state_dir).revision()
    deadline = time.monotonic() + timeout
    for node in ("node1", "node2"):
        while True:
            try:
                st = c.agent(node)
                if st["datapath"]["syncedRevision"] >= target \
                        and st["proxy"]["syncedRevision"] >= target:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, f"{node} never synced revision {target}"
            time.sleep(0.1)


def _header(c: Cluster, pod: str) -> str | None:
    r = c.exec(pod, "curl", "-s", "-m", "3", "-D", "-", "-o", "/dev/null",
               "http://alpha/public/h", check=False)
    for line in r.out.splitlines():
        if line.lower().startswith("x-route:"):
            return line.split(":", 1)[1].strip()
    return None


PROBE = ("import socket,sys\ntry:\n c=socket.create_connection((sys.argv[1],9090),timeout=1)\n"
         " c.sendall(b'ping')\n print('open' if c.recv(16)==b'ping' else 'closed')\n"
         "except OSError:\n print('closed')")


def test_agents_killed_every_two_seconds_lose_nothing(cluster: Cluster) -> None:
    c = cluster
    client2 = {**CLIENT, "metadata": {"name": "client2"},
               "spec": {**CLIENT["spec"], "nodeName": "node2"}}
    c.apply([SERVER, BYSTANDER, client("friend"), client("stranger"), SERVER_POLICY,
             deployment("alpha"), service("alpha"), CLIENT, client2, L7_POLICY,
             route("alpha-route", "alpha", "PathPrefix", "/", "gen-0")])
    c.wait_pods(count=8)
    _wait_everything_synced(c)
    deadline = time.monotonic() + 20
    while _header(c, "client") != "gen-0":
        assert time.monotonic() < deadline, "the route never took effect"
        time.sleep(0.2)
    ip = c.get("pod", "server")["status"]["podIP"]  # type: ignore[index]
    vip = c.get("service", "alpha")["spec"]["clusterIP"]  # type: ignore[index]
    bystander_ip = c.get("pod", "bystander")["status"]["podIP"]  # type: ignore[index]

    def load(pod: str, script: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", c.state_dir,
                                 "exec", pod, "--", sys.executable, "-c", script, *args],
                                stdout=subprocess.PIPE, text=True)

    seconds = str(LOOP_SECONDS + 4)
    runs = {"long": load("friend", L4_LOAD, ip, "long", seconds),
            "friend-new": load("friend", L4_LOAD, ip, "new", seconds),
            "stranger-new": load("stranger", L4_LOAD, ip, "new", seconds),
            "l7": load("client", L7_LOAD, vip, seconds), "dns": load("client2", DNS_LOAD, seconds)}
    time.sleep(2)
    stop = threading.Event()
    changes = [0]

    def change() -> None:
        # changes while the agents die and start again: a route and a policy, in turn
        i = 0
        while not stop.is_set():
            i += 1
            c.apply([route("alpha-route", "alpha", "PathPrefix", "/", f"gen-{i}")])
            if i % 2:
                c.apply([BYSTANDER_POLICY])
            else:
                c.run("delete", "networkpolicy", "bystander-only-from-friend")
            changes[0] = i
            time.sleep(0.5)

    changer = threading.Thread(target=change)
    changer.start()
    kills = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < LOOP_SECONDS:
        kills += _kill_agents(c)  # (an agent the daemon has not started again is not killed)
        time.sleep(KILL_EVERY)
    stop.set()
    changer.join()
    # the last state: the policy on the bystander in place, the route at its last value
    c.apply([BYSTANDER_POLICY])
    final_header = f"gen-{changes[0]}"
    results = {k: json.loads(p.communicate(timeout=120)[0]) for k, p in runs.items()}
    print(f"crash loop: {kills} agent kills, {changes[0] * 2} changes; "
          f"load: {json.dumps(results)}")
    # An agent killed before it was ready is started again only after a back-off (the daemon's
    # crash-loop rule), so fewer than 60 kills land in the minute; each of them is a real one.
    assert kills >= 20 and changes[0] >= 10, (kills, changes)

    # nothing failed, nothing denied got through
    assert results["long"]["bad"] == 0 and results["long"]["ok"] > 1000, results["long"]
    assert results["friend-new"]["bad"] == 0 and results["friend-new"]["ok"] > 200, results
    assert results["stranger-new"]["ok"] == 0, results["stranger-new"]
    l7 = results["l7"]
    assert l7["opened"] == [], l7
    assert l7["nbad"] == 0 and l7["ok"] > 100 and l7["denied"] > 100, l7
    # Name lookups do not depend on an agent: none fails, none waits a resolver timeout.
    dns = results["dns"]
    assert dns["nbad"] == 0 and dns["slow"] == 0 and dns["ok"] > 100, dns

    # the last changes took effect on every node, quickly
    _wait_everything_synced(c)
    for pod in ("client", "client2"):
        deadline = time.monotonic() + 5
        while _header(c, pod) != final_header:
            assert time.monotonic() < deadline, f"{pod}: route never at {final_header}"
            time.sleep(0.1)
    assert c.exec("friend", sys.executable, "-c", PROBE, bystander_ip).out.strip() == "open"
    assert c.exec("stranger", sys.executable, "-c", PROBE, bystander_ip).out.strip() == "closed"
    assert c.exec("stranger", sys.executable, "-c", PROBE, ip).out.strip() == "closed"

    # and what is programmed is what a fresh agent programs: one more restart, unhurried
    time.sleep(1.5)  # the agents' periodic work (certificates, status) settles
    crashed = _programmed(c)
    before = {n: _agent_ref(c, n) for n in ("node1", "node2")}
    assert _kill_agents(c) == 2
    deadline = time.monotonic() + 30
    while any(_agent_ref(c, n) in (None, before[n]) for n in before):
        assert time.monotonic() < deadline, "the agents did not come back"
        time.sleep(0.1)
    _wait_everything_synced(c)
    time.sleep(1.5)
    fresh = _programmed(c)
    for node in ("node1", "node2"):
        for name in PROGRAMMED_MAPS:
            assert crashed[node]["maps"][name] == fresh[node]["maps"][name], (node, name)
        assert crashed[node]["envoy"] == fresh[node]["envoy"], node
