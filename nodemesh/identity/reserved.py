"""Reserved identities: fixed numbers for peers that are not pods, numbered as Cilium does.

Policies name them as entities (``fromEntities: [host]``) or by their labels
(``fromEndpoints: [{matchLabels: {"reserved:host": ""}}]``); the ipcache maps addresses to them
(the node's address → host, other nodes → remote-node, everything else → world).
"""

from __future__ import annotations

from types import MappingProxyType

ANY = 0  # "any identity" in policy keys; never an endpoint's identity
HOST = 1
WORLD = 2
UNMANAGED = 3
HEALTH = 4
INIT = 5
REMOTE_NODE = 6

# Pod identities start here (Cilium's first cluster-local identity), the same on every node.
MIN_POD_IDENTITY = 256

RESERVED_NAMES: MappingProxyType[int, str] = MappingProxyType(
    {
        HOST: "host",
        WORLD: "world",
        UNMANAGED: "unmanaged",
        HEALTH: "health",
        INIT: "init",
        REMOTE_NODE: "remote-node",
    }
)
RESERVED_BY_NAME: MappingProxyType[str, int] = MappingProxyType(
    {name: num for num, name in RESERVED_NAMES.items()}
)

# Each reserved identity's label set, in the stored form of `nodemesh.identity.labels`.
RESERVED_LABELS: MappingProxyType[int, MappingProxyType[str, str]] = MappingProxyType(
    {num: MappingProxyType({f"reserved:{name}": ""}) for num, name in RESERVED_NAMES.items()}
)


def is_reserved(identity: int) -> bool:
    return 0 < identity < MIN_POD_IDENTITY


def reserved_labels(identity: int) -> dict[str, str]:
    """The label set of a reserved identity (KeyError for any other number)."""
    return dict(RESERVED_LABELS[identity])
