"""The agent's xDS server: ADS (state of the world and delta) for the node's Envoy, on a unix socket.

One `XdsServer` serves any number of Envoys, each identified by `node.id`, from one `Snapshot`
per node. `set_snapshot(node_id, snapshot)` replaces the node's snapshot and pushes the change to
its open streams at once, type by type in warming order (CDS, EDS, SDS, LDS, RDS).

Protocol rules this follows (https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol):

- SotW (`StreamAggregatedResources`): every response for a type carries the version of the whole
  type in the snapshot and a fresh nonce. LDS and CDS responses carry every resource (leaving one
  out deletes it); EDS, RDS and SDS responses carry the resources Envoy asked for by name. A
  request whose `response_nonce` is not the latest nonce of its type is stale and ignored. The
  first reply to the latest nonce is the ACK (no `error_detail`) or NACK; later requests with the
  same nonce are subscription changes (Envoy repeats the nonce), so a nonce is not consumed.
- Delta (`DeltaAggregatedResources`): per-resource versions (content hashes); a response carries
  only what Envoy does not have yet and names what it must drop in `removed_resources`. Envoy's
  `initial_resource_versions` on a reconnect say what it still has, so a restarted server with the
  same snapshot sends nothing new. On a NACK the versions of that response are rolled back, so
  the next snapshot resends whatever Envoy did not take.
- After a cluster changes, its endpoints are sent again even when they did not change: Envoy
  re-creates the cluster, and the new one warms until it sees its ClusterLoadAssignment.
- A NACK leaves Envoy on its last good version; the server does not resend the same version and
  waits for the next snapshot.

Status per node and type (`status`) follows go-control-plane's idea of status info: what was
sent, what was ACKed, the open NACK, the resource names. `on_nack` lets the agent turn a NACK into
route conditions; `stats()` counts responses, ACKs, NACKs and stale nonces for metrics.

Everything runs on one asyncio loop. `set_snapshot` may be called from another thread (the
change is handed to the loop); `status`, `sync_state`, `nodes` and `stats` only read and copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import secrets
import stat
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from nodemesh.proxy.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PUSH_ORDER,
    WILDCARD_TYPES,
    Snapshot,
    short_name,
)

log = logging.getLogger("nodemesh.proxy.xds")

# node_id, type_url, version, message, resource names in the NACKed response
NackCallback = Callable[[str, str, str, str, list[str]], object]
# node_id, type_url, version
AckCallback = Callable[[str, str, str], object]

# gRPC server options. Envoy sends HTTP/2 keepalive pings on its xDS connection; gRPC's default
# policy answers pings more often than every 5 minutes without data with GOAWAY
# (ENHANCE_YOUR_CALM), which would drop the ADS stream of an idle node every few minutes.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    # Our own pings find an Envoy that hangs without closing the socket.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Access-log batches from a busy Envoy can exceed the default 4 MiB.
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]

_SNAPSHOT = object()  # stream event: the node's snapshot changed
_EOF = object()  # stream event: Envoy closed its side


class _BadRequest(Exception):
    pass


def _type_order(type_urls: Iterable[str]) -> list[str]:
    ts = set(type_urls)
    return [t for t in PUSH_ORDER if t in ts] + sorted(t for t in ts if t not in PUSH_ORDER)


# ---------------------------------------------------------------------------------------------
# Status


@dataclass
class _TypeStatus:
    mode: str
    subscribed: tuple[str, ...] | None = None  # None: wildcard
    sent_version: str | None = None
    sent_at: float | None = None
    acked_version: str | None = None
    acked_at: float | None = None
    nack: dict[str, Any] | None = None
    resource_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "acked_version": self.acked_version,
            "acked_at": self.acked_at,
            "sent_version": self.sent_version,
            "sent_at": self.sent_at,
            "pending": self.sent_version is not None and self.sent_version != self.acked_version
                       and not (self.nack and self.nack["version"] == self.sent_version),
            "nack": dict(self.nack) if self.nack else None,
            "resource_names": list(self.resource_names),
            "subscribed": None if self.subscribed is None else list(self.subscribed),
        }


@dataclass
class _NodeState:
    streams: set[_Stream] = field(default_factory=set)
    types: dict[str, _TypeStatus] = field(default_factory=dict)
    envoy_version: str = ""
    connected_at: float | None = None
    disconnected_at: float | None = None


# ---------------------------------------------------------------------------------------------
# The server


class XdsServer:
    """Per-node snapshots, ADS streams, status and counters; optionally the gRPC server itself.

    Use it without gRPC in tests by driving `servicer` directly, or `await start(path)` to listen
    on a unix socket (Envoy's static `xds_cluster` points at it with a `pipe` address).
    """

    def __init__(self, *, on_nack: NackCallback | None = None, on_ack: AckCallback | None = None,
                 force_eds_after_cds: bool = True) -> None:
        self.on_nack = on_nack
        self.on_ack = on_ack
        # Resend endpoints after their cluster changed (see module docstring). Switchable only
        # so tests can show what Envoy does without it.
        self.force_eds_after_cds = force_eds_after_cds
        self._snapshots: dict[str, Snapshot] = {}
        self._nodes: dict[str, _NodeState] = {}
        self._counters: Counter[tuple[str, str]] = Counter()
        self._stream_ids = itertools.count(1)
        self._nonces = itertools.count(1)
        # A per-process prefix: a nonce from an earlier server process can never match one of ours.
        self._nonce_prefix = secrets.token_hex(3)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._grpc: grpc.aio.Server | None = None
        self._socket_path: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._als: Any | None = None
        self.servicer = AdsServicer(self)

    # ---- snapshots ----------------------------------------------------------------------------
    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> None:
        """Serve `snapshot` to `node_id` from now on, and push it to its open streams."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"set_snapshot needs a Snapshot, not {type(snapshot).__name__}")
        self._snapshots[node_id] = snapshot
        self._in_loop(lambda: self._notify(node_id))

    def get_snapshot(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    def clear_snapshot(self, node_id: str) -> None:
        """Forget the node's snapshot. Its Envoy keeps what it has; nothing more is pushed."""
        self._snapshots.pop(node_id, None)

    def _in_loop(self, fn: Callable[[], None]) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn)
        else:
            fn()

    def _notify(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is not None:
            for s in list(node.streams):
                s.notify()
        self._bump()

    # ---- status -----------------------------------------------------------------------------
    def nodes(self) -> dict[str, dict[str, Any]]:
        """Every node that ever connected or has a snapshot: connection and sync state."""
        out = {}
        for node_id in sorted(set(self._nodes) | set(self._snapshots)):
            n = self._nodes.get(node_id) or _NodeState()
            snap = self._snapshots.get(node_id)
            out[node_id] = {
                "connected": bool(n.streams),
                "streams": len(n.streams),
                "modes": sorted({s.mode for s in n.streams}),
                "envoy_version": n.envoy_version,
                "connected_at": n.connected_at,
                "disconnected_at": n.disconnected_at,
                "snapshot_version": snap.version if snap else None,
                "sync": self.sync_state(node_id),
            }
        return out

    def status(self, node_id: str) -> dict[str, dict[str, Any]]:
        """Per type URL: `acked_version`, `sent_version`, `nack` ({version, message, code, at,
        resource_names} or None), `resource_names` (what Envoy was given), `subscribed` (None
        for wildcard), `pending`, `mode`, and times. Empty for a node that never connected."""
        n = self._nodes.get(node_id)
        if n is None:
            return {}
        types = dict(n.types)
        return {t: types[t].to_dict() for t in _type_order(types)}

    def sync_state(self, node_id: str) -> str:
        """Where the node's Envoy stands with its current snapshot:

        - `no-snapshot`: nothing to serve yet; `disconnected`: no open stream;
        - `pending`: some type was not answered yet (or Envoy has not asked for CDS and LDS);
        - `nacked`: every type is answered, and Envoy refused the current version of at least
          one: it runs its last good version of that type;
        - `synced`: Envoy ACKed the current version of every type it asked for.
        """
        snap = self._snapshots.get(node_id)
        if snap is None:
            return "no-snapshot"
        n = self._nodes.get(node_id)
        if n is None or not n.streams:
            return "disconnected"
        types = dict(n.types)
        if CLUSTER not in types or LISTENER not in types:
            return "pending"  # Envoy has not asked for its wildcard types yet
        nacked = False
        for t, st in types.items():
            v = snap.type_version(t)
            if st.sent_version != v:
                return "pending"
            if st.nack and st.nack["version"] == v:
                nacked = True
            elif st.acked_version != v:
                return "pending"
        return "nacked" if nacked else "synced"

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: per kind, per type short name (CDS, EDS, ...)."""
        out: dict[str, Any] = {}
        for (kind, t), v in sorted(self._counters.items()):
            if t:
                out.setdefault(kind, {})[t] = v
            else:
                out[kind] = v
        out["streams_active"] = sum(len(n.streams) for n in self._nodes.values())
        return out

    def _count(self, kind: str, type_url: str = "", n: int = 1) -> None:
        if n:
            self._counters[(kind, short_name(type_url) if type_url else "")] += n

    # ---- waiting ----------------------------------------------------------------------------
    def _bump(self) -> None:
        ev = self._changed
        if ev is not None:
            self._changed = None
            ev.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate()` holds; it is checked after every status change."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()  # so other threads hand changes over safely
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("xDS status did not reach the expected state in time")
            if self._changed is None:
                self._changed = asyncio.Event()
            ev = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), min(left, 0.5))

    async def wait_synced(self, node_id: str, timeout: float = 10.0) -> str:
        """Wait until the node's Envoy ACKed or NACKed the current snapshot; returns the state."""
        await self.wait_for(lambda: self.sync_state(node_id) in ("synced", "nacked"), timeout)
        return self.sync_state(node_id)

    # ---- stream bookkeeping (called by streams) ---------------------------------------------
    def _attach(self, stream: _Stream, node: Any) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        n = self._nodes.setdefault(stream.node_id or "", _NodeState())
        n.streams.add(stream)
        n.connected_at = time.time()
        v = node.user_agent_build_version.version
        if node.HasField("user_agent_build_version"):
            n.envoy_version = f"{v.major_number}.{v.minor_number}.{v.patch}"
        self._count("streams_opened")
        log.info("xds: node %s connected (%s, stream %d, envoy %s)", stream.node_id, stream.mode,
                 stream.id, n.envoy_version or "?")
        self._bump()

    def _detach(self, stream: _Stream) -> None:
        n = self._nodes.get(stream.node_id or "")
        if n is None or stream not in n.streams:
            return
        n.streams.discard(stream)
        n.disconnected_at = time.time()
        self._count("streams_closed")
        log.info("xds: node %s disconnected (stream %d)", stream.node_id, stream.id)
        self._bump()

    def _type(self, stream: _Stream, t: str) -> _TypeStatus:
        n = self._nodes.setdefault(stream.node_id or "", _NodeState())
        st = n.types.get(t)
        if st is None or st.mode != stream.mode:
            st = n.types[t] = _TypeStatus(mode=stream.mode)
        return st

    def _subscribed(self, stream: _Stream, t: str, names: Iterable[str] | None) -> None:
        self._type(stream, t).subscribed = None if names is None else tuple(sorted(names))

    def _sent(self, stream: _Stream, t: str, version: str, names: Iterable[str], n: int) -> None:
        st = self._type(stream, t)
        st.sent_version, st.sent_at = version, time.time()
        st.resource_names = tuple(sorted(names))
        self._count("responses", t)
        self._count("resources_sent", t, n)
        self._bump()

    def _envoy_has(self, stream: _Stream, t: str, version: str) -> None:
        """Envoy said on (re)connect which version it runs: that is its last ACKed version."""
        st = self._type(stream, t)
        if st.acked_version is None:
            st.acked_version = version

    def _synced(self, stream: _Stream, t: str, version: str, names: Iterable[str]) -> None:
        """Delta: Envoy already has everything of `version` (nothing needed sending)."""
        st = self._type(stream, t)
        st.sent_version = st.acked_version = version
        st.resource_names = tuple(sorted(names))
        st.nack = None
        self._bump()

    def _ack(self, stream: _Stream, t: str, version: str, names: Iterable[str]) -> None:
        st = self._type(stream, t)
        st.acked_version, st.acked_at, st.nack = version, time.time(), None
        st.resource_names = tuple(sorted(names))
        self._count("acks", t)
        log.debug("xds: %s ACK %s %s", stream.node_id, short_name(t), version)
        self._bump()
        if self.on_ack is not None:
            self._callback(self.on_ack, stream.node_id or "", t, version)

    def _nack(self, stream: _Stream, t: str, version: str, detail: Any, names: list[str]) -> None:
        st = self._type(stream, t)
        st.nack = {"version": version, "message": detail.message, "code": detail.code,
                   "at": time.time(), "resource_names": list(names)}
        self._count("nacks", t)
        log.warning("xds: node %s rejected %s version %s: %s", stream.node_id, short_name(t),
                    version, detail.message)
        self._bump()
        if self.on_nack is not None:
            self._callback(self.on_nack, stream.node_id or "", t, version, detail.message, list(names))

    def _callback(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            r = fn(*args)
            if inspect.isawaitable(r):
                task = asyncio.ensure_future(r)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:  # a broken callback must not break the stream
            log.exception("xds: callback %r failed", fn)

    def _nonce(self) -> str:
        return f"{self._nonce_prefix}-{next(self._nonces)}"

    # ---- gRPC server ------------------------------------------------------------------------
    async def start(self, socket_path: str, *, als: Any | None = None,
                    options: list[tuple[str, Any]] | None = None) -> None:
        """Listen on the unix socket `socket_path` (and serve the ALS receiver `als` there too)."""
        self._loop = asyncio.get_running_loop()
        if len(os.fsencode(socket_path)) >= 108:
            raise ValueError(f"unix socket path is too long (max 107 bytes): {socket_path}")
        os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
        _remove_stale_socket(socket_path)
        server = grpc.aio.server(options=options or SERVER_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.servicer, server)
        if als is not None:
            als.register(server)
        if server.add_insecure_port(f"unix:{os.path.abspath(socket_path)}") == 0:
            raise OSError(f"cannot listen on unix:{socket_path}")
        await server.start()
        # The socket is the agent's control channel: only the owner (root) may connect.
        with contextlib.suppress(OSError):
            os.chmod(socket_path, 0o600)
        if als is not None:
            await als.start()
        self._grpc, self._socket_path = server, socket_path
        self._als = als
        log.info("xds: serving on unix:%s", socket_path)

    async def stop(self, grace: float | None = 0.5) -> None:
        """Close all streams and the socket. Envoys keep their configuration and reconnect."""
        server, self._grpc = self._grpc, None
        if server is not None:
            await server.stop(grace)
        als, self._als = self._als, None
        if als is not None:
            await als.stop()
        if self._socket_path:
            _remove_stale_socket(self._socket_path)
            self._socket_path = None
        for task in list(self._tasks):
            task.cancel()


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    os.unlink(path)


# ---------------------------------------------------------------------------------------------
# Streams


class _Stream:
    """One ADS stream (one Envoy connection). Requests and snapshot changes are merged into one
    queue and handled in order by the RPC's own task, so stream state needs no locks."""

    mode = ""

    def __init__(self, server: XdsServer) -> None:
        self.server = server
        self.id = next(server._stream_ids)
        self.node_id: str | None = None
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self._notified = False

    def notify(self) -> None:
        if not self._notified:  # coalesce: the handler always reads the newest snapshot
            self._notified = True
            self.events.put_nowait(_SNAPSHOT)

    async def _pump(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for req in requests:
                self.events.put_nowait(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the RPC broke: same as Envoy going away
            log.debug("xds: stream %d read failed: %r", self.id, e)
        finally:
            self.events.put_nowait(_EOF)

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        pump = asyncio.create_task(self._pump(requests))
        try:
            while True:
                ev = await self.events.get()
                if ev is _EOF:
                    return
                if ev is _SNAPSHOT:
                    self._notified = False
                    if self.node_id is None:
                        continue
                    responses = self.on_snapshot()
                else:
                    if self.node_id is None:
                        if not ev.node.id:
                            raise _BadRequest("the first request must carry node.id")
                        self.node_id = ev.node.id
                        self.server._attach(self, ev.node)
                    responses = self.on_request(ev)
                for r in responses:
                    yield r
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            self.server._detach(self)

    def on_request(self, req: Any) -> list[Any]:
        raise NotImplementedError

    def on_snapshot(self) -> list[Any]:
        raise NotImplementedError


@dataclass
class _SotwType:
    names: frozenset[str] | None = None  # None: wildcard
    nonce: str = ""  # latest nonce sent ("" = nothing sent on this stream yet)
    answered: bool = True  # the latest nonce got its ACK/NACK
    sent_version: str | None = None
    sent: Mapping[str, str] = field(default_factory=dict)  # name → version in the latest response
    acked: Mapping[str, str] | None = None  # name → version Envoy last accepted (None: unknown)
    envoy_had: str = ""  # the version Envoy said it runs when this stream opened


class _SotwStream(_Stream):
    mode = "sotw"

    def __init__(self, server: XdsServer) -> None:
        super().__init__(server)
        self.types: dict[str, _SotwType] = {}

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> list[Any]:
        srv, t = self.server, req.type_url
        st = self.types.get(t)
        first = st is None
        if st is None:
            st = self.types[t] = _SotwType()
        if req.response_nonce and st.nonce:
            if req.response_nonce != st.nonce:
                srv._count("stale_nonces", t)  # answers an older response: ignore it entirely
                return []
            if not st.answered:
                st.answered = True
                if req.HasField("error_detail"):
                    # Envoy's message rarely names the resource; the suspects are the ones that
                    # changed since the version it last accepted (as delta would have sent).
                    suspects = sorted(n for n, v in st.sent.items()
                                      if st.acked is None or st.acked.get(n) != v)
                    srv._nack(self, t, st.sent_version or "", req.error_detail,
                              suspects or sorted(st.sent))
                else:
                    st.acked = st.sent
                    srv._ack(self, t, st.sent_version or "", st.sent)
        elif first and req.version_info:
            srv._envoy_has(self, t, req.version_info)
            st.envoy_had = req.version_info
        names: frozenset[str] | None = frozenset(req.resource_names)
        if "*" in req.resource_names or (t in WILDCARD_TYPES and not req.resource_names):
            names = None
        changed = names != st.names
        st.names = names
        srv._subscribed(self, t, names)
        snap = srv.get_snapshot(self.node_id or "")
        if snap is None:
            return []  # answered when the node's snapshot arrives
        if not st.nonce or changed or st.sent_version != snap.type_version(t):
            return self._push(snap, [t])
        return []

    def on_snapshot(self) -> list[Any]:
        snap = self.server.get_snapshot(self.node_id or "")
        if snap is None:
            return []
        due = [t for t, st in self.types.items() if st.sent_version != snap.type_version(t)]
        return self._push(snap, due)

    def _push(self, snap: Snapshot, due: Iterable[str]) -> list[Any]:
        """Responses for the `due` types, in warming order."""
        out = []
        due_set = set(due)
        for t in _type_order(set(self.types) | due_set):
            if t not in due_set:
                continue
            resp, changed = self._response(snap, t)
            out.append(resp)
            if (t == CLUSTER and ENDPOINT in self.types and self.server.force_eds_after_cds
                    and any(snap.eds_name(c) for c in changed)):
                due_set.add(ENDPOINT)  # comes later in the order: sent in this same pass
        return out

    def _response(self, snap: Snapshot, t: str) -> tuple[discovery_pb2.DiscoveryResponse, list[str]]:
        """The response for type `t`, and the names it changes (resent with a new version)."""
        st = self.types[t]
        packed, versions = snap.packed(t), snap.resource_versions(t)
        names = list(packed) if st.names is None else sorted(n for n in st.names if n in packed)
        version = snap.type_version(t)
        resp = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=t, nonce=self.server._nonce(),
            resources=[packed[n] for n in names])
        sent = {n: versions[n] for n in names}
        changed = [n for n, v in sent.items() if n in st.sent and st.sent[n] != v]
        if st.acked is None and st.envoy_had == version:
            st.acked = sent  # a reconnect: Envoy already runs exactly this
        st.nonce, st.answered, st.sent_version, st.sent = resp.nonce, False, version, sent
        self.server._sent(self, t, version, names, len(names))
        return resp, changed


@dataclass
class _Pending:
    version: str
    upserted: tuple[str, ...]
    removed: tuple[str, ...]
    prev: dict[str, str | None]  # name → version Envoy had before this response
    new: dict[str, str | None]  # name → version this response gave it (None: removed)


@dataclass
class _DeltaType:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)  # explicit subscriptions
    known: dict[str, str] = field(default_factory=dict)  # what Envoy has: name → version
    pending: dict[str, _Pending] = field(default_factory=dict)  # nonce → response awaiting ACK
    told_missing: set[str] = field(default_factory=set)
    responded: bool = False
    nacked_version: str | None = None


class _DeltaStream(_Stream):
    mode = "delta"
    MAX_PENDING = 64  # Envoy answers every response; this only bounds a misbehaving client

    def __init__(self, server: XdsServer) -> None:
        super().__init__(server)
        self.types: dict[str, _DeltaType] = {}

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> list[Any]:
        srv, t = self.server, req.type_url
        st = self.types.get(t)
        first = st is None
        if st is None:
            st = self.types[t] = _DeltaType()
            # An empty first subscription to a wildcard type is the legacy wildcard request.
            st.wildcard = t in WILDCARD_TYPES and not req.resource_names_subscribe
            # Envoy reconnecting tells us what it still has; trust it, so nothing is resent.
            st.known = dict(req.initial_resource_versions)
        snap = srv.get_snapshot(self.node_id or "")
        if req.response_nonce:
            p = st.pending.pop(req.response_nonce, None)
            if p is None:
                srv._count("stale_nonces", t)
            elif req.HasField("error_detail"):
                for n, prev in p.prev.items():
                    if st.known.get(n) == p.new[n]:  # not superseded by a later response
                        if prev is None:
                            st.known.pop(n, None)
                        else:
                            st.known[n] = prev
                # Do not resend what Envoy just refused; the next snapshot will be diffed again.
                st.nacked_version = p.version
                srv._nack(self, t, p.version, req.error_detail, list(p.upserted) + list(p.removed))
            else:
                version = p.version
                if snap is not None and not st.pending:
                    up, rm = self._diff(snap, t, st)
                    if not up and not rm:
                        version = snap.type_version(t)  # nothing newer is owed: Envoy is current
                st.nacked_version = None
                srv._ack(self, t, version, st.known)
        # Unsubscribe before subscribe: if both name one resource, it stays subscribed.
        for n in req.resource_names_unsubscribe:
            if n == "*":
                st.wildcard = False
            else:
                st.names.discard(n)
                st.told_missing.discard(n)
                if not st.wildcard:
                    st.known.pop(n, None)
        for n in req.resource_names_subscribe:
            if n == "*":
                st.wildcard = True
            elif n not in st.names:
                st.names.add(n)
                st.told_missing.discard(n)
                if not first:  # (re)subscribing: send it even if we think Envoy has it
                    st.known.pop(n, None)
        if req.resource_names_subscribe or req.resource_names_unsubscribe or first:
            srv._subscribed(self, t, None if st.wildcard else st.names)
        if snap is None:
            return []
        resp = self._response(snap, t, always=not st.responded)
        return [resp] if resp is not None else []

    def on_snapshot(self) -> list[Any]:
        snap = self.server.get_snapshot(self.node_id or "")
        if snap is None:
            return []
        out = []
        for t in _type_order(self.types):
            resp = self._response(snap, t, always=not self.types[t].responded)
            if resp is None:
                continue
            out.append(resp)
            if t == CLUSTER and self.server.force_eds_after_cds and ENDPOINT in self.types:
                eds = self.types[ENDPOINT]
                for r in resp.resources:
                    cla = snap.eds_name(r.name)
                    if cla is not None and cla in eds.known:
                        del eds.known[cla]  # resend: the re-created cluster warms on it
        return out

    def _diff(self, snap: Snapshot, t: str, st: _DeltaType) -> tuple[list[str], list[str]]:
        """(upserts, removals) that would bring Envoy to `snap`. Removals include subscribed
        names that do not exist and Envoy was not told about yet."""
        packed, versions = snap.packed(t), snap.resource_versions(t)
        wanted = set(packed) if st.wildcard else {n for n in st.names if n in packed}
        upserts = [n for n in sorted(wanted) if st.known.get(n) != versions[n]]
        gone = {n for n in st.known if n not in packed}
        missing = {n for n in st.names if n not in packed and n not in st.known
                   and n not in st.told_missing}
        return upserts, sorted(gone | missing)

    def _response(self, snap: Snapshot, t: str, *, always: bool) -> Any:
        st = self.types[t]
        upserts, removed = self._diff(snap, t, st)
        version = snap.type_version(t)
        if not always and version == st.nacked_version:
            return None
        if not upserts and not removed and not always:
            if not st.pending:
                self.server._synced(self, t, version, st.known)
            return None
        packed, versions = snap.packed(t), snap.resource_versions(t)
        prev: dict[str, str | None] = {n: st.known.get(n) for n in upserts + removed}
        new: dict[str, str | None] = {}
        for n in upserts:
            st.known[n] = new[n] = versions[n]
            st.told_missing.discard(n)
        for n in removed:
            st.known.pop(n, None)
            new[n] = None
        # Envoy now knows these do not exist; tell it again only after they come and go again.
        st.told_missing.update(n for n in removed if n in st.names)
        nonce = self.server._nonce()
        st.pending[nonce] = _Pending(version, tuple(upserts), tuple(removed), prev, new)
        while len(st.pending) > self.MAX_PENDING:
            st.pending.pop(next(iter(st.pending)))
        st.responded = True
        self.server._sent(self, t, version, st.known, len(upserts))
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version, type_url=t, nonce=nonce,
            resources=[discovery_pb2.Resource(name=n, version=versions[n], resource=packed[n])
                       for n in upserts],
            removed_resources=removed)


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """The gRPC face of `XdsServer`: one `_Stream` per RPC."""

    def __init__(self, server: XdsServer) -> None:
        self._server = server

    async def StreamAggregatedResources(self, request_iterator: AsyncIterator[Any],
                                        context: Any) -> AsyncIterator[Any]:
        async with contextlib.aclosing(self._serve(_SotwStream(self._server), request_iterator,
                                                   context)) as responses:
            async for r in responses:
                yield r

    async def DeltaAggregatedResources(self, request_iterator: AsyncIterator[Any],
                                       context: Any) -> AsyncIterator[Any]:
        async with contextlib.aclosing(self._serve(_DeltaStream(self._server), request_iterator,
                                                   context)) as responses:
            async for r in responses:
                yield r

    async def _serve(self, stream: _Stream, requests: AsyncIterator[Any],
                     context: Any) -> AsyncIterator[Any]:
        # aclosing: when gRPC drops the RPC, the stream's `finally` (detach from the node) runs now,
        # not whenever the generator is garbage collected.
        async with contextlib.aclosing(stream.run(requests)) as responses:
            try:
                async for r in responses:
                    yield r
            except _BadRequest as e:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))


async def _abort(context: Any, code: grpc.StatusCode, message: str) -> None:
    r = context.abort(code, message)
    if isinstance(r, Awaitable):
        await r


def run_in_thread_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """An event loop running in a daemon thread (for callers that are not async themselves,
    such as tests). Stop it with `loop.call_soon_threadsafe(loop.stop)` and join the thread."""
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, name="xds-loop", daemon=True)
    t.start()
    return loop, t
