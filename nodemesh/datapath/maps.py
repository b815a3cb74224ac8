"""One node's pinned maps: typed handles, writes by diff, the service LB, events and counters.

Handles open from the pins (`<bpffs>/<node>/<map>`), so they work with or without a load in
this process (a second process that only writes maps). Maps are written by diff (`sync_map`,
`apply_lb`): only changed entries are written, stale ones deleted, so applying the same desired
state twice writes nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from nodemesh.datapath import libbpf
from nodemesh.datapath.build import DatapathError
from nodemesh.datapath.layout import (
    MAPS,
    ConfigFlags,
    Direction,
    DropReason,
    EndpointFlags,
    EndpointInfo,
    FlowEvent,
    Lb4AffinityKey,
    Lb4Key,
    NodeConfig,
    Verdict,
    ip4,
    ip4_str,
    l7_redirect,
    lxc_entry,
    lxc_key,
    maglev_table_type,
    netns_entry,
    netns_key,
    u32,
)
from nodemesh.datapath.lb import LbState

TUNNEL_SOCKS_MAP = "nm_tunnel_socks"
MAGLEV_MAP = "nm_lb4_maglev"

# what sync_map takes: {key bytes: value} or [(key struct or bytes, value), ...]
Desired = Mapping[Any, Any] | Iterable[tuple[Any, Any]]


class Counter(NamedTuple):
    packets: int
    bytes: int


class MetricKey(NamedTuple):
    reason: DropReason | int
    direction: Direction
    verdict: Verdict | int


class FlowCountKeyT(NamedTuple):
    src_identity: int
    dst_identity: int
    dport: int
    protocol: int
    verdict: Verdict | int
    direction: Direction


def _enum(cls: Any, value: int) -> Any:
    try:
        return cls(value)
    except ValueError:
        return value


def _listening_inodes(pid: int, ports: set[int]) -> dict[int, int]:
    """socket inode -> port, for the TCP listening sockets of `pid`'s network namespace on
    those ports (IPv4)."""
    out = {}
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A":  # TCP_LISTEN
                continue
            port = int(parts[1].rsplit(":", 1)[1], 16)
            if port in ports:
                out[int(parts[9])] = port
    return out


# --- events -----------------------------------------------------------------------------------
class RingReader:
    """The node's flow events. The programs never wake us: call drain() on a timer (run() does,
    every 10 ms, from an asyncio loop)."""

    def __init__(self, map_fd: int, callback: Callable[[FlowEvent], None],
                 raw: bool = False) -> None:
        self._rb = libbpf.RingBuffer(map_fd, callback, FlowEvent, raw=raw)

    def drain(self) -> int:
        return self._rb.drain()

    def poll(self, timeout_ms: int = 10) -> int:
        return self._rb.poll(timeout_ms)

    async def run(self, interval: float = 0.01, stop: asyncio.Event | None = None) -> None:
        while stop is None or not stop.is_set():
            self.drain()
            await asyncio.sleep(interval)
        self.drain()

    def close(self) -> None:
        self._rb.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the maps ---------------------------------------------------------------------------------
class Maps:
    """The maps pinned in `pin_dir`, with the node's Maglev table size `maglev_m`."""

    def __init__(self, pin_dir: str | Path, maglev_m: int) -> None:
        self.pin_dir = Path(pin_dir)
        self.maglev_m = maglev_m
        self._maps: dict[str, libbpf.Map[Any, Any]] = {}
        self._readers: list[RingReader] = []

    def map(self, name: str) -> libbpf.Map[Any, Any]:
        """A typed handle on a pinned map (opened once, from the pin: it works with or without
        load(), e.g. in a second process that only writes maps)."""
        m = self._maps.get(name)
        if m is not None:
            return m
        if name not in MAPS:
            raise DatapathError(f"unknown map {name}")
        key_t, value_t = MAPS[name]
        pin = self.pin_dir / name
        if not pin.exists():
            raise DatapathError(f"{pin} is not pinned: call load() first")
        if value_t is None:  # the Maglev table: its size is the pinned map's
            fd = libbpf.obj_get(pin)
            try:
                vsize = libbpf.map_info(fd).value_size
            finally:
                os.close(fd)
            value_t = maglev_table_type(vsize // 4)
        m = libbpf.Map.from_pin(pin, key_t, value_t)
        self._maps[name] = m
        return m

    config = property(lambda self: self.map("nm_config"))
    endpoints = property(lambda self: self.map("nm_endpoints"))
    ipcache = property(lambda self: self.map("nm_ipcache"))
    policy = property(lambda self: self.map("nm_policy"))
    policy_cidr = property(lambda self: self.map("nm_policy_cidr"))
    ct = property(lambda self: self.map("nm_ct"))
    services = property(lambda self: self.map("nm_lb4_svc"))
    backends = property(lambda self: self.map("nm_lb4_be"))
    revnat = property(lambda self: self.map("nm_lb4_revnat"))
    maglev = property(lambda self: self.map("nm_lb4_maglev"))
    affinity = property(lambda self: self.map("nm_lb4_affin"))
    reverse_sk = property(lambda self: self.map("nm_lb4_rsk"))
    metrics = property(lambda self: self.map("nm_metrics"))
    flowcnt = property(lambda self: self.map("nm_flowcnt"))
    l7_redir = property(lambda self: self.map("nm_l7_redir"))
    lxc = property(lambda self: self.map("nm_lxc"))
    pod_netns = property(lambda self: self.map("nm_netns"))

    # -- endpoints and config ---------------------------------------------------------------
    def set_endpoint(self, ifindex: int, ipv4: str, identity: int,
                     flags: EndpointFlags = EndpointFlags.NONE,
                     netns_cookie: int | None = None) -> None:
        """Write a pod's nm_endpoints entry: the last step of bringing a pod up (fail-closed
        until then); its nm_lxc entry (IP -> veth, identity), which the proxy's hook needs;
        and with netns_cookie (libbpf.netns_cookie of the pod's namespace) its nm_netns entry
        (cookie -> identity, veth), without which connect4 never redirects the pod to the
        node Envoy. An agent that syncs nm_endpoints with sync_map syncs nm_lxc and nm_netns
        the same way (layout.lxc_entry, layout.netns_entry)."""
        self.endpoints.put(u32(ifindex), EndpointInfo(ip4(ipv4), identity, int(flags), 0))
        self.set_lxc(ipv4, ifindex, identity)
        if netns_cookie is not None:
            self.set_netns(netns_cookie, identity, ifindex)

    def remove_endpoint(self, ifindex: int) -> None:
        """Delete a pod's nm_endpoints entry (its veth fails closed at once), the nm_lxc entry
        of its address and the nm_netns entries that name its veth."""
        info = self.endpoints.get(u32(ifindex))
        self.endpoints.delete(u32(ifindex))
        if info is not None:
            current = self.lxc.get(lxc_key(info.ipv4))
            if current is not None and current.ifindex == ifindex:
                self.lxc.delete(lxc_key(info.ipv4))
        for key in [k for k, v in self.pod_netns.items() if v.ifindex == ifindex]:
            self.pod_netns.delete(key)

    def set_lxc(self, ipv4: str, ifindex: int, identity: int) -> None:
        key, value = lxc_entry(ipv4, ifindex, identity)
        self.lxc.put(key, value)

    def set_netns(self, cookie: int, identity: int, ifindex: int) -> None:
        """One nm_netns entry: the pod whose network namespace has this cookie."""
        key, value = netns_entry(cookie, identity, ifindex)
        self.pod_netns.put(key, value)

    def remove_netns(self, cookie: int) -> None:
        self.pod_netns.delete(netns_key(cookie))

    def set_l7_redirect(self, addr: str, port: int, proxy_port: int, policy_id: int = 0,
                        identity: int = 0) -> None:
        """One nm_l7_redir entry (TCP) for clients of that identity (0: any client); the agent
        would rather sync_map("nm_l7_redir", pairs of layout.l7_redirect)."""
        key, value = l7_redirect(addr, port, proxy_port, policy_id, identity=identity)
        self.l7_redir.put(key, value)

    def set_config(self, node_ip: str, dns_ip: str = "0.0.0.0", proxy_ip: str = "0.0.0.0",
                   flags: ConfigFlags = ConfigFlags.NONE) -> None:
        """nm_config. proxy_ip 0.0.0.0 = no node Envoy (no L7 redirect). PROXY_RETURN only
        once install_proxy_routing() ran."""
        self.config.put(u32(0), NodeConfig(ip4(node_ip), ip4(dns_ip), ip4(proxy_ip), int(flags)))

    # -- the tunnel's listeners --------------------------------------------------------------
    def set_tunnel_listeners(self, pid: int, ports: Mapping[int, int]) -> dict[int, int]:
        """Put the node Envoy's listening sockets (process `pid`, in this node's namespace) on
        `ports` into nm_tunnel_socks: slot -> port. Returns slot -> the socket's cookie for the
        slots it filled; a port with no listener leaves its slot as it is."""
        inodes = _listening_inodes(pid, set(ports.values()))
        out: dict[int, int] = {}
        m = self.map(TUNNEL_SOCKS_MAP)
        fds_dir = f"/proc/{pid}/fd"
        wanted = {port: slot for slot, port in ports.items()}
        for name in os.listdir(fds_dir):
            try:
                link = os.readlink(os.path.join(fds_dir, name))
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            port = inodes.get(int(link[8:-1]))
            if port is None or port not in wanted or wanted[port] in out:
                continue
            fd = libbpf.pidfd_getfd(pid, int(name))
            try:
                libbpf.map_update_raw(m.fd, wanted[port].to_bytes(4, "little"),
                                      fd.to_bytes(8, "little"))
            finally:
                os.close(fd)
            cookie = libbpf.map_lookup_raw(m.fd, wanted[port].to_bytes(4, "little"), 8)
            out[wanted[port]] = int.from_bytes(cookie or bytes(8), "little")
        return out

    def tunnel_listener_cookies(self) -> dict[int, int]:
        """slot -> socket cookie of what nm_tunnel_socks holds now (a closed socket leaves)."""
        m = self.map(TUNNEL_SOCKS_MAP)
        out = {}
        for slot in (0, 1):
            raw = libbpf.map_lookup_raw(m.fd, slot.to_bytes(4, "little"), 8)
            if raw:
                out[slot] = int.from_bytes(raw, "little")
        return out

    # -- writes by diff ----------------------------------------------------------------------
    @staticmethod
    def _key_bytes(key: bytes | ctypes.Structure | ctypes._SimpleCData) -> bytes:  # type: ignore[name-defined]
        return key if isinstance(key, bytes) else bytes(key)

    def _diff(self, name: str, desired: Desired) -> tuple[dict[bytes, Any], list[bytes]]:
        m = self.map(name)
        if m.percpu:
            raise DatapathError(f"{name} is written by the datapath, not synced")
        pairs = desired.items() if isinstance(desired, Mapping) else desired
        want = {self._key_bytes(k): v for k, v in pairs}
        have = {bytes(k): bytes(v) for k, v in m.items()}
        writes = {k: v for k, v in want.items() if have.get(k) != bytes(v)}
        deletes = [k for k in have if k not in want]
        return writes, deletes

    def _write(self, name: str, entries: Mapping[bytes, Any]) -> None:
        m = self.map(name)
        for k, v in entries.items():
            m.put(m.key_type.from_buffer_copy(k), v)

    def _delete(self, name: str, keys: list[bytes]) -> None:
        m = self.map(name)
        for k in keys:
            m.delete(m.key_type.from_buffer_copy(k))

    def capacity(self, name: str) -> int:
        """The map's max entries as the kernel has it (bytes for a ring buffer)."""
        return int(libbpf.map_info(self.map(name).fd).max_entries)

    def _no_room(self, name: str, writes: Mapping[bytes, Any], deletes: list[bytes]) -> bool:
        """Whether writing before deleting would overflow the map for a moment (a full map
        whose objects change): then the stale entries go first."""
        if not deletes or not writes:
            return False
        have = {bytes(k) for k in self.map(name).keys()}  # noqa: SIM118 - a BPF map
        new = sum(1 for k in writes if k not in have)
        return len(have) + new > self.capacity(name)

    def sync_map(self, name: str, desired: Desired) -> tuple[int, int]:
        """Make the map hold exactly `desired`: write the entries that differ, then delete the
        stale ones (stale ones first when the map has no room for both at once: the snapshot
        never asks for more than it holds). Returns (written, deleted). `desired` is a dict
        keyed by key bytes (or by hashable ctypes scalars), or an iterable of (key, value)
        pairs, since ctypes structs are not hashable."""
        writes, deletes = self._diff(name, desired)
        if self._no_room(name, writes, deletes):
            self._delete(name, deletes)
            self._write(name, writes)
        else:
            self._write(name, writes)
            self._delete(name, deletes)
        return len(writes), len(deletes)

    # -- the service LB ----------------------------------------------------------------------
    def apply_lb(self, state: LbState) -> dict[str, tuple[int, int]]:
        """Sync the four LB maps in an order that never lets a connect() see a half-written
        service: backends and tables first, service slots before the service entry, and
        deletions last (a removed service's entry before its slots). Then drop affinity entries
        that point at a backend the service no longer has."""
        if state.maglev_m != self.maglev_m:
            raise DatapathError(f"LB state built for M={state.maglev_m}, datapath uses "
                                f"{self.maglev_m}")
        desired = state.maps()
        plans = {name: self._diff(name, desired[name]) for name in desired}
        out = {name: (len(w), len(d)) for name, (w, d) in plans.items()}

        def slot(k: bytes) -> int:
            return Lb4Key.from_buffer_copy(k).backend_slot

        # A full map whose services change: its stale entries go first (a removed service's
        # entry before its slots), so that the new ones have room.
        for name in ("nm_lb4_svc", "nm_lb4_be", "nm_lb4_maglev", "nm_lb4_revnat"):
            if self._no_room(name, *plans[name]):
                deletes = plans[name][1]
                self._delete(name, sorted(deletes, key=slot) if name == "nm_lb4_svc"
                             else deletes)
                plans[name] = (plans[name][0], [])
        for name in ("nm_lb4_be", "nm_lb4_maglev", "nm_lb4_revnat"):
            self._write(name, plans[name][0])
        svc_writes = plans["nm_lb4_svc"][0]

        self._write("nm_lb4_svc", {k: v for k, v in svc_writes.items() if slot(k) > 0})
        self._write("nm_lb4_svc", {k: v for k, v in svc_writes.items() if slot(k) == 0})
        svc_deletes = sorted(plans["nm_lb4_svc"][1], key=slot)
        self._delete("nm_lb4_svc", svc_deletes)
        for name in ("nm_lb4_maglev", "nm_lb4_revnat", "nm_lb4_be"):
            self._delete(name, plans[name][1])

        stale = []
        for k, v in self.affinity.items():
            allowed = state.service_backends.get(k.rev_nat_index)
            if allowed is None or v.backend_id not in allowed:
                stale.append(bytes(k))
        for k in stale:
            self.affinity.delete(Lb4AffinityKey.from_buffer_copy(k))
        out["nm_lb4_affin"] = (0, len(stale))
        return out

    def current_lb_state(self) -> LbState:
        """The id assignments in the pinned LB maps, as an LbState to pass as `previous` to
        compile_lb after a restart, so backend ids and rev_nat indexes survive the agent."""
        state = LbState(maglev_m=self.maglev_m)
        for k, v in self.services.items():
            if k.backend_slot == 0:
                state.rev_nat[(ip4_str(k.address), k.dport, k.protocol)] = v.rev_nat_index
        for k, v in self.backends.items():
            state.backend_ids[(ip4_str(v.address), v.port, v.protocol)] = k.value
        state.next_rev_nat = max(state.rev_nat.values(), default=0) % 0xFFFF + 1
        state.next_backend_id = max(state.backend_ids.values(), default=0) % 0xFFFFFFFE + 1
        return state

    # -- observe ------------------------------------------------------------------------------
    def open_events(self, callback: Callable[[FlowEvent], None],
                    raw: bool = False) -> RingReader:
        """A reader of nm_events; callback gets each FlowEvent (with raw: its bytes, to decode
        later) when drain() runs."""
        fd = libbpf.obj_get(self.pin_dir / "nm_events")
        try:
            reader = RingReader(fd, callback, raw=raw)
        finally:
            os.close(fd)  # the ring buffer holds its own mapping
        self._readers.append(reader)
        return reader

    def read_metrics(self) -> dict[MetricKey, Counter]:
        """nm_metrics summed over CPUs: (reason, direction, verdict) -> packets, bytes."""
        out: dict[MetricKey, Counter] = {}
        for k, per_cpu in self.metrics.items():
            key = MetricKey(_enum(DropReason, k.reason), Direction(k.direction),
                            _enum(Verdict, k.verdict))
            out[key] = Counter(sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu))
        return out

    def read_flow_counters(self) -> dict[FlowCountKeyT, Counter]:
        """nm_flowcnt summed over CPUs: per identity pair, port, protocol, verdict, direction."""
        out: dict[FlowCountKeyT, Counter] = {}
        for k, per_cpu in self.flowcnt.items():
            key = FlowCountKeyT(k.src_identity, k.dst_identity, k.dport, k.protocol,
                                _enum(Verdict, k.verdict), Direction(k.direction))
            out[key] = Counter(sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu))
        return out

    def close(self) -> None:
        """Release this process's event readers and map handles (the pins stay)."""
        for r in self._readers:
            r.close()
        self._readers.clear()
        for m in self._maps.values():
            m.close()
        self._maps.clear()
