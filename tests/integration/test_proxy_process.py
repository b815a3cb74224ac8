"""The Envoy process: start, admin over a unix socket, adopt from the pidfile, stop; and (as
root) start inside a network namespace and a cgroup with admin reached through the namespace."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import pytest

from nodemesh.errors import NodemeshError
from nodemesh.host import cgroup
from nodemesh.proxy.envoy import AdminClient, EnvoyProcess, bootstrap
from tests.integration.test_proxy_envoy import NODE, Rig, rig_factory, shares, started

__all__ = ["rig_factory"]  # the fixture, imported for these tests


@pytest.fixture
def tmpdir_short() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="nm-pp-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_start_admin_adopt_stop_leaves_nothing(rig_factory: Callable[..., Rig]) -> None:
    rig = started(rig_factory("GRPC"), {"a": 100})
    envoy = rig.envoy
    assert envoy is not None and envoy.ready()
    admin_sock = envoy.admin.socket_path
    assert admin_sock and os.stat(admin_sock).st_mode & 0o777 == 0o600

    # Admin over the unix socket.
    info = envoy.admin.server_info()
    assert info["state"] == "LIVE" and "/1.40." in info["version"]
    assert info["command_line_options"]["concurrency"] == 1
    stats = envoy.stats()
    assert stats["cluster_manager.active_clusters"] == 2  # a and the static xds_cluster
    clusters = {c["name"] for c in envoy.clusters()["cluster_statuses"]}
    assert {"a", "xds_cluster"} <= clusters
    dump = envoy.config_dump("dynamic_active_clusters")
    assert any(c["cluster"]["name"] == "a" for c in dump["configs"])
    rss = envoy.rss_bytes()
    assert rss is not None and 20 * 2**20 < rss < 500 * 2**20

    # A new agent adopts the running Envoy from its pidfile.
    with open(envoy.pidfile) as f:
        recorded = json.load(f)
    assert recorded["pid"] == envoy.pid and recorded["node_id"] == NODE
    adopted = EnvoyProcess.adopt(envoy.pidfile)
    assert adopted is not None and adopted.pid == envoy.pid and adopted.node_id == NODE
    assert adopted.ready() and adopted.stats()["cluster_manager.warming_clusters"] == 0
    assert shares(rig.port, 3) == {"a": 3}

    adopted.stop()
    assert not adopted.alive()
    assert not os.path.exists(envoy.pidfile) and not os.path.exists(admin_sock)
    envoy.stop()  # the original handle reaps its child; stopping twice is harmless
    assert _gone(envoy.pid) and not os.path.exists(f"/proc/{envoy.pid}")
    assert EnvoyProcess.adopt(envoy.pidfile) is None


def test_adopt_refuses_dead_or_recycled_pids(tmpdir_short: str) -> None:
    pidfile = os.path.join(tmpdir_short, "envoy.json")
    assert EnvoyProcess.adopt(pidfile) is None  # no file
    with open(pidfile, "w") as f:
        json.dump({"pid": os.getpid(), "start": 1}, f)  # our PID, another start time
    assert EnvoyProcess.adopt(pidfile) is None


def test_bad_bootstrap_fails_with_envoys_message(tmpdir_short: str) -> None:
    cfg = bootstrap(NODE, os.path.join(tmpdir_short, "xds.sock"),
                    admin_socket=os.path.join(tmpdir_short, "admin.sock"))
    cfg["admin"]["no_such_field"] = 1
    with pytest.raises(NodemeshError, match="no_such_field"):
        EnvoyProcess.start(cfg, tmpdir_short, concurrency=1)
    assert not os.path.exists(os.path.join(tmpdir_short, "envoy.json"))


def test_stale_admin_socket_is_replaced(tmpdir_short: str) -> None:
    """An Envoy killed with SIGKILL leaves its admin socket file; the next start still binds."""
    admin = os.path.join(tmpdir_short, "admin.sock")
    cfg = bootstrap(NODE, os.path.join(tmpdir_short, "xds.sock"), admin_socket=admin)
    first = EnvoyProcess.start(cfg, tmpdir_short, concurrency=1)
    try:
        first.ref.signal(9)
        assert first._popen is not None
        first._popen.wait(5)
        assert os.path.exists(admin)
        second = EnvoyProcess.start(cfg, tmpdir_short, concurrency=1)
        try:
            assert second.admin.server_info()["state"] in ("PRE_INITIALIZING", "INITIALIZING")
            assert not second.ready()  # no xDS server: Envoy waits for its first config
        finally:
            second.stop()
    finally:
        first.stop()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespace, cgroup)")
def test_envoy_in_a_network_namespace_and_cgroup(tmpdir_short: str) -> None:
    name = "nm-pxtest-" + secrets.token_hex(3)
    ns_path = f"/run/netns/{name}"
    cg = os.path.join(cgroup.find_cgroup2_root(), name)
    subprocess.run(["ip", "netns", "add", name], check=True)
    envoy: EnvoyProcess | None = None
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        cgroup.create(cg)
        # TCP admin on 127.0.0.1:15000 *inside* the namespace: reachable only through it.
        cfg = bootstrap(NODE, os.path.join(tmpdir_short, "xds.sock"), admin_port=15000)
        envoy = EnvoyProcess.start(cfg, tmpdir_short, concurrency=1, netns_path=ns_path,
                                   cgroup_path=cg)
        assert os.stat(f"/proc/{envoy.pid}/ns/net").st_ino == os.stat(ns_path).st_ino
        assert os.stat(f"/proc/{envoy.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        assert envoy.pid in cgroup.procs(cg)
        assert envoy.admin.netns_path == ns_path
        assert envoy.admin.server_info()["node"]["id"] == NODE
        # The test's own thread is still in its namespace afterwards.
        assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
        adopted = EnvoyProcess.adopt(envoy.pidfile)
        assert adopted is not None
        assert adopted.admin == AdminClient(host="127.0.0.1", port=15000, netns_path=ns_path)
        assert "state" in adopted.admin.server_info()
        envoy.stop()
        assert not envoy.alive() and cgroup.procs(cg) == []
    finally:
        if envoy is not None and envoy.alive():
            envoy.stop()
        if os.path.isdir(cg):
            cgroup.remove_tree(cg)
        subprocess.run(["ip", "netns", "delete", name], check=False)
    assert not os.path.exists(ns_path) and not os.path.isdir(cg)
