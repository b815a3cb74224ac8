"""The agent's workload certificates: one leaf per workload identity of the node's pods.

The agent makes each identity's key itself, sends the cluster CA a CSR (the CA signs only
identities of pods scheduled on this node), and hands the leaf to its Envoy over SDS; the key
never leaves the node. Leaves are renewed at half of their lifetime, and at once when the trust
bundle says the CA signs with another root (a rotation), so a leaf never expires under a running
workload and the old root can be retired. They are kept in ``<node dir>/certs.json`` (0600), so a
restarted agent serves Envoy the leaves it already has.

`ensure` is what a new pod waits for before its containers start; `sync` (the agent's loop)
renews, drops identities no local pod has any more, and tells the proxy when something changed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

from nodemesh.certs import pem
from nodemesh.certs.authority import CaError
from nodemesh.certs.client import CaClient, CaUnavailable
from nodemesh.certs.leaf import Leaf, leaf_from, make_csr, new_key
from nodemesh.host.files import read_json, write_json_atomic

log = logging.getLogger("nodemesh.certs")
RETRY_SECONDS = 1.0  # after a failed signing request
EXPIRY_MARGIN = timedelta(seconds=1)  # a leaf this close to its end is not handed out


def renewal_due(leaf: Leaf) -> float:
    """When (epoch seconds) a leaf is renewed: at half of its lifetime."""
    return leaf.renew_at.timestamp()


class CertManager:
    def __init__(self, node: str, ca_socket: str, state_file: str, ttl_seconds: float) -> None:
        self.node = node
        self.ca = CaClient(ca_socket)
        self.state_file = state_file
        self.ttl = ttl_seconds
        self.leaves: dict[str, Leaf] = {}
        self.roots: list[bytes] = []  # the trust bundle, as the store has it
        self.signing: str = ""  # the fingerprint of the root the CA signs with now
        self.wanted: set[str] = set()
        self.on_change: list[Callable[[], None]] = []
        self.last_error: str | None = None
        self.renewals = 0
        self._lock = threading.RLock()
        self._issue_locks: dict[str, threading.Lock] = {}  # one CSR in flight per identity
        self._retry: dict[str, float] = {}
        self._load()

    # ---- persistence ---------------------------------------------------------------------
    def _load(self) -> None:
        data = read_json(self.state_file) or {}
        for rec in data.get("leaves") or []:
            try:
                leaf = Leaf.from_json(rec)
            except ValueError as e:
                log.warning("%s: dropped a leaf record: %s", self.state_file, e)
                continue
            if leaf.expires_in() > 0:
                self.leaves[leaf.spiffe_id] = leaf

    def _save(self) -> None:
        write_json_atomic(self.state_file,
                          {"leaves": [lf.to_json() for _, lf in sorted(self.leaves.items())]},
                          mode=0o600)

    # ---- the trust bundle ---------------------------------------------------------------------
    def set_bundle(self, roots: list[bytes], signing: str) -> bool:
        """The trust bundle from the store; True when it changed."""
        with self._lock:
            if roots == self.roots and signing == self.signing:
                return False
            self.roots, self.signing = list(roots), signing
        return True

    # ---- leaves --------------------------------------------------------------------------
    def ready(self) -> frozenset[str]:
        """The identities whose leaves can be handed out now."""
        now = pem.utc()
        with self._lock:
            return frozenset(i for i, lf in self.leaves.items()
                             if lf.not_after - now > EXPIRY_MARGIN)

    def snapshot(self) -> dict[str, Leaf]:
        with self._lock:
            return dict(self.leaves)

    def ensure(self, spiffe_id: str, timeout: float = 10.0) -> Leaf:
        """A valid leaf for the identity, asking the CA if need be (a pod about to start)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self.wanted.add(spiffe_id)
        while True:
            # One request per identity at a time: pods of one ServiceAccount that start together
            # wait for the first one's certificate instead of each asking for its own.
            with self._issuing(spiffe_id):
                leaf = self._valid(spiffe_id)
                if leaf is not None:
                    return leaf
                try:
                    return self._issue(spiffe_id)
                except (CaError, CaUnavailable) as e:
                    if isinstance(e, CaError) or time.monotonic() > deadline:
                        raise
            time.sleep(0.2)

    def _issuing(self, spiffe_id: str) -> threading.Lock:
        with self._lock:
            return self._issue_locks.setdefault(spiffe_id, threading.Lock())

    def _valid(self, spiffe_id: str) -> Leaf | None:
        with self._lock:
            leaf = self.leaves.get(spiffe_id)
        if leaf is None or leaf.not_after - pem.utc() <= EXPIRY_MARGIN:
            return None
        return leaf

    def _issue(self, spiffe_id: str) -> Leaf:
        key = new_key()
        try:
            chain = self.ca.sign(make_csr(key, spiffe_id), spiffe_id, self.ttl)
            leaf = leaf_from(chain, key, self.roots or None)
        except (CaError, CaUnavailable) as e:
            self.last_error = f"{spiffe_id}: {e.message}"
            self._retry[spiffe_id] = time.monotonic() + RETRY_SECONDS
            raise
        except ValueError as e:
            self.last_error = f"{spiffe_id}: the CA's answer is unusable: {e}"
            self._retry[spiffe_id] = time.monotonic() + RETRY_SECONDS
            raise CaError(self.last_error) from None
        with self._lock:
            renewed = spiffe_id in self.leaves
            self.leaves[spiffe_id] = leaf
            self._save()
        self._retry.pop(spiffe_id, None)
        self.last_error = None
        if renewed:
            self.renewals += 1
        log.info("%s certificate for %s, serial %x, until %s", "renewed" if renewed else "got",
                 spiffe_id, leaf.serial, pem.iso(leaf.not_after))
        for fn in self.on_change:
            fn()
        return leaf

    def sync(self, wanted: Iterable[str]) -> bool:
        """Renew what is due (or signed by a retired root), drop identities no local pod has;
        True when the set of leaves changed."""
        wanted = set(wanted)
        now = time.time()
        changed = False
        with self._lock:
            self.wanted = wanted | {i for i in self.wanted if i not in self.leaves}
            for gone in set(self.leaves) - wanted:
                del self.leaves[gone]
                changed = True
            if changed:
                self._save()
            todo = []
            for spiffe_id in sorted(wanted):
                leaf = self.leaves.get(spiffe_id)
                stale_root = bool(leaf and self.signing and leaf.issuer_fingerprint != self.signing)
                due = leaf is None or stale_root or now >= renewal_due(leaf)
                if due and self._retry.get(spiffe_id, 0.0) <= time.monotonic():
                    todo.append(spiffe_id)
        for spiffe_id in todo:
            try:
                with self._issuing(spiffe_id):
                    self._issue(spiffe_id)
            except (CaError, CaUnavailable) as e:
                log.warning("certificate for %s: %s", spiffe_id, e.message)
        if changed:
            for fn in self.on_change:
                fn()
        return changed or bool(todo)

    def next_due(self) -> float:
        """Seconds until the next renewal (or retry) is due."""
        now = time.time()
        with self._lock:
            dues = [renewal_due(lf) - now for i, lf in self.leaves.items() if i in self.wanted]
        retries = [t - time.monotonic() for t in self._retry.values()]
        return max(0.05, min(dues + retries, default=5.0))

    def status(self) -> list[dict]:
        now = pem.utc()
        with self._lock:
            return [{"spiffeId": i, "serial": format(lf.serial, "x"),
                     "notBefore": pem.iso(lf.not_before), "notAfter": pem.iso(lf.not_after),
                     "expiresInSeconds": round((lf.not_after - now).total_seconds(), 1),
                     "issuer": lf.issuer_fingerprint}
                    for i, lf in sorted(self.leaves.items())]


def state_file(node_dir: str) -> str:
    return os.path.join(node_dir, "certs.json")
