"""Services -> the socket-LB maps' contents. Pure functions, no kernel, no root.

`compile_lb` turns a list of `LbService` (ClusterIP, port, protocol, backends, algorithm,
affinity, L7 port) into map-ready entries for nm_lb4_svc, nm_lb4_be, nm_lb4_revnat and
nm_lb4_maglev. Backend ids and rev_nat indexes stay stable across calls (they are taken from the
previous state), so an unchanged service produces byte-identical entries and the syncer writes
nothing; a new id is never one that was freed in the same call, so a stale affinity entry can
not silently point at somebody else's backend.

`maglev_table` is the lookup-table population of Maglev (Eisenbud et al., NSDI 2016, section
3.4): each backend walks its own permutation of the M slots (offset + j * skip mod M) and the
backends take turns claiming their next free slot. The permutation comes from blake2b, never
Python's salted `hash()`, so every agent computes the same table.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nodemesh.datapath.layout import (
    MAGLEV_DEFAULT_M,
    Lb4Backend,
    Lb4Key,
    Lb4ReverseNat,
    Lb4Service,
    Proto,
    ServiceFlags,
    ip4,
    maglev_table_type,
    u16,
    u32,
)

ALGORITHMS = ("random", "maglev")
DEFAULT_AFFINITY_TIMEOUT = 10800  # Kubernetes' sessionAffinityConfig.clientIP.timeoutSeconds


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _hash64(name: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=salt).digest(),
                          "little")


def maglev_table(backend_names: list[str], m: int) -> list[int]:
    """The Maglev lookup table: m entries, each an index into backend_names. m must be a prime
    larger than the number of backends. Depends only on the names and m, not on their order."""
    if not is_prime(m):
        raise ValueError(f"Maglev table size {m} is not a prime")
    if len(set(backend_names)) != len(backend_names):
        raise ValueError("duplicate backend names")
    n = len(backend_names)
    if n == 0:
        return []
    if n >= m:
        raise ValueError(f"{n} backends need a Maglev table larger than {m}")
    order = sorted(range(n), key=lambda i: backend_names[i])
    offsets = [_hash64(backend_names[i], b"nm-maglev-off") % m for i in order]
    skips = [_hash64(backend_names[i], b"nm-maglev-skip") % (m - 1) + 1 for i in order]
    nexts = [0] * n
    table = [-1] * m
    filled = 0
    while True:
        for j in range(n):
            off, skip, nxt = offsets[j], skips[j], nexts[j]
            slot = (off + nxt * skip) % m
            while table[slot] >= 0:
                nxt += 1
                slot = (off + nxt * skip) % m
            table[slot] = order[j]
            nexts[j] = nxt + 1
            filled += 1
            if filled == m:
                return table


@dataclass(frozen=True)
class LbService:
    """One ClusterIP service port as the datapath sees it."""

    vip: str
    port: int
    proto: str | int
    backends: Sequence[tuple[str, int]]
    algorithm: str = "random"  # random | maglev
    affinity_timeout: int | None = None  # seconds; None = no ClientIP affinity
    l7_proxy_port: int | None = None  # route through the node Envoy on this port

    @property
    def key(self) -> tuple[str, int, int]:
        return (_canonical_ip(self.vip), self.port, int(Proto.parse(self.proto)))


@functools.lru_cache(maxsize=1 << 16)
def _canonical_ip(text: str) -> str:
    return str(ipaddress.IPv4Address(text))


BackendKey = tuple[str, int, int]  # (ip, port, protocol)
ServiceKey = tuple[str, int, int]  # (vip, port, protocol)


@dataclass
class LbState:
    """The output of compile_lb: ids, and the entries of each map keyed by key bytes."""

    maglev_m: int
    rev_nat: dict[ServiceKey, int] = field(default_factory=dict)
    backend_ids: dict[BackendKey, int] = field(default_factory=dict)
    svc: dict[bytes, Lb4Service] = field(default_factory=dict)
    backends: dict[bytes, Lb4Backend] = field(default_factory=dict)
    revnat: dict[bytes, Lb4ReverseNat] = field(default_factory=dict)
    maglev: dict[bytes, ctypes.Array] = field(default_factory=dict)
    # rev_nat_index -> the backend ids the service may use (affinity cleanup)
    service_backends: dict[int, frozenset[int]] = field(default_factory=dict)
    # rev_nat_index -> backend names the Maglev table was built from (reuse when unchanged)
    maglev_names: dict[int, tuple[str, ...]] = field(default_factory=dict)
    next_backend_id: int = 1
    next_rev_nat: int = 1

    def maps(self) -> dict[str, dict[bytes, ctypes.Structure | ctypes.Array]]:
        return {
            "nm_lb4_be": dict(self.backends),
            "nm_lb4_maglev": dict(self.maglev),
            "nm_lb4_revnat": dict(self.revnat),
            "nm_lb4_svc": dict(self.svc),
        }


def _allocate(used: set[int], start: int, limit: int) -> int:
    """The first id >= start (wrapping to 1) not in used."""
    candidate = start if 1 <= start <= limit else 1
    for _ in range(limit):
        if candidate not in used:
            return candidate
        candidate = candidate + 1 if candidate < limit else 1
    raise ValueError(f"no free id below {limit}")


def _validate(svc: LbService) -> None:
    where = f"service {svc.vip}:{svc.port}/{svc.proto}"
    try:
        ipaddress.IPv4Address(svc.vip)
    except ValueError as e:
        raise ValueError(f"{where}: vip: {e}") from None
    if not 1 <= svc.port <= 0xFFFF:
        raise ValueError(f"{where}: port must be 1-65535")
    try:
        proto = Proto.parse(svc.proto)
    except (KeyError, ValueError):
        raise ValueError(f"{where}: proto must be TCP or UDP") from None
    if proto not in (Proto.TCP, Proto.UDP):
        raise ValueError(f"{where}: proto must be TCP or UDP")
    if svc.algorithm not in ALGORITHMS:
        raise ValueError(f"{where}: algorithm must be one of {', '.join(ALGORITHMS)}")
    if svc.affinity_timeout is not None and not 1 <= svc.affinity_timeout <= 86400:
        raise ValueError(f"{where}: affinity timeout must be 1-86400 seconds")
    if svc.l7_proxy_port is not None and not 1 <= svc.l7_proxy_port <= 0xFFFF:
        raise ValueError(f"{where}: l7_proxy_port must be 1-65535")
    if len(svc.backends) > 0xFFFF:
        raise ValueError(f"{where}: more than 65535 backends")
    seen = set()
    for ip, port in svc.backends:
        try:
            ip4(ip)  # (parsed once per address text, cached)
        except ValueError as e:
            raise ValueError(f"{where}: backend {ip}: {e}") from None
        if not 1 <= port <= 0xFFFF:
            raise ValueError(f"{where}: backend {ip}:{port}: port must be 1-65535")
        if (ip, port) in seen:
            raise ValueError(f"{where}: backend {ip}:{port} listed twice")
        seen.add((ip, port))


def compile_lb(services: Iterable[LbService], previous: LbState | None = None,
               maglev_m: int | None = None) -> LbState:
    """Map-ready entries for the services; ids are reused from `previous`."""
    services = list(services)
    m = maglev_m or (previous.maglev_m if previous else MAGLEV_DEFAULT_M)
    if not is_prime(m):
        raise ValueError(f"Maglev table size {m} is not a prime")
    by_key: dict[ServiceKey, LbService] = {}
    for svc in services:
        _validate(svc)
        if svc.key in by_key:
            raise ValueError(f"service {svc.vip}:{svc.port}/{svc.proto} defined twice")
        by_key[svc.key] = svc

    prev = previous or LbState(maglev_m=m)
    state = LbState(maglev_m=m, next_backend_id=prev.next_backend_id,
                    next_rev_nat=prev.next_rev_nat)

    # ids: keep the old ones; new ones never reuse an id that was live in `previous`
    live_rev = set(prev.rev_nat.values())
    for key in sorted(by_key):
        if key in prev.rev_nat:
            state.rev_nat[key] = prev.rev_nat[key]
    for key in sorted(by_key):
        if key not in state.rev_nat:
            idx = _allocate(live_rev | set(state.rev_nat.values()), state.next_rev_nat, 0xFFFF)
            state.rev_nat[key] = idx
            state.next_rev_nat = idx % 0xFFFF + 1

    wanted_backends = sorted({(ip, port, key[2]) for key, svc in by_key.items()
                              for ip, port in svc.backends})
    live_be = set(prev.backend_ids.values())
    for bkey in wanted_backends:
        if bkey in prev.backend_ids:
            state.backend_ids[bkey] = prev.backend_ids[bkey]
    for bkey in wanted_backends:
        if bkey not in state.backend_ids:
            bid = _allocate(live_be | set(state.backend_ids.values()), state.next_backend_id,
                            0xFFFFFFFE)
            state.backend_ids[bkey] = bid
            state.next_backend_id = bid % 0xFFFFFFFE + 1

    for (ip, port, proto), bid in state.backend_ids.items():
        state.backends[bytes(u32(bid))] = Lb4Backend(ip4(ip), port, proto, 0)

    table_type = maglev_table_type(m)
    for key, svc in by_key.items():
        vip, port, proto = key
        rev = state.rev_nat[key]
        backends = sorted(svc.backends, key=lambda b: (ip4(b[0]), b[1]))
        ids = [state.backend_ids[(ip, bport, proto)] for ip, bport in backends]
        flags = ServiceFlags.NONE
        if svc.affinity_timeout:
            flags |= ServiceFlags.AFFINITY
        if svc.algorithm == "maglev":
            flags |= ServiceFlags.MAGLEV
        if svc.l7_proxy_port:
            flags |= ServiceFlags.L7
        head = Lb4Service(0, len(ids), rev, int(flags), 0, svc.l7_proxy_port or 0,
                          svc.affinity_timeout or 0)
        state.svc[bytes(Lb4Key(ip4(vip), port, 0, proto))] = head
        for slot, bid in enumerate(ids, 1):
            state.svc[bytes(Lb4Key(ip4(vip), port, slot, proto))] = Lb4Service(
                bid, 0, rev, int(flags), 0, 0, 0)
        state.revnat[bytes(u16(rev))] = Lb4ReverseNat(ip4(vip), port, 0)
        state.service_backends[rev] = frozenset(ids)
        if svc.algorithm == "maglev" and ids:
            names = tuple(f"{ip}:{bport}" for ip, bport in backends)
            prev_key = bytes(u16(rev))
            if (prev.maglev_m == m and prev.maglev_names.get(rev) == names
                    and prev_key in prev.maglev):
                table = prev.maglev[prev_key]
            else:
                idx = maglev_table(list(names), m)
                table = table_type(*[ids[i] for i in idx])
            state.maglev[bytes(u16(rev))] = table
            state.maglev_names[rev] = names
    return state
