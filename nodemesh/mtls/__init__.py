"""Mutual TLS between workloads: which connections must be, may be, or are not encrypted.

Pure functions over stored objects, with no I/O, for the agent and the policy compiler to use:

- ``peerauth``: Istio's PeerAuthentication semantics: the effective mTLS mode (STRICT,
  PERMISSIVE, DISABLE) of every pod, and of each of its ports (``resolve_modes``).

The words follow DESIGN.md: a *workload identity* is a pod's namespace and ServiceAccount as a
SPIFFE ID, proven by a certificate; it is not the numeric *identity* of the kernel's policy.
"""
