"""Identities: security label sets and the cluster-wide numbers allocated to them.

- `labels`: which labels define a pod's identity, and how selector keys find them;
- `reserved`: the fixed identities of non-pod peers (host, world, remote-node ...);
- `allocator`: label set → number, through the store, the same on every node.
"""

from nodemesh.identity.allocator import (
    IDENTITY_API_VERSION,
    IDENTITY_KIND,
    MAX_IDENTITY,
    IdentitiesExhausted,
    allocate_identity,
    find_identity,
    identity_object,
    list_identities,
    release_unused,
)
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
    "IDENTITY_API_VERSION",
    "IDENTITY_KIND",
    "MAX_IDENTITY",
    "NAMESPACE_LABEL",
    "NAMESPACE_LABELS_PREFIX",
    "RESERVED_BY_NAME",
    "RESERVED_LABELS",
    "RESERVED_NAMES",
    "SERVICE_ACCOUNT_LABEL",
    "VOLATILE_LABELS",
    "IdentitiesExhausted",
    "Identity",
    "allocate_identity",
    "find_identity",
    "identity_object",
    "is_reserved",
    "label_value",
    "list_identities",
    "release_unused",
    "reserved_labels",
    "security_labels",
    "security_labels_from",
]
