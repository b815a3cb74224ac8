"""Pod address allocation from a node's pod CIDR (pure).

Addresses are handed out round-robin after the last one given, so a freed address is not reused
at once (a late packet for a deleted pod does not reach its successor). The first host address is
kept for the node itself.
"""

from __future__ import annotations

import ipaddress

from nodemesh.errors import NodemeshError


def allocate(cidr: str, in_use: set[str], last: str | None = None) -> str:
    net = ipaddress.ip_network(cidr)
    hosts = list(net.hosts())[1:]  # .1 is the node's
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
