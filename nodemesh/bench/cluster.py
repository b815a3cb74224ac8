"""A local cluster as the benchmark uses it: `up` in a private state dir, the CLI, pods, the
processes of the mesh, CPU pinning, `down`, and a check that nothing of it is left behind.

Everything goes through the real CLI (`python -m nodemesh --state-dir DIR ...`) as a user would,
except `apply_timed`, which runs `nodemesh apply`'s code (`nodemesh.store.apply`) in this
process so that the change-latency test measures the apply and not the interpreter's start-up,
and `get`, which reads what `nodemesh get KIND -o json` prints straight from the cluster's store
(`nodemesh.store`): waiting for pods polls it several times a second, and an interpreter per poll
would keep a good part of this 2-CPU machine busy while the pods start.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from nodemesh.cluster import inventory
from nodemesh.cluster.controllers import pod_ready
from nodemesh.host import procs
from nodemesh.host.files import read_json
from nodemesh.host.procs import ProcRef

NAMESPACE = "default"  # where everything the benchmark applies lives (the CLI's default)


def pid_from_ref(path: str) -> int | None:
    """The PID in a `{"pid", "start"}` file if that very process still runs."""
    ref = ProcRef.from_json(read_json(path))
    return ref.pid if ref is not None and ref.alive() else None


def tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def cgroup_procs(root: str) -> list[int]:
    """Every process in the cgroup tree at `root`."""
    out: list[int] = []
    for d, _dirs, files in os.walk(root):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                continue
    return out


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class BenchCluster:
    name: str
    state_dir: str
    datapath: str
    nodes: int = 1
    log: Callable[[str], None] = print
    up_args: tuple[str, ...] = ()  # more `nodemesh up` flags (the scale section's --store etcd)
    _cfg: Any = field(default=None, repr=False)

    # ---- CLI ------------------------------------------------------------------------------
    def cli(self, *args: str, input: str | None = None, timeout: float = 120,
            check: bool = True) -> Result:
        p = subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", self.state_dir, *args],
                           input=input, capture_output=True, text=True, timeout=timeout)
        r = Result(p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise RuntimeError(f"nodemesh {' '.join(args[:4])} exited {p.returncode}: "
                               f"{p.stderr.strip()[-800:]}")
        return r

    def apply(self, objs: list[dict[str, Any]]) -> None:
        self.cli("apply", "-f", "-", input=yaml.safe_dump_all(objs))

    def apply_timed(self, objs: list[dict[str, Any]]) -> tuple[int, int]:
        """Apply in this process, as `nodemesh apply -f FILE` does (read and validate the file,
        open the store, store the objects in one transaction); returns the CLOCK_MONOTONIC
        nanoseconds at the start and at the end of the apply. Invalid objects raise the
        `NodemeshError` the CLI would print."""
        from nodemesh.cluster.config import load_cluster
        from nodemesh.store import open_store
        from nodemesh.store.apply import apply_objects, load_and_validate

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(yaml.safe_dump_all(objs))
            path = f.name
        try:
            t0 = time.monotonic_ns()
            found = load_and_validate([path], None)
            apply_objects(open_store(load_cluster(self.state_dir).state_dir), found)
            t1 = time.monotonic_ns()
        finally:
            os.unlink(path)
        return t0, t1

    def get(self, kind: str, name: str | None = None) -> Any:
        """What `nodemesh get KIND [NAME] -o json` prints (the store's objects), read here."""
        from nodemesh.model.kinds import resolve_kind
        from nodemesh.store import open_store

        info = resolve_kind(kind)
        if info is None:
            raise RuntimeError(f"unknown resource type {kind!r}")
        ns = NAMESPACE if info.namespaced else ""
        store = open_store(self.state_dir)
        try:
            if name is None:
                return {"apiVersion": "v1", "kind": "List", "items": store.list(info.kind, ns)}
            obj = store.get(info.kind, ns, name)
        finally:
            store.close()
        if obj is None:
            raise RuntimeError(f"cluster {self.name}: {info.kind} {ns}/{name} not found")
        return obj

    def pods(self) -> list[dict[str, Any]]:
        return self.get("pods")["items"]

    def vip(self, svc: str) -> str:
        return self.get("svc", svc)["spec"]["clusterIP"]

    def pod_ips(self, app: str) -> list[str]:
        return sorted((p["status"]["podIP"] for p in self.pods()
                       if (p["metadata"].get("labels") or {}).get("app") == app
                       and not p["metadata"].get("deletionTimestamp")),
                      key=lambda ip: tuple(int(x) for x in ip.split(".")))

    def wait_ready(self, expected: int | None = None, timeout: float = 120.0) -> list[dict]:
        """Wait until every pod is Ready (and, with `expected`, that many exist)."""
        deadline = time.monotonic() + timeout
        while True:
            pods = [p for p in self.pods() if not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in pods if pod_ready(p)]
            if len(ready) == len(pods) and (expected is None or len(pods) == expected):
                return pods
            if time.monotonic() > deadline:
                bad = [p["metadata"]["name"] for p in pods if not pod_ready(p)]
                raise RuntimeError(f"cluster {self.name}: pods not ready after {timeout:.0f}s "
                                   f"({len(ready)}/{len(pods)}, expected {expected}): {bad[:5]}")
            time.sleep(0.3)

    def exec(self, pod: str, argv: list[str], container: str | None = None,
             timeout: float = 300, check: bool = True) -> Result:
        args = ["exec"] + (["-c", container] if container else []) + [pod, "--", *argv]
        return self.cli(*args, timeout=timeout, check=check)

    def exec_popen(self, pod: str, argv: list[str], container: str | None = None
                   ) -> subprocess.Popen[str]:
        args = ["exec"] + (["-c", container] if container else []) + [pod, "--", *argv]
        return subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", self.state_dir,
                                 *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1)

    # ---- lifecycle ------------------------------------------------------------------------
    def up(self) -> None:
        self.cli("up", "--nodes", str(self.nodes), "--name", self.name,
                 "--datapath", self.datapath, *self.up_args, timeout=180)

    @property
    def cfg(self) -> Any:
        if self._cfg is None:
            from nodemesh.cluster.config import load_cluster

            self._cfg = load_cluster(self.state_dir)
        return self._cfg

    @property
    def is_up(self) -> bool:
        """Brought up and not yet down (its state directory holds the cluster's config)."""
        return os.path.exists(os.path.join(self.state_dir, "cluster.json"))

    def down(self) -> None:
        daemon = pid_from_ref(os.path.join(self.state_dir, "daemon.json"))
        self.cli("down", timeout=300, check=False)
        deadline = time.monotonic() + 10
        while daemon and procs.start_time(daemon) is not None and time.monotonic() < deadline:
            procs.reap_children()
            time.sleep(0.05)
        procs.reap_children()

    def leftovers(self) -> list[str]:
        """Everything of this cluster still on the machine (empty after a clean `down`)."""
        return inventory.leftovers(self.name, self.state_dir)

    # ---- processes ------------------------------------------------------------------------
    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.cfg.nodes]

    def node_dir(self, node: str = "node1") -> str:
        return os.path.join(self.state_dir, "nodes", node)

    def agent_pid(self, node: str = "node1") -> int | None:
        return pid_from_ref(os.path.join(self.node_dir(node), "agent.json"))

    def daemon_pid(self) -> int | None:
        return pid_from_ref(os.path.join(self.state_dir, "daemon.json"))

    def node_envoy_pids(self, node: str = "node1") -> list[int]:
        """The node's Envoy: the processes of the node's proxy cgroup, or its pidfile."""
        pids = set(cgroup_procs(self.cfg.proxy_cgroup(node)))
        for rel in ("envoy/envoy.json", "envoy.json"):
            p = pid_from_ref(os.path.join(self.node_dir(node), rel))
            if p:
                pids.add(p)
        return sorted(pids)

    def pod_pids(self) -> list[int]:
        return cgroup_procs(self.cfg.cgroup_dir)

    def sidecar_envoy_pids(self, node: str | None = None) -> list[int]:
        """Envoys that run inside pods (the sidecar model), on `node` or on every node."""
        from nodemesh.proxy.envoy import envoy_binary

        binary = os.path.realpath(envoy_binary())
        node_cgroups = [self.cfg.node_cgroup(n) for n in ([node] if node else self.node_names)]
        return sorted(p for root in node_cgroups for p in cgroup_procs(root) if exe(p) == binary)

    def _role(self, node: str, what: str) -> str:
        return f"{node} {what}" if len(self.node_names) > 1 else what

    def mesh_roles(self) -> dict[int, str]:
        """nodemesh's own processes on every node, the agents and the node Envoys, by what
        they are ("agent", "node Envoy"; prefixed with the node when there are several)."""
        if self.datapath == "none":
            return {}
        out: dict[int, str] = {}
        for node in self.node_names:
            out.update({p: self._role(node, "node Envoy") for p in self.node_envoy_pids(node)})
            agent = self.agent_pid(node)
            if agent:
                out[agent] = self._role(node, "agent")
        return out

    def sidecar_roles(self) -> dict[int, str]:
        """Every sidecar Envoy ("sidecar Envoy", prefixed with its node when there are several)."""
        return {p: self._role(node, "sidecar Envoy") for node in self.node_names
                for p in self.sidecar_envoy_pids(node)}

    def mesh_pids(self) -> list[int]:
        return sorted(self.mesh_roles())

    def all_pids(self) -> list[int]:
        pids = set(cgroup_procs(self.cfg.cgroup_dir))
        daemon = self.daemon_pid()
        if daemon:
            pids.add(daemon)
        for node in self.node_names:
            agent = self.agent_pid(node)
            pids |= ({agent} if agent else set()) | set(self.node_envoy_pids(node))
        return sorted(pids)

    def envoy_stats(self, node: str, filter: str) -> dict[str, int | float] | None:
        """Counters and gauges of the node's Envoy that match `filter` (None: no Envoy, no admin)."""
        return self._envoy_admin(node, lambda a: a.stats(filter=filter))

    def envoy_memory(self, node: str) -> dict[str, int] | None:
        """The node Envoy's heap (its admin `/memory`: allocated, heap_size, pageheap_free, ...):
        what it uses against what it holds, which PSS alone does not tell apart."""
        return self._envoy_admin(node, lambda a: {k: int(v) for k, v in a.get_json("/memory").items()})

    def _envoy_admin(self, node: str, ask: Callable[[Any], Any]) -> Any:
        from nodemesh.proxy.envoy import AdminClient

        try:
            with open(os.path.join(self.node_dir(node), "envoy", "envoy.json")) as f:
                admin = json.load(f).get("admin") or {}
            return ask(AdminClient(socket_path=admin.get("socket_path"),
                                   host=admin.get("host", "127.0.0.1"),
                                   port=int(admin.get("port", 15000)), timeout=3))
        except Exception:  # no Envoy, no admin: the caller reports "unknown"
            return None

    def certificates(self, node: str) -> int | None:
        """How many workload certificates the node's agent holds (None: it did not say)."""
        r = self.cli("get", "certificates", "-o", "json", check=False)  # the agents', not the store's
        try:
            items = json.loads(r.out)["items"]
        except (ValueError, KeyError):
            return None
        return next((len(i.get("certificates") or []) for i in items
                     if i.get("node") == node and not i.get("error")), None)

    def pin(self, cpus: set[int], nice: int | None = None) -> int:
        """Pin every thread of every process of the cluster to `cpus` (and give it the `nice`
        value, plus whatever the process gave the thread over its main thread); returns the
        number of threads."""
        n = 0
        for pid in self.all_pids():
            base = 0
            with contextlib.suppress(OSError):
                base = os.getpriority(os.PRIO_PROCESS, pid)
            for t in tasks(pid):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(t, cpus)
                    if nice is not None:
                        # A thread the process itself lowered (the agent's flow-event reader)
                        # keeps its distance from the process's other threads.
                        own = os.getpriority(os.PRIO_PROCESS, t) - base
                        os.setpriority(os.PRIO_PROCESS, t, max(-20, min(19, nice + own)))
                    n += 1
        return n
