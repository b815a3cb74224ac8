"""The datapath's ABI: the Python twins of the C structs, enumerations and constants of
bpf/lib/common.h and bpf/lib/drop_reasons.h, defined once for the whole project. The policy
compiler (nodemesh.policy) and the datapath (loader, agent) both take them from here; the C
headers are the source of truth for every value.

Pure: it imports only the standard library (ctypes for the structs, no libbpf), so compile-side
code may import it freely.

Network-order (`__be16`/`__be32`) fields use ctypes' big-endian scalar types, so Python code
reads and writes natural values: an address is the integer of `ipaddress.IPv4Address`, a port
is a plain port number. tests/unit/test_datapath_layout.py compares every struct's size and
member offsets with the BTF of the compiled objects, and the enumerations and constants with the
headers' #defines; `STRUCTS` lists the pairs.

Also here: the policy maps' keys and values as the plain hashable values the compiler produces
(`PolicyKey`, `PolicyValue`, `CidrKey`, `PortRule`, `CidrValue`, each with its struct) and their
conversion to map entries (`policy_map_pairs`), and the entries of the endpoint maps
(`lxc_entry`, `netns_entry`) and of nm_l7_redir (`l7_redirect`), so that nothing outside this
module knows the bit layout of a key.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
be16: type = ctypes.c_uint16.__ctype_be__  # type: ignore[attr-defined]
be32: type = ctypes.c_uint32.__ctype_be__  # type: ignore[attr-defined]


def ip4(addr: str | int | ipaddress.IPv4Address) -> int:
    """An IPv4 address as the integer a be32 field takes."""
    return int(ipaddress.IPv4Address(addr))


def ip4_str(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


# --- enumerations ----------------------------------------------------------------------------
class Direction(enum.IntEnum):
    """From the pod's point of view."""

    INGRESS = 0  # entering the pod (to_container)
    EGRESS = 1  # leaving the pod (from_container)


class EventType(enum.IntEnum):
    TRACE = 1  # a new connection passed a tc hook
    DROP = 2
    SOCK = 3  # a socket-LB translation


class Verdict(enum.IntEnum):
    """flow_event.verdict / metrics_key.verdict. `hubble` gives flow.proto's Verdict value."""

    FORWARDED = 1
    DROPPED = 2
    REDIRECTED = 3
    TRANSLATED = 4

    @property
    def hubble(self) -> int:
        return {1: 1, 2: 2, 3: 5, 4: 7}[self.value]


class DropReason(enum.IntEnum):
    """Values are Hubble's flow.proto DropReason; `hubble_name` is its enum name
    (`drop_reason_desc` in Hubble JSON)."""

    NONE = 0
    INVALID_SOURCE_IP = 132
    POLICY_DENIED = 133
    INVALID_PACKET = 134
    UNSUPPORTED_L3 = 139
    CT_MAP_INSERTION_FAILED = 155
    FRAG_NOT_SUPPORTED = 157
    NO_SERVICE = 158
    SOCKET_LOOKUP_FAILED = 178
    SOCKET_ASSIGN_FAILED = 179
    PROXY_UNSUPPORTED = 180
    POLICY_DENY = 181
    AUTH_REQUIRED = 189
    UNENCRYPTED_TRAFFIC = 195
    RATE_LIMITED = 198
    UNKNOWN_ENDPOINT = 203

    @property
    def hubble_name(self) -> str:
        return _HUBBLE_DROP_NAMES[self]


_HUBBLE_DROP_NAMES = {
    DropReason.NONE: "DROP_REASON_UNKNOWN",
    DropReason.INVALID_SOURCE_IP: "INVALID_SOURCE_IP",
    DropReason.POLICY_DENIED: "POLICY_DENIED",
    DropReason.INVALID_PACKET: "INVALID_PACKET_DROPPED",
    DropReason.UNSUPPORTED_L3: "UNSUPPORTED_L3_PROTOCOL",
    DropReason.CT_MAP_INSERTION_FAILED: "CT_MAP_INSERTION_FAILED",
    DropReason.FRAG_NOT_SUPPORTED: "IP_FRAGMENTATION_NOT_SUPPORTED",
    DropReason.NO_SERVICE: "SERVICE_BACKEND_NOT_FOUND",
    DropReason.SOCKET_LOOKUP_FAILED: "SOCKET_LOOKUP_FAILED",
    DropReason.SOCKET_ASSIGN_FAILED: "SOCKET_ASSIGN_FAILED",
    DropReason.PROXY_UNSUPPORTED: "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL",
    DropReason.POLICY_DENY: "POLICY_DENY",
    DropReason.AUTH_REQUIRED: "AUTH_REQUIRED",
    DropReason.UNENCRYPTED_TRAFFIC: "UNENCRYPTED_TRAFFIC",
    DropReason.RATE_LIMITED: "DROP_RATE_LIMITED",
    DropReason.UNKNOWN_ENDPOINT: "DROP_EP_NOT_READY",
}


class PolicyVerdict(enum.IntEnum):
    """policy_entry.verdict / policy_port_rule.verdict (POLICY_*): what a policy rule says. Not
    the flow's `Verdict`, which is what happened to the packet."""

    NONE = 0  # no entry matched (the kernel's value; never a rule's)
    ALLOW = 1
    DENY = 2
    REDIRECT = 3


class ServiceFlags(enum.IntFlag):
    NONE = 0
    AFFINITY = 1
    MAGLEV = 2
    L7 = 4


class ConfigFlags(enum.IntFlag):
    """node_config.flags."""

    NONE = 0
    # the proxy return route is installed (routing.install_proxy_routing): replies to the node
    # Envoy's transparent upstream sockets are marked PROXY_MARK for local delivery
    PROXY_RETURN = 1
    # the node Envoy's mutual-TLS tunnel listeners are up (TUNNEL_OUT_PORT, TUNNEL_IN_PORT on
    # proxy_ip): TCP between pods of different nodes goes through them (docs/security.md)
    TUNNEL = 2


class EndpointFlags(enum.IntFlag):
    NONE = 0
    INGRESS_ENFORCED = 1
    EGRESS_ENFORCED = 2
    # TCP from other nodes into the pod enters through the node Envoy's inbound tunnel listener
    TUNNEL_IN = 4


class IpcacheFlags(enum.IntFlag):
    """ipcache_entry.flags: how TCP from a local pod reaches the address."""

    NONE = 0
    TUNNEL = 1  # through the node Envoy's mutual-TLS tunnel
    TUNNEL_PORTS = 2  # nm_tunnel_port says so for some ports (a port-level mode)


class EventFlags(enum.IntFlag):
    """flow_event.flags."""

    NONE = 0
    TUNNEL = 1  # the connection went into the mutual-TLS tunnel (source side)
    AUTH = 2  # the peer's identity was authenticated (destination side)


class PolicyFlags(enum.IntFlag):
    """policy_entry.flags."""

    NONE = 0
    AUTH = 1  # the rule matches only an authenticated peer (authentication.mode: required)


class Identity(enum.IntEnum):
    """Reserved identities (IDENTITY_*), numbered as Cilium does; pod identities start at
    FIRST_POD_IDENTITY. ANY is "any identity" in policy keys, never an endpoint's identity.
    Their names and label sets are in nodemesh.identity.reserved."""

    ANY = 0
    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6


FIRST_POD_IDENTITY = 256


class Proto(enum.IntEnum):
    """IP protocol numbers, as policy_key.protocol, ct_key.protocol, lb4_key.protocol and
    flow_event.protocol hold them; ANY (0) is "every protocol" in a policy rule. SCTP is here
    for the policies that name it; the datapath has no SCTP rules of its own."""

    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    SCTP = 132

    @classmethod
    def parse(cls, value: str | int) -> Proto:
        if isinstance(value, int):
            return cls(value)
        return cls[value.upper()]


class CtClosing(enum.IntFlag):
    NONE = 0
    TX = 1  # FIN from the side that opened the connection
    RX = 2  # FIN from the other side


CT_F_REPLY_SEEN = 1
CT_F_NODE_SOCKET = 2  # opened by a socket of the node namespace (to_container saw skb->sk)
# hairpin: the node Envoy's upstream to the client pod itself; its source (the pod's own address)
# was rewritten to proxy_ip at to_container, the pod's replies are rewritten back (with NODE_SOCKET)
CT_F_HAIRPIN = 4
CT_F_TUNNEL = 8  # went into the node Envoy's outbound tunnel listener; later packets are marked
CT_F_AUTH = 16  # the peer's identity was authenticated (the NM_MARK_AUTH socket mark)

# The mutual-TLS tunnel's listeners on proxy_ip and the socket marks of its upstreams.
TUNNEL_OUT_PORT = 15006
TUNNEL_IN_PORT = 15008
NM_MARK_AUTH = 0x1000  # the node Envoy authenticated the client of this upstream
NM_MARK_TUNNEL = 0x2000  # the outbound tunnel's upstream: the client's egress was decided already

# The proxy return path (bpf/lib/common.h): the mark (within the mask) the datapath sets on a
# reply that belongs to a transparent socket of the node, and the rule/table that deliver it.
PROXY_MARK = 0x200
PROXY_MARK_MASK = 0xF00
PROXY_ROUTE_TABLE = 2004
PROXY_RULE_PREF = 9

POLICY_KEY_BITS = 96  # endpoint(32) identity(32) direction(8) protocol(8) dport(16)
POLICY_KEY_FIXED_BITS = 72  # endpoint, identity and direction always match
POLICY_CIDR_KEY_BITS = 96  # endpoint(32) direction(8) pad(24) addr(32)
POLICY_CIDR_KEY_BASE = 64  # endpoint(32) direction(8) pad(24), then the address
POLICY_CIDR_MAX_RULES = 16
PORT_MIN, PORT_MAX = 0, 0xFFFF  # the ports of a rule (dport is a __be16)
MAGLEV_DEFAULT_M = 16381


# --- structs ---------------------------------------------------------------------------------
class NodeConfig(ctypes.Structure):
    _fields_ = [("node_ip", be32), ("dns_ip", be32), ("proxy_ip", be32), ("flags", u32)]


class EndpointInfo(ctypes.Structure):
    _fields_ = [("ipv4", be32), ("identity", u32), ("flags", u32), ("pad", u32)]


class IpcacheKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", be32)]

    @classmethod
    def of(cls, cidr: str) -> IpcacheKey:
        net = ipaddress.IPv4Network(cidr, strict=False)
        return cls(net.prefixlen, int(net.network_address))


class IpcacheEntry(ctypes.Structure):
    _fields_ = [("identity", u32), ("node_ip", be32), ("flags", u32), ("pad", u32)]


class TunnelPortKey(ctypes.Structure):
    _fields_ = [("addr", be32), ("port", be16), ("pad", u16)]


class TunnelPortVal(ctypes.Structure):
    _fields_ = [("tunnel", u8), ("pad", u8 * 3)]


class RateBucket(ctypes.Structure):
    """nm_dns_limit / nm_event_budget value: a budget (GCRA time) and what was over it."""

    _fields_ = [("tat", u64), ("over", u64)]


# The five policy-map structs: the ctypes layout here, the plain value the compiler produces
# (`PolicyKey`, `PolicyValue`, `CidrKey`, `PortRule`, `CidrValue`, below) converts to it.
class PolicyKeyStruct(ctypes.Structure):
    _fields_ = [
        ("prefixlen", u32),
        ("endpoint", u32),
        ("identity", u32),
        ("direction", u8),
        ("protocol", u8),
        ("dport", be16),
    ]


class PolicyEntryStruct(ctypes.Structure):
    _fields_ = [("verdict", u8), ("flags", u8), ("proxy_port", u16), ("policy_id", u32)]


class PolicyCidrKeyStruct(ctypes.Structure):
    _fields_ = [
        ("prefixlen", u32),
        ("endpoint", u32),
        ("direction", u8),
        ("pad", u8 * 3),
        ("addr", be32),
    ]


class PolicyPortRuleStruct(ctypes.Structure):
    _fields_ = [
        ("protocol", u8),
        ("verdict", u8),
        ("proxy_port", u16),
        ("port_lo", u16),
        ("port_hi", u16),
        ("policy_id", u32),
    ]


class PolicyCidrEntryStruct(ctypes.Structure):
    _fields_ = [("count", u32), ("rules", PolicyPortRuleStruct * POLICY_CIDR_MAX_RULES)]


class CtKey(ctypes.Structure):
    _fields_ = [
        ("saddr", be32),
        ("daddr", be32),
        ("sport", be16),
        ("dport", be16),
        ("protocol", u8),
        ("direction", u8),
        ("pad", u16),
    ]


class CtEntry(ctypes.Structure):
    _fields_ = [
        ("expires_ns", u64),
        ("packets", u64),
        ("bytes", u64),
        ("src_identity", u32),
        ("dst_identity", u32),
        ("tcp_flags_seen", u8),
        ("closing", u8),
        ("verdict", u8),
        ("flags", u8),
        ("policy_id", u32),
    ]


class Lb4Key(ctypes.Structure):
    _fields_ = [
        ("address", be32),
        ("dport", be16),
        ("backend_slot", u16),
        ("protocol", u8),
        ("pad", u8 * 3),
    ]


class Lb4Service(ctypes.Structure):
    _fields_ = [
        ("backend_id", u32),
        ("count", u16),
        ("rev_nat_index", u16),
        ("flags", u8),
        ("pad", u8),
        ("l7_proxy_port", u16),
        ("affinity_timeout", u32),
    ]


class Lb4Backend(ctypes.Structure):
    _fields_ = [("address", be32), ("port", be16), ("protocol", u8), ("flags", u8)]


class Lb4ReverseNat(ctypes.Structure):
    _fields_ = [("address", be32), ("port", be16), ("pad", u16)]


class Lb4AffinityKey(ctypes.Structure):
    _fields_ = [("netns_cookie", u64), ("rev_nat_index", u16), ("pad", u16), ("pad2", u32)]


class Lb4AffinityVal(ctypes.Structure):
    _fields_ = [("last_used_ns", u64), ("backend_id", u32), ("pad", u32)]


class Lb4ReverseSkKey(ctypes.Structure):
    _fields_ = [("cookie", u64), ("address", be32), ("port", be16), ("pad", u16)]


class Lb4ReverseSkVal(ctypes.Structure):
    _fields_ = [("address", be32), ("port", be16), ("rev_nat_index", u16)]


class L7RedirKey(ctypes.Structure):
    _fields_ = [("addr", be32), ("port", be16), ("protocol", u8), ("pad", u8),
                ("identity", u32)]


class L7RedirVal(ctypes.Structure):
    _fields_ = [("proxy_port", u16), ("pad", u16), ("policy_id", u32)]


class LxcInfo(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("identity", u32)]


class NetnsInfo(ctypes.Structure):
    _fields_ = [("identity", u32), ("ifindex", u32)]


class FlowEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", u64),
        ("type", u8),
        ("verdict", u8),
        ("reason", u8),
        ("direction", u8),
        ("ifindex", u32),
        ("saddr", be32),
        ("daddr", be32),
        ("sport", be16),
        ("dport", be16),
        ("protocol", u8),
        ("tcp_flags", u8),
        ("rev_nat_index", u16),
        ("src_identity", u32),
        ("dst_identity", u32),
        ("policy_id", u32),
        ("len", u32),
        ("netns_cookie", u64),
        ("orig_daddr", be32),
        ("orig_dport", be16),
        ("flags", u8),
        ("pad", u8),
    ]

    def describe(self) -> str:
        """One line for logs and test failures."""
        kind = EventType(self.type).name if self.type in EventType._value2member_map_ else self.type
        reason = f" {DropReason(self.reason).name}" if self.reason else ""
        proto = Proto(self.protocol).name if self.protocol in Proto._value2member_map_ else self.protocol
        orig = (f" (vip {ip4_str(self.orig_daddr)}:{self.orig_dport})"
                if self.type == EventType.SOCK else "")
        return (f"{kind} {Verdict(self.verdict).name if self.verdict else '-'}{reason} "
                f"{Direction(self.direction).name} if={self.ifindex} {proto} "
                f"{ip4_str(self.saddr)}:{self.sport} -> {ip4_str(self.daddr)}:{self.dport}"
                f"{orig} id {self.src_identity}->{self.dst_identity} policy={self.policy_id}")


class MetricsKey(ctypes.Structure):
    _fields_ = [("reason", u8), ("direction", u8), ("verdict", u8), ("pad", u8)]


class MetricsVal(ctypes.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


class FlowCountKey(ctypes.Structure):
    _fields_ = [
        ("src_identity", u32),
        ("dst_identity", u32),
        ("dport", be16),
        ("protocol", u8),
        ("verdict", u8),
        ("direction", u8),
        ("pad", u8 * 3),
    ]


def maglev_table_type(m: int) -> type[ctypes.Array]:
    """The value type of nm_lb4_maglev: __u32 backend_ids[M]."""
    return u32 * m


# C struct name -> Python twin, for the layout test.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "node_config": NodeConfig,
    "endpoint_info": EndpointInfo,
    "ipcache_key": IpcacheKey,
    "ipcache_entry": IpcacheEntry,
    "tunnel_port_key": TunnelPortKey,
    "tunnel_port_val": TunnelPortVal,
    "rate_bucket": RateBucket,
    "policy_key": PolicyKeyStruct,
    "policy_entry": PolicyEntryStruct,
    "policy_cidr_key": PolicyCidrKeyStruct,
    "policy_port_rule": PolicyPortRuleStruct,
    "policy_cidr_entry": PolicyCidrEntryStruct,
    "ct_key": CtKey,
    "ct_entry": CtEntry,
    "lb4_key": Lb4Key,
    "lb4_service": Lb4Service,
    "lb4_backend": Lb4Backend,
    "lb4_reverse_nat": Lb4ReverseNat,
    "lb4_affinity_key": Lb4AffinityKey,
    "lb4_affinity_val": Lb4AffinityVal,
    "lb4_reverse_sk_key": Lb4ReverseSkKey,
    "lb4_reverse_sk_val": Lb4ReverseSkVal,
    "l7_redir_key": L7RedirKey,
    "l7_redir_val": L7RedirVal,
    "lxc_info": LxcInfo,
    "netns_info": NetnsInfo,
    "flow_event": FlowEvent,
    "metrics_key": MetricsKey,
    "metrics_val": MetricsVal,
    "flow_count_key": FlowCountKey,
}

# Pinned map name -> (key type, value type). nm_lb4_maglev's value depends on M (see
# maglev_table_type); nm_events is a ring buffer of FlowEvent records.
MAPS: dict[str, tuple[type, type | None]] = {
    "nm_config": (u32, NodeConfig),
    "nm_dns_limit": (u32, RateBucket),
    "nm_event_budget": (u64, RateBucket),
    "nm_endpoints": (u32, EndpointInfo),
    "nm_ipcache": (IpcacheKey, IpcacheEntry),
    "nm_policy": (PolicyKeyStruct, PolicyEntryStruct),
    "nm_policy_cidr": (PolicyCidrKeyStruct, PolicyCidrEntryStruct),
    "nm_ct": (CtKey, CtEntry),
    "nm_lb4_svc": (Lb4Key, Lb4Service),
    "nm_lb4_be": (u32, Lb4Backend),
    "nm_lb4_revnat": (u16, Lb4ReverseNat),
    "nm_lb4_maglev": (u16, None),
    "nm_lb4_affin": (Lb4AffinityKey, Lb4AffinityVal),
    "nm_lb4_rsk": (Lb4ReverseSkKey, Lb4ReverseSkVal),
    "nm_metrics": (MetricsKey, MetricsVal),
    "nm_flowcnt": (FlowCountKey, MetricsVal),
    "nm_l7_redir": (L7RedirKey, L7RedirVal),
    "nm_lxc": (be32, LxcInfo),
    "nm_netns": (u64, NetnsInfo),
    "nm_tunnel_port": (TunnelPortKey, TunnelPortVal),
    "nm_tunnel_socks": (u32, u64),  # a SOCKMAP: written with fds, read back as socket cookies
    "nm_lost": (u32, u64),
}
RINGBUF_MAPS = ("nm_events",)


# --- map entries ----------------------------------------------------------------------------
def l7_redirect(addr: str | int, port: int, proxy_port: int, policy_id: int = 0,
                protocol: int = Proto.TCP, identity: int = 0) -> tuple[L7RedirKey, L7RedirVal]:
    """An nm_l7_redir entry: TCP connections of clients with `identity` (0: of any client) on
    this node to addr:port go to the node Envoy's listener on proxy_port (a pair for
    Datapath.sync_map). connect4 takes the entry for the client's identity before the one
    for any client; a client with neither connects to addr:port itself."""
    if not 0 < proxy_port <= 0xFFFF:
        raise ValueError(f"bad proxy port {proxy_port}")
    if not 0 <= identity <= 0xFFFFFFFF:
        raise ValueError(f"bad identity {identity}")
    return (L7RedirKey(ip4(addr), port, protocol, 0, identity),
            L7RedirVal(proxy_port, 0, policy_id))


def tunnel_port_entry(addr: str | int, port: int, tunnel: bool) -> tuple[TunnelPortKey, TunnelPortVal]:
    """An nm_tunnel_port entry: TCP to addr:port goes through the tunnel or not, whatever its
    pod's ipcache flags say (a pair for sync_map)."""
    return TunnelPortKey(ip4(addr), port, 0), TunnelPortVal(1 if tunnel else 0)


def lxc_key(addr: str | int) -> Any:
    """The nm_lxc key of a pod IP (a be32 scalar)."""
    return be32(ip4(addr))


def lxc_entry(addr: str | int, ifindex: int, identity: int) -> tuple[Any, LxcInfo]:
    """An nm_lxc entry: a local pod's IP -> its veth and identity (a pair for sync_map)."""
    return lxc_key(addr), LxcInfo(ifindex, identity)


def netns_key(cookie: int) -> Any:
    """The nm_netns key of a network namespace cookie (a u64 scalar)."""
    return u64(cookie)


def netns_entry(cookie: int, identity: int, ifindex: int) -> tuple[Any, NetnsInfo]:
    """An nm_netns entry: a local pod's network namespace (its cookie, libbpf.netns_cookie)
    -> its identity and veth (a pair for sync_map). connect4 decides the L7 redirect by this
    identity: a pod without an entry is never redirected."""
    if not 0 < cookie <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"bad netns cookie {cookie}")
    return netns_key(cookie), NetnsInfo(identity, ifindex)


# --- nm_policy and nm_policy_cidr: the compiler's plain values ---------------------------------
# Hashable and ordered, so that the compiler (nodemesh.policy.lower) can fold, compare and diff
# them; field for field the structs above (a `struct()` each). Values are host integers:
# PolicyKey.dport is the port *number* whose big-endian encoding makes the LPM prefix bits line
# up with the port's high bits; CidrKey.addr is the masked network address, dotted.


@dataclass(frozen=True, order=True)
class PolicyKey:
    """``struct policy_key``."""

    prefixlen: int  # POLICY_KEY_FIXED_BITS .. POLICY_KEY_BITS
    endpoint: int  # lxc ifindex
    identity: int  # remote identity, Identity.ANY = any
    direction: int  # Direction
    protocol: int  # Proto
    dport: int  # port number (the ICMP type for ICMP); masked to the prefix

    @classmethod
    def of(cls, endpoint: int, identity: int, direction: int, bits: int, value: int) -> PolicyKey:
        """The key whose variable part (protocol << 16 | port, 24 bits) matches its first
        `bits` bits of `value`: 0 = any protocol and port, 8 = any port of one protocol, 8 + k =
        the ports that share their first k bits with value's (24 = exactly one port)."""
        if not (bits == 0 or 8 <= bits <= 24):
            raise ValueError(f"policy key prefix of {bits} variable bits (0 or 8..24)")
        value &= ~((1 << (24 - bits)) - 1) & 0xFFFFFF
        return cls(POLICY_KEY_FIXED_BITS + bits, endpoint, identity, int(direction),
                   value >> 16, value & 0xFFFF)

    def struct(self) -> PolicyKeyStruct:
        return PolicyKeyStruct(self.prefixlen, self.endpoint, self.identity, self.direction,
                               self.protocol, self.dport)


def port_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """Decompose the port range [lo, hi] into aligned power-of-two blocks: [(start, k)], each
    covering start .. start + 2**k - 1, with start a multiple of 2**k. Fewest blocks,
    ascending. Each block is one LPM prefix: `PolicyKey.of(..., 24 - k, protocol << 16 | start)`."""
    if not PORT_MIN <= lo <= hi <= PORT_MAX:
        raise ValueError(f"bad port range {lo}-{hi}")
    out = []
    x = lo
    while x <= hi:
        k = 0
        while k < 16 and x % (1 << (k + 1)) == 0 and x + (1 << (k + 1)) - 1 <= hi:
            k += 1
        out.append((x, k))
        x += 1 << k
    return out


@dataclass(frozen=True)
class PolicyValue:
    """``struct policy_entry``."""

    verdict: int  # PolicyVerdict
    proxy_port: int
    policy_id: int
    flags: int = 0  # PolicyFlags

    def struct(self) -> PolicyEntryStruct:
        return PolicyEntryStruct(self.verdict, self.flags, self.proxy_port, self.policy_id)


@dataclass(frozen=True, order=True)
class CidrKey:
    """``struct policy_cidr_key``."""

    prefixlen: int  # POLICY_CIDR_KEY_BASE + CIDR length
    endpoint: int
    direction: int
    addr: str  # network address, dotted

    @classmethod
    def of(cls, endpoint: int, direction: int, cidr: str | ipaddress.IPv4Network) -> CidrKey:
        """The key of a CIDR (host bits are dropped)."""
        net = ipaddress.IPv4Network(cidr, strict=False)
        return cls(POLICY_CIDR_KEY_BASE + net.prefixlen, endpoint, int(direction),
                   str(net.network_address))

    def struct(self) -> PolicyCidrKeyStruct:
        key = PolicyCidrKeyStruct()
        key.prefixlen, key.endpoint, key.direction = self.prefixlen, self.endpoint, self.direction
        key.addr = ip4(self.addr)
        return key


@dataclass(frozen=True, order=True)
class PortRule:
    """``struct policy_port_rule``."""

    protocol: int  # Proto; ANY = any
    verdict: int  # PolicyVerdict
    proxy_port: int
    port_lo: int
    port_hi: int
    policy_id: int

    def matches(self, protocol: int, port: int) -> bool:
        return self.protocol in (Proto.ANY, protocol) and self.port_lo <= port <= self.port_hi

    def struct(self) -> PolicyPortRuleStruct:
        return PolicyPortRuleStruct(self.protocol, self.verdict, self.proxy_port, self.port_lo,
                                    self.port_hi, self.policy_id)


@dataclass(frozen=True)
class CidrValue:
    """``struct policy_cidr_entry`` (``count`` = len(rules), at most POLICY_CIDR_MAX_RULES)."""

    rules: tuple[PortRule, ...]

    @property
    def count(self) -> int:
        return len(self.rules)

    def struct(self) -> PolicyCidrEntryStruct:
        if len(self.rules) > POLICY_CIDR_MAX_RULES:
            raise ValueError(f"{len(self.rules)} port rules for one CIDR; at most "
                             f"{POLICY_CIDR_MAX_RULES}")
        entry = PolicyCidrEntryStruct()
        entry.count = len(self.rules)
        for i, r in enumerate(self.rules):
            entry.rules[i] = r.struct()
        return entry


def policy_map_pairs(lowered: Iterable[Any]) -> tuple[
        list[tuple[PolicyKeyStruct, PolicyEntryStruct]],
        list[tuple[PolicyCidrKeyStruct, PolicyCidrEntryStruct]]]:
    """The ``nm_policy`` and ``nm_policy_cidr`` entries of endpoints' lowered policies
    (`nodemesh.policy.lower.LoweredPolicy`: its ``policy`` and ``cidr`` dicts of the values
    above), as the kernel's structs: pairs for `Datapath.sync_map`."""
    policy_pairs, cidr_pairs = [], []
    for low in lowered:
        policy_pairs.extend((k.struct(), v.struct()) for k, v in low.policy.items())
        cidr_pairs.extend((k.struct(), v.struct()) for k, v in low.cidr.items())
    return policy_pairs, cidr_pairs
