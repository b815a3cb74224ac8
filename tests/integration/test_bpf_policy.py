"""Policy, conntrack, fail-closed and flow events on a real kernel, pod to pod.

Policy entries are written the agent's way (bpfharness.Policies: rules → EndpointPolicy →
lower_policy → policy_map_pairs → sync_map), so these tests check the compiler's output too."""

from __future__ import annotations

import ctypes

import pytest

from nodemesh.datapath.layout import (
    Direction,
    DropReason,
    EndpointFlags,
    EventType,
    Identity,
    PolicyVerdict,
    Proto,
    Verdict,
    ip4,
    lxc_key,
)
from nodemesh.datapath.loader import Datapath
from tests.integration import bpfharness
from tests.integration.bpfharness import (
    DNS_IP,
    NODE_IP,
    Chat,
    Events,
    Pod,
    Policies,
    Topology,
    connect,
    run,
)

pytestmark = pytest.mark.root
# the shared fixtures (assigned, not imported, so that test parameters may shadow them)
bpf_objects, topo, dp = bpfharness.bpf_objects, bpfharness.topo, bpfharness.dp

INGRESS, EGRESS = Direction.INGRESS, Direction.EGRESS
BOTH = EndpointFlags.INGRESS_ENFORCED | EndpointFlags.EGRESS_ENFORCED


def isolate(dp: Datapath, pod: Pod, flags: EndpointFlags) -> None:
    dp.set_endpoint(pod.ifindex, pod.ip, pod.identity, flags)


rule = bpfharness.policy_rule  # (dp, pod, direction, identity, verdict, policy_id, protocol, port)


def test_default_deny_drops_with_event(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    p2.server("tcp", 8080)
    isolate(dp, p2, EndpointFlags.INGRESS_ENFORCED)
    events = Events(dp)

    res = connect(p1, p2.ip)

    assert not res["ok"]
    drops = events.where(type=EventType.DROP, reason=DropReason.POLICY_DENIED)
    assert drops, events.dump()
    e = drops[0]
    assert (e.verdict, e.direction, e.ifindex) == (Verdict.DROPPED, INGRESS, p2.ifindex)
    assert (e.saddr, e.daddr, e.sport, e.dport, e.protocol) == (
        ip4(p1.ip), ip4(p2.ip), res["sport"], 8080, Proto.TCP)
    assert (e.src_identity, e.dst_identity, e.policy_id) == (p1.identity, p2.identity, 0)
    assert e.tcp_flags & 0x02  # the SYN
    # the egress side (pod1 is not isolated) let it out, as a new connection
    out = events.where(type=EventType.TRACE, ifindex=p1.ifindex, sport=res["sport"])
    assert out and out[0].direction == EGRESS
    counters = dp.read_metrics()
    assert any(k.reason == DropReason.POLICY_DENIED and k.direction == INGRESS and v.packets
               for k, v in counters.items())
    flows = dp.read_flow_counters()
    assert any(k.src_identity == p1.identity and k.dst_identity == p2.identity and k.dport == 8080
               and k.verdict == Verdict.DROPPED for k in flows)


def test_allow_entry_lets_a_new_connection_through(topo: Topology, dp: Datapath) -> None:
    p1, p2, p3 = topo.pods[:3]
    p2.server("tcp", 8080)
    isolate(dp, p2, EndpointFlags.INGRESS_ENFORCED)
    rule(dp, p2, INGRESS, p1.identity, PolicyVerdict.ALLOW, policy_id=7)
    events = Events(dp)

    res = connect(p1, p2.ip)
    assert res["ok"] and res["reply"] == "pod2:8080 hi"
    assert not connect(p3, p2.ip)["ok"]  # the allow is for pod1 only

    traces = events.where(type=EventType.TRACE, sport=res["sport"])
    by_dir = {e.direction: e for e in traces}
    assert set(by_dir) == {INGRESS, EGRESS}, events.dump()
    for e in traces:
        assert (e.saddr, e.daddr, e.dport, e.protocol) == (ip4(p1.ip), ip4(p2.ip), 8080, 6)
        assert (e.src_identity, e.dst_identity) == (p1.identity, p2.identity)
        assert e.verdict == Verdict.FORWARDED and e.reason == 0
    assert by_dir[INGRESS].ifindex == p2.ifindex and by_dir[INGRESS].policy_id == 7
    assert by_dir[EGRESS].ifindex == p1.ifindex and by_dir[EGRESS].policy_id == 0
    # one event per connection and hook: the data and the replies made none
    assert len(traces) == 2


def test_port_range_entries(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    for port in (8081, 8084):
        p2.server("tcp", port)
    isolate(dp, p2, EndpointFlags.INGRESS_ENFORCED)
    rule(dp, p2, INGRESS, Identity.ANY, PolicyVerdict.ALLOW, 3, Proto.TCP, (8080, 8083))
    assert len(list(dp.policy.items())) == 1  # one aligned block of four ports

    assert connect(p1, p2.ip, 8081)["ok"]
    assert not connect(p1, p2.ip, 8084)["ok"]


def test_deny_wins_over_allow(topo: Topology, dp: Datapath) -> None:
    p1, p2, p3, p4 = topo.pods
    p2.server("tcp", 8080)
    p4.server("tcp", 8080)
    isolate(dp, p2, EndpointFlags.INGRESS_ENFORCED)
    # any identity may reach TCP/8080, but pod1 is denied everything (a shorter prefix)
    rule(dp, p2, INGRESS, Identity.ANY, PolicyVerdict.ALLOW, policy_id=10)
    rule(dp, p2, INGRESS, p1.identity, PolicyVerdict.DENY, policy_id=20, protocol=None, port=None)
    # pod4 is not isolated at all, but a deny still applies to it
    rule(dp, p4, INGRESS, p3.identity, PolicyVerdict.DENY, policy_id=30)
    events = Events(dp)

    assert not connect(p1, p2.ip)["ok"]
    ok = connect(p3, p2.ip)
    assert ok["ok"]
    assert not connect(p3, p4.ip)["ok"]
    assert connect(p1, p4.ip)["ok"]

    denied = events.where(type=EventType.DROP, reason=DropReason.POLICY_DENY)
    assert {(e.saddr, e.daddr, e.policy_id) for e in denied} == {
        (ip4(p1.ip), ip4(p2.ip), 20), (ip4(p3.ip), ip4(p4.ip), 30)}, events.dump()
    allowed = events.where(type=EventType.TRACE, sport=ok["sport"], direction=INGRESS)
    assert allowed[0].policy_id == 10

    # an exact-identity allow loses to a wildcard deny, and to a CIDR deny
    rule(dp, p2, INGRESS, Identity.ANY, PolicyVerdict.DENY, policy_id=40)
    rule(dp, p2, INGRESS, p3.identity, PolicyVerdict.ALLOW, policy_id=41)
    assert not connect(p3, p2.ip)["ok"]
    rule(dp, p2, INGRESS, Identity.ANY, PolicyVerdict.ALLOW, policy_id=42)
    assert connect(p3, p2.ip)["ok"]
    Policies.of(dp).cidr_rule(p2, INGRESS, f"{p3.ip}/32", PolicyVerdict.DENY, 43)
    assert not connect(p3, p2.ip)["ok"]


def test_cidr_entries(topo: Topology, dp: Datapath) -> None:
    p1, p2, p3, p4 = topo.pods
    p2.server("tcp", 8080)
    p2.server("udp", 9000)
    isolate(dp, p2, EndpointFlags.INGRESS_ENFORCED)
    # ipBlock 10.77.0.0/24 except pod3's address, TCP 8080 only
    Policies.of(dp).cidr_rule(p2, INGRESS, "10.77.0.0/24", PolicyVerdict.ALLOW, 5, Proto.TCP, 8080,
                              excepts=(f"{p3.ip}/32",))
    assert len(list(dp.policy_cidr.items())) == 2  # the block, and the except with no rules
    events = Events(dp)

    ok = connect(p1, p2.ip)
    assert ok["ok"]
    assert connect(p4, p2.ip)["ok"]
    assert not connect(p3, p2.ip)["ok"]  # the except
    assert not connect(p1, p2.ip, 9000, "udp")["ok"]  # another protocol and port
    assert events.where(type=EventType.TRACE, sport=ok["sport"], direction=INGRESS)[0].policy_id == 5


def test_established_connection_survives_a_change_to_deny(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    p2.server("tcp", 8080)
    isolate(dp, p2, EndpointFlags.INGRESS_ENFORCED)
    rule(dp, p2, INGRESS, p1.identity, PolicyVerdict.ALLOW, policy_id=1)
    chat = Chat(topo, p1, p2.ip)
    assert chat.say("one") == "pod2:8080 one"

    rule(dp, p2, INGRESS, p1.identity, PolicyVerdict.DENY, policy_id=2)

    assert chat.say("two") == "pod2:8080 two"  # established: no policy lookup
    assert not connect(p1, p2.ip)["ok"]  # new: denied
    assert chat.say("three") == "pod2:8080 three"


def test_replies_pass_without_a_rule(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    p2.server("tcp", 8080)
    p2.server("udp", 9000)
    # both pods isolated both ways; only pod1 -> pod2 is allowed, at each end, and nothing
    # allows the replies: conntrack does
    isolate(dp, p1, BOTH)
    isolate(dp, p2, BOTH)
    for proto, port in ((Proto.TCP, 8080), (Proto.UDP, 9000)):
        rule(dp, p1, EGRESS, p2.identity, PolicyVerdict.ALLOW, 1, proto, port)
        rule(dp, p2, INGRESS, p1.identity, PolicyVerdict.ALLOW, 2, proto, port)

    assert connect(p1, p2.ip)["reply"] == "pod2:8080 hi"
    assert connect(p1, p2.ip, 9000, "udp")["reply"] == "pod2:9000 hi"
    p1.server("tcp", 8080)
    assert not connect(p2, p1.ip)["ok"]  # the other way is a new connection: denied


def test_icmp_echo_is_tracked(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    isolate(dp, p2, EndpointFlags.INGRESS_ENFORCED)
    ping = f"""
        import json, os, socket, struct, time
        def csum(b):
            s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
            s = (s >> 16) + (s & 0xffff); s += s >> 16
            return ~s & 0xffff
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.settimeout(0.7)
        hdr = struct.pack("!BBHHH", 8, 0, 0, 0x4242, 1) + b"nodemesh"
        pkt = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
        s.sendto(pkt, ("{p2.ip}", 0))
        try:
            while True:
                data, addr = s.recvfrom(1500)
                if data[20] == 0 and addr[0] == "{p2.ip}":
                    print(json.dumps(True)); break
        except OSError:
            print(json.dumps(False))
    """
    assert p1.python(ping) is False
    rule(dp, p2, INGRESS, p1.identity, PolicyVerdict.ALLOW, 9, Proto.ICMP, 8)  # echo request
    assert p1.python(ping) is True


def test_fail_closed_without_endpoint_entry(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    p1.server("tcp", 8080)
    p2.server("tcp", 8080)
    assert connect(p1, p2.ip)["ok"]
    assert connect(p2, p1.ip)["ok"]
    dp.endpoints.delete(ctypes.c_uint32(p2.ifindex))
    events = Events(dp)

    assert not connect(p1, p2.ip)["ok"]
    assert not connect(p2, p1.ip)["ok"]  # nothing leaves the pod either

    drops = events.where(type=EventType.DROP, reason=DropReason.UNKNOWN_ENDPOINT)
    assert {(e.ifindex, e.direction) for e in drops} >= {(p2.ifindex, INGRESS),
                                                         (p2.ifindex, EGRESS)}, events.dump()


def test_source_address_check(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    p2.server("tcp", 8080)
    spoofed = "10.77.0.99"
    run(["ip", "-n", p1.netns, "addr", "add", f"{spoofed}/32", "dev", "eth0"])
    try:
        events = Events(dp)
        assert not connect(p1, p2.ip, src=spoofed)["ok"]
        drops = events.where(type=EventType.DROP, reason=DropReason.INVALID_SOURCE_IP)
        assert drops and drops[0].saddr == ip4(spoofed) and drops[0].ifindex == p1.ifindex
        assert drops[0].direction == EGRESS and drops[0].src_identity == p1.identity
    finally:
        run(["ip", "-n", p1.netns, "addr", "del", f"{spoofed}/32", "dev", "eth0"])


def test_dns_and_node_are_always_allowed(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    isolate(dp, p1, BOTH)
    p1.server("tcp", 8080)
    p2.server("tcp", 8080)
    topo.node_server("udp", DNS_IP, 53, "dns")
    topo.node_server("tcp", DNS_IP, 53, "dns")
    topo.node_server("udp", NODE_IP, 53, "node")
    events = Events(dp)

    assert connect(p1, DNS_IP, 53, "udp")["reply"] == "dns hi"
    assert connect(p1, DNS_IP, 53, "tcp")["reply"] == "dns hi"
    assert not connect(p1, p2.ip)["ok"]  # everything else is isolated
    assert not connect(p1, NODE_IP, 53, "udp")["ok"]  # the node IP is not the DNS address
    denied = events.where(type=EventType.DROP, reason=DropReason.POLICY_DENIED, direction=EGRESS)
    assert {e.daddr for e in denied} == {ip4(p2.ip), ip4(NODE_IP)}, events.dump()
    assert all(e.dst_identity in (p2.identity, Identity.HOST) for e in denied)
    from_node = topo.node_python(f"""
        import json, socket
        s = socket.create_connection(("{p1.ip}", 8080), timeout=2)
        s.sendall(b"probe")
        print(json.dumps(s.recv(100).decode()))
    """)
    assert from_node == "pod1:8080 probe"


def _tx_packets(topo: Topology, ifname: str) -> int:
    import json

    link = json.loads(run(["ip", "-n", topo.node_ns, "-s", "-j", "link", "show", "dev", ifname]).stdout)
    return int(link[0]["stats64"]["tx"]["packets"])


def test_same_node_fast_path_skips_the_node_stack_and_keeps_policy(topo: Topology,
                                                                   dp: Datapath) -> None:
    """A pod's packet for another pod of the node goes straight into that pod's namespace
    (bpf_redirect_peer): the destination veth's host side transmits nothing. Without the
    destination's nm_lxc entry the same packets take the node's stack and are counted there."""
    p1, p2, p3 = topo.pods[:3]
    p2.server("tcp", 8080)
    events = Events(dp)

    def exchanges(client: Pod, n: int = 5) -> int:
        before = _tx_packets(topo, p2.lxc)
        for _ in range(n):
            res = connect(client, p2.ip)
            assert res["ok"] and res["reply"], res
        return _tx_packets(topo, p2.lxc) - before

    exchanges(p1, 1)  # neighbour resolution (the node answers ARP on the veth) out of the way
    assert exchanges(p1) == 0
    # the destination's ingress side still ran on the way: its policy, conntrack and events
    assert events.where(type=EventType.TRACE, direction=INGRESS, ifindex=p2.ifindex,
                        saddr=ip4(p1.ip), dport=8080), events.dump()
    isolate(dp, p2, EndpointFlags.INGRESS_ENFORCED)
    rule(dp, p2, INGRESS, p1.identity, PolicyVerdict.ALLOW, 7)
    assert exchanges(p1) == 0
    denied = connect(p3, p2.ip)
    assert not denied["ok"], denied
    assert events.wait_for(type=EventType.DROP, direction=INGRESS, ifindex=p2.ifindex,
                           saddr=ip4(p3.ip), reason=DropReason.POLICY_DENIED), events.dump()
    # the control: without the fast path's lookup the node's stack forwards (and counts)
    dp.lxc.delete(lxc_key(p2.ip))
    assert exchanges(p1) >= 5 * 3
