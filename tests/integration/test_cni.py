"""nodemesh-cni under a real container runtime: Debian's containerd and runc start containers
(`ctr run --cni`, a busybox rootfs built here, nothing pulled) inside a node namespace of a
local cluster; Debian's `ptp` + `host-local` make their interface, nodemesh-cni is chained
after them. The containers get service load balancing, NetworkPolicy and L7 routes as the local
cluster's pods do, and removing one leaves nothing behind.

Then conformance-style cases call the plugin binary itself with CNI's environment against the
real agent, on a netns and veth that the real `ptp` binary made: ADD twice, DEL of a container
never added, DEL after the netns is gone, CHECK after a program was detached, the agent down.

The private containerd (own root, state, socket and config under a temp dir) is stopped by its
PID at the end. `ctr` runs in a mount namespace of its own in which /etc/cni/net.d and
/opt/cni/bin are the temp dir's (overlays on /etc and /opt, visible to that process only): the
host's /etc and /opt are never written.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from nodemesh.cluster import ipam
from tests.integration.clusterharness import Cluster, new_cluster, pod_ready

pytestmark = pytest.mark.root

ECHO = "registry.k8s.io/gateway-api/conformance/echo-advanced"
BUSYBOX = "/usr/bin/busybox"
CNI_BIN = "/usr/lib/cni"
NODE = "node1"
APPLETS = ("sh", "wget", "httpd", "sleep", "cat", "echo", "ip", "ls", "nc", "timeout")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# containerd 1.6 keeps its shims' sockets in /run/containerd/s, runc's state in
# /run/containerd/runc and ctr's FIFOs in /run/containerd/fifo, whatever its configuration says;
# ctr reads /etc/cni/net.d, runs plugins from /opt/cni/bin (and Debian's /usr/lib/cni) and caches
# results in /var/lib/cni. containerd and each ctr run in a mount namespace of their own in which
# those are the test's directories: overlays on /run, /etc, /opt and /var/lib that only they
# see (each with upper and work dirs of its own: overlayfs refuses an upper dir another mount
# uses), with the test's directories bound on top. Nothing else under them is written:
# host-local's leases are in the cluster's state dir, a temp dir.
RUN_PRELUDE = """set -e
o=$(mktemp -d {t}/overlay.XXXXXX)
mkdir $o/run-up $o/run-work $o/etc-up $o/etc-work $o/opt-up $o/opt-work $o/lib-up $o/lib-work
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/run,upperdir=$o/run-up,workdir=$o/run-work /run
mkdir -p /run/containerd
mount --bind {t}/run-containerd /run/containerd
"""
CTR_MOUNTS = """mount -t overlay overlay -o lowerdir=/etc,upperdir=$o/etc-up,workdir=$o/etc-work /etc
mkdir -p /etc/cni/net.d
mount --bind "$NM_NETD" /etc/cni/net.d
mount -t overlay overlay -o lowerdir=/opt,upperdir=$o/opt-up,workdir=$o/opt-work /opt
mkdir -p /opt/cni/bin
mount --bind {t}/cni-bin /opt/cni/bin
mount -t overlay overlay -o lowerdir=/var/lib,upperdir=$o/lib-up,workdir=$o/lib-work /var/lib
mkdir -p /var/lib/cni
mount --bind {t}/cni-cache /var/lib/cni
"""


def cni_pod(name: str, labels: dict[str, str], command: list[str]) -> dict:
    """A Pod whose sandbox CNI brings: the local pod runtime leaves it alone."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels,
                         "annotations": {"nodemesh.io/sandbox": "cni"}},
            "spec": {"nodeName": NODE, "containers": [
                {"name": "c", "image": "busybox", "command": command}]}}


class Runtime:
    """A private containerd and the ctr commands the test runs against it."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.tmp = tempfile.mkdtemp(prefix="nodemesh-cni-")
        self.sock = os.path.join(self.tmp, "containerd.sock")
        self.proc: subprocess.Popen | None = None
        self.runs: dict[str, subprocess.Popen] = {}
        self.node_ns = f"{cluster.name}-{NODE}"
        from nodemesh.cluster.config import load_cluster

        self.cfg = load_cluster(cluster.state_dir)
        self.cgroup_root = self.cfg.cgroup_root
        self.v1_before = set(glob.glob(f"/sys/fs/cgroup/*/{cluster.name}"))

    # ---- setup ---------------------------------------------------------------------------
    def start(self) -> None:
        t = self.tmp
        assert not self.cluster.state_dir.startswith("/var/lib/")
        for d in ("root", "state", "cni-bin", "cni-cache", "run-containerd",
                  "rootfs/bin", "rootfs/proc", "rootfs/sys", "rootfs/dev", "rootfs/etc",
                  "rootfs/www", "rootfs/tmp"):
            os.makedirs(os.path.join(t, d), exist_ok=True)
        shutil.copy(BUSYBOX, os.path.join(t, "rootfs/bin/busybox"))
        for a in APPLETS:
            os.symlink("busybox", os.path.join(t, "rootfs/bin", a))
        with open(os.path.join(t, "rootfs/www/index.html"), "w") as f:
            f.write("hello from a containerd pod\n")
        with open(os.path.join(t, "ctr-wrapper.sh"), "w") as f:
            f.write((RUN_PRELUDE + CTR_MOUNTS).format(t=t) + 'exec "$@"\n')
        with open(os.path.join(t, "containerd-wrapper.sh"), "w") as f:
            f.write(RUN_PRELUDE.format(t=t) + 'exec "$@"\n')
        # The plugin: the venv's console script when installed, else the module.
        script = os.path.join(os.path.dirname(sys.executable), "nodemesh-cni")
        run = script if os.path.exists(script) else f"{sys.executable} -m nodemesh.cni"
        plugin = os.path.join(t, "cni-bin", "nodemesh-cni")
        with open(plugin, "w") as f:
            f.write(f"#!/bin/sh\nPYTHONPATH={REPO} exec {run}\n")
        os.chmod(plugin, 0o755)
        with open(os.path.join(t, "config.toml"), "w") as f:
            f.write(f'version = 2\nroot = "{t}/root"\nstate = "{t}/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n'
                    f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
                    f'[debug]\n  address = "{t}/debug.sock"\n[metrics]\n  address = ""\n'
                    # (its "opt" plugin would make /opt/containerd on the host)
                    f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{t}/opt"\n')
        log = open(os.path.join(t, "containerd.log"), "w")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(["unshare", "-m", "sh", os.path.join(t, "containerd-wrapper.sh"),
                                      "containerd", "--config", os.path.join(t, "config.toml")],
                                     stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while subprocess.run(["ctr", "-a", self.sock, "version"],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "containerd did not start"
            assert self.proc.poll() is None, _read(os.path.join(t, "containerd.log"))
            time.sleep(0.1)

    def netd(self, pod: str) -> str:
        """A network configuration dir for one container (its pod's identity in the args)."""
        d = os.path.join(self.tmp, "netd", pod)
        os.makedirs(d, exist_ok=True)
        conf = self.cluster.run("cni-config", "--node", NODE, "--pod", f"default/{pod}").out
        with open(os.path.join(d, "10-nodemesh.conflist"), "w") as f:
            f.write(conf)
        return d

    def ctr(self, *args: str, netd: str | None = None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        cmd = ["ip", "netns", "exec", self.node_ns, "unshare", "-m", "sh",
               os.path.join(self.tmp, "ctr-wrapper.sh"), "ctr", "-a", self.sock, *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "NM_NETD": netd or os.path.join(self.tmp, "netd")})
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: {p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def cgroup(self, name: str) -> str:
        node_cg = os.path.join(self.cgroup_root, self.cluster.name, NODE)
        return "/" + os.path.relpath(os.path.join(node_cg, f"ctr-{name}"), self.cgroup_root)

    def run(self, name: str, *argv: str) -> None:
        """`ctr run --rm --cni` in the foreground (it calls CNI DEL when the task ends):
        returns once the task runs (ADD is done by then)."""
        netd = self.netd(name)
        cmd = ["ip", "netns", "exec", self.node_ns, "unshare", "-m", "sh",
               os.path.join(self.tmp, "ctr-wrapper.sh"), "ctr", "-a", self.sock, "run", "--rm",
               "--cni", "--rootfs", "--cgroup", self.cgroup(name),
               os.path.join(self.tmp, "rootfs"), name, *argv]
        out = open(os.path.join(self.tmp, f"ctr-{name}.log"), "w")  # noqa: SIM115
        self.runs[name] = subprocess.Popen(cmd, stdout=out, stderr=out,
                                           env={**os.environ, "NM_NETD": netd})
        deadline = time.monotonic() + 60
        while True:
            if self.runs[name].poll() is not None:
                raise AssertionError(f"ctr run {name} exited {self.runs[name].returncode}: "
                                     + _read(out.name))
            tasks = self.ctr("task", "ls", check=False).stdout
            if any(line.split()[:1] == [name] and "RUNNING" in line for line in tasks.splitlines()):
                return
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.2)

    def exec(self, name: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.ctr("task", "exec", "--exec-id", f"x{time.monotonic_ns()}", name, *argv,
                        check=False, timeout=timeout)

    def wget(self, name: str, url: str) -> subprocess.CompletedProcess:
        """busybox wget in container `name` (its -T option crashes Debian's busybox 1.35)."""
        return self.exec(name, "/bin/timeout", "5", "/bin/wget", "-q", "-O-", url)

    def remove(self, name: str) -> None:
        """Kill the task: the foreground `ctr run --rm` then runs CNI DEL and deletes it."""
        self.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        p = self.runs.pop(name)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    # ---- teardown -----------------------------------------------------------------------
    def stop(self) -> None:
        for name in list(self.runs):
            self.remove(name)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # runc (cgroup v1 controllers on a hybrid host) leaves the empty parents of the
        # containers' cgroups in each v1 hierarchy.
        for top in set(glob.glob(f"/sys/fs/cgroup/*/{self.cluster.name}")) - self.v1_before:
            if top.startswith(self.cgroup_root):
                continue  # the cluster's own (cgroup v2) tree: `down` removes it
            for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Cluster, Runtime]]:
    c = new_cluster(1)
    rt = Runtime(c)
    try:
        rt.start()
        c.apply([
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo"},
             "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "echo"}},
                      "template": {"metadata": {"labels": {"app": "echo"}}, "spec": {
                          "containers": [{"name": "echo", "image": ECHO, "ports": [
                              {"containerPort": 8080, "name": "http"}]}]}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
             "spec": {"selector": {"app": "echo"},
                      "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
             "spec": {"selector": {"app": "web"},
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
             "spec": {"nodeName": NODE, "containers": [
                 {"name": "c", "image": "debian", "command": ["sleep", "infinity"]}]}},
            cni_pod("web", {"app": "web"}, ["httpd", "-f", "-p", "8080", "-h", "/www"]),
            cni_pod("cclient", {"app": "cclient"}, ["sleep", "3600"]),
        ])
        rt.run("web", "/bin/httpd", "-f", "-p", "8080", "-h", "/www")
        rt.run("cclient", "/bin/sleep", "3600")
        yield c, rt
    finally:
        rt.stop()
        c.down()
        left = c.leftovers()
        assert not left, f"cluster {c.name} left things behind: {left}"
        for path in ("/etc/cni", "/opt/cni", "/opt/containerd", "/var/lib/cni", "/run/containerd",
                     "/var/lib/containerd"):
            assert not os.path.exists(path), f"{path} was made"
        assert not glob.glob(f"/sys/fs/cgroup/*/{c.name}"), "runc's cgroups are left"
        assert not os.path.exists(rt.tmp)
        assert not _processes_naming(rt.tmp), "containerd, a shim or ctr is left"


def _processes_naming(text: str) -> list[str]:
    from nodemesh.host.procs import command_lines

    return [f"{pid}: {cmd[:120]}" for pid, cmd in command_lines() if text in cmd]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _pod(c: Cluster, name: str) -> dict:
    return c.get("pod", name)  # type: ignore[return-value]


def _wait(pred, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _cluster_ip(c: Cluster, svc: str) -> str:
    return c.get("svc", svc)["spec"]["clusterIP"]  # type: ignore[index]


def test_containers_get_addresses_from_the_cni_range_and_are_ready(env) -> None:
    c, _ = env
    lo, hi = ipam.cni_range("10.244.1.0/24")  # node1's pod CIDR
    for name in ("web", "cclient"):
        pod = _wait(lambda n=name: p if pod_ready(p := _pod(c, n)) else None, f"{name} ready")
        ip = pod["status"]["podIP"]
        assert int(lo.rsplit(".", 1)[1]) <= int(ip.rsplit(".", 1)[1]) <= int(hi.rsplit(".", 1)[1])
        assert pod["status"]["sandbox"]["cni"]["containerID"] == f"default-{name}"
    cni = c.agent(NODE)["cniPods"]
    assert sorted(p["pod"] for p in cni) == ["default/cclient", "default/web"]
    c.wait_pods(count=4)  # the two local pods too


def test_pod_to_service_both_ways(env) -> None:
    c, rt = env
    c.wait_pods(count=4)
    c.wait_synced()
    # a local pod -> the Service whose only backend is a containerd container
    out = c.exec("client", "curl", "-s", "--max-time", "5", "http://web/").out
    assert out == "hello from a containerd pod\n"
    # a containerd container -> the Service of a local pod (the socket LB in its cgroup)
    r = rt.wget("cclient", f"http://{_cluster_ip(c, 'echo')}/")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pod"].startswith("echo-")


def test_network_policy_denies_and_allows(env) -> None:
    c, rt = env
    c.apply([{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "web-from-cclient"},
              "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                       "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cclient"}}}]}]}}])
    try:
        c.wait_synced()
        r = c.exec("client", "curl", "-s", "--max-time", "2", "http://web/", check=False)
        assert r.code != 0, "the policy should deny the local client"
        r = rt.wget("cclient", f"http://{_cluster_ip(c, 'web')}/")
        assert r.returncode == 0 and r.stdout == "hello from a containerd pod\n", r.stderr
        flows = c.run("observe", "--verdict", "DROPPED", "--to-pod", "default/web", "-o", "json",
                      "--last", "5").out
        assert flows.strip(), "the drop should be a flow"
    finally:
        c.run("delete", "netpol", "web-from-cclient")
    c.wait_synced()
    assert c.exec("client", "curl", "-s", "--max-time", "5", "http://web/").code == 0


def test_l7_route_applies_to_a_containerd_client(env) -> None:
    c, rt = env
    c.apply([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
              "metadata": {"name": "echo-route"},
              "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
                       "rules": [{"filters": [{"type": "RequestHeaderModifier",
                                               "requestHeaderModifier": {"set": [
                                                   {"name": "x-route", "value": "via-envoy"}]}}],
                                  "backendRefs": [{"name": "echo", "port": 80}]}]}}])
    url = f"http://{_cluster_ip(c, 'echo')}/cni"

    def routed() -> bool:
        r = rt.wget("cclient", url)
        return r.returncode == 0 and json.loads(r.stdout)["headers"].get("X-Route") == ["via-envoy"]

    try:
        _wait(routed, "the route's header on the containerd client's request", timeout=30)
    finally:
        c.run("delete", "httproute", "echo-route")


# ---- the plugin binary, conformance-style --------------------------------------------------
class Plugin:
    """Runs CNI binaries in the node's namespace with CNI's environment."""

    def __init__(self, c: Cluster, rt: Runtime) -> None:
        self.c, self.rt = c, rt
        self.node_ns = rt.node_ns
        conf = json.loads(c.run("cni-config", "--node", NODE, "--pod", "default/conf").out)
        self.network = conf["name"]
        self.ptp = {"cniVersion": "1.0.0", "name": self.network, **conf["plugins"][0]}
        self.mesh = {"cniVersion": "1.0.0", "name": self.network, **conf["plugins"][1]}

    def call(self, binary: str, command: str, conf: dict, container: str, netns: str,
             ifname: str = "eth0") -> tuple[int, dict | None]:
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container,
               "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_PATH": CNI_BIN}
        p = subprocess.run(["ip", "netns", "exec", self.node_ns, binary], input=json.dumps(conf),
                           capture_output=True, text=True, env=env, timeout=60)
        return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None

    def mesh_call(self, command: str, container: str, netns: str, prev: dict | None = None,
                  **conf: object) -> tuple[int, dict | None]:
        body = {**self.mesh, **conf}
        if prev is not None:
            body["prevResult"] = prev
        return self.call(os.path.join(self.rt.tmp, "cni-bin", "nodemesh-cni"), command, body,
                         container, netns)


@pytest.fixture()
def plugin(env) -> Iterator[Plugin]:
    c, rt = env
    c.apply([cni_pod("conf", {"app": "conf"}, ["sleep", "3600"])])
    p = Plugin(c, rt)
    yield p
    for container in ("conf1", "conf4"):  # (a failed test's leftovers; DEL is idempotent)
        p.mesh_call("DEL", container, "")
    c.run("delete", "pod", "conf", check=False)


def _agent_pid(c: Cluster) -> int | None:
    from nodemesh.errors import NodemeshError

    try:
        return int(c.agent(NODE)["pid"])
    except (NodemeshError, OSError):  # not running, or killed while it answered
        return None


def _links(c: Cluster, ifname: str) -> list[str]:
    from nodemesh.cluster.config import load_cluster

    links = os.path.join(load_cluster(c.state_dir).bpffs, NODE, "links")
    return sorted(f for f in os.listdir(links) if f.startswith(f"tcx-{ifname}-"))


def test_plugin_conformance(env, plugin: Plugin) -> None:
    c, rt = env
    ns = f"{c.name}-cnitest"
    netns = f"/run/netns/{ns}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code, prev = plugin.call(f"{CNI_BIN}/ptp", "ADD", plugin.ptp, "conf1", netns)
        assert code == 0 and prev, prev
        veth = next(i["name"] for i in prev["interfaces"] if not i.get("sandbox"))
        # a pod the local pod runtime runs: refused, and nothing attached
        code, err = plugin.mesh_call("ADD", "conf1", netns, prev,
                                     args={"cni": {"K8S_POD_NAMESPACE": "default",
                                                   "K8S_POD_NAME": "client"}})
        assert code == 1 and err is not None and err["code"] == 100, err
        assert "run by the local cluster's pod runtime" in err["msg"]
        assert _links(c, veth) == []
        # ADD, then ADD again (the runtime retried): the same result, one attachment
        for _ in range(2):
            code, out = plugin.mesh_call("ADD", "conf1", netns, prev)
            assert code == 0, out
            assert out is not None and out["ips"] == prev["ips"]
        assert [p["containerID"] for p in c.agent(NODE)["cniPods"]].count("conf1") == 1
        assert pod_ready(_pod(c, "conf"))
        assert _links(c, veth) == [f"tcx-{veth}-egress", f"tcx-{veth}-ingress"]
        # CHECK: fine, and again after the agent was killed (the next one adopts the sandbox)
        assert plugin.mesh_call("CHECK", "conf1", netns, prev) == (0, None)
        old_pid = c.agent(NODE)["pid"]
        os.kill(old_pid, signal.SIGKILL)
        _wait(lambda: _agent_pid(c) not in (None, old_pid), "a new agent", timeout=30)
        assert plugin.mesh_call("CHECK", "conf1", netns, prev) == (0, None)
        assert "conf1" in [p["containerID"] for p in c.agent(NODE)["cniPods"]]
        # then detach a program behind the agent's back: CHECK fails
        from nodemesh.cluster.config import load_cluster

        pin = os.path.join(load_cluster(c.state_dir).bpffs, NODE, "links", f"tcx-{veth}-ingress")
        subprocess.run(["bpftool", "link", "detach", "pinned", pin], check=True)
        code, err = plugin.mesh_call("CHECK", "conf1", netns, prev)
        assert code == 1 and err is not None and err["code"] == 101, err
        assert "from_container is not attached" in err["msg"], err
        # a new ADD re-attaches it
        assert plugin.mesh_call("ADD", "conf1", netns, prev)[0] == 0
        assert plugin.mesh_call("CHECK", "conf1", netns, prev) == (0, None)
        # CHECK of a container never added: the spec's "unknown container"
        code, err = plugin.mesh_call("CHECK", "never", netns, prev)
        assert code == 1 and err is not None and err["code"] == 3, err
        # DEL of a container never added: success, nothing printed
        assert plugin.mesh_call("DEL", "never", "") == (0, None)
        # the agent down: try again later, and nothing registered
        code, err = plugin.mesh_call("ADD", "conf2", netns, prev,
                                     agentSocket=os.path.join(rt.tmp, "no-agent.sock"))
        assert code == 1 and err is not None and err["code"] == 11, err
        assert "not reachable" in err["msg"]
        assert "conf2" not in [p["containerID"] for p in c.agent(NODE)["cniPods"]]
        # DEL after the netns is gone (its veth went with it): success, everything removed
        subprocess.run(["ip", "netns", "del", ns], check=True)
        assert plugin.mesh_call("DEL", "conf1", "") == (0, None)
        assert plugin.mesh_call("DEL", "conf1", "") == (0, None)  # and again
        assert plugin.call(f"{CNI_BIN}/ptp", "DEL", plugin.ptp, "conf1", "")[0] == 0
        assert "conf1" not in [p["containerID"] for p in c.agent(NODE)["cniPods"]]
        assert _links(c, veth) == []
        status = _pod(c, "conf")["status"]
        assert "podIP" not in status and not pod_ready(_pod(c, "conf"))
        # GC (CNI 1.1.0): an attachment the runtime no longer lists goes
        subprocess.run(["ip", "netns", "add", ns], check=True)
        code, prev = plugin.call(f"{CNI_BIN}/ptp", "ADD", plugin.ptp, "conf4", netns)
        assert code == 0 and prev, prev
        veth = next(i["name"] for i in prev["interfaces"] if not i.get("sandbox"))
        assert plugin.mesh_call("ADD", "conf4", netns, prev)[0] == 0
        assert plugin.mesh_call("STATUS", "", "", cniVersion="1.1.0") == (0, None)
        valid = [{"containerID": f"default-{n}", "ifname": "eth0"} for n in ("web", "cclient")]
        assert plugin.mesh_call("GC", "", "", cniVersion="1.1.0",
                                **{"cni.dev/valid-attachments": valid}) == (0, None)
        assert [p["containerID"] for p in c.agent(NODE)["cniPods"]] == ["default-cclient",
                                                                         "default-web"]
        assert _links(c, veth) == []
        assert plugin.call(f"{CNI_BIN}/ptp", "DEL", plugin.ptp, "conf4", netns)[0] == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_plugin_refuses_bad_input_clearly(env, plugin: Plugin) -> None:
    code, err = plugin.mesh_call("ADD", "bad1", "/run/netns/none", None)
    assert code == 1 and err is not None and err["code"] == 7 and "prevResult" in err["msg"]
    code, err = plugin.mesh_call("ADD", "bad1", "/run/netns/none", {}, mtu=1400)
    assert code == 1 and err is not None and err["code"] == 2 and "'mtu'" in err["msg"]
    code, err = plugin.mesh_call("VERSION", "", "", cniVersion="0.3.1")
    assert code == 0 and err is not None and "1.0.0" in err["supportedVersions"]
    c, _ = env
    ns = "/run/netns/none"

    def prev(address: str) -> dict:
        return {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": ns}],
                "ips": [{"interface": 0, "address": address}]}

    # a pod the store does not have
    code, err = plugin.mesh_call("ADD", "bad2", ns, prev("10.244.1.250/24"),
                                 args={"cni": {"K8S_POD_NAMESPACE": "default",
                                               "K8S_POD_NAME": "ghost"}})
    assert code == 1 and err is not None and err["code"] == 100, err
    assert "pod default/ghost is not in the store" in err["msg"]
    # an address outside the node's pod CIDR, or one another pod has
    code, err = plugin.mesh_call("ADD", "bad3", ns, prev("10.99.0.5/24"))
    assert code == 1 and err is not None and err["code"] == 7 and "pod CIDR" in err["msg"], err
    taken = _pod(c, "client")["status"]["podIP"]
    code, err = plugin.mesh_call("ADD", "bad4", ns, prev(f"{taken}/24"))
    assert code == 1 and err is not None and err["code"] == 7, err
    assert "is pod default/client's" in err["msg"]
    assert [p["containerID"] for p in c.agent(NODE)["cniPods"]] == ["default-cclient",
                                                                     "default-web"]


def test_removing_containers_leaves_nothing(env) -> None:
    c, rt = env
    before = c.agent(NODE)["datapath"]["endpoints"]
    veths = {p["status"]["sandbox"]["hostInterface"] for p in (_pod(c, "web"), _pod(c, "cclient"))}
    for name in ("web", "cclient"):
        rt.remove(name)
    assert c.agent(NODE)["cniPods"] == []
    assert c.agent(NODE)["datapath"]["endpoints"] == before - 2
    links = subprocess.run(["ip", "-n", rt.node_ns, "-o", "link"], capture_output=True,
                           text=True).stdout
    for v in veths:
        assert v not in links
        assert _links(c, v) == []
    for name in ("web", "cclient"):
        st = _pod(c, name)["status"]
        assert "podIP" not in st and not pod_ready(_pod(c, name))
    from nodemesh.cluster.config import load_cluster

    ipam_dir = os.path.join(load_cluster(c.state_dir).node_dir(NODE), "cni-ipam", "nodemesh")
    assert [f for f in os.listdir(ipam_dir) if f[0].isdigit()] == []
    assert os.listdir(os.path.join(load_cluster(c.state_dir).node_dir(NODE), "cni")) == []
    assert "web" not in rt.ctr("container", "ls").stdout
    assert not glob.glob(os.path.join(rt.cgroup_root, c.name, NODE, "ctr-*"))
