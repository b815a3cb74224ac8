"""The store contract: what `nodemesh.store.base.Store` promises, run against every backend.

Each backend is one entry of `BACKENDS` (SQLite, etcd); the `backend` fixture runs every contract
test against each. A new backend (Kubernetes) adds one `Backend`: how to open a store at a
location (a picklable callable: the concurrency test opens it in other processes), a fresh
location per test, how to make it compact its event history early, and a location of its own for
the tests that compact. Tests of one backend's own details (SQLite's numbering and file mode,
etcd's revisions and watch streams) follow the contract, at the end.

The etcd backend runs against a real etcd (Debian's, `make setup`) on 127.0.0.1, started here and
stopped by PID; a missing etcd fails these tests, it does not skip them.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodemesh.errors import Conflict
from nodemesh.store.base import ADDED, DELETED, MODIFIED, Compacted, Store
from nodemesh.store.etcd import open_url
from nodemesh.store.sqlite import SqliteStore
from tests.etcdserver import EtcdServer


@dataclass(frozen=True)
class Backend:
    name: str
    open: Callable[[str], Store]  # a store at a location; picklable (used in child processes)
    # A fresh, empty location for one test (its tmp_path; the request, for fixtures it needs).
    location: Callable[[Path, pytest.FixtureRequest], str]
    # Make the backend compact its events early: after about 20 writes it keeps about 10.
    compact_early: Callable[[pytest.MonkeyPatch], None]
    # A location whose compaction no other test sees (etcd compacts the whole server at once).
    isolated: Callable[[Path, pytest.FixtureRequest], str]


def _sqlite_compact_early(monkeypatch: pytest.MonkeyPatch) -> None:
    import nodemesh.store.sqlite as mod

    monkeypatch.setattr(mod, "KEEP_EVENTS", 10)
    monkeypatch.setattr(mod, "COMPACT_EVERY", 20)


def _sqlite_location(tmp: Path, request: pytest.FixtureRequest) -> str:
    return str(tmp / "store.db")


def _etcd_compact_early(monkeypatch: pytest.MonkeyPatch) -> None:
    import nodemesh.store.etcd as mod

    monkeypatch.setattr(mod, "KEEP_REVISIONS", 10)
    monkeypatch.setattr(mod, "COMPACT_EVERY", 20)


def _etcd_location(tmp: Path, request: pytest.FixtureRequest) -> str:
    # One server for the session; each test its own prefix, so no test sees another's keys.
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return server.location(f"/test/{uuid.uuid4().hex}/")


def _etcd_isolated(tmp: Path, request: pytest.FixtureRequest) -> str:
    server = EtcdServer()
    request.addfinalizer(server.stop)
    return server.location("/nodemesh/")


BACKENDS = [
    Backend("sqlite", SqliteStore, _sqlite_location, _sqlite_compact_early, _sqlite_location),
    Backend("etcd", open_url, _etcd_location, _etcd_compact_early, _etcd_isolated),
]


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


@pytest.fixture
def location(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return backend.location(tmp_path, request)


@pytest.fixture
def store(backend: Backend, location: str) -> Iterator[Store]:
    s = backend.open(location)
    yield s
    s.close()


def svc(name: str, port: int = 80, ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"port": port}]}}


def rv(obj: dict) -> int:
    return int(obj["metadata"]["resourceVersion"])


# ---- versioning ------------------------------------------------------------------------------

def test_put_assigns_bookkeeping_and_bumps_generation_on_spec_change(store: Store) -> None:
    with store.transaction() as t:
        a = t.put(svc("web"))
    assert a["metadata"]["generation"] == 1
    assert a["metadata"]["uid"]
    assert a["metadata"]["creationTimestamp"]
    assert rv(a) == store.revision()
    with store.transaction() as t:
        b = t.put(svc("web", 81))
    assert b["metadata"]["generation"] == 2
    assert b["metadata"]["uid"] == a["metadata"]["uid"]
    assert b["metadata"]["creationTimestamp"] == a["metadata"]["creationTimestamp"]
    assert rv(b) > rv(a) and rv(b) == store.revision()
    assert store.get("Service", "default", "web") == b


def test_every_write_gets_a_new_store_wide_revision(store: Store) -> None:
    # Each transaction's writes get a revision after every earlier one. Within one transaction
    # the writes' revisions never go down; SQLite gives each its own, etcd gives them the
    # transaction's one (see the backends' own tests at the end).
    with store.transaction() as t:
        a = t.put(svc("a"))
    with store.transaction() as t:
        b = t.put(svc("b", ns="other"))
    with store.transaction() as t:
        c = t.put_status("Service", "default", "a", {"ok": True})
    d = store.get("Service", "other", "b")
    with store.transaction() as t:
        e = t.delete("Service", "other", "b")
    revs = [rv(a), rv(b), rv(c), rv(e)]
    assert revs == sorted(set(revs)), revs  # strictly increasing, across objects
    assert rv(d) == rv(b) and store.revision() == rv(e)


def test_identical_put_writes_nothing(store: Store) -> None:
    with store.transaction() as t:
        first = t.put(svc("web"))
    rev = store.revision()
    with store.transaction() as t:
        again = t.put(svc("web"))
    assert again == first
    assert store.revision() == rev
    assert store.events_since(rev) == []


def test_status_is_kept_by_spec_writes_and_does_not_bump_generation(store: Store) -> None:
    with store.transaction() as t:
        t.put(svc("web"))
        t.put_status("Service", "default", "web", {"ok": True})
        t.put(svc("web", 82))
    got = store.get("Service", "default", "web")
    assert got["status"] == {"ok": True}
    assert got["metadata"]["generation"] == 2


def test_put_status_of_the_same_status_or_a_missing_object_writes_nothing(store: Store) -> None:
    with store.transaction() as t:
        t.put(svc("web"))
        t.put_status("Service", "default", "web", {"ok": True})
    rev = store.revision()
    with store.transaction() as t:
        assert t.put_status("Service", "default", "web", {"ok": True})["status"] == {"ok": True}
        assert t.put_status("Service", "default", "gone", {"ok": True}) is None
    assert store.revision() == rev
    assert store.get("Service", "default", "web")["metadata"]["generation"] == 1


def test_user_supplied_status_and_bookkeeping_are_ignored(store: Store) -> None:
    o = svc("web")
    o["status"] = {"fake": 1}
    o["metadata"].update(uid="mine", generation=7, resourceVersion="999",
                         creationTimestamp="2000-01-01T00:00:00Z")
    with store.transaction() as t:
        got = t.put(o)
    assert "status" not in got
    assert got["metadata"]["uid"] != "mine"
    assert got["metadata"]["generation"] == 1
    assert got["metadata"]["creationTimestamp"] != "2000-01-01T00:00:00Z"
    assert rv(got) == store.revision()
    assert o["metadata"]["uid"] == "mine"  # the caller's object is not changed


def test_cluster_scoped_objects_have_no_namespace(store: Store) -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}
    with store.transaction() as t:
        t.put(ns)
    assert store.get("Namespace", "", "x")["metadata"]["name"] == "x"
    assert [o["metadata"]["name"] for o in store.list("Namespace")] == ["x"]


# ---- transactions and conflicts --------------------------------------------------------------

def test_transaction_is_all_or_nothing(store: Store) -> None:
    with store.transaction() as t:
        t.put(svc("before"))
    rev = store.revision()
    with pytest.raises(RuntimeError), store.transaction() as t:
        t.put(svc("a"))
        t.put(svc("b"))
        t.delete("Service", "default", "before")
        raise RuntimeError("boom")
    assert [o["metadata"]["name"] for o in store.list("Service")] == ["before"]
    assert store.revision() == rev
    assert store.events_since(rev) == []


def test_a_transaction_reads_its_own_writes(store: Store) -> None:
    with store.transaction() as t:
        t.put(svc("a"))
        assert t.get("Service", "default", "a") is not None
        assert [o["metadata"]["name"] for o in t.list("Service")] == ["a"]
        t.delete("Service", "default", "a")
        assert t.get("Service", "default", "a") is None


def test_create_refuses_existing_and_expect_rv_detects_races(store: Store) -> None:
    with store.transaction() as t:
        a = t.create(svc("a"))
    with pytest.raises(Conflict), store.transaction() as t:
        t.create(svc("a"))
    with store.transaction() as t:
        t.put(svc("a", 90), expect_rv=a["metadata"]["resourceVersion"])
    with pytest.raises(Conflict), store.transaction() as t:
        t.put(svc("a", 91), expect_rv=a["metadata"]["resourceVersion"])
    with pytest.raises(Conflict), store.transaction() as t:
        t.put(svc("missing"), expect_rv="1")
    assert store.get("Service", "default", "a")["spec"]["ports"] == [{"port": 90}]
    assert store.get("Service", "default", "missing") is None


def test_a_conflict_undoes_the_whole_transaction(store: Store) -> None:
    with store.transaction() as t:
        t.create(svc("a"))
    rev = store.revision()
    with pytest.raises(Conflict), store.transaction() as t:
        t.put(svc("b"))
        t.create(svc("a"))
    assert store.get("Service", "default", "b") is None
    assert store.revision() == rev


def test_two_handles_racing_on_expect_rv_let_one_win(backend: Backend, location: str) -> None:
    one, two = backend.open(location), backend.open(location)
    with one.transaction() as t:
        base = t.put(svc("a"))
    with one.transaction() as t:
        t.put(svc("a", 81), expect_rv=base["metadata"]["resourceVersion"])
    with pytest.raises(Conflict), two.transaction() as t:
        t.put(svc("a", 82), expect_rv=base["metadata"]["resourceVersion"])
    assert two.get("Service", "default", "a")["spec"]["ports"] == [{"port": 81}]
    one.close()
    two.close()


# ---- get, list, delete -----------------------------------------------------------------------

def test_list_filters_and_delete_of_missing(store: Store) -> None:
    with store.transaction() as t:
        t.put(svc("a", ns="x"))
        t.put(svc("b", ns="y"))
        t.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "y"}})
    rev = store.revision()
    with store.transaction() as t:
        assert t.delete("Service", "x", "nope") is None
    assert store.revision() == rev
    assert [o["metadata"]["name"] for o in store.list("Service", "y")] == ["b"]
    assert sorted(o["metadata"]["name"] for o in store.list(namespace="y")) == ["b", "c"]
    assert len(store.list("Service")) == 2
    assert len(store.list()) == 3
    assert store.get("Service", "x", "b") is None
    items, r = store.list_with_revision(("Service",))
    assert len(items) == 2 and r == store.revision()
    items, r = store.list_with_revision()
    assert len(items) == 3 and r == rev


def test_delete_returns_the_object_at_its_deletion_revision(store: Store) -> None:
    with store.transaction() as t:
        put = t.put(svc("a"))
    with store.transaction() as t:
        gone = t.delete("Service", "default", "a")
    assert gone["spec"] == put["spec"] and gone["metadata"]["uid"] == put["metadata"]["uid"]
    assert rv(gone) > rv(put) and rv(gone) == store.revision()
    assert store.get("Service", "default", "a") is None
    with store.transaction() as t:  # created again: a new object
        again = t.put(svc("a"))
    assert again["metadata"]["uid"] != put["metadata"]["uid"]
    assert again["metadata"]["generation"] == 1


# ---- events and watch ------------------------------------------------------------------------

def test_watch_reports_every_change_in_order(store: Store) -> None:
    start = store.revision()
    for change in (lambda t: t.put(svc("a")), lambda t: t.put(svc("a", 81)),
                   lambda t: t.put_status("Service", "default", "a", {"ok": True}),
                   lambda t: t.delete("Service", "default", "a")):
        with store.transaction() as t:
            change(t)
    evs = store.events_since(start)
    assert [e.type for e in evs] == [ADDED, MODIFIED, MODIFIED, DELETED]
    assert [e.revision for e in evs] == sorted({e.revision for e in evs})
    assert all(e.revision == rv(e.object) for e in evs)
    assert evs[-1].object["metadata"]["name"] == "a"
    assert evs[2].object["status"] == {"ok": True}
    assert store.events_since(evs[1].revision) == evs[2:]
    assert store.watch(evs[-1].revision, timeout=0.05) == []


def test_watch_waits_for_a_write_from_another_handle(backend: Backend, location: str) -> None:
    watcher, writer = backend.open(location), backend.open(location)
    since = watcher.revision()

    def write() -> None:
        time.sleep(0.2)
        with writer.transaction() as t:
            t.put(svc("late"))
        writer.close()

    th = threading.Thread(target=write)
    th.start()
    t0 = time.monotonic()
    evs = watcher.watch(since, timeout=10.0)
    th.join()
    assert [(e.type, e.object["metadata"]["name"]) for e in evs] == [(ADDED, "late")]
    assert time.monotonic() - t0 < 5.0
    watcher.close()


def test_stream_yields_events_in_order(store: Store) -> None:
    start = store.revision()
    with store.transaction() as t:
        for i in range(3):
            t.put(svc(f"s{i}"))
    stream = store.stream(start)
    got = [next(stream) for _ in range(3)]
    assert [e.object["metadata"]["name"] for e in got] == ["s0", "s1", "s2"]
    with store.transaction() as t:
        t.delete("Service", "default", "s1")
    ev = next(stream)
    assert (ev.type, ev.object["metadata"]["name"]) == (DELETED, "s1")


def test_compaction_makes_old_watchers_relist(backend: Backend, tmp_path: Path,
                                              request: pytest.FixtureRequest,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    location = backend.isolated(tmp_path, request)
    backend.compact_early(monkeypatch)
    store = backend.open(location)
    for i in range(25):
        with store.transaction() as t:
            t.put(svc("a", 1000 + i))
    with pytest.raises(Compacted):
        store.events_since(0)
    latest = store.revision()
    assert store.events_since(latest - 1)  # recent events are kept
    items, rev = store.list_with_revision()  # what a watcher that was told to relist does
    assert len(items) == 1 and store.events_since(rev) == []
    store.close()


# ---- several processes, durability -----------------------------------------------------------

def _writer(open_store: Callable[[str], Store], location: str, n: int, tag: str) -> None:
    s = open_store(location)
    for i in range(n):
        with s.transaction() as t:
            t.put(svc(f"{tag}{i}"))
    s.close()


def test_concurrent_writers_in_processes_lose_nothing(backend: Backend, location: str) -> None:
    backend.open(location).close()
    ps = [multiprocessing.Process(target=_writer, args=(backend.open, location, 30, tag))
          for tag in "xyz"]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
    assert [p.exitcode for p in ps] == [0, 0, 0]
    s = backend.open(location)
    assert len(s.list("Service")) == 90
    revs = [e.revision for e in s.events_since(0)]
    assert len(revs) == 90 and revs == sorted(set(revs)) and revs[-1] == s.revision()
    s.close()


def test_durable_across_reopen(backend: Backend, location: str) -> None:
    s = backend.open(location)
    with s.transaction() as t:
        kept = t.put(svc("keep"))
    rev = s.revision()
    s.close()
    again = backend.open(location)
    assert again.get("Service", "default", "keep") == kept
    assert again.revision() == rev
    assert [e.object["metadata"]["name"] for e in again.events_since(0)] == ["keep"]
    again.close()


# ---- SQLite's own details (not part of the contract) -----------------------------------------

def test_sqlite_numbers_revisions_one_by_one(tmp_path: Path) -> None:
    path = str(tmp_path / "store.db")
    s = SqliteStore(path)
    with s.transaction() as t:
        first = t.put(svc("web"))
    assert first["metadata"]["resourceVersion"] == "1"
    s.close()
    ps = [multiprocessing.Process(target=_writer, args=(SqliteStore, path, 30, tag)) for tag in "xyz"]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
    s = SqliteStore(path)
    assert s.revision() == 91
    assert [e.revision for e in s.events_since(0)] == list(range(1, 92))


def test_sqlite_file_is_private(tmp_path: Path) -> None:
    path = str(tmp_path / "store.db")
    SqliteStore(path).close()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
