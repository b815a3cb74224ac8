"""Ports, protocols and CIDRs: parsing policy fields into numbers, and the arithmetic the maps need
(CIDR containment for folding). The port blocks of LPM keys are `datapath.layout.port_blocks`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nodemesh.datapath.layout import PORT_MAX, PORT_MIN, Proto
from nodemesh.policy.types import (
    PROTOCOLS,
)

# Cilium's ``protocol: ANY`` (and its default) means these, as on a Cilium without SCTP enabled.
ANY_EXPANDS_TO = (Proto.TCP, Proto.UDP)


@dataclass(frozen=True, order=True)
class PortRange:
    """A protocol and an inclusive port range; protocol 0 only with the full range."""

    protocol: int
    lo: int = PORT_MIN
    hi: int = PORT_MAX

    @property
    def whole(self) -> bool:
        return self.lo == PORT_MIN and self.hi == PORT_MAX

    def covers(self, protocol: int, port: int) -> bool:
        return (self.protocol in (Proto.ANY, protocol)) and self.lo <= port <= self.hi


ALL_PORTS = PortRange(Proto.ANY)


@dataclass(frozen=True)
class NamedPort:
    """A port given by name, resolved against a pod's ``containers[].ports[].name``.

    ``protocols`` are the protocols the rule accepts (a NetworkPolicy port has one, defaulting to
    TCP; a Cilium ``ANY`` port accepts whatever protocol the named port has).
    """

    name: str
    protocols: tuple[int, ...]


PortSpec = PortRange | NamedPort


def protocol_number(name: object, default: str = "TCP") -> int:
    """``TCP``/``UDP``/``SCTP`` (any case) → IP protocol number; KeyError for others."""
    text = str(name).upper() if name is not None else default
    return PROTOCOLS[text]


def parse_port_number(value: object) -> int | None:
    """An int or a digit string → the number; None for a name."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def resolve_named(
    port: NamedPort, named_ports: Mapping[str, Iterable[tuple[str, int]]]
) -> list[PortRange]:
    """The concrete (protocol, port) a named port means on one pod; [] when it has no such port."""
    out = []
    for proto_name, number in named_ports.get(port.name, ()):
        try:
            proto = protocol_number(proto_name)
        except KeyError:
            continue
        if proto in port.protocols:
            out.append(PortRange(proto, number, number))
    return sorted(set(out))


def canonical_cidr(text: str) -> str | None:
    """``10.1.2.3/8`` → ``10.0.0.0/8``, ``10.1.2.3`` → ``10.1.2.3/32``; None for IPv6 (nodemesh
    pods and nodes are IPv4 only, so an IPv6 peer can never match and is left out)."""
    net = ipaddress.ip_network(str(text).strip(), strict=False)
    if net.version != 4:
        return None
    return str(net)


def cidr_contains(outer: str, inner: str) -> bool:
    """Is CIDR `inner` inside (or equal to) CIDR `outer`?"""
    o = ipaddress.IPv4Network(outer)
    i = ipaddress.IPv4Network(inner)
    return i.prefixlen >= o.prefixlen and i.subnet_of(o)


def ip_in_cidr(ip: str, cidr: str) -> bool:
    return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(cidr)
