"""Workload certificates for mutual TLS between node Envoys, with SPIFFE workload identities.

A pod's workload identity is its namespace and ServiceAccount as a SPIFFE ID
(``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``, `spiffe`). Certificates are per workload identity
and are held by the node agent of every node that runs a pod of that identity (as Istio's ztunnel
does); the agent generates the keys, so they never leave the node (`leaf`).

The certificate authority runs in the cluster daemon: `authority` holds the interface an external
CA can implement later and the built-in CA (a self-signed root with two-step rotation), `server`
serves it to agents on a unix socket, refusing nodes that run no pod of the identity they ask for
(`authorize`), and `client` is the agents' side.
"""

from __future__ import annotations

from nodemesh.certs.authority import BuiltinCA, CaError, CertificateAuthority, check_csr
from nodemesh.certs.authorize import authorize
from nodemesh.certs.client import CaClient, CaUnavailable
from nodemesh.certs.leaf import Leaf, leaf_from, make_csr, new_key, verify_chain
from nodemesh.certs.server import CaServer, netns_inode_of
from nodemesh.certs.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    check_trust_domain,
    parse_workload_id,
    spiffe_id,
    trust_domain_id,
)

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "BuiltinCA",
    "CaClient",
    "CaError",
    "CaServer",
    "CaUnavailable",
    "CertificateAuthority",
    "Leaf",
    "authorize",
    "check_csr",
    "check_trust_domain",
    "leaf_from",
    "make_csr",
    "netns_inode_of",
    "new_key",
    "parse_workload_id",
    "spiffe_id",
    "trust_domain_id",
    "verify_chain",
]
