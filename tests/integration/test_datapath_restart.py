"""SIGKILL of the agents changes nothing in the kernel: connections survive, verdicts hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.clusterharness import Cluster

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

SERVER = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "server", "labels": {"app": "server"}},
          "spec": {"nodeName": "node2", "containers": [{
              "name": "echo", "image": "nodemesh/echo", "args": ["--tcp=9090"],
              "ports": [{"containerPort": 9090, "name": "tcp"}]}]}}


def client(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "debian",
                                                          "command": ["sleep", "infinity"]}]}}


POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "server-only-from-friend"},
          "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "friend"}}}],
                                "ports": [{"port": 9090}]}]}}

# In a pod: for `seconds`, either keep one connection busy (mode "long": a ping every 20 ms,
# any error or wrong echo counts) or open new connections back to back (mode "new"), each of
# which counts only when it echoes: with mutual TLS between nodes a client's connection is
# accepted by its node's Envoy at once, and one the destination refuses is closed right after.
LOAD = r"""
import json, socket, sys, time
ip, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + seconds; ok = bad = 0; errors = []
if mode == "long":
    s = socket.create_connection((ip, 9090), timeout=2)
    while time.monotonic() < end:
        try:
            s.sendall(b"ping"); got = s.recv(16)
            if got == b"ping": ok += 1
            else: bad += 1; errors.append(repr(got))
        except OSError as e:
            bad += 1; errors.append(str(e)); break
        time.sleep(0.02)
else:
    while time.monotonic() < end:
        try:
            # 1.5 s: a SYN the busy server's backlog dropped is retried after 1 s (that is TCP,
            # not the datapath); a denied connection never completes.
            c = socket.create_connection((ip, 9090), timeout=1.5)
            c.sendall(b"ping"); got = c.recv(16); c.close()
            if got == b"ping": ok += 1
            else: bad += 1; errors.append(repr(got)); time.sleep(0.05)
        except OSError as e:
            bad += 1; errors.append(str(e)); time.sleep(0.05)
print(json.dumps({"ok": ok, "bad": bad, "errors": errors[:5]}))
"""


def test_agent_sigkill_keeps_connections_and_verdicts(cluster: Cluster) -> None:
    cluster.apply([SERVER, client("friend"), client("stranger"), POLICY])
    cluster.wait_pods(count=3)
    cluster.wait_synced()
    ip = cluster.get("pod", "server")["status"]["podIP"]  # type: ignore[index]

    def load(pod: str, mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", cluster.state_dir,
                                 "exec", pod, "--", sys.executable, "-c", LOAD, ip, mode, "6"],
                                stdout=subprocess.PIPE, text=True)

    runs = {"long": load("friend", "long"), "friend-new": load("friend", "new"),
            "stranger-new": load("stranger", "new")}
    time.sleep(1.5)
    killed = []
    for node in ("node1", "node2"):
        with open(os.path.join(cluster.state_dir, "nodes", node, "agent.json")) as f:
            pid = json.load(f)["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    results = {k: json.loads(p.communicate(timeout=60)[0]) for k, p in runs.items()}
    # The agents came back (the daemon restarted them) and adopted the datapath.
    for node in ("node1", "node2"):
        with open(os.path.join(cluster.state_dir, "nodes", node, "agent.json")) as f:
            assert json.load(f)["pid"] not in killed
    assert results["long"]["bad"] == 0 and results["long"]["ok"] > 100, results["long"]
    assert results["friend-new"]["bad"] == 0 and results["friend-new"]["ok"] > 20, results
    assert results["stranger-new"]["ok"] == 0 and results["stranger-new"]["bad"] >= 3, results
    # And after the restart the verdicts are still the same.
    cluster.wait_synced()
    probe = ("import socket,sys\ntry:\n c=socket.create_connection((sys.argv[1],9090),timeout=1)\n"
             " c.sendall(b'ping')\n print('open' if c.recv(16)==b'ping' else 'closed')\n"
             "except OSError:\n print('closed')")
    assert cluster.exec("friend", sys.executable, "-c", probe, ip).out.strip() == "open"
    assert cluster.exec("stranger", sys.executable, "-c", probe, ip).out.strip() == "closed"
