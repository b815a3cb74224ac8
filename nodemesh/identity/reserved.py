"""Reserved identities: fixed numbers for peers that are not pods, numbered as Cilium does.

Policies name them as entities (``fromEntities: [host]``) or by their labels
(``fromEndpoints: [{matchLabels: {"reserved:host": ""}}]``); the ipcache maps addresses to them
(the node's address → host, other nodes → remote-node, everything else → world).
"""

from __future__ import annotations

from types import MappingProxyType

# The numbers are the datapath's (bpf/lib/common.h IDENTITY_*, FIRST_POD_IDENTITY), defined once
# in nodemesh.datapath.layout: `Identity.ANY` is "any identity" in policy keys (never an
# endpoint's identity); pod identities start at FIRST_POD_IDENTITY, the same on every node.
from nodemesh.datapath.layout import FIRST_POD_IDENTITY, Identity

RESERVED_NAMES: MappingProxyType[int, str] = MappingProxyType(
    {int(i): i.name.lower().replace("_", "-") for i in Identity if i is not Identity.ANY}
)
RESERVED_BY_NAME: MappingProxyType[str, int] = MappingProxyType(
    {name: num for num, name in RESERVED_NAMES.items()}
)

# Each reserved identity's label set, in the stored form of `nodemesh.identity.labels`.
RESERVED_LABELS: MappingProxyType[int, MappingProxyType[str, str]] = MappingProxyType(
    {num: MappingProxyType({f"reserved:{name}": ""}) for num, name in RESERVED_NAMES.items()}
)


def is_reserved(identity: int) -> bool:
    return 0 < identity < FIRST_POD_IDENTITY


def reserved_labels(identity: int) -> dict[str, str]:
    """The label set of a reserved identity (KeyError for any other number)."""
    return dict(RESERVED_LABELS[identity])
