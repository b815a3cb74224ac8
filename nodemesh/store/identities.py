"""Numeric identity allocation through the store: one number per security label set, cluster-wide.

Each allocated identity is a cluster-scoped store object::

    apiVersion: nodemesh.io/v1
    kind: Identity
    metadata: {name: "256"}          # the number, as a string
    spec: {labels: {app: web, io.kubernetes.pod.namespace: prod, ...}}
    status: {lastUsed: "2025-01-01T00:00:00Z"}   # refreshed when an allocation reuses it

Every agent (and the CLI) allocates through the same store, in one transaction that looks for an
object with the same labels and otherwise creates the next number. The store serializes write
transactions (SQLite: ``BEGIN IMMEDIATE``; other backends detect the race and raise `Conflict`,
which we retry), so two nodes asking for the same labels at once get the same number.

Numbers are never handed out twice while the object exists. `release_unused` deletes identities no
pod uses any more, but only once they have been idle for a while: an allocation that reuses an
identity refreshes ``status.lastUsed`` so a collector working from a slightly old list of in-use
identities cannot delete one that a new pod just picked up.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime

from nodemesh.errors import Conflict, NodemeshError
from nodemesh.identity.reserved import FIRST_POD_IDENTITY
from nodemesh.store.base import Store, Txn

IDENTITY_KIND = "Identity"
IDENTITY_API_VERSION = "nodemesh.io/v1"
# Cilium's cluster-local identities are 24 bits wide; keep to that so an identity fits anything
# sized after Cilium's (flow records, metrics keys).
MAX_IDENTITY = (1 << 24) - 1
# Refresh ``status.lastUsed`` at most this often per identity (seconds): enough for the
# garbage-collection guard, without a store write on every pod start.
TOUCH_INTERVAL = 30.0
_RETRIES = 32


class IdentitiesExhausted(NodemeshError):
    """Every identity number is taken."""


def _number(obj: Mapping) -> int | None:
    try:
        num = int(obj["metadata"]["name"])
    except (KeyError, TypeError, ValueError):
        return None
    return num if FIRST_POD_IDENTITY <= num <= MAX_IDENTITY else None


def _labels_of(obj: Mapping) -> dict[str, str]:
    return dict((obj.get("spec") or {}).get("labels") or {})


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_ts(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _last_used(obj: Mapping) -> float | None:
    """The latest of creation and last reuse, as a UNIX time (None when neither is readable)."""
    times = [
        t
        for t in (
            _parse_ts((obj.get("metadata") or {}).get("creationTimestamp")),
            _parse_ts((obj.get("status") or {}).get("lastUsed")),
        )
        if t is not None
    ]
    return max(times) if times else None


def identity_object(number: int, labels: Mapping[str, str]) -> dict:
    """The store object for an identity."""
    return {
        "apiVersion": IDENTITY_API_VERSION,
        "kind": IDENTITY_KIND,
        "metadata": {"name": str(number)},
        "spec": {"labels": dict(sorted(labels.items()))},
    }


def _allocate_in(txn: Txn, labels: dict[str, str], now: float) -> int:
    taken: set[int] = set()
    for obj in txn.list(IDENTITY_KIND):
        num = _number(obj)
        if num is None:
            continue
        if _labels_of(obj) == labels:
            last = _parse_ts((obj.get("status") or {}).get("lastUsed"))
            if last is None or now - last >= TOUCH_INTERVAL:
                txn.put_status(IDENTITY_KIND, "", str(num), {"lastUsed": _rfc3339(now)})
            return num
        taken.add(num)
    # The next number after the highest in use, so a number freed by garbage collection is not
    # handed to different labels at once (stale map entries elsewhere might still name it).
    num = max(taken, default=FIRST_POD_IDENTITY - 1) + 1
    if num > MAX_IDENTITY:
        num = next(
            (n for n in range(FIRST_POD_IDENTITY, MAX_IDENTITY + 1) if n not in taken), -1
        )
        if num < 0:
            raise IdentitiesExhausted("no free identity number left")
    txn.create(identity_object(num, labels))
    return num


def allocate_identity(store: Store, labels: Mapping[str, str], *, now: float | None = None) -> int:
    """The cluster-wide number for a security label set, creating it when it is new."""
    wanted = {str(k): str(v) for k, v in labels.items()}
    try:
        # Every allocation reads all identities, so any other allocation is a lost race: with N
        # writers allocating at once a loser may lose N times over, hence the many attempts.
        for attempt in store.retrying(_RETRIES):
            with attempt as txn:
                num = _allocate_in(txn, wanted, time.time() if now is None else now)
        return num
    except Conflict as e:
        raise Conflict(f"could not allocate an identity for {wanted}: {e}") from e


def find_identity(store: Store, labels: Mapping[str, str]) -> int | None:
    """The number already allocated to a label set, or None (never writes)."""
    wanted = {str(k): str(v) for k, v in labels.items()}
    for obj in store.list(IDENTITY_KIND):
        num = _number(obj)
        if num is not None and _labels_of(obj) == wanted:
            return num
    return None


def list_identities(store: Store) -> dict[int, dict[str, str]]:
    """Every allocated pod identity → its labels (reserved identities are not stored)."""
    out: dict[int, dict[str, str]] = {}
    for obj in store.list(IDENTITY_KIND):
        num = _number(obj)
        if num is not None:
            out[num] = _labels_of(obj)
    return out


def release_unused(
    store: Store, in_use: set[int], min_age_seconds: float, *, now: float | None = None
) -> list[int]:
    """Delete identities not in `in_use` that were neither created nor reused for
    `min_age_seconds`; returns the numbers released, lowest first.

    `in_use` is what the caller saw in use across the cluster (every pod's identity). The age
    guard covers the race where a pod picked an identity up after that list was taken.
    """
    released: list[int] = []
    with store.transaction() as txn:
        t = time.time() if now is None else now
        for obj in txn.list(IDENTITY_KIND):
            num = _number(obj)
            if num is None or num in in_use:
                continue
            last = _last_used(obj)
            if last is not None and t - last < min_age_seconds:
                continue
            txn.delete(IDENTITY_KIND, "", obj["metadata"]["name"])
            released.append(num)
    return sorted(released)
