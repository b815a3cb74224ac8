"""A local cluster for integration tests: `up` in a private state dir, helpers, `down`, and a
check that nothing of it is left behind.

Tests drive the real CLI (`python -m nodemesh ...`) as a user would, and look at the real kernel
(`ip netns`, cgroups, /proc) to check what it did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import yaml

from nodemesh.host.procs import set_child_subreaper

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Orphans of the clusters we start (their daemons) are reparented to the test process, so we
# can reap them: PID 1 on this machine does not reap.
become_subreaper = set_child_subreaper


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@dataclass
class Cluster:
    name: str
    state_dir: str
    nodes: int
    env: dict = field(default_factory=dict)
    up_args: tuple[str, ...] = ()  # more `nodemesh up` flags (--mtls off, --cert-ttl 10s ...)

    # ---- CLI -------------------------------------------------------------------------------
    def run(self, *args: str, input: str | None = None, timeout: float = 120,
            check: bool = True) -> Result:
        p = subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", self.state_dir, *args],
                           input=input, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **self.env})
        r = Result(p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"nodemesh {' '.join(args)} exited {p.returncode}:\n"
                                 f"{p.stdout}\n{p.stderr}")
        return r

    def apply(self, manifest: str | list[dict], check: bool = True) -> Result:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump_all(manifest)
        return self.run("apply", "-f", "-", input=text, check=check)

    def exec(self, pod: str, *cmd: str, namespace: str = "default", check: bool = True,
             timeout: float = 60) -> Result:
        return self.run("exec", "-n", namespace, pod, "--", *cmd, check=check, timeout=timeout)

    def popen_exec(self, pod: str, *cmd: str, namespace: str = "default") -> subprocess.Popen:
        """`nodemesh exec` started in the background (stdout and stderr piped, as text)."""
        return subprocess.Popen(
            [sys.executable, "-m", "nodemesh", "--state-dir", self.state_dir, "exec", "-n",
             namespace, pod, "--", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, **self.env})

    def get(self, kind: str, name: str | None = None, namespace: str = "default") -> object:
        args = ["get", kind] + ([name] if name else []) + ["-n", namespace, "-o", "json"]
        return self.run(*args).json()

    def pods(self, namespace: str = "default", selector: str | None = None) -> list[dict]:
        args = ["get", "pods", "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
        return self.run(*args).json()["items"]  # type: ignore[index]

    def wait_pods(self, namespace: str = "default", count: int | None = None,
                  selector: str | None = None, timeout: float = 60) -> list[dict]:
        """Wait until `count` pods (all, if None) are Ready and none is terminating."""
        deadline = time.monotonic() + timeout
        while True:
            pods = self.pods(namespace, selector)
            live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in live if pod_ready(p)]
            if len(ready) == len(live) == (count if count is not None else len(live)) and (
                    count != 0 or not pods) and (live or count == 0):
                return ready
            if time.monotonic() > deadline:
                raise AssertionError(f"pods not ready after {timeout}s: "
                                     + ", ".join(f"{p['metadata']['name']}="
                                                 f"{(p.get('status') or {}).get('phase')}"
                                                 for p in pods))
            time.sleep(0.2)

    def agent(self, node: str, path: str = "/status") -> dict:
        from nodemesh.cluster.agentclient import AgentClient

        return AgentClient(os.path.join(self.state_dir, "nodes", node, "agent.sock"), node).get(path)

    def _synced_revision(self, node: str) -> int:
        """The revision the node's datapath has programmed; -1 while its agent is not running
        (the daemon restarts a killed agent: it has not synced anything yet)."""
        from nodemesh.errors import NodemeshError

        try:
            return int(self.agent(node)["datapath"]["syncedRevision"])
        except NodemeshError:
            return -1

    def store_revision(self) -> int:
        """The store's revision now. An etcd on the cluster's underlay is reached from the
        underlay's namespace, by a process that moves there before it connects (this one runs
        threads and stays in the host's, which has no route to the members)."""
        from nodemesh.store import open_store

        with open(os.path.join(self.state_dir, "cluster.json")) as f:
            store = json.load(f).get("store") or {}
        if not store.get("access_netns"):
            return open_store(self.state_dir).revision()
        code = ("import sys\n"
                "from nodemesh.cluster.config import load_cluster\n"
                "from nodemesh.host import netns\n"
                "from nodemesh.store import open_store\n"
                "cfg = load_cluster(sys.argv[1])\n"
                "netns.enter_for_store(cfg.store)\n"
                "print(open_store(cfg.state_dir).revision())\n")
        p = subprocess.run([sys.executable, "-c", code, self.state_dir], capture_output=True,
                           text=True, timeout=30, env={**os.environ, **self.env})
        if p.returncode != 0:
            raise AssertionError(f"store revision: {p.stderr}")
        return int(p.stdout)

    def wait_synced(self, timeout: float = 10.0) -> float:
        """Wait until every agent's datapath reflects the store as it is now; returns seconds."""
        target = self.store_revision()
        t0 = time.monotonic()
        pending = [f"node{i}" for i in range(1, self.nodes + 1)]
        while pending:
            pending = [n for n in pending if self._synced_revision(n) < target]
            if not pending:
                break
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"agents {pending} did not sync revision {target} in {timeout}s")
            time.sleep(0.02)
        return time.monotonic() - t0

    # ---- lifecycle -------------------------------------------------------------------------
    def up(self) -> None:
        self.run("up", "--nodes", str(self.nodes), "--name", self.name, *self.up_args,
                 timeout=180)

    def daemon_pid(self) -> int | None:
        try:
            with open(os.path.join(self.state_dir, "daemon.json")) as f:
                return int(json.load(f)["pid"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def down(self) -> None:
        daemon = self.daemon_pid()
        self._base_ids = self.envoy_base_ids()
        self.run("down", timeout=180, check=False)
        if daemon:
            reap(daemon)

    def envoy_base_ids(self) -> list[int]:
        """The hot-restart base ids of the node Envoys (their shared memory's names)."""
        from nodemesh.proxy.envoy import base_id_path, read_base_id

        out = []
        for n in range(1, self.nodes + 1):
            path = base_id_path(os.path.join(self.state_dir, "nodes", f"node{n}", "envoy"))
            if os.path.exists(path):
                out.append(read_base_id(path))
        return out

    def leftovers(self) -> list[str]:
        """Everything of this cluster still on the machine (should be empty after down),
        with the Envoys' hot-restart shared memory."""
        from nodemesh.cluster.inventory import leftovers
        from nodemesh.proxy.envoy import shared_memory_files

        shm = [f"shm {p}" for b in getattr(self, "_base_ids", []) for p in shared_memory_files(b)]
        return leftovers(self.name, self.state_dir) + shm


def reap(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)


def pod_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def new_cluster(nodes: int = 2, *up_args: str) -> Cluster:
    become_subreaper()
    name = "nmt" + uuid.uuid4().hex[:6]
    state = tempfile.mkdtemp(prefix=f"nodemesh-{name}-")
    # NODEMESH_TEST_STORE=etcd runs the cluster on etcd members of its own (`make test` runs
    # some suites so, tests/integration/test_on_etcd.py).
    if os.environ.get("NODEMESH_TEST_STORE") == "etcd" and "--store" not in up_args:
        up_args = (*up_args, "--store", "etcd", "--store-members", "1")
    c = Cluster(name=name, state_dir=state, nodes=nodes, up_args=up_args)
    try:
        c.up()
    except BaseException:  # an `up` that failed half-way leaves nothing running either
        c.down()
        raise
    return c


@contextmanager
def running_cluster(nodes: int = 2, *up_args: str) -> Iterator[Cluster]:
    """A cluster for a `with` block (a module's fixture): `down` at the end, and a check that
    nothing of it is left behind."""
    c = new_cluster(nodes, *up_args)
    try:
        yield c
    finally:
        c.down()
        left = c.leftovers()
        assert not left, f"cluster {c.name} left things behind: {left}"
