"""The embedded store: one SQLite database (WAL mode) shared by the CLI, the daemon and agents.

Objects live in one table keyed by (kind, namespace, name); every write also appends an event, so
a watcher asks "what happened after revision N" with one indexed query. Old events are compacted
away; a watcher that fell that far behind gets `Compacted` and lists again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator

from nodemesh.store.base import DELETED, Compacted, Event, Store, Txn

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    rev INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS events (rev INTEGER PRIMARY KEY, type TEXT NOT NULL, data TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0), ('compacted', 0);
"""

KEEP_EVENTS = 20000
COMPACT_EVERY = 1000


class _SqliteTxn(Txn):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn
        self._rev: int | None = None

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        row = self._c.execute(
            "SELECT data FROM objects WHERE kind=? AND namespace=? AND name=?",
            (kind, namespace or "", name),
        ).fetchone()
        return json.loads(row[0]) if row else None

    def list(self, kind: str | None = None, namespace: str | None = None) -> list[dict]:
        q, args = "SELECT data FROM objects", []
        conds = []
        if kind is not None:
            conds.append("kind=?")
            args.append(kind)
        if namespace is not None:
            conds.append("namespace=?")
            args.append(namespace)
        if conds:
            q += " WHERE " + " AND ".join(conds)
        q += " ORDER BY kind, namespace, name"
        return [json.loads(r[0]) for r in self._c.execute(q, args)]

    def _next_revision(self) -> int:
        if self._rev is None:
            self._rev = self._c.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]
        self._rev += 1
        self._c.execute("UPDATE meta SET value=? WHERE key='revision'", (self._rev,))
        if self._rev % COMPACT_EVERY == 0:
            floor = self._rev - KEEP_EVENTS
            if floor > 0:
                self._c.execute("DELETE FROM events WHERE rev <= ?", (floor,))
                self._c.execute("UPDATE meta SET value=? WHERE key='compacted'", (floor,))
        return self._rev

    def _write(self, kind: str, namespace: str, name: str, obj: dict, event: str) -> None:
        data = json.dumps(obj, separators=(",", ":"), sort_keys=True)
        rev = int(obj["metadata"]["resourceVersion"])
        self._c.execute(
            "INSERT OR REPLACE INTO objects (kind, namespace, name, rev, data) VALUES (?,?,?,?,?)",
            (kind, namespace or "", name, rev, data),
        )
        self._c.execute("INSERT INTO events (rev, type, data) VALUES (?,?,?)", (rev, event, data))

    def _remove(self, kind: str, namespace: str, name: str, obj: dict) -> None:
        rev = int(obj["metadata"]["resourceVersion"])
        self._c.execute(
            "DELETE FROM objects WHERE kind=? AND namespace=? AND name=?",
            (kind, namespace or "", name),
        )
        self._c.execute(
            "INSERT INTO events (rev, type, data) VALUES (?,?,?)",
            (rev, DELETED, json.dumps(obj, separators=(",", ":"), sort_keys=True)),
        )


class SqliteStore(Store):
    """A store in one SQLite file; safe across threads (a connection each) and processes."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(_SCHEMA)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[Txn]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _SqliteTxn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self.transaction(write=False) as t:
            return t.get(kind, namespace, name)

    def list(self, kind: str | None = None, namespace: str | None = None) -> list[dict]:
        with self.transaction(write=False) as t:
            return t.list(kind, namespace)

    def list_with_revision(self, kinds: tuple[str, ...] | None = None) -> tuple[list[dict], int]:
        with self.transaction(write=False) as t:
            rev = self._conn().execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]
            items = t.list() if kinds is None else [o for k in kinds for o in t.list(k)]
            return items, rev

    def revision(self) -> int:
        return self._conn().execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]

    def events_since(self, revision: int) -> list[Event]:
        conn = self._conn()
        compacted = conn.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()[0]
        if revision < compacted:
            raise Compacted(f"revision {revision} is compacted (oldest kept: {compacted + 1})")
        rows = conn.execute(
            "SELECT rev, type, data FROM events WHERE rev > ? ORDER BY rev LIMIT 5000", (revision,)
        ).fetchall()
        return [Event(t, json.loads(d), r) for r, t, d in rows]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
