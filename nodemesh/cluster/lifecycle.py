"""`nodemesh up` and `nodemesh down`: bring a local cluster up, recover it, tear it down.

`up` on a fresh state directory plans the cluster, creates its nodes and starts the daemon; on a
state directory whose daemon is dead (a crash, a reboot of the processes) it completes whatever is
missing and starts the daemon again, whose agents adopt the pods that still run. `down` removes
everything the cluster created, found by name and by recorded PID, so it also works after a crash.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable

from nodemesh.cluster import etcdmembers, topology
from nodemesh.cluster.config import (
    DEFAULT_CERT_TTL_SECONDS,
    DEFAULT_NODE_LEASE_SECONDS,
    DEFAULT_TRUST_DOMAIN,
    ClusterConfig,
    load_cluster,
    plan_cluster,
)
from nodemesh.errors import NodemeshError
from nodemesh.host import cgroup, netns, procs
from nodemesh.host.files import read_json
from nodemesh.host.procs import ProcRef
from nodemesh.model.nodes import LEASE_NAMESPACE
from nodemesh.store import open_store

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
Progress = Callable[[str], None]


def daemon_ref(cfg: ClusterConfig) -> ProcRef | None:
    ref = ProcRef.from_json(read_json(os.path.join(cfg.state_dir, "daemon.json")))
    return ref if ref is not None and ref.alive() else None


def _nodemesh_argv(state_dir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "nodemesh", "--state-dir", state_dir, *args]


def up(state_dir: str, nodes: int, name: str, progress: Progress = print,
       wait: float = 60.0, datapath: str = "bpf", mtls: str = "on",
       trust_domain: str = DEFAULT_TRUST_DOMAIN,
       cert_ttl_seconds: float = DEFAULT_CERT_TTL_SECONDS,
       store: dict | None = None,
       node_lease_seconds: int = DEFAULT_NODE_LEASE_SECONDS) -> ClusterConfig:
    """`store`: what `etcdmembers.plan_store` made of the --store flags (None: SQLite, or
    whatever a cluster being recovered has)."""
    if not NAME_RE.match(name):
        raise NodemeshError(f"--name {name!r}: must be 1-12 lowercase letters and digits, "
                            "starting with a letter", 2)
    if os.path.exists(os.path.join(state_dir, "cluster.json")):
        cfg = load_cluster(state_dir)
        if store is not None and store.get("type") != cfg.store_type:
            raise NodemeshError(f"cluster {cfg.name}'s store is {cfg.store_type}, not "
                                f"{store.get('type')}; `nodemesh down` first to change --store", 2)
        if daemon_ref(cfg) is not None:
            if nodes != len(cfg.nodes):
                raise NodemeshError(f"cluster {cfg.name} is already up with {len(cfg.nodes)} "
                                    f"nodes; `nodemesh down` first to change --nodes", 2)
            progress(f"cluster {cfg.name} is already up ({len(cfg.nodes)} nodes)")
            return cfg
        progress(f"recovering cluster {cfg.name} from {state_dir} (its daemon was not running)")
    else:
        taken = netns.list_netns(f"{name}-")
        if any(re.match(rf"^{name}-(node\d+|etcd\d+|underlay|pod-[0-9a-f]{{8}})$", n) for n in taken):
            raise NodemeshError(
                f"a cluster named {name!r} already exists on this machine (network namespaces "
                f"{', '.join(taken[:3])}...) with its state elsewhere; pick another --name, or "
                f"remove it with `nodemesh down --state-dir <its state dir>`", 1)
        if (store or {}).get("members"):
            etcdmembers.check_installed()
        cfg = plan_cluster(name, state_dir, nodes, cgroup.find_cgroup2_root(), datapath,
                           mtls=mtls, trust_domain=trust_domain,
                           cert_ttl_seconds=cert_ttl_seconds, store=store,
                           node_lease_seconds=node_lease_seconds)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        cfg.save()
        progress(f"creating cluster {name} with {nodes} node(s) in {state_dir}")
        if cfg.store_type == "etcd" and not cfg.store_members:
            for w in etcdmembers.external_warnings(cfg.store):
                progress(f"warning: {w}")
    if cfg.mtls:
        _ensure_ca(cfg, progress)
    if cfg.store_members and etcdmembers.ensure_pki(cfg):
        progress(f"etcd certificates created in {os.path.join(cfg.etcd_dir, 'pki')}")
    if cfg.store_type == "sqlite":
        seed_store(cfg)  # (an etcd store is seeded by the daemon, once it answers)
    topology.create_cluster_network(cfg)
    progress("nodes: " + ", ".join(f"{n.name} ({n.ip}, pods {n.pod_cidr})" for n in cfg.nodes))
    _start_daemon(cfg)
    if cfg.store_members:
        etcdmembers.wait_healthy(cfg, wait)
        progress(f"store: etcd, {len(cfg.store_members)} member(s) healthy: "
                 + ", ".join(f"{m['name']} ({m['ip']})" for m in cfg.store_members))
    endpoints = cfg.store.get("endpoints") or []
    if (cfg.store_type == "etcd" and not cfg.store_members and endpoints
            and len(etcdmembers.external_warnings(cfg.store)) == len(endpoints)):
        # (said above, endpoint by endpoint): an agent that cannot reach its store comes up only
        # after its first list times out, and then has nothing to program
        progress("agents: not waited for, they cannot reach the store from their nodes")
        return cfg
    _wait_agents(cfg, wait)
    progress("agents ready")
    return cfg


def _ensure_ca(cfg: ClusterConfig, progress: Progress) -> None:
    """The cluster's certificate authority (created once; its key readable by root only)."""
    from nodemesh.certs.authority import BuiltinCA

    if os.path.exists(os.path.join(cfg.ca_dir, "ca.json")):
        return
    ca = BuiltinCA.create(cfg.ca_dir, cfg.trust_domain)
    root = ca.status()["activeRoot"]
    progress(f"certificate authority for spiffe://{cfg.trust_domain} created "
             f"(root {root['fingerprint'][:16]}, valid until {root['notAfter']})")


def seed_store(cfg: ClusterConfig) -> None:
    """The namespaces and Node objects every cluster starts with (idempotent)."""
    store = open_store(cfg.state_dir)
    with store.transaction() as t:
        for ns in ("default", "kube-system", LEASE_NAMESPACE):
            if t.get("Namespace", "", ns) is None:
                t.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                       "spec": {}})
        for n in cfg.nodes:
            if t.get("Node", "", n.name) is None:
                t.put({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": n.name,
                                    "labels": {"kubernetes.io/hostname": n.name}},
                       "spec": {"podCIDR": n.pod_cidr}})
                t.put_status("Node", "", n.name, {
                    "addresses": [{"type": "InternalIP", "address": n.ip},
                                  {"type": "Hostname", "address": n.name}],
                    "conditions": [{"type": "Ready", "status": "Unknown",
                                    "reason": "AgentStarting"}]})
    store.close()


def _start_daemon(cfg: ClusterConfig) -> None:
    procs.spawn_detached(_nodemesh_argv(cfg.state_dir, "daemon"),
                         log_path=os.path.join(cfg.state_dir, "daemon.log"))


def _wait_agents(cfg: ClusterConfig, timeout: float) -> None:
    from nodemesh.cluster.agentclient import AgentClient

    deadline = time.monotonic() + timeout
    pending = {n.name for n in cfg.nodes}
    while pending:
        for node in sorted(pending):
            with contextlib.suppress(Exception):
                AgentClient(cfg.agent_socket(node), node, timeout=1).get("/healthz")
                pending.discard(node)
        if not pending:
            return
        if time.monotonic() > deadline:
            logs = ", ".join(os.path.join(cfg.node_dir(n), "agent.log") for n in sorted(pending))
            raise NodemeshError(f"agents of {', '.join(sorted(pending))} did not become ready in "
                                f"{timeout:.0f}s; see {logs}")
        if daemon_ref(cfg) is None and time.monotonic() > deadline - timeout + 5:
            raise NodemeshError("the cluster daemon exited; see "
                                + os.path.join(cfg.state_dir, "daemon.log"))
        time.sleep(0.1)


def down(state_dir: str, keep_state: bool = False, progress: Progress = print) -> bool:
    """Remove the cluster; False when there was none."""
    try:
        cfg = load_cluster(state_dir)
    except NodemeshError:
        return False
    progress(f"removing cluster {cfg.name}")
    daemon = daemon_ref(cfg)
    # Pods first, while the daemon (their reaper) still runs.
    shims = []
    for uid in _listdir(cfg.pods_dir()):
        ref = ProcRef.from_json((read_json(os.path.join(cfg.pod_dir(uid), "state.json")) or {})
                                .get("shim"))
        if ref is not None and ref.signal(signal.SIGTERM):
            shims.append(ref)
    deadline = time.monotonic() + 10
    while any(r.alive() for r in shims) and time.monotonic() < deadline:
        time.sleep(0.05)
    cgroup.kill_all(cfg.cgroup_dir)  # anything left in pods and proxies
    if daemon is not None:
        procs.stop(daemon, grace=15)
    for n in cfg.nodes:  # agents that outlived the daemon
        procs.stop(ProcRef.from_json(read_json(os.path.join(cfg.node_dir(n.name), "agent.json"))),
                   grace=5)
    etcdmembers.stop_members(cfg)  # after the agents and the daemon, their clients
    _remove_bpffs(cfg.bpffs)
    topology.remove_cluster_network(cfg)  # kills what is left in the cgroups, waits for it
    from nodemesh.proxy.envoy import base_id_path, remove_shared_memory

    for n in cfg.nodes:  # Envoy leaves its hot-restart shared memory in /dev/shm
        remove_shared_memory(base_id_path(os.path.join(cfg.node_dir(n.name), "envoy")))
    if keep_state:
        for sub in ("pods", "nodes"):
            shutil.rmtree(os.path.join(cfg.state_dir, sub), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cfg.state_dir, "daemon.json"))
    else:
        shutil.rmtree(cfg.state_dir, ignore_errors=True)
    # Check our own work: anything left is named, never silently kept.
    from nodemesh.cluster.inventory import leftovers

    # (Our parent may name the state dir too: `sudo nodemesh --state-dir X down`.)
    left = [x for x in leftovers(cfg.name, cfg.state_dir, include_state_dir=not keep_state)
            if not x.startswith(f"process {os.getppid()}:")]
    if left:
        progress(f"warning: left behind: {'; '.join(left)}")
    progress(f"cluster {cfg.name} removed")
    return True


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _is_mount(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _remove_bpffs(path: str) -> None:
    """Unpin everything (unlinking a pinned link detaches it), then unmount the bpffs."""
    if not os.path.isdir(path):
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(root, f))
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, d))
    while _is_mount(path):
        netns.umount(path)
    with contextlib.suppress(OSError):
        os.rmdir(path)
