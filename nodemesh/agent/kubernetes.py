"""`nodemesh agent --kubernetes`: the agent on a Kubernetes node (docs/kubernetes.md).

The differences from the local cluster's agent: the store is the API server
(`nodemesh.store.kubernetes.KubeStore`, in-cluster service account or ``--kubeconfig``); the node
is the host (no network namespace to enter); the node's pod CIDR and address come from its Node
object; cluster-wide settings come from the ``cluster.json`` the ConfigMap mounts; and the agent
runs no pods (the kubelet does): the pods' sandboxes reach it through nodemesh-cni.
"""

from __future__ import annotations

import logging
import os

from nodemesh.cluster.config import SERVICE_CIDR, ClusterConfig, NodeConfig
from nodemesh.errors import NodemeshError

log = logging.getLogger("nodemesh.agent")

SETTINGS_KEYS = {"name", "service_cidr", "extra", "maps"}


def _internal_ipv4(node: dict) -> list[str]:
    return [a.get("address") for a in (node.get("status") or {}).get("addresses") or []
            if a.get("type") == "InternalIP" and ":" not in (a.get("address") or ":")]


def node_addresses(nodes: list[dict]) -> dict[str, str]:
    """Every Node's IPv4 InternalIP by name (the ipcache's remote-node entries and the hosts of
    remote pods); a Node without one is left out."""
    out = {}
    for n in nodes:
        ips = _internal_ipv4(n)
        if ips:
            out[n["metadata"]["name"]] = ips[0]
    return out


def node_config(node: dict) -> NodeConfig:
    """The agent's node from its Node object: spec.podCIDR and the InternalIP address."""
    name = (node.get("metadata") or {}).get("name") or ""
    cidr = (node.get("spec") or {}).get("podCIDR")
    if not cidr:
        raise NodemeshError(f"Node {name}: spec.podCIDR: not set (nodemesh needs the "
                            "controller manager's --allocate-node-cidrs, or a CIDR per node)", 2)
    ips = _internal_ipv4(node)
    if not ips:
        raise NodemeshError(f"Node {name}: status.addresses: no IPv4 InternalIP", 2)
    return NodeConfig(name=name, index=1, ip=ips[0], pod_cidr=cidr)


def cluster_config(settings: dict, node: dict, state_dir: str) -> ClusterConfig:
    """The ClusterConfig of one node's agent: the ConfigMap's settings and the Node."""
    if not isinstance(settings, dict):
        raise NodemeshError("cluster.json: want a JSON object of settings", 2)
    unknown = sorted(set(settings) - SETTINGS_KEYS)
    if unknown:
        raise NodemeshError(f"cluster.json: {unknown[0]}: unknown setting in Kubernetes mode "
                            f"(known: {', '.join(sorted(SETTINGS_KEYS))})", 2)
    for key, typ in (("extra", dict), ("maps", dict), ("name", str), ("service_cidr", str)):
        if key in settings and not isinstance(settings[key], typ):
            raise NodemeshError(f"cluster.json: {key}: want a JSON {typ.__name__}", 2)
    return ClusterConfig(name=settings.get("name", "nodemesh"), state_dir=state_dir,
                         nodes=(node_config(node),),
                         service_cidr=settings.get("service_cidr", SERVICE_CIDR),
                         extra=dict(settings.get("extra") or {}),
                         store={"type": "kubernetes"}, maps=dict(settings.get("maps") or {}))


def load_settings(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise NodemeshError(f"{path}: can not read the cluster's settings: {e}", 2) from e


def open_kubernetes(node: str, config_path: str, state_dir: str, kubeconfig: str | None = None,
                    pods: str = "all", transport=None):
    """(ClusterConfig, KubeStore) for `node`: refuses a missing Node or bad settings before
    anything is touched."""
    from nodemesh.store.kubernetes import AGENT_KINDS, API_KINDS, KubeStore, connect

    if pods not in ("all", "node"):
        raise NodemeshError(f"--pods: want all or node, not {pods!r}", 2)
    settings = load_settings(config_path)
    api = connect(kubeconfig, transport=transport)
    node_obj = api.get(API_KINDS["Node"].path(None, node))
    if node_obj is None:
        api.close()
        raise NodemeshError(f"Node {node}: not found in the cluster (is --node / NODE_NAME the "
                            "kubelet's node name?)", 2)
    cfg = cluster_config(settings, node_obj, state_dir)
    selectors = {"Pod": f"spec.nodeName={node}"} if pods == "node" else {}
    return cfg, KubeStore(api, AGENT_KINDS, field_selectors=selectors)


def run_kubernetes_agent(node: str | None, config_path: str, state_dir: str,
                         kubeconfig: str | None = None, pods: str = "all") -> int:
    import asyncio

    from nodemesh.agent.main import Agent, bind_metrics

    node = node or os.environ.get("NODE_NAME")
    if not node:
        raise NodemeshError("nodemesh agent --kubernetes: no node: pass --node or set NODE_NAME "
                            "(the DaemonSet sets it from spec.nodeName)", 2)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, store = open_kubernetes(node, config_path, state_dir, kubeconfig, pods)
    os.makedirs(cfg.node_dir(node), exist_ok=True)
    asyncio.run(Agent(cfg, node, bind_metrics(cfg, node), store=store, kubernetes=True).run())
    return 0
