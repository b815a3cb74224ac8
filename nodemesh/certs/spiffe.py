"""SPIFFE IDs for workload identities: build, parse and check them (pure functions).

A pod's workload identity is its namespace and ServiceAccount, written as the SPIFFE ID
``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`` (the form Istio and SPIRE's
Kubernetes registrar use). The rules follow the SPIFFE ID specification: a lowercase trust domain
of letters, digits, dots, dashes and underscores; path segments of letters, digits, dots, dashes
and underscores, never empty, ``.`` or ``..``; no query, fragment, port, user info or
percent-encoding; at most 2048 bytes in all.
"""

from __future__ import annotations

import string

DEFAULT_TRUST_DOMAIN = "cluster.local"
SCHEME = "spiffe://"
MAX_TRUST_DOMAIN_LENGTH = 255
MAX_ID_LENGTH = 2048

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def check_trust_domain(td: str) -> str | None:
    """None when `td` is a valid SPIFFE trust domain name, else why it is not."""
    if not td:
        return "must not be empty"
    if len(td) > MAX_TRUST_DOMAIN_LENGTH:
        return f"must be at most {MAX_TRUST_DOMAIN_LENGTH} characters, got {len(td)}"
    for c in td:
        if c not in _TRUST_DOMAIN_CHARS:
            return (f"character {c!r} is not allowed (only lowercase letters, digits, dots, dashes "
                    "and underscores)")
    return None


def check_path_segment(segment: str) -> str | None:
    """None when `segment` may be one segment of a SPIFFE ID's path, else why not."""
    if not segment:
        return "must not be empty"
    if segment in (".", ".."):
        return f"must not be {segment!r}"
    for c in segment:
        if c not in _SEGMENT_CHARS:
            return f"character {c!r} is not allowed (only letters, digits, dots, dashes and underscores)"
    return None


def trust_domain_id(trust_domain: str) -> str:
    """The SPIFFE ID of the trust domain itself (``spiffe://<td>``), which roots carry."""
    if reason := check_trust_domain(trust_domain):
        raise ValueError(f"trust domain {trust_domain!r}: {reason}")
    return SCHEME + trust_domain


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The workload identity of pods of `namespace` running as `service_account`."""
    base = trust_domain_id(trust_domain)
    for what, value in (("namespace", namespace), ("service account", service_account)):
        if reason := check_path_segment(value):
            raise ValueError(f"{what} {value!r}: {reason}")
    return f"{base}/ns/{namespace}/sa/{service_account}"


def parse_workload_id(uri: str) -> tuple[str, str, str]:
    """(trust domain, namespace, service account) of a workload identity's SPIFFE ID.

    Raises ValueError naming the ID and what is wrong with it for anything else, including valid
    SPIFFE IDs of another shape (a trust domain alone, or another path).
    """
    if not isinstance(uri, str):
        raise ValueError(f"{uri!r} is not a SPIFFE ID: want a string")
    if len(uri.encode()) > MAX_ID_LENGTH:
        raise ValueError(f"SPIFFE ID {uri[:40]!r}...: longer than {MAX_ID_LENGTH} bytes")
    if not uri.startswith(SCHEME):
        raise ValueError(f"{uri!r} is not a SPIFFE ID: must start with {SCHEME}")
    td, slash, path = uri[len(SCHEME):].partition("/")
    if reason := check_trust_domain(td):
        raise ValueError(f"SPIFFE ID {uri!r}: trust domain {td!r}: {reason}")
    segments = path.split("/") if slash else []
    for segment in segments:
        if reason := check_path_segment(segment):
            raise ValueError(f"SPIFFE ID {uri!r}: path segment {segment!r}: {reason}")
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise ValueError(f"SPIFFE ID {uri!r} is not a workload identity: want "
                         f"{SCHEME}<trust-domain>/ns/<namespace>/sa/<service-account>")
    return td, segments[1], segments[3]
