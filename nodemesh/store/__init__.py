"""Desired-state stores: the small interface agents and the CLI use, and its backends.

The embedded default is SQLite (`sqlite.SqliteStore`); `etcd.EtcdStore` keeps the same interface
on etcd v3 for a cluster that spans hosts (docs/store.md), and `kubernetes.KubeStore` on the
Kubernetes API server for `nodemesh agent --kubernetes` (docs/kubernetes.md; opened by that
command, not by `open_store`). The interface is deliberately small (transactions over
get/list/put/delete, and a watch by revision) so that each backend can implement it.

On top of the interface: `informer` (a local, always-current copy of the store's objects, list
then watch) and `identities` (numeric identities for security label sets, allocated through the
store, the same on every node). `apply` is what `nodemesh apply` (and the demo and the
benchmark) does: manifests → validated, admitted objects → the store, in one transaction.
"""

from nodemesh.store.base import Compacted, Event, Store, Txn

__all__ = ["Compacted", "Event", "Store", "Txn", "open_store", "store_config"]


def store_config(state_dir: str) -> dict:
    """The cluster's store settings: ``cluster.json``'s top-level ``"store"`` object.

    Absent (or no cluster.json) means ``{"type": "sqlite"}``. Read here with json, not through
    nodemesh.cluster: the store sits below the cluster in the layers.
    """
    import json
    import os

    from nodemesh.errors import NodemeshError

    path = os.path.join(state_dir, "cluster.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return {"type": "sqlite"}
    except (OSError, ValueError) as e:
        raise NodemeshError(f"{path}: can not read the cluster's store settings: {e}") from e
    store = cfg.get("store") if isinstance(cfg, dict) else None
    if store is None:
        return {"type": "sqlite"}
    if not isinstance(store, dict) or store.get("type", "sqlite") not in ("sqlite", "etcd"):
        raise NodemeshError(f"{path}: store: want {{\"type\": \"sqlite\"}} or "
                            f"{{\"type\": \"etcd\", \"endpoints\": [...]}}, not {store!r}", 2)
    return {"type": "sqlite", **store}


def open_store(state_dir: str) -> Store:
    """Open the store of the cluster whose state lives in `state_dir` (its cluster.json says
    which: SQLite in ``<state_dir>/store.db`` unless ``"store": {"type": "etcd", ...}``)."""
    import os

    from nodemesh.errors import NodemeshError

    cfg = store_config(state_dir)
    if cfg["type"] == "etcd":
        from nodemesh.host.netns import check_store_netns
        from nodemesh.store.etcd import EtcdStore

        # The local cluster's members are on the underlay: from the host's namespace their
        # addresses would follow its default route off the machine. Refuse there.
        check_store_netns(cfg)
        endpoints = cfg.get("endpoints")
        if not endpoints or not isinstance(endpoints, list):
            raise NodemeshError(f"{os.path.join(state_dir, 'cluster.json')}: store.endpoints: "
                                "want a list of etcd client URLs", 2)
        return EtcdStore(endpoints, ca=cfg.get("ca"), cert=cfg.get("cert"), key=cfg.get("key"),
                         prefix=cfg.get("prefix") or "/nodemesh/")

    from nodemesh.store.sqlite import SqliteStore

    return SqliteStore(os.path.join(state_dir, "store.db"))
