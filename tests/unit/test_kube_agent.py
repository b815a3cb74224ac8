"""`nodemesh agent --kubernetes`: its configuration from the Node and the ConfigMap, its errors,
and its probes. (The agent's run against a real API server is not tested here: none can be
installed on these machines; docs/kubernetes.md says what was and was not run.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodemesh.agent.api import ApiError, ApiServer
from nodemesh.agent.kubernetes import cluster_config, node_config, open_kubernetes
from nodemesh.agent.probe import agent_socket, probe
from nodemesh.errors import NodemeshError
from nodemesh.store.kubernetes import AGENT_KINDS
from tests.unit.kubereplay import DATA, KUBECONFIG, Replay

NODE = json.loads((DATA / "node_get.json").read_text())["exchanges"][0]["response"]["body"]
SETTINGS = {"name": "prod", "extra": {"proxy": False, "mtls": "off"}, "maps": {"nm_ct": 131072}}
ROOT = Path(__file__).resolve().parents[2]


def test_node_config_from_the_node_object() -> None:
    n = node_config(NODE)
    assert (n.name, n.ip, n.pod_cidr) == ("node1", "192.0.2.11", "10.244.1.0/24")
    cfg = cluster_config(SETTINGS, NODE, "/var/run/nodemesh")
    assert cfg.node("node1") == n and cfg.name == "prod"
    assert cfg.map_sizes["nm_ct"] == 131072 and not cfg.mtls
    assert cfg.agent_socket("node1") == agent_socket("/var/run/nodemesh", "node1")


def test_bad_node_or_settings_name_the_field() -> None:
    no_cidr = {**NODE, "spec": {}}
    with pytest.raises(NodemeshError, match=r"Node node1: spec.podCIDR: not set"):
        node_config(no_cidr)
    with pytest.raises(NodemeshError, match=r"Node node1: status.addresses: no IPv4 InternalIP"):
        node_config({**NODE, "status": {"addresses": [{"type": "Hostname", "address": "n"}]}})
    with pytest.raises(NodemeshError, match=r"cluster.json: nodes: unknown setting"):
        cluster_config({**SETTINGS, "nodes": []}, NODE, "/s")
    with pytest.raises(NodemeshError, match=r"cluster.json: extra: want a JSON dict"):
        cluster_config({"extra": []}, NODE, "/s")


def _files(tmp_path: Path) -> tuple[str, str]:
    kc, settings = tmp_path / "kubeconfig", tmp_path / "cluster.json"
    kc.write_text(KUBECONFIG)
    settings.write_text(json.dumps(SETTINGS))
    return str(kc), str(settings)


def test_open_kubernetes_reads_the_node_then_follows_the_agents_kinds(tmp_path: Path) -> None:
    kc, settings = _files(tmp_path)
    replay = Replay("node_get")
    cfg, store = open_kubernetes("node1", settings, str(tmp_path), kc, pods="node",
                                 transport=replay.transport())
    try:
        assert cfg.node("node1").ip == "192.0.2.11"
        assert store.kinds == AGENT_KINDS
        assert store.field_selectors == {"Pod": "spec.nodeName=node1"}
        assert replay.remaining() == [] and replay.unexpected == []
    finally:
        replay.done.set()
        store.close()


def test_open_kubernetes_refuses_an_unknown_node(tmp_path: Path) -> None:
    kc, settings = _files(tmp_path)
    replay = Replay("node_missing")
    with pytest.raises(NodemeshError, match=r"Node node9: not found in the cluster") as e:
        open_kubernetes("node9", settings, str(tmp_path), kc, transport=replay.transport())
    assert e.value.exit_code == 2


def test_cli_kubernetes_agent_with_a_missing_kubeconfig_exits_2(tmp_path: Path) -> None:
    _, settings = _files(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    r = subprocess.run([sys.executable, "-m", "nodemesh", "agent", "--kubernetes", "--node",
                        "node1", "--config", settings, "--kubeconfig", str(tmp_path / "nope"),
                        "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, env=env, timeout=60)
    if os.geteuid() != 0:
        pytest.skip("nodemesh agent refuses to run without root before it reads anything")
    assert r.returncode == 2, r.stderr
    assert f"kubernetes: can not use {tmp_path / 'nope'}" in r.stderr
    assert not (tmp_path / "state").exists()  # nothing was created


def test_probe_asks_the_agent_on_its_socket(tmp_path: Path) -> None:
    sock = agent_socket(str(tmp_path), "node1")
    os.makedirs(os.path.dirname(sock))
    stopping = {"yes": False}

    async def healthz(q, body):
        return {"ok": True}

    async def status(q, body):
        if stopping["yes"]:
            raise ApiError(503, "agent is stopping")
        return {"node": "node1"}

    async def main() -> None:
        api = ApiServer(sock)
        api.route("GET", "/healthz", healthz)
        api.route("GET", "/status", status)
        await api.start()
        try:
            assert await asyncio.to_thread(probe, str(tmp_path), "node1", "live") is None
            assert await asyncio.to_thread(probe, str(tmp_path), "node1", "ready") is None
            # As the DaemonSet's exec probe runs it: the node and state dir from the env.
            env = {**os.environ, "PYTHONPATH": str(ROOT), "NODE_NAME": "node1",
                   "NODEMESH_STATE_DIR": str(tmp_path)}
            cmd = [sys.executable, "-m", "nodemesh.agent.probe", "ready"]
            ok = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True,
                                         text=True, timeout=30)
            assert ok.returncode == 0, ok.stderr
            stopping["yes"] = True
            why = await asyncio.to_thread(probe, str(tmp_path), "node1", "ready")
            assert why is not None and "stopping" in why
            bad = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True,
                                          text=True, timeout=30)
            assert bad.returncode == 1 and "probe ready: " in bad.stderr and "stopping" in bad.stderr
        finally:
            api.close()

    asyncio.run(main())
    why = probe(str(tmp_path), "node1", "live")
    assert why is not None and "not running" in why


def test_agent_in_kubernetes_mode_runs_no_pods_and_leaves_the_node_to_the_kubelet(
        tmp_path: Path) -> None:
    from nodemesh.agent.main import Agent, NoPods
    from nodemesh.store.kubernetes import KubeStore, connect

    kc, _ = _files(tmp_path)
    replay = Replay("node_get")
    store = KubeStore(connect(kc, transport=replay.transport()), kinds=())
    cfg = cluster_config({"extra": {"datapath": "none"}}, NODE, str(tmp_path))
    try:
        agent = Agent(cfg, "node1", store=store, kubernetes=True)
        assert isinstance(agent.pods, NoPods) and agent.store is store
        agent._heartbeat()
        assert replay.requests == []  # no Node read or write every 5 s from every node
    finally:
        replay.done.set()
        store.close()


def test_node_addresses_from_the_nodes() -> None:
    from nodemesh.agent.kubernetes import node_addresses

    other = {"metadata": {"name": "node2"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "fd00::2"}, {"type": "InternalIP", "address": "192.0.2.12"}]}}
    bare = {"metadata": {"name": "node3"}, "status": {}}
    assert node_addresses([NODE, other, bare]) == {"node1": "192.0.2.11", "node2": "192.0.2.12"}


def test_reconciler_in_kubernetes_mode_knows_every_node_and_wakes_on_nodes() -> None:
    from types import SimpleNamespace

    from nodemesh.agent.reconcile import NodeReconciler
    from nodemesh.store.informer import SyncedRevision

    other = {"metadata": {"name": "node2"},
             "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.12"}]}}
    informer = SimpleNamespace(list=lambda kind: [NODE, other] if kind == "Node" else [],
                               revision=7)
    datapath = SimpleNamespace(synced=SyncedRevision())
    cfg = cluster_config(SETTINGS, NODE, "/var/run/nodemesh")
    rec = NodeReconciler(cfg, "node1", None, informer, datapath)  # type: ignore[arg-type]
    assert rec._node_ips() == {"node1": "192.0.2.11", "node2": "192.0.2.12"}
    rec._on_store_change({"Node"})
    assert rec._dirty.is_set()


def test_host_network_pods_are_the_node_not_endpoints() -> None:
    """On Kubernetes, hostNetwork pods (kube-proxy, the agent itself) carry the node's address:
    they get no pod identity, so the node's ipcache entry stays the node's."""
    from nodemesh.datapath import layout as L
    from nodemesh.node.snapshot import NodeInputs, ipcache_entries, pods_with_address

    def pod(name: str, ip: str, host: bool) -> dict:
        return {"kind": "Pod", "metadata": {"name": name, "namespace": "kube-system",
                                            "uid": f"uid-{name}", "labels": {"app": name}},
                "spec": {"nodeName": "node1", "hostNetwork": host, "containers": []},
                "status": {"podIP": ip}}

    inp = NodeInputs(node="node1", node_ip="192.0.2.11", node_ips={"node1": "192.0.2.11"},
                     objects={"Pod": [pod("kube-proxy", "192.0.2.11", True),
                                      pod("dns", "10.244.1.5", False)]}, proxy=False)
    pods = pods_with_address(inp)
    assert set(pods) == {"uid-dns"}
    entries = ipcache_entries("node1", "192.0.2.11", inp.node_ips, pods, {"uid-dns": 300}, {})
    by = {(L.ip4_str(k.addr), k.prefixlen): v.identity for k, v in entries}
    assert by[("192.0.2.11", 32)] == L.Identity.HOST


def test_a_finished_pods_address_goes_to_the_next_pod() -> None:
    from nodemesh.node.snapshot import Endpoint, NodeInputs, pods_with_address

    def pod(name: str, node: str, phase: str) -> dict:
        return {"kind": "Pod", "metadata": {"name": name, "namespace": "prod", "uid": f"uid-{name}"},
                "spec": {"nodeName": node, "containers": []},
                "status": {"phase": phase, "podIP": "10.244.2.7"}}

    objs = {"Pod": [pod("job-1", "node2", "Succeeded"), pod("web", "node2", "Running"),
                    pod("local-done", "node1", "Failed")]}
    inp = NodeInputs(node="node1", node_ip="192.0.2.11", node_ips={}, objects=objs, proxy=False,
                     attached={"uid-local-done": Endpoint("uid-local-done", "prod", "local-done",
                                                          "10.244.1.9", 7)})
    got = {uid: ip for uid, (_, ip) in pods_with_address(inp).items()}
    # The local cluster keeps a finished pod's veth: it stays while attached.
    assert got == {"uid-web": "10.244.2.7", "uid-local-done": "10.244.1.9"}


def test_agent_in_kubernetes_mode_follows_the_api_and_answers_its_probes(tmp_path: Path) -> None:
    """The agent's run in Kubernetes mode, without the datapath (that needs root and a node):
    it follows the recorded API, serves no DNS, answers its probes, and stops on request."""
    from nodemesh.agent.main import Agent
    from nodemesh.store.kubernetes import KubeStore, connect

    kc, _ = _files(tmp_path)
    replay = Replay("agent_start")
    store = KubeStore(connect(kc, transport=replay.transport()), kinds=("Pod",),
                      field_selectors={"Pod": "spec.nodeName=node1"})
    cfg = cluster_config({"extra": {"datapath": "none"}}, NODE, str(tmp_path))
    os.makedirs(cfg.node_dir("node1"))
    agent = Agent(cfg, "node1", store=store, kubernetes=True)

    async def main() -> dict:
        run = asyncio.create_task(agent.run())
        try:
            for _ in range(200):
                if await asyncio.to_thread(probe, str(tmp_path), "node1", "ready") is None:
                    break
                await asyncio.sleep(0.05)
            from nodemesh.cluster.agentclient import AgentClient

            st = await asyncio.to_thread(
                AgentClient(cfg.agent_socket("node1"), "node1").get, "/status")
            assert agent.informer.get("Pod", "prod", "web-1") is not None
            return st
        finally:
            agent._request_stop()
            await asyncio.wait_for(run, 10)

    try:
        st = asyncio.run(main())
    finally:
        replay.done.set()
        store.close()
    assert st["node"] == "node1" and st["podCIDR"] == "10.244.1.0/24" and st["pods"] == 0
    assert st["storeRevision"] == 1  # one event: the listed pod
    assert not hasattr(agent, "dns")  # no DNS server on the node (the cluster daemon's is not
    assert st["dns"] == {"servedBy": "the cluster's DNS (Kubernetes mode)"}  # there either)
    assert replay.unexpected == []


def test_proxy_external_mode_writes_the_bootstrap_and_starts_no_envoy(tmp_path: Path,
                                                                      caplog) -> None:
    """"proxy": "external": the agent writes the node Envoy's bootstrap and waits for the Envoy
    the nodemesh-envoy DaemonSet starts from it (tests/integration/test_proxy_external.py runs
    that half with a real Envoy); it never starts one, and refuses a planned restart."""
    from nodemesh.agent.proxy import ProxyManager
    from nodemesh.observe.ring import FlowRing
    from nodemesh.proxy.external import BOOTSTRAP

    cfg = cluster_config({"extra": {"proxy": "external", "mtls": "off"}}, NODE, str(tmp_path))
    pm = ProxyManager(cfg, "node1", None, FlowRing(16))  # type: ignore[arg-type]
    assert pm.external
    with caplog.at_level("WARNING", logger="nodemesh.proxy"):
        pm._ensure_envoy()
        pm._ensure_envoy()
    assert pm.envoy is None
    written = json.loads((Path(pm.envoy_dir) / BOOTSTRAP).read_text())
    assert written["node"]["id"] == "node1"
    assert written["admin"]["address"]["pipe"]["path"] == os.path.join(pm.envoy_dir, "admin.sock")
    ep = written["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    assert ep["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"] == pm.socket
    assert caplog.text.count("waiting for the node Envoy (nodemesh-envoy)") == 1
    assert not os.path.exists(os.path.join(pm.envoy_dir, "envoy.json"))  # nothing started
    with pytest.raises(NodemeshError, match="not the agent's to restart"):
        asyncio.run(pm.restart_envoy())


@pytest.mark.parametrize(("args", "message"), [
    ([], "nodemesh agent: --node is required (without --kubernetes)"),
    (["--kubernetes", "--node", "node1", "--config", "/nonexistent/cluster.json"],
     "/nonexistent/cluster.json: can not read the cluster's settings"),
])
def test_cli_agent_argument_errors(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "nodemesh", "agent", *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    if os.geteuid() != 0 and args:
        pytest.skip("nodemesh agent --kubernetes refuses to run without root first")
    assert r.returncode == 2 and message in r.stderr, r.stderr
