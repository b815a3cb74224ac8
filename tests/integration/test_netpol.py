"""The Kubernetes NetworkPolicy e2e model against the real kernel.

Namespaces x, y, z with pods a, b, c (on two nodes), every pod serving TCP and UDP on the ports
the cases probe. Each case of `tests/netpol_cases.py` (ported upstream cases and nodemesh's
CiliumNetworkPolicy cases) is applied through the CLI; then, from inside every pod, real sockets
probe every other pod, and the whole reachability matrix must match the case's truth table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml

from tests import netpol_cases as nc
from tests.integration.clusterharness import Cluster, new_cluster

ALL_PORTS = sorted({p for case in nc.CASES for p in case.server_ports})
PROBE_TIMEOUT = 1.0

# Runs inside a pod: probe every (key, ip, protocol, port) at once, print {key: reachable}.
PROBER = r"""
import json, socket, sys, threading
targets = json.loads(sys.argv[1]); timeout = float(sys.argv[2]); out = {}
def probe(key, ip, proto, port):
    try:
        if proto == "TCP":
            # Reachable means answered: with mutual TLS between nodes, a connection is accepted
            # by the client's node Envoy at once, and closed if the destination refuses it.
            c = socket.create_connection((ip, port), timeout=timeout); c.settimeout(timeout)
            c.sendall(b"hostname"); out[key] = bool(c.recv(256)); c.close()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
            s.sendto(b"hostname", (ip, port)); s.recvfrom(256); s.close()
            out[key] = True
    except OSError:
        out[key] = False
ts = [threading.Thread(target=probe, args=t) for t in targets]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(out))
"""


def model_pod(pod: str, labels: dict[str, str]) -> dict:
    """One echo process serving every probed port; the named ports are the model's."""
    ns, name = pod.split("/")
    args = [f"--{proto.lower()}={p}" for p in ALL_PORTS for proto in nc.SERVER_PROTOCOLS]
    ports = [{"containerPort": p, "protocol": proto, "name": nc.port_name(p, proto)}
             for p in ALL_PORTS for proto in nc.SERVER_PROTOCOLS]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "serve", "image": "nodemesh/echo", "args": args,
                                     "ports": ports}]}}


class Model:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.ips: dict[str, str] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.ns_labels: dict[str, dict[str, str]] = {}
        # The policies this model may have in the store (recorded before they are applied): a
        # reset deletes them in one `delete -f -` instead of listing every namespace and kind.
        self.applied: dict[tuple[str, str, str], dict] = {}

    def setup(self) -> None:
        self.c.apply([nc.namespace_object(ns) for ns in nc.NAMESPACES])
        self.c.apply([model_pod(p, nc.pod_labels(p)) for p in nc.PODS])
        for ns in nc.NAMESPACES:
            for p in self.c.wait_pods(namespace=ns, count=3, timeout=90):
                self.ips[f"{ns}/{p['metadata']['name']}"] = p["status"]["podIP"]
        self.labels = {p: nc.pod_labels(p) for p in nc.PODS}
        self.ns_labels = {ns: nc.namespace_labels(ns) for ns in nc.NAMESPACES}
        self.c.wait_synced()

    def reset(self) -> None:
        """Back to the model's start: no policies, original labels."""
        self.delete(list(self.applied))
        self.sync_labels(nc.State())

    def apply(self, policies: list[dict]) -> None:
        for p in policies:
            self.applied[nc.policy_key(p)] = p
        self.c.apply(policies)

    def delete(self, keys: list[tuple[str, str, str]]) -> None:
        """Delete these policies in one CLI call (those already gone are fine)."""
        if keys:
            self.c.run("delete", "-f", "-", "--ignore-not-found",
                       input=yaml.safe_dump_all([self.applied[k] for k in keys]))
            for k in keys:
                self.applied.pop(k, None)

    def sync_labels(self, state: nc.State) -> None:
        ns_changed = [ns for ns in nc.NAMESPACES if state.namespaces[ns] != self.ns_labels[ns]]
        if ns_changed:
            self.c.apply([state.namespace_object(ns) for ns in ns_changed])
            self.ns_labels.update({ns: dict(state.namespaces[ns]) for ns in ns_changed})
        pods_changed = [p for p in nc.PODS if state.pods[p] != self.labels[p]]
        if pods_changed:
            self.c.apply([model_pod(p, dict(state.pods[p])) for p in pods_changed])
            self.labels.update({p: dict(state.pods[p]) for p in pods_changed})

    def probe(self, probes: tuple[nc.Probe, ...]) -> dict[tuple[int, str, str], bool]:
        """From every pod at once: each probe to every other pod."""
        procs = {}
        for src in nc.PODS:
            targets = [[f"{i}|{dst}", self.ips[dst], pr.protocol, pr.port]
                       for i, pr in enumerate(probes) for dst in nc.PODS if dst != src]
            ns, name = src.split("/")
            procs[src] = subprocess.Popen(
                [sys.executable, "-m", "nodemesh", "--state-dir", self.c.state_dir, "exec", "-n", ns,
                 name, "--", sys.executable, "-c", PROBER, json.dumps(targets), str(PROBE_TIMEOUT)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen: dict[tuple[int, str, str], bool] = {}
        for src, p in procs.items():
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, f"prober in {src} failed: {err}"
            for key, ok in json.loads(out).items():
                i, dst = key.split("|")
                seen[(int(i), src, dst)] = ok
        return seen


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    c = new_cluster(nodes=2)
    try:
        m = Model(c)
        m.setup()
        yield m
    finally:
        c.down()
        assert not c.leftovers()


@pytest.mark.root
def test_model_spans_both_nodes(model: Model) -> None:
    nodes = {p["spec"]["nodeName"] for ns in nc.NAMESPACES for p in model.c.pods(ns)}
    assert nodes == {"node1", "node2"}


def test_case_counts() -> None:
    assert len(nc.NETPOL_CASES) >= 20
    assert len(nc.CILIUM_CASES) >= 8


@pytest.mark.root
@pytest.mark.parametrize("case", nc.CASES, ids=[c.name for c in nc.CASES])
def test_reachability_matrix(model: Model, case: nc.Case) -> None:
    model.reset()
    state = nc.State(server_ports=case.server_ports)
    for step in case.steps:
        before = dict(state.policies)
        state.run(step, model.ips)
        model.delete([k for k in model.applied if k not in state.policies])
        changed = [p for k, p in state.policies.items() if before.get(k) != p]
        model.sync_labels(state)
        if changed:
            model.apply(changed)
        took = model.c.wait_synced()
        assert took < 1.0, f"policy took {took:.2f}s to reach the datapath"
        time.sleep(0.05)
        seen = model.probe(step.probes)
        failures = []
        for i, pr in enumerate(step.probes):
            observed = {(s, d): seen[(i, s, d)] for s, d in pr.expected.pairs()}
            wrong = [(s, d) for (s, d), ok in observed.items() if ok != pr.expected.expected(s, d)]
            if wrong:
                failures.append(f"{pr.protocol}/{pr.port} after {step.description!r}: "
                                f"{len(wrong)} wrong pairs, e.g. {wrong[:4]}\n"
                                f"expected (! = observed differs):\n{pr.expected.table(observed)}")
        assert not failures, f"case {case.name}:\n" + "\n".join(failures)
