"""The SQLite store: versioning, transactions, the watch by revision, durability."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from nodemesh.errors import Conflict
from nodemesh.store.base import ADDED, DELETED, MODIFIED, Compacted
from nodemesh.store.sqlite import SqliteStore


def svc(name: str, port: int = 80, ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"port": port}]}}


@pytest.fixture
def store(tmp_path) -> SqliteStore:
    return SqliteStore(str(tmp_path / "store.db"))


def test_put_assigns_bookkeeping_and_bumps_generation_on_spec_change(store: SqliteStore) -> None:
    with store.transaction() as t:
        a = t.put(svc("web"))
    assert a["metadata"]["generation"] == 1
    assert a["metadata"]["uid"]
    assert a["metadata"]["resourceVersion"] == "1"
    with store.transaction() as t:
        b = t.put(svc("web", 81))
    assert b["metadata"]["generation"] == 2
    assert b["metadata"]["uid"] == a["metadata"]["uid"]
    assert b["metadata"]["creationTimestamp"] == a["metadata"]["creationTimestamp"]
    assert int(b["metadata"]["resourceVersion"]) > 1


def test_identical_put_writes_nothing(store: SqliteStore) -> None:
    with store.transaction() as t:
        t.put(svc("web"))
    rev = store.revision()
    with store.transaction() as t:
        t.put(svc("web"))
    assert store.revision() == rev
    assert store.events_since(rev) == []


def test_status_is_kept_by_spec_writes_and_does_not_bump_generation(store: SqliteStore) -> None:
    with store.transaction() as t:
        t.put(svc("web"))
        t.put_status("Service", "default", "web", {"ok": True})
        t.put(svc("web", 82))
    got = store.get("Service", "default", "web")
    assert got["status"] == {"ok": True}
    assert got["metadata"]["generation"] == 2


def test_user_supplied_status_and_bookkeeping_are_ignored(store: SqliteStore) -> None:
    o = svc("web")
    o["status"] = {"fake": 1}
    o["metadata"]["uid"] = "mine"
    with store.transaction() as t:
        got = t.put(o)
    assert "status" not in got
    assert got["metadata"]["uid"] != "mine"


def test_transaction_is_all_or_nothing(store: SqliteStore) -> None:
    with pytest.raises(RuntimeError), store.transaction() as t:
        t.put(svc("a"))
        t.put(svc("b"))
        raise RuntimeError("boom")
    assert store.list("Service") == []
    assert store.revision() == 0


def test_create_refuses_existing_and_expect_rv_detects_races(store: SqliteStore) -> None:
    with store.transaction() as t:
        a = t.create(svc("a"))
    with pytest.raises(Conflict), store.transaction() as t:
        t.create(svc("a"))
    with store.transaction() as t:
        t.put(svc("a", 90), expect_rv=a["metadata"]["resourceVersion"])
    with pytest.raises(Conflict), store.transaction() as t:
        t.put(svc("a", 91), expect_rv=a["metadata"]["resourceVersion"])


def test_watch_reports_every_change_in_order(store: SqliteStore) -> None:
    start = store.revision()
    with store.transaction() as t:
        t.put(svc("a"))
        t.put(svc("a", 81))
        t.delete("Service", "default", "a")
    evs = store.events_since(start)
    assert [e.type for e in evs] == [ADDED, MODIFIED, DELETED]
    assert [e.revision for e in evs] == sorted(e.revision for e in evs)
    assert evs[-1].object["metadata"]["name"] == "a"
    assert store.watch(evs[-1].revision, timeout=0.05) == []


def test_list_filters_and_delete_of_missing(store: SqliteStore) -> None:
    with store.transaction() as t:
        t.put(svc("a", ns="x"))
        t.put(svc("b", ns="y"))
        assert t.delete("Service", "x", "nope") is None
    assert [o["metadata"]["name"] for o in store.list("Service", "y")] == ["b"]
    assert len(store.list()) == 2
    items, rev = store.list_with_revision(("Service",))
    assert len(items) == 2 and rev == store.revision()


def test_compaction_makes_old_watchers_relist(store: SqliteStore, monkeypatch) -> None:
    import nodemesh.store.sqlite as mod

    monkeypatch.setattr(mod, "KEEP_EVENTS", 10)
    monkeypatch.setattr(mod, "COMPACT_EVERY", 20)
    with store.transaction() as t:
        for i in range(25):
            t.put(svc("a", 1000 + i))
    with pytest.raises(Compacted):
        store.events_since(0)
    assert store.events_since(20)


def _writer(path: str, n: int, tag: str) -> None:
    s = SqliteStore(path)
    for i in range(n):
        with s.transaction() as t:
            t.put(svc(f"{tag}{i}"))


def test_concurrent_writers_in_processes_lose_nothing(tmp_path) -> None:
    path = str(tmp_path / "store.db")
    SqliteStore(path)
    ps = [multiprocessing.Process(target=_writer, args=(path, 30, tag)) for tag in "xyz"]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
    s = SqliteStore(path)
    assert len(s.list("Service")) == 90
    assert s.revision() == 90
    assert [e.revision for e in s.events_since(0)] == list(range(1, 91))


def test_durable_across_reopen(tmp_path) -> None:
    path = str(tmp_path / "store.db")
    s = SqliteStore(path)
    with s.transaction() as t:
        t.put(svc("keep"))
    s.close()
    again = SqliteStore(path)
    assert again.get("Service", "default", "keep") is not None
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
