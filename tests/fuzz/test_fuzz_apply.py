"""Fuzz the in-process apply path: accepted and round-tripping through `get -o yaml`, or
refused with exit 2 naming the resource and field, with the store unchanged."""

from __future__ import annotations

import os
import tempfile

import yaml
from hypothesis import event, given
from hypothesis import strategies as st

from nodemesh.cli.output import to_yaml
from nodemesh.errors import InvalidManifest, NodemeshError
from nodemesh.model.kinds import KINDS, obj_key
from nodemesh.store.apply import apply_objects, load_and_validate
from nodemesh.store.sqlite import SqliteStore
from tests.fuzz.strategies import SEEDS, dump, manifest_texts, mutated

_DIR = tempfile.mkdtemp(prefix="nodemesh-fuzz-")


_STORE: list[SqliteStore] = []


def _store() -> SqliteStore:
    """One store for the whole run (a fresh SQLite file per case costs ~20 ms of fsyncs)."""
    if not _STORE:
        _STORE.append(SqliteStore(os.path.join(_DIR, "store.db")))
        apply_objects(_STORE[0], load_and_validate([os.path.join(_DIR, "seed.yaml")], None))
    return _STORE[0]


def _apply_text(text: str) -> tuple[SqliteStore, list[dict] | NodemeshError, list, int]:
    """Write `text` to a file and apply it as `nodemesh apply -f` does, in-process."""
    path = os.path.join(_DIR, "m.yaml")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    store = _store()
    before, rev = store.list(), store.revision()
    try:
        objs = load_and_validate([path], None)
        apply_objects(store, objs)
    except NodemeshError as e:
        return store, e, before, rev
    return store, objs, before, rev


with open(os.path.join(_DIR, "seed.yaml"), "w") as _f:
    _f.write(dump([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}]))


def _check(text: str) -> str:
    store, result, before, rev = _apply_text(text)
    if isinstance(result, NodemeshError):
        assert result.exit_code == 2, result
        assert store.list() == before and store.revision() == rev, "partial write"
        if isinstance(result, InvalidManifest):
            for line in result.errors:  # "<Kind ns/name | source>: <field>: <problem>"
                assert line.count(": ") >= 1, line
        assert str(result).strip(), "empty message"
        return "refused"
    for o in result:
        kind, ns, name = obj_key(o)
        stored = store.get(kind, ns, name)
        assert stored is not None
        assert yaml.safe_load(to_yaml(stored)) == stored, "get -o yaml does not round-trip"
    return "accepted"


@given(manifest_texts)
def test_apply_any_text(text: str) -> None:
    event(_check(text))


@given(st.lists(mutated(), min_size=2, max_size=4))
def test_apply_multi_document(docs: list[dict]) -> None:
    """Later bad documents must leave nothing of the earlier good ones stored."""
    event(_check(dump(docs)))


def test_seeds_are_accepted() -> None:
    """Not vacuous: every unmutated seed manifest of every kind is accepted."""
    assert set(SEEDS) == {k for k, i in KINDS.items() if i.user_writable}
    for kind, seed in SEEDS.items():
        assert _check(dump([seed])) == "accepted", kind
