"""The control plane's side of mutual TLS: the cluster daemon serves the CA to node agents,
publishes the trust bundle in the store, and carries out CA rotations.

- **Serving.** The CA (`nodemesh.certs.authority.BuiltinCA`, in ``<state>/ca/``) answers on
  ``<state>/ca.sock``. A caller is a node agent when its network namespace (read through
  SO_PEERCRED and /proc) is one of the cluster's node namespaces; it gets certificates only for
  workload identities of pods the store has scheduled on its node (`certs.authorize`).
- **The bundle.** The cluster-scoped ``TrustBundle/default`` holds every root nodes must trust,
  the fingerprint of the root the CA signs with, and the rotation's phase. Agents follow it: they
  hand the roots to their Envoy, and renew their leaves when the signing root changes.
- **Rotation** (`nodemesh ca rotate` asks for it by setting ``spec.rotate`` on the bundle): the
  new root is prepared and published, and signs nothing until every node reports (in its Node
  status) that its Envoy trusts it; then it signs, and once every node reports leaves from it
  only, the old root is retired. No node ever meets a certificate it cannot verify, so no
  connection fails.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from nodemesh.certs import pem
from nodemesh.certs.authority import BuiltinCA
from nodemesh.certs.authorize import authorize
from nodemesh.certs.server import CaServer, netns_inode_of
from nodemesh.cluster.config import ClusterConfig
from nodemesh.store import Store
from nodemesh.store.base import now_rfc3339

log = logging.getLogger("nodemesh.trust")
BUNDLE_NAME = "default"
ROTATION_TIMEOUT_SECONDS = 120.0


def fingerprint_of(root_pem: bytes) -> str:
    return pem.fingerprint(pem.load_certs(root_pem, "root")[0])


def bundle_object(ca: BuiltinCA, phase: str, requested: str | None = None) -> dict[str, Any]:
    roots = ca.roots()
    st = ca.status()
    spec: dict[str, Any] = {"trustDomain": ca.trust_domain,
                            "roots": [r.decode() for r in roots],
                            "signing": st["activeRoot"]["fingerprint"],
                            "rotation": {"phase": phase}}
    if requested:
        spec["rotate"] = requested
    return {"apiVersion": "nodemesh.io/v1", "kind": "TrustBundle",
            "metadata": {"name": BUNDLE_NAME}, "spec": spec}


def node_trusts(node: Mapping[str, Any], fingerprints: Iterable[str]) -> bool:
    """Does the node report that its Envoy trusts every root in `fingerprints`?"""
    have = set(((node.get("status") or {}).get("mesh") or {}).get("trustedRoots") or [])
    return set(fingerprints) <= have


def node_signed_by(node: Mapping[str, Any], fingerprint: str) -> bool:
    """Are all the node's leaves issued by that root?"""
    issuers = ((node.get("status") or {}).get("mesh") or {}).get("leafIssuers")
    return issuers is not None and set(issuers) <= {fingerprint}


class Trust:
    """The daemon's mutual-TLS duties for one cluster."""

    def __init__(self, cfg: ClusterConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.ca = BuiltinCA.load_or_create(cfg.ca_dir, cfg.trust_domain)
        self._netns = {}
        for n in cfg.nodes:
            try:
                self._netns[os.stat(f"/run/netns/{cfg.node_netns(n.name)}").st_ino] = n.name
            except OSError:
                log.warning("node %s: no network namespace yet", n.name)
        self.server = CaServer(self.ca, cfg.ca_socket, self._node_of_peer, self._authorize,
                               max_ttl_seconds=max(cfg.cert_ttl_seconds, 1.0))
        self._rotation: dict[str, Any] | None = None

    def start(self) -> None:
        self.server.start()
        self.publish(self._phase())

    def stop(self) -> None:
        self.server.stop()

    # ---- the CA server's callbacks --------------------------------------------------------
    def _node_of_peer(self, pid: int) -> str | None:
        inode = netns_inode_of(pid)
        return self._netns.get(inode) if inode is not None else None

    def _authorize(self, node: str, spiffe_id: str) -> str | None:
        return authorize(node, spiffe_id, self.cfg.trust_domain, self.store.list("Pod"))

    # ---- the bundle -------------------------------------------------------------------------
    def _phase(self) -> str:
        return self.ca.status()["rotation"]

    def publish(self, phase: str, requested: str | None = None) -> None:
        obj = bundle_object(self.ca, phase, requested)
        with self.store.transaction() as t:
            cur = t.get("TrustBundle", "", BUNDLE_NAME)
            if requested is None and cur is not None:
                req = (cur.get("spec") or {}).get("rotate")
                if req and phase != "idle":
                    obj["spec"]["rotate"] = req
            t.put(obj)

    def status(self) -> dict[str, Any]:
        return self.ca.status()

    # ---- rotation (the daemon's loop calls `step`) ------------------------------------------
    def step(self) -> None:
        """Advance a rotation that is asked for or under way (never blocks)."""
        bundle = self.store.get("TrustBundle", "", BUNDLE_NAME)
        spec = (bundle or {}).get("spec") or {}
        requested = spec.get("rotate")
        phase = (spec.get("rotation") or {}).get("phase", "idle")
        nodes = [n for n in self.store.list("Node")]
        if requested and phase == "idle" and self.ca.prepared is None:
            fp = self.ca.prepare()
            self._rotation = {"started": time.monotonic(), "root": fp}
            log.info("CA rotation asked for (%s): prepared root %s", requested, fp)
            self.publish("prepared", requested)
            return
        if self.ca.prepared is not None:
            fp = self.ca.prepared
            if all(node_trusts(n, [fp]) for n in nodes) or self._timed_out():
                self.ca.rotate()
                log.info("CA rotation: every node trusts %s; it signs from now on", fp)
                self.publish("rotating", requested)
            return
        if phase == "rotating" or (self.ca.status()["rotation"] == "rotating"):
            active = self.ca.status()["activeRoot"]["fingerprint"]
            if all(node_signed_by(n, active) for n in nodes) or self._timed_out():
                dropped = self.ca.retire()
                log.info("CA rotation done: %d old root(s) retired", dropped)
                self._rotation = None
                self.publish("idle")
                with self.store.transaction() as t:
                    cur = t.get("TrustBundle", "", BUNDLE_NAME)
                    if cur is not None:
                        status = {"lastRotation": now_rfc3339(), "signing": active}
                        t.put_status("TrustBundle", "", BUNDLE_NAME, status)

    def _timed_out(self) -> bool:
        # A node that never answers (its agent is gone) must not stall a rotation forever; its
        # leaves then fail against the others until it comes back and renews.
        r = self._rotation
        return bool(r) and time.monotonic() - r["started"] > ROTATION_TIMEOUT_SECONDS
