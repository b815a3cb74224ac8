"""Policy ids: the number a map entry carries to say which policy decided.

An id is derived from the policy's kind, namespace and name (a hash), not from its position in a
list: it stays the same when other policies come and go, and it is the same on every node, so a
flow's ``policy_id`` means the same thing wherever it was recorded. Hash collisions (rare in 31
bits) are resolved deterministically over the whole set of policies, which every node sees alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

_MASK = 0x7FFFFFFF  # 31 bits: fits policy_id (u32) and stays positive everywhere


def policy_ref(kind: str, namespace: str, name: str) -> str:
    """How a policy is named in `EndpointPolicy.policy_names`: ``NetworkPolicy ns/name``."""
    return f"{kind} {namespace}/{name}"


def _hash_id(ref: str) -> int:
    value = int.from_bytes(hashlib.sha256(ref.encode()).digest()[:4], "big") & _MASK
    return value or 1  # 0 means "no policy"


def assign_policy_ids(refs: Iterable[str]) -> dict[str, int]:
    """ref → id for a set of policy refs; stable for the same set, and per ref across sets unless
    two refs collide."""
    out: dict[str, int] = {}
    used: set[int] = set()
    for ref in sorted(set(refs)):
        num = _hash_id(ref)
        while num in used:
            num = num % _MASK + 1
        used.add(num)
        out[ref] = num
    return out
