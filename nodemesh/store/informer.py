"""A local, always-current copy of the store's objects (list, then watch), like client-go's informer.

One thread follows the store; readers take consistent snapshots. Listeners are called (from the
informer's thread) after every batch of changes, with the kinds that changed, so reconcilers can
react within one poll interval (20 ms) of a write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from nodemesh.errors import NodemeshError
from nodemesh.store import Compacted, Store
from nodemesh.store.base import DELETED

log = logging.getLogger("nodemesh.informer")
Key = tuple[str, str, str]


class Informer:
    def __init__(self, store: Store, poll_interval: float = 0.02) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self._objects: dict[Key, dict] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[set[str]], None]] = []
        self._synced = threading.Event()
        self._stop = threading.Event()
        self.revision = 0
        # When the follow loop last had an answer from the store, and since when it has had
        # them without a gap (monotonic clock): see `following_since`.
        self._last_answer = 0.0
        self._following_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="informer", daemon=True)

    def add_listener(self, fn: Callable[[set[str]], None]) -> None:
        self._listeners.append(fn)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the follow loop to end after `stop` (within one watch timeout, 1 s)."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait_synced(self, timeout: float = 30.0) -> bool:
        return self._synced.wait(timeout)

    # A watch answers at least once a second (its timeout); a longer silence is a gap.
    FOLLOW_GAP_SECONDS = 2.5

    def following_since(self) -> float | None:
        """Since when (monotonic) this copy has followed the store without a gap, or None while
        it does not (the store is unreachable, or this process was stopped). A controller that
        judges by the absence of changes (an unrenewed lease) must not count time before it."""
        if time.monotonic() - self._last_answer > self.FOLLOW_GAP_SECONDS:
            return None
        return self._following_since

    def _answered(self) -> None:
        now = time.monotonic()
        if self._following_since is None or now - self._last_answer > self.FOLLOW_GAP_SECONDS:
            self._following_since = now
        self._last_answer = now

    # ---- reads ---------------------------------------------------------------------------
    def list(self, kind: str, namespace: str | None = None) -> list[dict]:
        with self._lock:
            return [o for (k, ns, _), o in self._objects.items()
                    if k == kind and (namespace is None or ns == namespace)]

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._lock:
            return self._objects.get((kind, namespace or "", name))

    def kinds(self, kinds: Iterable[str]) -> dict[str, list[dict]]:
        with self._lock:
            wanted = set(kinds)
            out: dict[str, list[dict]] = {k: [] for k in wanted}
            for (k, _, _), o in self._objects.items():
                if k in wanted:
                    out[k].append(o)
            return out

    # ---- the follow loop -----------------------------------------------------------------
    def _relist(self) -> None:
        items, rev = self.store.list_with_revision()
        with self._lock:
            self._objects = {_key(o): o for o in items}
            self.revision = rev
        self._notify({o["kind"] for o in items} | {"*"})

    def _notify(self, kinds: set[str]) -> None:
        for fn in self._listeners:
            try:
                fn(kinds)
            except Exception:
                log.exception("informer listener failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._relist()
                self._answered()
                self._synced.set()
                while not self._stop.is_set():
                    events = self.store.watch(self.revision, 1.0, self.poll_interval)
                    self._answered()
                    if not events:
                        continue
                    changed: set[str] = set()
                    with self._lock:
                        for ev in events:
                            key = _key(ev.object)
                            old = self._objects.get(key)
                            if ev.type == DELETED:
                                self._objects.pop(key, None)
                            else:
                                self._objects[key] = ev.object
                            # The status of these kinds is written by us, for users: a change
                            # there must not wake the reconcilers that wrote it.
                            if not (key[0] in STATUS_ONLY_FOR_USERS and old is not None
                                    and ev.type != DELETED and _same_but_status(old, ev.object)):
                                changed.add(key[0])
                            self.revision = ev.revision
                    self._notify(changed)
            except Compacted:
                log.warning("watch fell behind compaction; listing again")
            except NodemeshError as e:  # the store is unavailable: no traceback every 0.5 s
                self._following_since = None  # (the next answer starts anew)
                log.warning("store watch failed (%s); retrying", e)
                time.sleep(0.5)
            except Exception:
                self._following_since = None
                log.exception("store watch failed; retrying")
                time.sleep(0.5)


# Reconcilers act on the changes the informer reports; without one they still run a full sync
# this often, a safety net that costs an idle agent little.
RESYNC_SECONDS = 10.0


class SyncedRevision:
    """The store revision a reconciler's output reflects, for ``syncedRevision`` in status.

    A sync reflects the revision it read when it began. Changes the reconciler does not depend
    on (a heartbeat, a status it wrote itself) move the mark forward without a sync, but only
    once no sync is running and no change it depends on is waiting; otherwise they are kept and
    applied when such a sync ends.
    """

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()
        self._busy = False
        self._pending = False  # a change the reconciler depends on, not yet taken by a sync
        self._quiet = 0  # the latest unrelated revision seen while busy or pending

    def changed(self) -> None:
        with self._lock:
            self._pending = True

    def unrelated(self, revision: int) -> None:
        with self._lock:
            if self._busy or self._pending:
                self._quiet = max(self._quiet, revision)
            else:
                self.value = max(self.value, revision)

    def begin(self) -> None:
        with self._lock:
            self._busy = True
            self._pending = False

    def done(self, revision: int) -> None:
        """The sync that began earlier reflects ``revision``."""
        with self._lock:
            self._busy = False
            self.value = max(self.value, revision)
            if not self._pending:
                self.value = max(self.value, self._quiet)

    def failed(self) -> None:
        with self._lock:
            self._busy = False
            self._pending = True


STATUS_ONLY_FOR_USERS = frozenset({"HTTPRoute", "GRPCRoute", "Node", "Deployment", "Identity"})


def _same_but_status(a: dict, b: dict) -> bool:
    strip = lambda o: {k: (v if k != "metadata" else  # noqa: E731
                           {mk: mv for mk, mv in v.items() if mk != "resourceVersion"})
                       for k, v in o.items() if k != "status"}
    return strip(a) == strip(b)


def _key(obj: dict) -> Key:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace") or "", meta["name"]
