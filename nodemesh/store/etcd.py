"""The store on etcd v3: many hosts, one consistent store (docs/store.md).

A thin client over etcd's own gRPC API (``grpcio`` and etcd's published protos, compiled into
`nodemesh.store.etcdrpc`). The mapping onto the `Store` interface:

- Store revisions are etcd revisions: an object's ``resourceVersion`` is its key's mod revision
  (not stored in the JSON; filled in on every read). One transaction is one etcd Txn, so all the
  writes of a transaction share one revision (SQLite gives each write its own).
- A transaction reads at one pinned etcd revision (the first read's) and commits with a compare
  on the mod revision of every key it read (put, put_status, create and delete read first), plus
  a per-kind guard key for every kind it listed, so a lost race fails the commit and raises
  `Conflict`; nothing is written then. The caller retries (as `identities.allocate_identity`
  does) or gives up.
- A watch is an etcd watch stream over the prefix, from ``since + 1``, with previous values for
  deletes; a compacted start revision surfaces as `Compacted`.
- Every call has a deadline; a store that does not answer raises
  ``NodemeshError("store unavailable: ...")`` within `STORE_TIMEOUT` seconds.

Key layout under the prefix (default ``/nodemesh/``)::

    <prefix><kind>/<namespace>/<name>   the object, JSON (cluster-scoped: empty namespace)
    <prefix>@rev                        written by every transaction: its mod revision is the
                                        revision of the last write under the prefix
    <prefix>@kind/<kind>                written by every transaction that writes <kind>: the
                                        guard that makes a list conflict with later writes
"""

from __future__ import annotations

import contextlib
import copy
import json
import queue
import threading
import time
import urllib.parse
from collections.abc import Iterator

import grpc

from nodemesh.errors import Conflict, NodemeshError
from nodemesh.store.base import ADDED, DELETED, MODIFIED, Compacted, Event, Store, Txn
from nodemesh.store.etcdrpc import kv_pb2, rpc_pb2

# A store that does not answer within this many seconds is unavailable (issue 10 item 5: the CLI
# fails within 10 s). One attempt gets at most ATTEMPT_TIMEOUT, the next endpoint gets the rest.
# STORE_TIMEOUT leaves a CLI command's start-up (1-3 s on a busy machine) inside the 10 s.
STORE_TIMEOUT = 5.5
ATTEMPT_TIMEOUT = 3.5
# A fresh client waits up to this long (within STORE_TIMEOUT) for a connection to any endpoint,
# and starts with the first one that is up, rather than spending ATTEMPT_TIMEOUT on a member that
# accepts TCP but does not answer (SIGSTOPped, overloaded). It stops waiting when every endpoint
# has failed to connect.
CONNECT_GRACE = 2.5
# A watch stream that has been silent this long is asked for its progress; one that does not
# answer that within WATCH_PROGRESS_TIMEOUT is dead (its member is stopped, or cut off), and the
# watcher moves on to the next endpoint: a change waits at most about their sum, not the ~15 s
# gRPC's keepalive takes to notice.
WATCH_QUIET = 2.0
WATCH_PROGRESS_TIMEOUT = 3.0
# etcd refuses a Txn with more than --max-txn-ops (default 128) compares; past this many reads a
# transaction compares the prefix's @rev key instead (any write under the prefix conflicts).
MAX_COMPARES = 100
# Compact etcd's history like the SQLite store compacts its events: a writer whose commit crosses
# a multiple of COMPACT_EVERY revisions compacts away all but the last KEEP_REVISIONS (0: never).
KEEP_REVISIONS = 20000
COMPACT_EVERY = 1000
# Most events one events_since() returns (like SQLite's).
EVENTS_LIMIT = 5000

# What a member that is up but has no quorum (no leader) answers: the store is unavailable, as
# when nothing answers (found by tests/integration/test_etcd_faults.py, two members stopped).
_NO_QUORUM = frozenset({"context deadline exceeded", "etcdserver: request timed out",
                        "etcdserver: no leader", "etcdserver: leader changed"})

_REV_KEY = "@rev"
_KIND_KEY = "@kind/"
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10000),  # etcd's --grpc-keepalive-min-time is 5 s
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    # a member that comes back (or a node whose path to it returns) is found within 1 s
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 << 20),
]


def _range_end(prefix: bytes) -> bytes:
    """The end of the key range that holds every key starting with `prefix` (etcd's rule)."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _encode(obj: dict) -> bytes:
    stored = copy.deepcopy(obj)
    stored["metadata"].pop("resourceVersion", None)
    return json.dumps(stored, separators=(",", ":"), sort_keys=True).encode()


def _decode(value: bytes, revision: int) -> dict:
    obj = json.loads(value)
    obj["metadata"]["resourceVersion"] = str(revision)
    return obj


class EtcdError(NodemeshError):
    """etcd answered a call with an error (not "unavailable"): `code` is the gRPC status."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"store: etcd {method}: {code.name.lower()}: {details}")
        self.code = code
        self.details = details


class _Client:
    """Channels to the endpoints, in order; a call that finds one unreachable tries the next."""

    def __init__(self, endpoints: list[str], ca: str | None, cert: str | None,
                 key: str | None) -> None:
        if not endpoints:
            raise NodemeshError("store unavailable: no etcd endpoints configured")
        self.endpoints = endpoints
        creds = None
        if ca or cert or any(e.startswith("https://") for e in endpoints):
            def read(path: str | None) -> bytes | None:
                if not path:
                    return None
                with open(path, "rb") as f:
                    return f.read()
            creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
        self._channels = []
        for ep in endpoints:
            u = urllib.parse.urlsplit(ep if "://" in ep else "http://" + ep)
            if not u.hostname or not u.port:
                raise NodemeshError(f"etcd endpoint {ep!r}: want scheme://host:port", 2)
            target = f"{u.hostname}:{u.port}"
            ch = (grpc.secure_channel(target, creds, _CHANNEL_OPTIONS) if creds is not None
                  else grpc.insecure_channel(target, _CHANNEL_OPTIONS))
            self._channels.append(ch)
        self._current = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._states = [grpc.ChannelConnectivity.IDLE] * len(self._channels)
        self._fresh = len(self._channels) > 1  # no call made yet: see which endpoint is up first
        if self._fresh:
            for i, ch in enumerate(self._channels):  # connects to every endpoint now
                ch.subscribe(lambda state, i=i: self._state(i, state), try_to_connect=True)

    def _state(self, i: int, state: grpc.ChannelConnectivity) -> None:
        with self._ready:
            self._states[i] = state
            self._ready.notify_all()

    def _pick(self, deadline: float) -> None:
        """Before the first call: start with an endpoint that is connected (the current one if it
        is), waiting up to CONNECT_GRACE for one to be."""
        ready = grpc.ChannelConnectivity.READY
        with self._ready:
            if not self._fresh:
                return
            self._fresh = False
            until = min(deadline, time.monotonic() + CONNECT_GRACE)
            while self._states[self._current] != ready:
                up = [i for i, st in enumerate(self._states) if st == ready]
                if up:
                    self._current = up[0]
                    return
                if all(st == grpc.ChannelConnectivity.TRANSIENT_FAILURE for st in self._states):
                    return
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._ready.wait(left)

    def _method(self, ch: grpc.Channel, path: str, req_cls: type, resp_cls: type):
        return ch.unary_unary(path, request_serializer=req_cls.SerializeToString,
                              response_deserializer=resp_cls.FromString)

    def call(self, method: str, request, *, idempotent: bool = True):
        """One unary call to etcd ("KV/Range", ...) with the store's deadline and failover."""
        req_cls = type(request)
        resp_cls = getattr(rpc_pb2, req_cls.__name__.replace("Request", "Response"))
        if req_cls is rpc_pb2.CompactionRequest:
            resp_cls = rpc_pb2.CompactionResponse
        deadline = time.monotonic() + STORE_TIMEOUT
        errors = []
        self._pick(deadline)
        with self._lock:
            first = self._current
        n = len(self._channels)
        for attempt in range(n):
            i = (first + attempt) % n
            left = deadline - time.monotonic()
            if left <= 0:
                break
            timeout = min(left, ATTEMPT_TIMEOUT) if attempt < n - 1 else left
            fn = self._method(self._channels[i], f"/etcdserverpb.{method}", req_cls, resp_cls)
            try:
                resp = fn(request, timeout=timeout)
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        and not (code == grpc.StatusCode.UNKNOWN and details in _NO_QUORUM):
                    raise EtcdError(method, code, details) from None
                errors.append(f"{self.endpoints[i]}: {code.name.lower()}: {details}")
                self.rotate(i)
                if not idempotent and "failed to connect" not in details:
                    # It may have reached etcd and been applied: sending it again could apply
                    # it twice (or fail its compares and look like a lost race).
                    raise NodemeshError(f"store unavailable: etcd did not confirm the "
                                        f"transaction, which may or may not have been applied "
                                        f"({errors[-1]})") from None
                continue
            return resp
        why = "; ".join(errors) or f"none within {STORE_TIMEOUT:.0f} s"
        if any(err.endswith(tuple(_NO_QUORUM)) for err in errors):
            raise NodemeshError(f"store unavailable: etcd has no quorum, no member could serve "
                                f"the request ({why})")
        raise NodemeshError(f"store unavailable: no etcd endpoint answered ({why})")

    def watch_channel(self) -> tuple[grpc.Channel, str]:
        with self._lock:
            i = self._current
        return self._channels[i], self.endpoints[i]

    def rotate(self, failed: int | None = None) -> None:
        """Use the next endpoint from now on (unless another call moved on already)."""
        with self._lock:
            if failed is None or failed == self._current:
                self._current = (self._current + 1) % len(self._channels)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


class _WatchStream:
    """One etcd watch over the store's prefix, read by a thread into a queue."""

    def __init__(self, store: EtcdStore, since: int) -> None:
        self.position = since  # the revision of the last event handed out
        self._store = store
        self._q: queue.Queue = queue.Queue()
        self._requests: queue.Queue = queue.Queue()
        ch, self._endpoint = store._client.watch_channel()
        watch = ch.stream_stream("/etcdserverpb.Watch/Watch",
                                 request_serializer=rpc_pb2.WatchRequest.SerializeToString,
                                 response_deserializer=rpc_pb2.WatchResponse.FromString)
        self._requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=store._prefix, range_end=_range_end(store._prefix),
            start_revision=since + 1, prev_kv=True)))
        self._created = False
        self._opened = self._heard = time.monotonic()  # when it opened, when it last answered
        self._asked: float | None = None  # when a progress request went unanswered since
        # "hasleader": etcd ends the stream when this member loses the leader (clientv3's
        # WithRequireLeader), so a watcher on a member cut off from quorum moves on.
        self._call = watch(iter(self._requests.get, None), metadata=(("hasleader", "true"),))
        self._thread = threading.Thread(target=self._read, name="etcd-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for resp in self._call:
                self._q.put(resp)
        except grpc.RpcError as e:
            self._q.put(e)
        except Exception as e:
            self._q.put(e)
        else:
            self._q.put(None)

    def _unavailable(self, why: str) -> NodemeshError:
        self._store._client.rotate()
        return NodemeshError(f"store unavailable: etcd watch at {self._endpoint}: {why}")

    def next_batch(self, timeout: float) -> list[Event]:
        """The events of the next watch response (after `position`); [] when none came."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            left = deadline - now
            if not self._created:
                left = max(left, self._opened + STORE_TIMEOUT - now)  # it must answer its creation
            if left <= 0:
                return []
            if self._created:
                self._check_alive(now)
            try:
                item = self._q.get(timeout=min(left, 0.5) if self._created else left)
            except queue.Empty:
                if not self._created:
                    self.close()
                    raise self._unavailable(f"no answer within {STORE_TIMEOUT:.0f} s") from None
                continue
            self._heard, self._asked = time.monotonic(), None
            if item is None:
                raise self._unavailable("stream ended")
            if isinstance(item, grpc.RpcError):
                raise self._unavailable(f"{item.code().name.lower()}: {item.details()}")
            if isinstance(item, Exception):
                raise item
            resp: rpc_pb2.WatchResponse = item
            if resp.compact_revision:
                self.close()
                raise Compacted(f"revision {self.position} is compacted (oldest kept: "
                                f"{resp.compact_revision})")
            if resp.created:
                self._created = True
            if resp.canceled:
                self.close()
                raise self._unavailable(f"watch canceled: {resp.cancel_reason}")
            events = [ev for e in resp.events if (ev := self._store._event(e)) is not None]
            if resp.events:
                self.position = max(self.position, resp.events[-1].kv.mod_revision)
            if events:
                return events

    def _check_alive(self, now: float) -> None:
        """Ask a quiet stream for its progress; give up on one that does not answer."""
        if self._asked is None:
            if now - self._heard >= WATCH_QUIET:
                self._asked = now
                self._requests.put(rpc_pb2.WatchRequest(
                    progress_request=rpc_pb2.WatchProgressRequest()))
        elif now - self._asked >= WATCH_PROGRESS_TIMEOUT:
            self.close()
            raise self._unavailable(f"no answer to a progress request within "
                                    f"{WATCH_PROGRESS_TIMEOUT:.0f} s")

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        with self._store._lock:
            self._store._streams.discard(self)


class _EtcdTxn(Txn):
    def __init__(self, store: EtcdStore) -> None:
        self._s = store
        self.rev: int | None = None  # the etcd revision every read of this transaction sees
        self._cache: dict[bytes, tuple[int, bytes | None]] = {}  # key → (mod revision, value)
        self._reads: dict[bytes, int] = {}  # key → mod revision it had (0: absent)
        self._guards: dict[bytes, int] = {}
        self._writes: dict[bytes, tuple[str, dict | None]] = {}  # key → (kind, obj or deleted)
        self._produced: list[dict] = []  # objects handed back, whose resourceVersion is the commit's

    # ---- reads at one revision --------------------------------------------------------------
    def _range(self, key: bytes, range_end: bytes = b"") -> list:
        req = rpc_pb2.RangeRequest(key=key, range_end=range_end, revision=self.rev or 0)
        try:
            resp = self._s._client.call("KV/Range", req)
        except EtcdError as e:
            if e.code == grpc.StatusCode.OUT_OF_RANGE:  # our read revision was compacted
                raise Conflict(f"store: transaction outlived compaction ({e.details}); retry") from e
            raise
        if self.rev is None:
            self.rev = resp.header.revision
        return list(resp.kvs)

    def _fetch(self, key: bytes) -> tuple[int, bytes | None]:
        if key not in self._cache:
            kvs = self._range(key)
            self._cache[key] = (kvs[0].mod_revision, kvs[0].value) if kvs else (0, None)
        return self._cache[key]

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        key = self._s._key(kind, namespace, name)
        if key in self._writes:
            obj = self._writes[key][1]
            return copy.deepcopy(obj) if obj is not None else None
        mod, value = self._fetch(key)
        self._reads[key] = mod
        return _decode(value, mod) if value is not None else None

    def list(self, kind: str | None = None, namespace: str | None = None) -> list[dict]:
        s = self._s
        if kind is None:
            base, guard = s._prefix, s._prefix + _REV_KEY.encode()
        else:
            base = s._prefix + kind.encode() + b"/"
            if namespace is not None:
                base += namespace.encode() + b"/"
            guard = s._prefix + (_KIND_KEY + kind).encode()
        if guard not in self._guards:
            self._guards[guard] = self._fetch(guard)[0]
        found: dict[bytes, dict] = {}
        for kv in self._range(base, _range_end(base)):
            self._cache.setdefault(kv.key, (kv.mod_revision, kv.value))
            if s._is_object(kv.key):
                found[kv.key] = _decode(kv.value, kv.mod_revision)
        for key, (_, obj) in self._writes.items():
            if key.startswith(base):
                if obj is None:
                    found.pop(key, None)
                else:
                    found[key] = copy.deepcopy(obj)
        items = list(found.values())
        if namespace is not None and kind is None:
            items = [o for o in items if (o["metadata"].get("namespace") or "") == namespace]
        items.sort(key=lambda o: (o["kind"], o["metadata"].get("namespace") or "",
                                  o["metadata"]["name"]))
        return items

    # ---- writes, buffered until commit --------------------------------------------------------
    def _next_revision(self) -> int:
        # Not known before the commit; a guess until then, the commit's revision after it.
        return (self.rev or 0) + 1

    def _write(self, kind: str, namespace: str, name: str, obj: dict, event: str) -> None:
        self._writes[self._s._key(kind, namespace, name)] = (kind, obj)
        self._produced.append(obj)

    def _remove(self, kind: str, namespace: str, name: str, obj: dict) -> None:
        key = self._s._key(kind, namespace, name)
        if self._fetch(key)[1] is None:
            self._writes.pop(key, None)  # created in this transaction: it never was
        else:
            self._writes[key] = (kind, None)
        self._produced.append(obj)

    def commit(self) -> None:
        if not self._writes:
            return
        s = self._s
        compares = [*self._reads.items(), *self._guards.items()]
        if len(compares) > MAX_COMPARES:
            rev_key = s._prefix + _REV_KEY.encode()
            compares = [(rev_key, self._fetch(rev_key)[0])]
        ops = []
        kinds = set()
        for key, (kind, obj) in self._writes.items():
            kinds.add(kind)
            if obj is None:
                ops.append(rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key)))
            else:
                ops.append(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=_encode(obj))))
        for key in [s._prefix + _REV_KEY.encode(),
                    *(s._prefix + (_KIND_KEY + k).encode() for k in sorted(kinds))]:
            ops.append(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key)))
        req = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.MOD,
                                     key=k, mod_revision=m) for k, m in compares],
            success=ops)
        try:
            resp = s._client.call("KV/Txn", req, idempotent=False)
        except EtcdError as e:
            if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise NodemeshError(f"store: etcd refused the transaction ({len(ops)} writes): "
                                    f"{e.details}") from e
            raise
        if not resp.succeeded:
            raise Conflict("store: modified concurrently (an object this transaction read changed "
                           "before it committed); retry")
        rev = resp.header.revision
        for obj in self._produced:
            obj["metadata"]["resourceVersion"] = str(rev)
        s._committed(self.rev or 0, rev)


class EtcdStore(Store):
    """The store in etcd v3 under `prefix`; safe across threads and processes."""

    def __init__(self, endpoints: list[str] | str, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, prefix: str = "/nodemesh/") -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        if not prefix.endswith("/"):
            prefix += "/"
        self.endpoints = list(endpoints)
        self._prefix = prefix.encode()
        self._client = _Client(self.endpoints, ca, cert, key)
        self._local = threading.local()
        self._streams: set[_WatchStream] = set()
        self._lock = threading.Lock()

    # ---- keys and events ------------------------------------------------------------------
    def _key(self, kind: str, namespace: str, name: str) -> bytes:
        return self._prefix + f"{kind}/{namespace or ''}/{name}".encode()

    def _is_object(self, key: bytes) -> bool:
        return not key[len(self._prefix):].startswith(b"@")

    def _event(self, e: kv_pb2.Event) -> Event | None:
        if not self._is_object(e.kv.key):
            return None
        if e.type == kv_pb2.Event.DELETE:
            if not e.prev_kv.value:
                return None
            return Event(DELETED, _decode(e.prev_kv.value, e.kv.mod_revision), e.kv.mod_revision)
        typ = ADDED if e.kv.version == 1 else MODIFIED
        return Event(typ, _decode(e.kv.value, e.kv.mod_revision), e.kv.mod_revision)

    # ---- the interface ----------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Txn]:
        txn = _EtcdTxn(self)
        yield txn  # an exception in the body: nothing was written, nothing to undo
        txn.commit()

    def _latest(self) -> tuple[int, int]:
        """(revision of the last write under the prefix or 0, etcd's current revision)."""
        resp = self._client.call("KV/Range", rpc_pb2.RangeRequest(key=self._prefix + _REV_KEY.encode()))
        return (resp.kvs[0].mod_revision if resp.kvs else 0), resp.header.revision

    def revision(self) -> int:
        last, current = self._latest()
        # Nothing written under the prefix yet: every revision so far is as good as none.
        return last or current

    def list_with_revision(self, kinds: tuple[str, ...] | None = None) -> tuple[list[dict], int]:
        resp = self._client.call("KV/Range", rpc_pb2.RangeRequest(
            key=self._prefix, range_end=_range_end(self._prefix)))
        rev_key = self._prefix + _REV_KEY.encode()
        rev = resp.header.revision
        items = []
        for kv in resp.kvs:
            if kv.key == rev_key:
                rev = kv.mod_revision
            elif self._is_object(kv.key):
                obj = _decode(kv.value, kv.mod_revision)
                if kinds is None or obj["kind"] in kinds:
                    items.append(obj)
        items.sort(key=lambda o: (o["kind"], o["metadata"].get("namespace") or "",
                                  o["metadata"]["name"]))
        return items, rev

    def events_since(self, revision: int) -> list[Event]:
        last, _ = self._latest()
        if last <= revision:
            return []
        ws = _WatchStream(self, revision)
        out: list[Event] = []
        deadline = time.monotonic() + STORE_TIMEOUT
        try:
            while ws.position < last and len(out) < EVENTS_LIMIT:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodemeshError(f"store unavailable: etcd history after {revision} not "
                                        f"read within {STORE_TIMEOUT:.0f} s")
                out.extend(ws.next_batch(left))
        finally:
            ws.close()
        return [e for e in out if e.revision <= last]

    def watch(self, since: int, timeout: float, poll_interval: float = 0.02) -> list[Event]:
        """Events after `since` from an etcd watch stream (kept open between calls that go on
        where the last one stopped); [] when none came within `timeout`."""
        ws: _WatchStream | None = getattr(self._local, "stream", None)
        if ws is not None and ws.position != since:
            ws.close()
            ws = None
        if ws is None:
            self._latest()  # finds an endpoint that answers (a stream does not fail over)
            ws = _WatchStream(self, since)
            self._local.stream = ws
            with self._lock:
                self._streams.add(ws)
        try:
            return ws.next_batch(timeout)
        except BaseException:
            ws.close()
            self._local.stream = None
            raise

    def stream(self, since: int, poll_interval: float = 0.02) -> Iterator[Event]:
        """Events after `since`, forever, from one etcd watch stream of its own."""
        self._latest()  # finds an endpoint that answers (a stream does not fail over)
        ws = _WatchStream(self, since)
        with self._lock:
            self._streams.add(ws)
        try:
            while True:
                yield from ws.next_batch(1.0)
        finally:
            ws.close()

    # ---- etcd's own ---------------------------------------------------------------------------
    def compact(self, revision: int) -> None:
        """Drop etcd's history before `revision` (every key in etcd: compaction is cluster-wide)."""
        try:
            self._client.call("KV/Compact", rpc_pb2.CompactionRequest(revision=revision,
                                                                       physical=True))
        except EtcdError as e:
            if e.code != grpc.StatusCode.OUT_OF_RANGE:  # compacted there already
                raise

    def _committed(self, read_rev: int, rev: int) -> None:
        if COMPACT_EVERY and KEEP_REVISIONS and rev // COMPACT_EVERY > read_rev // COMPACT_EVERY:
            floor = rev - KEEP_REVISIONS
            if floor > 0:
                # Unavailable now: the next writer that crosses a multiple tries again.
                with contextlib.suppress(NodemeshError):
                    self.compact(floor)

    def close(self) -> None:
        with self._lock:
            streams, self._streams = self._streams, set()
        for ws in streams:
            ws.close()
        self._client.close()


def open_url(url: str) -> EtcdStore:
    """An etcd store from one string: ``ENDPOINT[,ENDPOINT...][|PREFIX][?ca=..&cert=..&key=..]``
    (e.g. ``http://127.0.0.1:2379|/t/1/``), the form tests and the CLI pass around."""
    query: dict[str, list[str]] = {}
    if "?" in url:
        url, qs = url.split("?", 1)
        query = urllib.parse.parse_qs(qs)
    endpoints, _, prefix = url.partition("|")

    def one(name: str) -> str | None:
        return query.get(name, [None])[0]

    return EtcdStore(endpoints, ca=one("ca"), cert=one("cert"), key=one("key"),
                     prefix=prefix or "/nodemesh/")
