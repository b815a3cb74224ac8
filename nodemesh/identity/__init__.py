"""Identities: security label sets and the fixed numbers of non-pod peers (pure).

- `labels`: which labels define a pod's identity, and how selector keys find them;
- `reserved`: the fixed identities of non-pod peers (host, world, remote-node ...).

Allocating a number to a label set goes through the store: `nodemesh.store.identities`.
"""

from nodemesh.identity.labels import (
    NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX,
    SERVICE_ACCOUNT_LABEL,
    VOLATILE_LABELS,
    label_value,
    security_labels,
    security_labels_from,
)
from nodemesh.identity.reserved import (
    FIRST_POD_IDENTITY,
    RESERVED_BY_NAME,
    RESERVED_LABELS,
    RESERVED_NAMES,
    Identity,
    is_reserved,
    reserved_labels,
)

__all__ = [
    "FIRST_POD_IDENTITY",
    "NAMESPACE_LABEL",
    "NAMESPACE_LABELS_PREFIX",
    "RESERVED_BY_NAME",
    "RESERVED_LABELS",
    "RESERVED_NAMES",
    "SERVICE_ACCOUNT_LABEL",
    "VOLATILE_LABELS",
    "Identity",
    "is_reserved",
    "label_value",
    "reserved_labels",
    "security_labels",
    "security_labels_from",
]
