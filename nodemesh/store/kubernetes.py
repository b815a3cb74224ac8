"""The store on the Kubernetes API server: Kubernetes mode (`nodemesh agent --kubernetes`).

On a Kubernetes cluster the desired state is the API server's: users apply their manifests with
kubectl, the kubelet runs the pods, and each node's agent follows what it needs through the API
(docs/kubernetes.md). This module maps the `Store` interface onto the API:

- **Reads that follow** (the informer's `list_with_revision` and `watch`): one *reflector* thread
  per kind, as client-go's: a paginated LIST (``limit``/``continue``) gives the objects and the
  list's ``resourceVersion``; a WATCH from there (``allowWatchBookmarks=true``,
  ``timeoutSeconds``) gives ADDED/MODIFIED/DELETED events; a BOOKMARK moves the resume point
  without an object; when a stream ends the watch resumes from the last resourceVersion seen. A
  ``410 Gone`` (the ERROR event with an ``Expired`` Status, or a 410 answer to the request) means
  that version is compacted away: LIST again, and the difference between the old copy and the
  new list becomes events (deletions during the gap included). Server errors (5xx, 429) and
  connection failures back off exponentially (0.2 s doubling to 30 s, reset by a good answer)
  and resume from the last resourceVersion. The reflectors' events are merged into one local
  sequence: a `KubeStore`'s "revision" is that sequence, not an API resourceVersion (those are
  opaque and per kind; they stay in each object's ``metadata.resourceVersion``).
- **Reads and writes in a transaction** go to the API at once (GET, LIST, POST, PUT, DELETE):
  the API has no multi-object transaction, so a `KubeStore` transaction is a sequence of
  single-object writes, each one conditional on the resourceVersion it read (optimistic
  concurrency: a ``409 Conflict`` raises `Conflict`, and `Store.retrying` or the caller reads
  again). A create that meets an existing object (``409 AlreadyExists``) raises `Conflict` too:
  `identities.allocate_identity` then lists again, so an identity number is created at most once
  (the API server's create is the arbiter: two label sets never share a number).
- **Statuses** are written through the ``/status`` subresource, and a ``409 Conflict`` there is
  retried with a fresh read (up to `STATUS_ATTEMPTS` times).

The HTTP client is lightkube's configuration layer (kubeconfig or in-cluster service account,
bearer tokens re-read when the kubelet rotates them, exec plugins, client certificates, the
cluster CA) and the httpx2 client it builds; lightkube's own watch is not used (it neither asks
for bookmarks nor lists again after 410: docs/kubernetes.md says why).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx2

from nodemesh.errors import Conflict, NodemeshError
from nodemesh.model.kinds import KINDS
from nodemesh.store.base import ADDED, DELETED, MODIFIED, Compacted, Event, Store, Txn

log = logging.getLogger("nodemesh.store.kubernetes")

# Items per LIST page (client-go's reflector pages by 500 too).
PAGE_SIZE = 500
# A watch request asks the server to end the stream after this many seconds (client-go picks
# 5-10 minutes at random); the resume from the last resourceVersion is cheap with bookmarks.
WATCH_SECONDS = 300
# Backoff between failed LIST/WATCH requests of one kind.
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 30.0
# Attempts at one status write that meets 409 Conflict (each after a fresh read).
STATUS_ATTEMPTS = 5
# Events the merged local sequence keeps for `events_since` (older: `Compacted`, list again).
HISTORY = 20000
# How long `list_with_revision` waits for every reflector's first LIST.
SYNC_TIMEOUT = 60.0
# A kind the cluster does not serve (its CRD is not installed: no Cilium, no Gateway API, no
# Istio) lists as empty; its reflector looks again this often.
ABSENT_RECHECK = 60.0


@dataclass(frozen=True)
class ApiKind:
    """Where a kind lives in the API: ``/api/v1`` (core) or ``/apis/<group>/<version>``."""

    kind: str
    api_version: str
    plural: str
    namespaced: bool
    status: bool  # has a /status subresource

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
            if subresource:
                parts.append(subresource)
        return "/".join(parts)


# Kinds with a status subresource on a real cluster (and in the CRDs nodemesh ships).
_HAS_STATUS = {"Pod", "Node", "Namespace", "Service", "Deployment", "HTTPRoute", "GRPCRoute",
               "CiliumNetworkPolicy", "Identity", "PeerAuthentication"}


def _api_kinds() -> dict[str, ApiKind]:
    out = {k: ApiKind(k, info.api_version, info.plural, info.namespaced, k in _HAS_STATUS)
           for k, info in KINDS.items()}
    # Read in Kubernetes mode only (the local cluster computes endpoints from pods itself).
    out["EndpointSlice"] = ApiKind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices",
                                   True, False)
    return out


API_KINDS: dict[str, ApiKind] = _api_kinds()

# What an agent follows in Kubernetes mode (the informer's kinds).
AGENT_KINDS = ("Node", "Namespace", "Pod", "Service", "EndpointSlice", "ServiceAccount",
               "NetworkPolicy", "CiliumNetworkPolicy", "HTTPRoute", "GRPCRoute",
               "PeerAuthentication", "Identity")


def api_kind(kind: str) -> ApiKind:
    try:
        return API_KINDS[kind]
    except KeyError:
        raise NodemeshError(f"store: kind {kind!r} is not served by the Kubernetes store", 2) from None


# ---- the HTTP layer -------------------------------------------------------------------------
class ApiError(NodemeshError):
    """The API server answered with an error Status (`code`, `reason` as it sent them)."""

    def __init__(self, code: int, reason: str, message: str, what: str = "") -> None:
        super().__init__(f"kubernetes API: {what + ': ' if what else ''}{code} {reason}: {message}")
        self.code = code
        self.reason = reason


class Gone(ApiError):
    """410: the resourceVersion asked for is older than the server's history: list again."""


class Unavailable(NodemeshError):
    """The API server could not be reached (connection refused, reset, timed out)."""


def _status_error(code: int, body: bytes, what: str) -> ApiError:
    reason, message = "", body.decode("utf-8", "replace")[:300]
    with contextlib.suppress(ValueError, AttributeError):
        st = json.loads(body)
        if isinstance(st, dict) and st.get("kind") == "Status":
            reason, message = st.get("reason") or "", st.get("message") or ""
            code = int(st.get("code") or code)
    cls = Gone if code == 410 else ApiError
    return cls(code, reason or httpx2.codes.get_reason_phrase(code), message, what)


class KubeApi:
    """JSON requests to one API server over an httpx2 client (from `connect`, or a test's)."""

    def __init__(self, client: httpx2.Client) -> None:
        self.client = client

    def request(self, method: str, path: str, params: dict | None = None,
                body: dict | None = None) -> dict:
        what = f"{method} {path}"
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            resp = self.client.request(method, path, params=params,
                                       content=None if body is None else json.dumps(body),
                                       headers={"Content-Type": "application/json",
                                                "Accept": "application/json"})
        except httpx2.HTTPError as e:
            raise Unavailable(f"store unavailable: kubernetes API: {what}: {e}") from e
        if resp.status_code >= 400:
            raise _status_error(resp.status_code, resp.content, what)
        return resp.json()

    def get(self, path: str) -> dict | None:
        try:
            return self.request("GET", path)
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    @contextlib.contextmanager
    def stream(self, path: str, params: dict) -> Iterator[Iterator[str]]:
        """The lines of a watch response (each one JSON watch event)."""
        what = f"GET {path} (watch)"
        params = {k: v for k, v in params.items() if v is not None}
        try:
            with self.client.stream("GET", path, params=params,
                                    headers={"Accept": "application/json"}) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _status_error(resp.status_code, resp.content, what)
                yield resp.iter_lines()
        except httpx2.HTTPError as e:
            raise Unavailable(f"store unavailable: kubernetes API: {what}: {e}") from e

    def close(self) -> None:
        self.client.close()


SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def connect(kubeconfig: str | None = None, context: str | None = None,
            transport: httpx2.BaseTransport | None = None,
            service_account: str = SERVICE_ACCOUNT) -> KubeApi:
    """A client for the cluster: `kubeconfig` (a path) when given, else the pod's service
    account (``KUBERNETES_SERVICE_HOST`` and the mounted token), else ``$KUBECONFIG`` or
    ``~/.kube/config``. Bad or missing configuration raises `NodemeshError` naming it."""
    from lightkube.config.client_adapter import Client, ConnectionParams
    from lightkube.config.kubeconfig import KubeConfig
    from lightkube.core.exceptions import ConfigError

    try:
        if kubeconfig:
            cfg = KubeConfig.from_file(kubeconfig)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            # The token is read from its file again when the server answers 401: the kubelet
            # rotates projected service account tokens.
            cfg = KubeConfig.from_service_account(service_account)
        else:
            cfg = KubeConfig.from_env()
        single = cfg.get(context)
        if single is None:
            raise ConfigError(f"no context {context!r}" if context else "no current context")
        # A watch stream is quiet for as long as nothing changes: its read timeout must outlast
        # the server's timeoutSeconds (bookmarks come about once a minute).
        timeout = httpx2.Timeout(10.0, read=WATCH_SECONDS + 30.0)
        client = Client(single, ConnectionParams(timeout=timeout, transport=transport))
    except (ConfigError, OSError, ValueError, KeyError) as e:
        where = kubeconfig or ("the in-cluster service account" if
                               os.environ.get("KUBERNETES_SERVICE_HOST") else "$KUBECONFIG")
        raise NodemeshError(f"kubernetes: can not use {where}: {e}", 2) from e
    return KubeApi(client)


# ---- following one kind ----------------------------------------------------------------------
class Backoff:
    """Exponential backoff with jitter: `next()` the delay to wait, `reset()` after success."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX,
                 jitter: Callable[[], float] = random.random) -> None:
        self.initial, self.maximum, self._jitter = initial, maximum, jitter
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay * (1 + 0.1 * self._jitter())

    def reset(self) -> None:
        self._next = self.initial


def _with_type(obj: dict, ak: ApiKind) -> dict:
    # List items of built-in kinds carry no kind/apiVersion (the list does): fill them in.
    obj.setdefault("kind", ak.kind)
    obj.setdefault("apiVersion", ak.api_version)
    return obj


_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _trim(obj: dict) -> dict:
    """What the reflectors keep of an object: without ``managedFields`` and kubectl's
    last-applied copy, which nodemesh never reads (often half of an object's size)."""
    meta = obj.get("metadata") or {}
    meta.pop("managedFields", None)
    ann = meta.get("annotations")
    if ann and _LAST_APPLIED in ann:
        meta["annotations"] = {k: v for k, v in ann.items() if k != _LAST_APPLIED}
    return obj


def _key(obj: dict) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


class Reflector:
    """List then watch one kind, forever, into its store's merged event sequence."""

    def __init__(self, store: KubeStore, ak: ApiKind, field_selector: str | None = None) -> None:
        self.store = store
        self.ak = ak
        self.field_selector = field_selector
        self.resource_version: str | None = None  # where the next watch resumes; None: list
        self.objects: dict[tuple[str, str], dict] = {}
        self.synced = threading.Event()
        self.backoff = Backoff(jitter=store.jitter)
        self.lists = 0  # LISTs done (the first, and one after each 410)
        self.absent = False  # the cluster answered 404: the kind's CRD is not installed
        self._thread = threading.Thread(target=self.run, name=f"kube-{ak.plural}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _params(self) -> dict:
        return {"fieldSelector": self.field_selector} if self.field_selector else {}

    def list(self) -> None:
        items: list[dict] = []
        params = {**self._params(), "limit": str(PAGE_SIZE)}
        while True:
            page = self.store.api.request("GET", self.ak.path(), params)
            items.extend(_trim(_with_type(o, self.ak)) for o in page.get("items") or [])
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
        self.lists += 1
        self.absent = False
        self._replace(items, meta.get("resourceVersion") or "")

    def _replace(self, items: list[dict], rv: str) -> None:
        """The new list replaces the old copy: what differs becomes events."""
        new = {_key(o): o for o in items}
        events: list[tuple[str, dict]] = []
        for k, o in new.items():
            old = self.objects.get(k)
            if old is None:
                events.append((ADDED, o))
            elif old["metadata"].get("resourceVersion") != o["metadata"].get("resourceVersion"):
                events.append((MODIFIED, o))
        events.extend((DELETED, o) for k, o in self.objects.items() if k not in new)
        self.objects = new
        self.resource_version = rv
        self.store._emit(events)
        self.synced.set()

    def watch(self) -> None:
        """One watch request, until the server ends it (then the caller resumes)."""
        params = {**self._params(), "watch": "true", "resourceVersion": self.resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_SECONDS)}
        with self.store.api.stream(self.ak.path(), params) as lines:
            for line in lines:
                if self.store.stopping.is_set():
                    return
                if not line.strip():
                    continue
                ev = json.loads(line)
                typ, obj = ev.get("type"), ev.get("object") or {}
                if typ == "ERROR":
                    raise _status_error(int(obj.get("code") or 500), json.dumps(obj).encode(),
                                        f"watch {self.ak.plural}")
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if typ == "BOOKMARK":
                    self.resource_version = rv or self.resource_version
                    continue
                if typ not in (ADDED, MODIFIED, DELETED):
                    log.warning("watch %s: unknown event type %r ignored", self.ak.plural, typ)
                    continue
                obj = _trim(_with_type(obj, self.ak))
                if typ == DELETED:
                    self.objects.pop(_key(obj), None)
                else:
                    self.objects[_key(obj)] = obj
                self.resource_version = rv or self.resource_version
                self.store._emit([(typ, obj)])
                self.backoff.reset()

    def run(self) -> None:
        while not self.store.stopping.is_set():
            try:
                if self.resource_version is None:
                    self.list()
                    self.backoff.reset()
                self.watch()
            except ApiError as e:
                if e.code == 410:
                    log.info("%s: %s; listing again", self.ak.plural, e)
                    self.resource_version = None
                elif e.code == 404 and self.resource_version is None:
                    if not self.absent:
                        log.warning("%s: not served by this cluster (is its CRD installed?); "
                                    "following it as empty", self.ak.plural)
                    self.absent = True
                    self._replace([], "")
                    self.resource_version = None
                    self.store.sleep(ABSENT_RECHECK)
                else:
                    delay = self.backoff.next()
                    log.warning("%s: %s; retrying in %.1f s", self.ak.plural, e, delay)
                    self.store.sleep(delay)
            except (Unavailable, ValueError) as e:
                delay = self.backoff.next()
                log.warning("%s: %s; retrying in %.1f s", self.ak.plural, e, delay)
                self.store.sleep(delay)
            except Exception:  # a bug: keep following, loudly
                delay = self.backoff.next()
                log.exception("%s: reflector failed; retrying in %.1f s", self.ak.plural, delay)
                self.store.sleep(delay)


# ---- the store -----------------------------------------------------------------------------
class _KubeTxn(Txn):
    """Reads and single-object writes straight to the API (see the module's docstring)."""

    def __init__(self, store: KubeStore) -> None:
        self._s = store

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        ak = api_kind(kind)
        obj = self._s.api.get(ak.path(namespace, name))
        return _with_type(obj, ak) if obj is not None else None

    def list(self, kind: str | None = None, namespace: str | None = None) -> list[dict]:
        if kind is None:
            return [o for k in self._s.kinds for o in self.list(k, namespace)]
        ak = api_kind(kind)
        items: list[dict] = []
        params = {"limit": str(PAGE_SIZE)}
        while True:
            page = self._s.api.request("GET", ak.path(namespace), params)
            items.extend(_with_type(o, ak) for o in page.get("items") or [])
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                return items
            params["continue"] = cont

    def put(self, obj: dict, expect_rv: str | None = None) -> dict:
        ak = api_kind(obj["kind"])
        namespace, name = _key(obj)
        body = copy.deepcopy(obj)
        body.pop("status", None)
        body["apiVersion"] = ak.api_version
        cur = self.get(obj["kind"], namespace, name)
        if cur is None:
            if expect_rv is not None:
                raise Conflict(f"{obj['kind']} {name}: gone (resourceVersion {expect_rv} is stale)")
            return self.create(body)
        body["metadata"]["resourceVersion"] = expect_rv or cur["metadata"]["resourceVersion"]
        try:
            return self._s.api.request("PUT", ak.path(namespace, name), body=body)
        except ApiError as e:
            if e.code == 409:
                raise Conflict(f"{obj['kind']} {name}: modified concurrently: {e}") from e
            raise

    def create(self, obj: dict) -> dict:
        ak = api_kind(obj["kind"])
        namespace, name = _key(obj)
        body = copy.deepcopy(obj)
        body["apiVersion"] = ak.api_version
        for k in ("resourceVersion", "uid", "creationTimestamp", "generation"):
            body["metadata"].pop(k, None)
        try:
            return _with_type(self._s.api.request("POST", ak.path(namespace), body=body), ak)
        except ApiError as e:
            if e.code == 409:  # AlreadyExists
                raise Conflict(f"{obj['kind']} {name}: already exists ({e.reason})") from e
            raise

    def put_status(self, kind: str, namespace: str, name: str, status: dict) -> dict | None:
        """The status through the /status subresource; a 409 Conflict (another writer got in
        between) reads the object again and writes again, up to `STATUS_ATTEMPTS` times.

        A Node's status belongs to its kubelet: a write there is not sent (the agent's own
        reports stay in its local API), and the Node is returned as it is."""
        ak = api_kind(kind)
        if kind == "Node":
            return self.get(kind, namespace, name)
        last: ApiError | None = None
        for _ in range(STATUS_ATTEMPTS):
            cur = self.get(kind, namespace, name)
            if cur is None:
                return None
            if cur.get("status") == status:
                return cur
            body = {**cur, "status": copy.deepcopy(status)}
            path = ak.path(namespace, name, "status" if ak.status else None)
            try:
                return _with_type(self._s.api.request("PUT", path, body=body), ak)
            except ApiError as e:
                if e.code == 404:
                    return None
                if e.code != 409:
                    raise
                last = e
                self._s.status_conflicts += 1
        raise Conflict(f"{kind} {namespace + '/' if namespace else ''}{name}: status not written "
                       f"after {STATUS_ATTEMPTS} conflicts: {last}")

    def delete(self, kind: str, namespace: str, name: str) -> dict | None:
        ak = api_kind(kind)
        try:
            gone = self._s.api.request("DELETE", ak.path(namespace, name))
        except ApiError as e:
            if e.code == 404:
                return None
            raise
        return _with_type(gone, ak) if gone.get("kind") != "Status" else None

    # The base class's generic write path is not used: the server owns uid, generation and
    # resourceVersion, and every write above is one request.
    def _write(self, kind: str, namespace: str, name: str, obj: dict, event: str) -> None:
        raise NotImplementedError

    def _remove(self, kind: str, namespace: str, name: str, obj: dict) -> None:
        raise NotImplementedError

    def _next_revision(self) -> int:
        raise NotImplementedError


class KubeStore(Store):
    """The Store interface over the Kubernetes API (module docstring).

    `kinds` are the kinds `list_with_revision` and `watch` follow (a reflector each, started on
    first use); `field_selectors` narrows some (``{"Pod": "spec.nodeName=node1"}``).
    """

    def __init__(self, api: KubeApi, kinds: tuple[str, ...] = AGENT_KINDS,
                 field_selectors: dict[str, str] | None = None,
                 sleep: Callable[[float], None] | None = None,
                 jitter: Callable[[], float] = random.random) -> None:
        self.api = api
        self.kinds = tuple(kinds)
        self.field_selectors = dict(field_selectors or {})
        self.stopping = threading.Event()
        self.sleep = sleep or self.stopping.wait
        self.jitter = jitter
        self.status_conflicts = 0
        self._cond = threading.Condition()
        self._seq = 0
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._reflectors: dict[str, Reflector] = {}
        self._started = False

    # ---- reflectors -------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._started:
                return
            self._started = True
            for k in self.kinds:
                self._reflectors[k] = Reflector(self, api_kind(k), self.field_selectors.get(k))
        for r in self._reflectors.values():
            r.start()

    def reflector(self, kind: str) -> Reflector:
        self.start()
        return self._reflectors[kind]

    def wait_synced(self, timeout: float = SYNC_TIMEOUT) -> bool:
        self.start()
        deadline = time.monotonic() + timeout
        return all(r.synced.wait(max(0.0, deadline - time.monotonic()))
                   for r in self._reflectors.values())

    def _emit(self, changes: list[tuple[str, dict]]) -> None:
        if not changes:
            return
        with self._cond:
            for typ, obj in changes:
                self._seq += 1
                self._history.append(Event(typ, obj, self._seq))
            self._cond.notify_all()

    # ---- the interface ----------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Txn]:
        yield _KubeTxn(self)

    def revision(self) -> int:
        with self._cond:
            return self._seq

    def list_with_revision(self, kinds: tuple[str, ...] | None = None) -> tuple[list[dict], int]:
        if not self.wait_synced():
            late = [k for k, r in self._reflectors.items() if not r.synced.is_set()]
            raise NodemeshError(f"store unavailable: kubernetes API: no first list of "
                                f"{', '.join(late)} within {SYNC_TIMEOUT:.0f} s")
        with self._cond:
            items = [o for k, r in self._reflectors.items() if kinds is None or k in kinds
                     for o in r.objects.values()]
            return items, self._seq

    def events_since(self, revision: int) -> list[Event]:
        with self._cond:
            if self._history and revision < self._history[0].revision - 1:
                raise Compacted(f"local event {revision} is gone (oldest kept: "
                                f"{self._history[0].revision})")
            return [e for e in self._history if e.revision > revision]

    def watch(self, since: int, timeout: float, poll_interval: float = 0.02) -> list[Event]:
        self.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._seq <= since:
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping.is_set():
                    return []
                self._cond.wait(left)
        return self.events_since(since)

    def close(self) -> None:
        self.stopping.set()
        with self._cond:
            self._cond.notify_all()
        self.api.close()
        for r in self._reflectors.values():
            r.join(2.0)
