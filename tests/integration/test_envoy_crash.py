"""A node Envoy killed with SIGKILL under load (issue 12, docs/reliability.md): the agent hears of
it at once (a pidfd), starts another and pushes it the configuration; L7 traffic is back within
a fraction of a second, an L7-policed destination is never reached without its policy while
Envoy is down (nothing fails open), and `nodemesh status` says what happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.clusterharness import Cluster
from tests.integration.test_routes import CLIENT, deployment, route, service

# Back within this much of the kill in the test (the measured figure is in docs/reliability.md;
# the bound leaves room for a loaded CI machine).
RECOVERY_BOUND_S = 1.5

POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "alpha-l7"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "alpha"}},
             "ingress": [{"fromEndpoints": [{"matchLabels": {}}],
                          "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                       "rules": {"http": [{"method": "GET",
                                                           "path": "/public/.*"}]}}]}]},
}

# In the client pod: a new connection per request, alternating a path the L7 policy allows and
# one it denies, for argv[1] seconds; every outcome with its CLOCK_MONOTONIC time.
LOAD = r"""
import http.client, json, sys, time
end = time.monotonic() + float(sys.argv[1]); out = []
i = 0
while time.monotonic() < end:
    path = "/public/x" if i % 2 == 0 else "/private"
    i += 1
    t = time.monotonic()
    try:
        c = http.client.HTTPConnection("alpha", 80, timeout=2)
        c.request("GET", path); r = c.getresponse(); r.read(); c.close()
        out.append([t, path, r.status])
    except Exception as e:
        out.append([t, path, type(e).__name__])
        time.sleep(0.005)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def policed(cluster: Cluster) -> Cluster:
    cluster.apply([deployment("alpha"), service("alpha"), CLIENT, POLICY,
                   route("alpha-route", "alpha", "PathPrefix", "/", "alpha"),
                   deployment("beta"), service("beta")])  # beta: L4 only, no route
    cluster.wait_pods(count=5)
    cluster.wait_synced()
    deadline = time.monotonic() + 20
    while _code(cluster, "/public/x") != "200" or _code(cluster, "/private") != "403":
        assert time.monotonic() < deadline, "the route and the L7 policy never took effect"
        time.sleep(0.2)
    return cluster


def _code(c: Cluster, path: str) -> str:
    return c.exec("client", "curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://alpha{path}", check=False).out


def test_envoy_sigkill_recovers_fast_and_never_fails_open(policed: Cluster) -> None:
    c = policed
    before = c.agent("node1")["proxy"]["envoy"]
    load = subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", c.state_dir,
                             "exec", "client", "--", sys.executable, "-c", LOAD, "6"],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(2.5)
    killed_at = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    out, _ = load.communicate(timeout=60)
    results = json.loads(out)
    after_kill = [r for r in results if r[0] >= killed_at]
    assert len(results) > 50 and after_kill, results[-5:]
    # nothing fails open: the denied path is never answered by the backend
    opened = [r for r in results if r[1] == "/private" and r[2] == 200]
    assert not opened, opened
    # before the kill every request had its answer; after it, failures only for a moment
    assert all(r[2] == (200 if r[1] == "/public/x" else 403)
               for r in results if r[0] < killed_at - 0.05), results[:20]
    failed = [r for r in after_kill if not isinstance(r[2], int) or r[2] >= 500]
    last_failure = max((r[0] for r in failed), default=killed_at)
    assert last_failure - killed_at < RECOVERY_BOUND_S, failed
    good_after = [r for r in after_kill if r[0] > last_failure]
    assert len(good_after) > 20 and all(r[2] in (200, 403) for r in good_after), good_after[:5]

    # L4 across nodes goes through the tunnel, which is the new Envoy too: its listeners are
    # in the socket lookup again (each beta pod by its address, those of node2 tunnelled)
    betas = c.pods(selector="app=beta")
    assert any(p["spec"]["nodeName"] == "node2" for p in betas), betas
    for p in betas:
        codes = []
        for _ in range(2):
            codes.append(c.exec("client", "curl", "-s", "-m", "3", "-o", "/dev/null", "-w",
                                "%{http_code}", f"http://{p['status']['podIP']}:8080/",
                                check=False).out)
            if codes[-1] == "200":
                break
        # Known (docs/reliability.md): in about 1 run in 5 the first such connection after the
        # restart timed out; a second one must work (a tunnel never refilled fails both).
        if codes[0] != "200":
            print(f"first connection to {p['spec']['nodeName']} after the restart: {codes}")
        assert codes[-1] == "200", (p["spec"]["nodeName"], codes)

    # the agent says what happened
    envoy = c.agent("node1")["proxy"]["envoy"]
    assert envoy["pid"] != before["pid"] and envoy["alive"]
    assert envoy["restarts"] == before.get("restarts", 0) + 1
    last = envoy["exits"][-1]
    assert last["pid"] == before["pid"] and last["how"] == "killed by SIGKILL", last
    assert last["downMs"] is not None and last["downMs"] < RECOVERY_BOUND_S * 1000, last
    status = c.run("status").out
    assert (f"restarted 1 time (last: pid {before['pid']} killed by SIGKILL at {last['at']}, "
            f"back after {last['downMs']:.0f} ms)") in status, status
    print(f"Envoy SIGKILL: {len(failed)} failed requests over "
          f"{(last_failure - killed_at) * 1000:.0f} ms; agent: back after {last['downMs']} ms")
