"""Desired-state stores: the small interface agents and the CLI use, and its backends.

The embedded default is SQLite (`sqlite.SqliteStore`). The interface is deliberately small
(transactions over get/list/put/delete, and a watch by revision) so that etcd and Kubernetes
backends can implement it.

On top of the interface: `informer` (a local, always-current copy of the store's objects, list
then watch) and `identities` (numeric identities for security label sets, allocated through the
store, the same on every node). `apply` is what `nodemesh apply` (and the demo and the
benchmark) does: manifests → validated, admitted objects → the store, in one transaction.
"""

from nodemesh.store.base import Compacted, Event, Store, Txn

__all__ = ["Compacted", "Event", "Store", "Txn", "open_store"]


def open_store(state_dir: str) -> Store:
    """Open the store of the cluster whose state lives in `state_dir`."""
    import os

    from nodemesh.store.sqlite import SqliteStore

    return SqliteStore(os.path.join(state_dir, "store.db"))
