"""Identity allocation through a real SQLite store: reuse, numbering, races, garbage collection."""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from pathlib import Path

import pytest

from nodemesh.errors import Conflict
from nodemesh.identity import FIRST_POD_IDENTITY
from nodemesh.store import identities as alloc_mod
from nodemesh.store.base import Store
from nodemesh.store.etcd import open_url
from nodemesh.store.identities import (
    IDENTITY_KIND,
    allocate_identity,
    find_identity,
    list_identities,
    release_unused,
)
from nodemesh.store.sqlite import SqliteStore
from tests.etcdserver import EtcdServer
from tests.storeworkers import _allocator

WEB = {"app": "web", "io.kubernetes.pod.namespace": "prod"}
DB = {"app": "db", "io.kubernetes.pod.namespace": "prod"}


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(str(tmp_path / "state.db"))
    yield s
    s.close()


def test_first_identity_is_256_and_reused(store: SqliteStore) -> None:
    a = allocate_identity(store, WEB)
    assert a == FIRST_POD_IDENTITY
    assert allocate_identity(store, dict(reversed(list(WEB.items())))) == a  # order does not matter
    b = allocate_identity(store, DB)
    assert b == a + 1
    assert list_identities(store) == {a: WEB, b: DB}
    assert find_identity(store, DB) == b
    assert find_identity(store, {"app": "nope"}) is None


def test_object_shape(store: SqliteStore) -> None:
    num = allocate_identity(store, WEB)
    obj = store.get(IDENTITY_KIND, "", str(num))
    assert obj["apiVersion"] == "nodemesh.io/v1"
    assert obj["kind"] == "Identity"
    assert obj["metadata"]["name"] == str(num)
    assert obj["spec"] == {"labels": WEB}


def test_numbers_follow_the_highest(store: SqliteStore) -> None:
    nums = [allocate_identity(store, {"app": str(i)}) for i in range(5)]
    assert nums == list(range(256, 261))
    released = release_unused(store, in_use={256, 257, 258, 260}, min_age_seconds=0)
    assert released == [259]
    # 259 is free but lower than the highest: the next new label set gets 261, not 259
    assert allocate_identity(store, {"app": "new"}) == 261


def test_empty_label_set_is_an_identity(store: SqliteStore) -> None:
    assert allocate_identity(store, {}) == allocate_identity(store, {})


def test_ignores_foreign_objects(store: SqliteStore) -> None:
    with store.transaction() as t:
        t.put({"apiVersion": "nodemesh.io/v1", "kind": IDENTITY_KIND, "metadata": {"name": "junk"},
               "spec": {"labels": WEB}})
        t.put({"apiVersion": "nodemesh.io/v1", "kind": IDENTITY_KIND, "metadata": {"name": "7"},
               "spec": {"labels": WEB}})
    assert allocate_identity(store, WEB) == 256
    assert list_identities(store) == {256: WEB}


def test_release_respects_min_age_and_reuse(store: SqliteStore) -> None:
    t0 = 1_700_000_000.0
    a = allocate_identity(store, WEB, now=t0)
    b = allocate_identity(store, DB, now=t0)
    # creation timestamps are the store's clock: use a far-future "now" for age, and the
    # lastUsed refresh to keep one of them young
    allocate_identity(store, DB, now=t0 + 10_000_000_000)  # reused "now": lastUsed refreshed
    released = release_unused(store, in_use=set(), min_age_seconds=3600, now=t0 + 10_000_000_000 + 60)
    assert released == [a]
    assert list_identities(store) == {b: DB}
    assert release_unused(store, in_use=set(), min_age_seconds=3600, now=t0 + 10_000_000_000 + 60) == []
    later = t0 + 10_000_000_000 + 3600
    assert release_unused(store, in_use={b}, min_age_seconds=0, now=later) == []
    # a lastUsed in the future (another node's clock ahead) keeps the identity: never early
    assert release_unused(store, in_use=set(), min_age_seconds=0) == []
    assert release_unused(store, in_use=set(), min_age_seconds=3600, now=later) == [b]


def test_touch_is_throttled(store: SqliteStore) -> None:
    t0 = 1_700_000_000.0
    allocate_identity(store, WEB, now=t0)
    allocate_identity(store, WEB, now=t0 + 1)  # first reuse sets lastUsed
    rev = store.revision()
    allocate_identity(store, WEB, now=t0 + 2)  # within TOUCH_INTERVAL: no write
    assert store.revision() == rev
    allocate_identity(store, WEB, now=t0 + 2 + alloc_mod.TOUCH_INTERVAL)
    assert store.revision() == rev + 1


def test_retries_on_conflict(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = alloc_mod._allocate_in

    def flaky(txn, labels, now):
        calls["n"] += 1
        if calls["n"] < 3:
            raise Conflict("lost a race")
        return real(txn, labels, now)

    monkeypatch.setattr(alloc_mod, "_allocate_in", flaky)
    assert allocate_identity(store, WEB) == 256
    assert calls["n"] == 3


def test_gives_up_after_repeated_conflicts(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def always(txn, labels, now):
        raise Conflict("lost")

    monkeypatch.setattr(alloc_mod, "_allocate_in", always)
    with pytest.raises(Conflict):
        allocate_identity(store, WEB)


def test_wraps_to_lowest_free_when_exhausted(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alloc_mod, "MAX_IDENTITY", 258)
    assert [allocate_identity(store, {"n": str(i)}) for i in range(3)] == [256, 257, 258]
    release_unused(store, in_use={256, 258}, min_age_seconds=0)
    assert allocate_identity(store, {"n": "new"}) == 257
    with pytest.raises(alloc_mod.IdentitiesExhausted):
        allocate_identity(store, {"n": "newer"})


def test_threads_agree(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    SqliteStore(path).close()
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        s = SqliteStore(path)
        barrier.wait()
        # everyone asks for WEB; half also ask for their own labels, interleaved
        nums = [allocate_identity(s, WEB)]
        if i % 2:
            allocate_identity(s, {"own": str(i)})
        nums.append(allocate_identity(s, WEB))
        with lock:
            results.extend(nums)
        s.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    s = SqliteStore(path)
    ids = list_identities(s)
    assert len(ids) == 5  # WEB + 4 own label sets, no duplicates
    assert sorted(ids) == list(range(256, 261))
    s.close()


def _process_worker(path: str, labels_list: list[dict[str, str]], out: multiprocessing.Queue) -> None:
    s: Store = SqliteStore(path)
    out.put([allocate_identity(s, labels) for labels in labels_list])
    s.close()


def test_processes_agree(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    SqliteStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    sets = [{"app": str(i % 3)} for i in range(6)]
    procs = [ctx.Process(target=_process_worker, args=(path, sets if i % 2 else sets[::-1], q))
             for i in range(4)]
    for p in procs:
        p.start()
    answers = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    s = SqliteStore(path)
    ids = list_identities(s)
    s.close()
    assert len(ids) == 3 and sorted(ids) == [256, 257, 258]
    number_of = {labels["app"]: num for num, labels in ids.items()}
    # each process got, for each label set, the one number the store holds (a process asked in
    # either order, so check both)
    forward = [number_of[x["app"]] for x in sets]
    assert all(nums in (forward, forward[::-1]) for nums in answers)
    assert sorted(answers) == sorted([forward, forward, forward[::-1], forward[::-1]])


def test_processes_agree_on_etcd(etcd_server: EtcdServer) -> None:
    """The same race on etcd, where transactions do not wait but lose with Conflict and retry."""
    location = etcd_server.location(f"/test/{uuid.uuid4().hex}/")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    sets = [{"app": str(i % 3)} for i in range(6)]
    procs = [ctx.Process(target=_allocator, args=(location, sets if i % 2 else sets[::-1], q))
             for i in range(4)]
    for p in procs:
        p.start()
    answers = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    s = open_url(location)
    ids = list_identities(s)
    s.close()
    assert len(ids) == 3 and sorted(ids) == [256, 257, 258]
    number_of = {labels["app"]: num for num, labels in ids.items()}
    forward = [number_of[x["app"]] for x in sets]
    assert all(nums in (forward, forward[::-1]) for nums in answers)
