"""Pod address allocation from a node's pod CIDR (pure).

Addresses are handed out round-robin after the last one given, so a freed address is not reused
at once (a late packet for a deleted pod does not reach its successor). The first host address is
kept for the node itself (it is the gateway of pods that CNI brings), and the last quarter of the
CIDR (`cni_range`: .192-.254 of a /24) is left to the IPAM plugin of a CNI chain (docs/cni.md).
"""

from __future__ import annotations

import ipaddress

from nodemesh.errors import NodemeshError


def cni_range(cidr: str) -> tuple[str, str] | None:
    """The addresses of `cidr` that the local pod runtime never hands out, for a CNI chain's
    IPAM (host-local's rangeStart and rangeEnd); None for a CIDR too small to share."""
    net = ipaddress.ip_network(cidr)
    if net.num_addresses < 16:
        return None
    first = net.network_address + (net.num_addresses - net.num_addresses // 4)
    return str(first), str(net.broadcast_address - 1)


def gateway(cidr: str) -> str:
    """The first host address: the node's own (the gateway a CNI chain gives its pods)."""
    return str(next(ipaddress.ip_network(cidr).hosts()))


def allocate(cidr: str, in_use: set[str], last: str | None = None) -> str:
    net = ipaddress.ip_network(cidr)
    hosts = list(net.hosts())[1:]  # .1 is the node's
    reserved = cni_range(cidr)
    if reserved is not None:
        hosts = [h for h in hosts if h < ipaddress.ip_address(reserved[0])]
    if not hosts:
        raise NodemeshError(f"pod CIDR {cidr} has no room for pods")
    start = 0
    if last is not None:
        try:
            start = (hosts.index(ipaddress.ip_address(last)) + 1) % len(hosts)
        except ValueError:
            start = 0
    for i in range(len(hosts)):
        ip = str(hosts[(start + i) % len(hosts)])
        if ip not in in_use:
            return ip
    raise NodemeshError(f"pod CIDR {cidr} is full ({len(hosts)} pods)")
