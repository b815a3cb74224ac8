"""SyncedRevision: what ``syncedRevision`` may claim around syncs and unrelated changes."""

from nodemesh.store.informer import SyncedRevision


def test_unrelated_change_while_idle_moves_the_mark() -> None:
    s = SyncedRevision()
    s.unrelated(7)
    assert s.value == 7


def test_a_sync_reflects_the_revision_it_began_with() -> None:
    s = SyncedRevision()
    s.changed()
    s.begin()
    s.done(5)
    assert s.value == 5


def test_unrelated_change_during_a_sync_applies_when_it_ends() -> None:
    s = SyncedRevision()
    s.begin()
    s.unrelated(9)
    assert s.value == 0, "the sync has not finished"
    s.done(8)
    assert s.value == 9


def test_unrelated_change_after_a_dependency_waits_for_the_next_sync() -> None:
    s = SyncedRevision()
    s.changed()  # revision 10, not yet synced
    s.unrelated(11)
    assert s.value == 0
    s.begin()
    s.done(11)
    assert s.value == 11


def test_dependency_during_a_sync_keeps_later_unrelated_changes_back() -> None:
    s = SyncedRevision()
    s.begin()  # began at 4
    s.changed()  # 5 arrives during the sync
    s.unrelated(6)
    s.done(4)
    assert s.value == 4
    s.begin()
    s.done(6)
    assert s.value == 6


def test_failed_sync_claims_nothing_new() -> None:
    s = SyncedRevision()
    s.begin()
    s.unrelated(3)
    s.failed()
    assert s.value == 0
    s.unrelated(4)
    assert s.value == 0
    s.begin()
    s.done(4)
    assert s.value == 4


def test_the_mark_never_goes_back() -> None:
    s = SyncedRevision()
    s.unrelated(10)
    s.begin()
    s.done(8)
    assert s.value == 10
