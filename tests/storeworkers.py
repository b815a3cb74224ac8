"""What the store tests run in other processes (started with "spawn": see tests/unit/test_store.py).

A module of its own, importing little, so that each child starts in a fraction of a second."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
from collections.abc import Callable

from nodemesh.errors import Conflict
from nodemesh.store.base import Store


def svc(name: str, port: int = 80, ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"port": port}]}}


def _writer(open_store: Callable[[str], Store], location: str, n: int, tag: str) -> None:
    s = open_store(location)
    for i in range(n):
        with s.transaction() as t:
            t.put(svc(f"{tag}{i}"))
    s.close()


def _racer(open_store: Callable[[str], Store], location: str, rounds: int, tag: str,
           barrier: multiprocessing.synchronize.Barrier, wins: multiprocessing.Queue) -> None:
    s = open_store(location)
    for r in range(rounds):
        barrier.wait(30)
        obj = svc(f"round{r}")
        obj["metadata"]["labels"] = {"writer": tag}
        try:
            with s.transaction() as t:
                t.create(obj)
        except Conflict:
            continue
        wins.put((r, tag))
    s.close()


def _incrementer(open_store: Callable[[str], Store], location: str, n: int,
                 barrier: multiprocessing.synchronize.Barrier) -> None:
    s = open_store(location)
    barrier.wait(30)
    done = 0
    while done < n:
        try:
            with s.transaction() as t:  # read-modify-write, retried when it loses a race
                cur = t.get("ConfigMap", "default", "counter")
                obj = {k: v for k, v in cur.items() if k != "status"}
                obj["data"] = {"n": str(int(cur["data"]["n"]) + 1)}
                t.put(obj)
        except Conflict:
            continue
        done += 1
    s.close()


def _allocator(location: str, labels_list: list[dict[str, str]], out: multiprocessing.Queue) -> None:
    from nodemesh.store.etcd import open_url
    from nodemesh.store.identities import allocate_identity

    s = open_url(location)
    out.put([allocate_identity(s, labels) for labels in labels_list])
    s.close()


def _identity_racer(open_store: Callable[[str], Store], location: str,
                    labels_list: list[dict[str, str]], start_at: float) -> list[int]:
    """Allocate each label set in turn, starting at `start_at` (time.time(): every racer of one
    round starts at once); the numbers the store gave."""
    import time

    from nodemesh.store.identities import allocate_identity

    s = open_store(location)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        return [allocate_identity(s, labels) for labels in labels_list]
    finally:
        s.close()
