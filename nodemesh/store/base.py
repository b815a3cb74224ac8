"""The store interface: versioned objects, atomic transactions, and a watch by revision.

Every write bumps one store-wide revision counter; an object's ``metadata.resourceVersion`` is the
revision of its last write. The writes of one transaction get revisions after every earlier
transaction's; within it SQLite gives each write its own, etcd gives them all the transaction's
one (an etcd Txn is one revision), so a caller relies on neither. ``generation`` counts changes of
everything but ``status`` and bookkeeping metadata, as on Kubernetes. Watchers ask for the events
after a revision they have seen; when the store has compacted those away they get `Compacted` and
must list again.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from nodemesh.errors import Conflict

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"

# Pauses between attempts of a transaction that lost a race: up to 2 ms, doubling, at most 100 ms.
_RETRY_PAUSE, _RETRY_PAUSE_MAX = 0.002, 0.1
# Metadata the store owns: a user's put never sets these, and changes to them are not "spec".
_SERVER_META = ("uid", "resourceVersion", "generation", "creationTimestamp")


@dataclass(frozen=True)
class Event:
    type: str  # ADDED | MODIFIED | DELETED
    object: dict
    revision: int


class Compacted(Exception):
    """The events after the asked-for revision are gone: list again and watch from there."""


class Txn(abc.ABC):
    """One atomic unit of reads and writes; all writes land together or not at all."""

    @abc.abstractmethod
    def get(self, kind: str, namespace: str, name: str) -> dict | None: ...

    @abc.abstractmethod
    def list(self, kind: str | None = None, namespace: str | None = None) -> list[dict]: ...

    @abc.abstractmethod
    def _write(self, kind: str, namespace: str, name: str, obj: dict, event: str) -> None: ...

    @abc.abstractmethod
    def _remove(self, kind: str, namespace: str, name: str, obj: dict) -> None: ...

    @abc.abstractmethod
    def _next_revision(self) -> int: ...

    def put(self, obj: dict, expect_rv: str | None = None) -> dict:
        """Create or update an object's spec and metadata; its status is kept.

        A put that changes nothing writes nothing (no new revision, no event).
        """
        kind, meta = obj["kind"], obj["metadata"]
        namespace, name = meta.get("namespace") or "", meta["name"]
        old = self.get(kind, namespace, name)
        if expect_rv is not None and (old is None or old["metadata"]["resourceVersion"] != expect_rv):
            raise Conflict(f"{kind} {name}: modified concurrently (resourceVersion {expect_rv} is stale)")
        new = copy.deepcopy(obj)
        new.pop("status", None)
        new_meta = new["metadata"]
        for k in _SERVER_META:
            new_meta.pop(k, None)
        if old is not None:
            if _spec_view(old) == _spec_view(new):
                return old
            for k in ("uid", "creationTimestamp"):
                new_meta[k] = old["metadata"][k]
            new_meta["generation"] = old["metadata"].get("generation", 1) + 1
            if "status" in old:
                new["status"] = old["status"]
        else:
            new_meta["uid"] = str(uuid.uuid4())
            new_meta["creationTimestamp"] = now_rfc3339()
            new_meta["generation"] = 1
        new_meta["resourceVersion"] = str(self._next_revision())
        self._write(kind, namespace, name, new, MODIFIED if old else ADDED)
        return new

    def create(self, obj: dict) -> dict:
        """Like put, but refuses to overwrite an existing object."""
        meta = obj["metadata"]
        if self.get(obj["kind"], meta.get("namespace") or "", meta["name"]) is not None:
            raise Conflict(f"{obj['kind']} {meta['name']}: already exists")
        return self.put(obj)

    def put_status(self, kind: str, namespace: str, name: str, status: dict) -> dict | None:
        """Replace an object's status. Returns None when the object is gone."""
        old = self.get(kind, namespace, name)
        if old is None:
            return None
        if old.get("status") == status:
            return old
        new = copy.deepcopy(old)
        new["status"] = copy.deepcopy(status)
        new["metadata"]["resourceVersion"] = str(self._next_revision())
        self._write(kind, namespace, name, new, MODIFIED)
        return new

    def delete(self, kind: str, namespace: str, name: str) -> dict | None:
        """Delete an object; returns what was deleted, or None when it was not there."""
        old = self.get(kind, namespace, name)
        if old is None:
            return None
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._next_revision())
        self._remove(kind, namespace, name, gone)
        return gone


class Store(abc.ABC):
    """A desired-state store. Implementations must be safe to use from several processes."""

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Txn]:
        """One atomic transaction. Its writes never rest on reads that changed meanwhile: SQLite
        makes other writers wait; etcd commits only when nothing it read changed, and otherwise
        raises `Conflict` and writes nothing. A caller that may race other writers runs the body
        again (`retrying`) or gives up."""

    def retrying(self, attempts: int = 8) -> Iterator[_Attempt]:
        """Attempts to run one transaction body in until one commits::

            for attempt in store.retrying():
                with attempt as t:
                    ...

        An attempt that raises `Conflict` (lost a race, or met an object that exists) is
        followed by another after a short random pause that doubles each time (so writers that
        keep colliding spread out instead of colliding again); the last one's `Conflict` reaches
        the caller."""
        for i in range(attempts):
            attempt = _Attempt(self, last=i == attempts - 1)
            yield attempt
            if attempt.committed:
                return
            time.sleep(random.uniform(0, min(_RETRY_PAUSE * 2**i, _RETRY_PAUSE_MAX)))

    @abc.abstractmethod
    def revision(self) -> int:
        """The revision of the last write."""

    @abc.abstractmethod
    def events_since(self, revision: int) -> list[Event]:
        """Events with a revision greater than `revision`, oldest first (never blocks)."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        pass

    # Conveniences over a read-only transaction.
    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self.transaction() as t:
            return t.get(kind, namespace, name)

    def list(self, kind: str | None = None, namespace: str | None = None) -> list[dict]:
        with self.transaction() as t:
            return t.list(kind, namespace)

    def list_with_revision(
        self, kinds: tuple[str, ...] | None = None
    ) -> tuple[list[dict], int]:
        """A consistent list of `kinds` (all when None) and the revision it reflects."""
        with self.transaction() as t:
            rev = self.revision()
            items = t.list() if kinds is None else [o for k in kinds for o in t.list(k)]
            return items, rev

    def watch(
        self, since: int, timeout: float, poll_interval: float = 0.02
    ) -> list[Event]:
        """Wait up to `timeout` seconds for events after `since`; [] when none came."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events_since(since)
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(poll_interval)

    def stream(self, since: int, poll_interval: float = 0.02) -> Iterator[Event]:
        """Events after `since`, forever."""
        while True:
            for ev in self.watch(since, 1.0, poll_interval):
                since = ev.revision
                yield ev


class _Attempt:
    def __init__(self, store: Store, last: bool) -> None:
        self._cm = store.transaction()
        self._last = last
        self.committed = False

    def __enter__(self) -> Txn:
        return self._cm.__enter__()

    def __exit__(self, typ, exc, tb) -> bool:
        try:
            suppressed = self._cm.__exit__(typ, exc, tb)
        except Conflict:  # the commit lost a race
            if self._last:
                raise
            return True
        if typ is None:
            self.committed = True
            return bool(suppressed)
        return bool(suppressed) or (issubclass(typ, Conflict) and not self._last)


def _spec_view(obj: dict) -> dict:
    view = {k: v for k, v in obj.items() if k != "status"}
    view["metadata"] = {k: v for k, v in obj["metadata"].items() if k not in _SERVER_META}
    return view


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """Kubernetes' MicroTime (a Lease's renewTime): RFC 3339 with microseconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
