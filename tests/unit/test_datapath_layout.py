"""The Python twins in nodemesh/datapath/layout.py against the C side, through the BTF of the
compiled objects (no root: the objects are read as files)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nodemesh.datapath import layout
from nodemesh.datapath.build import OBJECTS, REPO_ROOT
from nodemesh.datapath.elf import BpfElf
from nodemesh.datapath.layout import (
    MAPS,
    STRUCTS,
    ConfigFlags,
    CtClosing,
    Direction,
    DropReason,
    EndpointFlags,
    EventType,
    Identity,
    Lb4Key,
    PolicyVerdict,
    ServiceFlags,
    Verdict,
    ip4,
)
from nodemesh.datapath.loader import Datapath, DatapathError

BPF_LIB = REPO_ROOT / "bpf" / "lib"

# docs/datapath.md, "Maps": pinned name -> map type
DOC_MAP_TYPES = {
    "nm_config": 2,  # ARRAY
    "nm_endpoints": 1,  # HASH
    "nm_ipcache": 11,  # LPM_TRIE
    "nm_policy": 11,
    "nm_policy_cidr": 11,
    "nm_ct": 9,  # LRU_HASH
    "nm_lb4_svc": 1,
    "nm_lb4_be": 1,
    "nm_lb4_revnat": 1,
    "nm_lb4_maglev": 1,
    "nm_lb4_affin": 9,
    "nm_lb4_rsk": 9,
    "nm_events": 27,  # RINGBUF
    "nm_metrics": 5,  # PERCPU_HASH
    "nm_flowcnt": 10,  # LRU_PERCPU_HASH
    "nm_l7_redir": 1,
    "nm_lxc": 1,
    "nm_netns": 1,
    "nm_dns_limit": 9,
    "nm_event_budget": 9,
}

# Hubble's flow.proto DropReason, for the values the datapath uses
HUBBLE_DROP_REASONS = {
    132: "INVALID_SOURCE_IP",
    133: "POLICY_DENIED",
    134: "INVALID_PACKET_DROPPED",
    139: "UNSUPPORTED_L3_PROTOCOL",
    155: "CT_MAP_INSERTION_FAILED",
    157: "IP_FRAGMENTATION_NOT_SUPPORTED",
    158: "SERVICE_BACKEND_NOT_FOUND",
    178: "SOCKET_LOOKUP_FAILED",
    179: "SOCKET_ASSIGN_FAILED",
    180: "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL",
    181: "POLICY_DENY",
    189: "AUTH_REQUIRED",
    195: "UNENCRYPTED_TRAFFIC",
    198: "DROP_RATE_LIMITED",
    203: "DROP_EP_NOT_READY",
}


@pytest.fixture(scope="module")
def objects() -> dict[str, BpfElf]:
    dp = Datapath("unit", "/nonexistent", "/nonexistent")
    try:
        dp.ensure_built()
    except DatapathError as e:
        if "clang" in str(e):
            pytest.skip(str(e))
        raise
    return {name: BpfElf(dp.object_path(name)) for name in OBJECTS}


def ctypes_members(cls: type[ctypes.Structure]) -> list[tuple[str, int, int]]:
    return [(name, getattr(cls, name).offset, getattr(cls, name).size)
            for name, *_ in cls._fields_]


@pytest.mark.parametrize("c_name", sorted(STRUCTS))
def test_struct_matches_btf(objects: dict[str, BpfElf], c_name: str) -> None:
    py = STRUCTS[c_name]
    found = 0
    for obj_name, elf in objects.items():
        st = elf.btf_structs().get(c_name)
        if st is None:
            continue
        found += 1
        assert ctypes.sizeof(py) == st.size, f"{obj_name}: sizeof(struct {c_name})"
        c_members = [(m.name, m.offset, m.size) for m in st.members]
        assert ctypes_members(py) == c_members, f"{obj_name}: struct {c_name}"
    assert found, f"struct {c_name} is in no object's BTF"


def test_every_c_struct_has_a_twin(objects: dict[str, BpfElf]) -> None:
    kernel_ctx = {"__sk_buff", "bpf_sock_addr", "bpf_sock", "bpf_sk_lookup"}
    for elf in objects.values():
        extra = set(elf.btf_structs()) - set(STRUCTS) - kernel_ctx
        # nm_pkt/policy_decision are program-internal and never leave the kernel
        assert extra <= {"nm_pkt", "policy_decision", "icmphdr"}, extra


@pytest.mark.parametrize("map_name", sorted(DOC_MAP_TYPES))
def test_map_declarations(objects: dict[str, BpfElf], map_name: str) -> None:
    by_class = {cls: name for name, cls in STRUCTS.items()}
    for obj_name, elf in objects.items():
        d = elf.btf_map_defs().get(map_name)
        assert d is not None, f"{obj_name} does not declare {map_name}"
        assert d.type == DOC_MAP_TYPES[map_name], f"{obj_name}: {map_name} type"
        assert d.pinning == 1, f"{map_name} is not LIBBPF_PIN_BY_NAME"
        if map_name in layout.RINGBUF_MAPS:
            continue
        key_t, value_t = MAPS[map_name]
        assert d.key_size == ctypes.sizeof(key_t), f"{map_name} key"
        if key_t in by_class:
            assert d.key_type == by_class[key_t]
        if value_t is None:  # the Maglev table, sized by the loader
            assert d.value_size == 4 * layout.MAGLEV_DEFAULT_M
        else:
            assert d.value_size == ctypes.sizeof(value_t), f"{map_name} value"
            if value_t in by_class:
                assert d.value_type == by_class[value_t]


def test_every_object_declares_the_same_maps(objects: dict[str, BpfElf]) -> None:
    first, *others = (objects[n].btf_map_defs() for n in OBJECTS)
    assert set(OBJECTS) == {"bpf_lxc", "bpf_sock", "bpf_host", "bpf_netns"}
    for defs in others:
        assert defs == first  # one declaration (maps.h), shared through the pins


def c_defines(*headers: str) -> dict[str, int]:
    out = {}
    for h in headers:
        for m in re.finditer(r"^#define\s+(\w+)\s+\(?(0x[0-9a-f]+|\d+)\)?", (BPF_LIB / h).read_text(),
                             re.M | re.I):
            out[m.group(1)] = int(m.group(2), 0)
    return out


def test_enums_match_the_headers() -> None:
    d = c_defines("common.h", "drop_reasons.h", "maps.h")
    checks: list[tuple[str, type]] = [
        ("DROP_", DropReason),
        ("EV_", EventType),
        ("VERDICT_", Verdict),
        ("SVC_F_", ServiceFlags),
        ("EP_F_", EndpointFlags),
        ("IDENTITY_", Identity),
        ("DIR_", Direction),
        ("CFG_F_", ConfigFlags),
        ("IPC_F_", layout.IpcacheFlags),
        ("FLOW_F_", layout.EventFlags),
        ("POLICY_F_", layout.PolicyFlags),
    ]
    for prefix, enum_cls in checks:
        c = {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}
        py = {m.name: m.value for m in enum_cls if m.value or m.name in c}  # type: ignore[attr-defined]
        assert c == py, prefix
    assert {k: v for k, v in d.items() if k.startswith("POLICY_") and k[7:] in
            PolicyVerdict.__members__} == {f"POLICY_{m.name}": m.value for m in PolicyVerdict}
    assert (d["CT_CLOSING_TX"], d["CT_CLOSING_RX"]) == (CtClosing.TX, CtClosing.RX)
    assert d["CT_F_REPLY_SEEN"] == layout.CT_F_REPLY_SEEN
    assert d["CT_F_NODE_SOCKET"] == layout.CT_F_NODE_SOCKET
    assert d["CT_F_HAIRPIN"] == layout.CT_F_HAIRPIN
    assert d["FIRST_POD_IDENTITY"] == layout.FIRST_POD_IDENTITY
    assert d["CT_F_TUNNEL"] == layout.CT_F_TUNNEL
    assert d["CT_F_AUTH"] == layout.CT_F_AUTH
    for name in ("TUNNEL_OUT_PORT", "TUNNEL_IN_PORT", "NM_MARK_AUTH", "NM_MARK_TUNNEL"):
        assert d[name] == getattr(layout, name), name
    assert (layout.NM_MARK_AUTH | layout.NM_MARK_TUNNEL) & layout.PROXY_MARK_MASK == 0
    assert d["POLICY_CIDR_MAX_RULES"] == layout.POLICY_CIDR_MAX_RULES
    assert d["POLICY_KEY_BITS"] == layout.POLICY_KEY_BITS
    assert d["POLICY_CIDR_KEY_BITS"] == layout.POLICY_CIDR_KEY_BITS
    assert d["NM_MAGLEV_M_DEFAULT"] == layout.MAGLEV_DEFAULT_M
    for name in ("PROXY_MARK", "PROXY_MARK_MASK", "PROXY_ROUTE_TABLE", "PROXY_RULE_PREF"):
        assert d[name] == getattr(layout, name), name
    assert layout.PROXY_MARK & ~layout.PROXY_MARK_MASK == 0


def test_drop_reasons_are_hubbles() -> None:
    for reason in DropReason:
        if reason is DropReason.NONE:
            continue
        assert HUBBLE_DROP_REASONS[reason.value] == reason.hubble_name
    assert [Verdict(v).hubble for v in (1, 2, 3, 4)] == [1, 2, 5, 7]


def test_network_order_fields_hold_natural_values() -> None:
    key = Lb4Key(ip4("10.96.0.10"), 80, 1, 6)
    assert bytes(key) == bytes.fromhex("0a60000a" "0050" "0100" "06000000")
    assert key.address == ip4("10.96.0.10") and key.dport == 80


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed")
def test_btf_reader_agrees_with_bpftool(objects: dict[str, BpfElf]) -> None:
    elf = objects["bpf_sock"]
    res = subprocess.run(["bpftool", "btf", "dump", "file", str(elf.path), "format", "raw"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"bpftool can not read the file here: {res.stderr.strip()}")
    dumped: dict[str, tuple[int, list[tuple[str, int]]]] = {}
    current = None
    for line in res.stdout.splitlines():
        m = re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+)", line)
        if m:
            current = m.group(1)
            dumped[current] = (int(m.group(2)), [])
            continue
        m = re.match(r"\s+'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        if m and current:
            dumped[current][1].append((m.group(1), int(m.group(2)) // 8))
        elif not line.startswith("\t"):
            current = None
    ours = elf.btf_structs()
    for name in STRUCTS:
        if name in ours:
            assert dumped[name] == (ours[name].size,
                                    [(m.name, m.offset) for m in ours[name].members]), name


def test_rodata_variable_is_found(objects: dict[str, BpfElf]) -> None:
    offset, size = objects["bpf_sock"].variable_offset(".rodata", "nm_maglev_m")
    assert size == 4 and offset % 4 == 0
    assert Path(objects["bpf_sock"].path).exists()


def test_l7_and_lxc_entries_encode_as_the_c_side_reads_them() -> None:
    key, val = layout.l7_redirect("10.77.0.2", 8080, 15001, policy_id=7)
    # be32 addr, be16 port, u8 protocol (TCP), pad, u32 client identity (host order, 0 = any);
    # u16 proxy port in host order, pad, u32 policy id
    assert bytes(key) == bytes.fromhex("0a4d0002" "1f90" "06" "00" "00000000")
    assert bytes(val) == (15001).to_bytes(2, "little") + bytes(2) + (7).to_bytes(4, "little")
    key, _ = layout.l7_redirect("10.77.0.2", 8080, 15001, identity=1001)
    assert bytes(key) == bytes.fromhex("0a4d0002" "1f90" "06" "00") + (1001).to_bytes(4, "little")
    assert key.identity == 1001
    with pytest.raises(ValueError):
        layout.l7_redirect("10.77.0.2", 8080, 0)
    with pytest.raises(ValueError):
        layout.l7_redirect("10.77.0.2", 8080, 15001, identity=-1)
    k, v = layout.lxc_entry("10.77.0.2", 5, 1002)
    assert bytes(k) == bytes.fromhex("0a4d0002")
    assert (v.ifindex, v.identity) == (5, 1002)


def test_netns_entries_encode_as_the_c_side_reads_them() -> None:
    # u64 netns cookie (host order) -> {u32 identity, u32 ifindex}
    k, v = layout.netns_entry(0x1122334455667788, 1002, 5)
    assert bytes(k) == (0x1122334455667788).to_bytes(8, "little")
    assert bytes(v) == (1002).to_bytes(4, "little") + (5).to_bytes(4, "little")
    assert bytes(layout.netns_key(4096)) == (4096).to_bytes(8, "little")
    assert MAPS["nm_netns"] == (layout.u64, layout.NetnsInfo)
    for bad in (0, -1, 1 << 64):
        with pytest.raises(ValueError):
            layout.netns_entry(bad, 1002, 5)


def test_l7_redir_migration_keeps_old_entries_for_any_client() -> None:
    from nodemesh.datapath.pins import MIGRATIONS

    old_key = bytes.fromhex("0a4d0002" "1f90" "06" "00")  # before per-client redirects
    old_val = bytes(layout.L7RedirVal(15001, 0, 7))
    key_size, value_size, convert = MIGRATIONS["nm_l7_redir"]
    assert (key_size, value_size) == (len(old_key), len(old_val))
    new_key, new_val = convert(old_key, old_val)
    assert new_key == bytes(layout.l7_redirect("10.77.0.2", 8080, 15001, policy_id=7)[0])
    assert new_val == old_val
    assert len(new_key) == ctypes.sizeof(layout.L7RedirKey)


def test_policy_key_bit_counts_follow_the_structs() -> None:
    """LPM prefix lengths count the bits after `prefixlen` (4 bytes): the fixed parts end where
    the first variable field starts."""
    key, cidr = layout.PolicyKeyStruct, layout.PolicyCidrKeyStruct
    assert (ctypes.sizeof(key) - 4) * 8 == layout.POLICY_KEY_BITS
    assert (key.protocol.offset - 4) * 8 == layout.POLICY_KEY_FIXED_BITS
    assert (ctypes.sizeof(cidr) - 4) * 8 == layout.POLICY_CIDR_KEY_BITS
    assert (cidr.addr.offset - 4) * 8 == layout.POLICY_CIDR_KEY_BASE


PLAIN_POLICY_VALUES = {  # the compiler's value -> its struct, with a sample
    layout.PolicyKey(96, 7, 300, 1, 6, 8080): "policy_key",
    layout.PolicyValue(3, 15001, 9, 1): "policy_entry",
    layout.CidrKey(88, 7, 1, "10.1.2.0"): "policy_cidr_key",
    layout.PortRule(17, 2, 0, 53, 60, 4): "policy_port_rule",
}


@pytest.mark.parametrize("value", list(PLAIN_POLICY_VALUES), ids=list(PLAIN_POLICY_VALUES.values()))
def test_policy_values_are_field_for_field_their_structs(value: object) -> None:
    struct = value.struct()  # type: ignore[attr-defined]
    assert type(struct) is STRUCTS[PLAIN_POLICY_VALUES[value]]
    names = [f[0] for f in type(struct)._fields_ if f[0] != "pad"]
    assert sorted(names) == sorted(value.__dataclass_fields__)  # type: ignore[attr-defined]
    for name in names:
        want = getattr(value, name)
        assert getattr(struct, name) == (ip4(want) if name == "addr" else want), name


def test_cidr_value_struct_holds_its_rules() -> None:
    rules = (layout.PortRule(6, 1, 0, 80, 80, 1), layout.PortRule(0, 2, 0, 0, 65535, 2))
    entry = layout.CidrValue(rules).struct()
    assert type(entry) is STRUCTS["policy_cidr_entry"] and entry.count == 2
    assert bytes(entry.rules[0]) == bytes(rules[0].struct())
    assert bytes(entry.rules[1]) == bytes(rules[1].struct())
    assert bytes(entry.rules[2]) == bytes(ctypes.sizeof(layout.PolicyPortRuleStruct))


def test_one_definition_per_word() -> None:
    """The policy compiler and the identity allocator use the datapath's enumerations."""
    from nodemesh import identity, policy
    from nodemesh.policy import types

    assert policy.Direction is types.Direction is Direction
    assert policy.PolicyVerdict is PolicyVerdict
    assert types.PROTOCOLS == {"TCP": layout.Proto.TCP, "UDP": layout.Proto.UDP,
                               "SCTP": layout.Proto.SCTP}
    assert identity.Identity is Identity and identity.FIRST_POD_IDENTITY == layout.FIRST_POD_IDENTITY
    assert set(identity.RESERVED_NAMES) == {int(i) for i in Identity} - {0}
    assert policy.LoweredPolicy.__module__ == "nodemesh.policy.lower"
    for name in ("PolicyKey", "PolicyValue", "CidrKey", "CidrValue", "PortRule"):
        assert getattr(policy, name) is getattr(layout, name), name


def test_layout_is_pure() -> None:
    """The ABI module imports nothing of the project but its package (no libbpf, agent, store):
    the compiler imports it."""
    import sys

    code = ("import sys, nodemesh.datapath.layout; "
            "print(sorted(m for m in sys.modules if m.startswith('nodemesh')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT).stdout
    assert out.strip() == "['nodemesh', 'nodemesh.datapath', 'nodemesh.datapath.layout']"
