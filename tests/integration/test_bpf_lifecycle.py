"""Load, adopt, upgrade and destroy on a real kernel; the libbpf binding's own behaviour."""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from nodemesh.datapath import libbpf
from nodemesh.datapath.attach import NETNS_PIN
from nodemesh.datapath.layout import (
    POLICY_KEY_BITS,
    Direction,
    EndpointFlags,
    EventType,
    Identity,
    Lb4Backend,
    PolicyKeyStruct,
    PolicyVerdict,
    Proto,
    ip4,
    u32,
)
from nodemesh.datapath.lb import LbService, compile_lb
from nodemesh.datapath.loader import Datapath, DatapathError
from tests.integration import bpfharness
from tests.integration.bpfharness import (
    PYTHON,
    REPO,
    Chat,
    Events,
    Topology,
    bpffs_entries,
    connect,
    run,
)

pytestmark = pytest.mark.root
# the shared fixtures (assigned, not imported, so that test parameters may shadow them)
bpf_objects, topo, dp = bpfharness.bpf_objects, bpfharness.topo, bpfharness.dp

VIP = "10.96.0.20"

# A second agent process: a new Datapath on the same bpffs, which loads, re-attaches every pod,
# reports its links and either exits or waits to be killed.
AGENT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from nodemesh.datapath.loader import Datapath
    node, bpffs, cgroup, netns, m, mode = sys.argv[2:8]
    d = Datapath(node, bpffs, cgroup, netns=netns, maglev_table_size=int(m))
    d.load()
    for ifname in sys.argv[8:]:
        d.attach_endpoint(ifname)
    print(json.dumps([list(link) for link in d.links()]), flush=True)
    if mode == "wait":
        time.sleep(600)
""")


def second_agent(topo: Topology, m: int = 16381, wait: bool = False) -> tuple[dict, object]:
    argv = [PYTHON, "-c", AGENT, str(REPO), topo.tag, str(topo.bpffs), str(topo.cgroup),
            topo.node_ns, str(m), "wait" if wait else "exit", *(p.lxc for p in topo.pods)]
    p = topo.track(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True))
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.wait(timeout=10)
        raise AssertionError(f"second agent failed: {p.stderr.read() if p.stderr else ''}")
    links = {name: (link_id, prog_id) for name, link_id, prog_id in json.loads(line)}
    if not wait:
        p.wait(timeout=10)
        assert p.returncode == 0
    return links, p


def link_map(dp: Datapath) -> dict[str, tuple[int, int]]:
    return {s.name: (s.link_id, s.prog_id) for s in dp.links()}


def test_attach_is_idempotent_and_detach_removes(topo: Topology, dp: Datapath) -> None:
    before = link_map(dp)
    # four socket hooks, the node namespace's socket lookup, two tc hooks per pod
    assert len(before) == 4 + 1 + 2 * len(topo.pods)
    assert NETNS_PIN in before
    p1 = topo.pods[0]
    assert dp.attach_endpoint(p1.lxc) == p1.ifindex
    dp.load()  # a second load in the same process adopts everything as well
    for pod in topo.pods:
        dp.attach_endpoint(pod.lxc)
    assert link_map(dp) == before

    dp.detach_endpoint(p1.lxc)
    assert not any(name.startswith(f"tcx-{p1.lxc}-") for name in link_map(dp))
    dp.detach_endpoint(p1.lxc)  # again: nothing to do
    with pytest.raises(DatapathError, match="no interface"):
        dp.attach_endpoint("nosuchdev0")
    dp.attach_endpoint(p1.lxc)
    assert len(link_map(dp)) == len(before)


def test_restart_adopts_pins_without_disturbing_a_connection(topo: Topology, dp: Datapath) -> None:
    p1, p2 = topo.pods[:2]
    p2.server("tcp", 8080)
    dp.apply_lb(compile_lb([LbService(VIP, 80, "TCP", [(p2.ip, 8080)])], maglev_m=dp.maglev_m))
    dp.set_endpoint(p2.ifindex, p2.ip, p2.identity, EndpointFlags.INGRESS_ENFORCED)
    bpfharness.policy_rule(dp, p2, Direction.INGRESS, p1.identity, PolicyVerdict.ALLOW, 1)
    chat = Chat(topo, p1, VIP, 80)
    assert chat.say("before") == "pod2:8080 before"
    links = link_map(dp)
    dp.close()  # this agent goes away; pins keep everything running

    # a second agent, killed with SIGKILL after it loaded: same build, nothing changes
    adopted, proc = second_agent(topo, wait=True)
    proc.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
    proc.wait(timeout=5)  # type: ignore[attr-defined]
    assert adopted == links
    assert link_map(dp) == links
    assert chat.say("after kill") == "pod2:8080 after kill"

    # maps kept their contents: the service and the policy still work for new connections
    assert connect(p1, VIP, 80)["reply"] == "pod2:8080 hi"
    assert not connect(topo.pods[2], p2.ip)["ok"]

    # a third agent with another build (another Maglev size changes the socket programs'
    # .rodata and the table map): the socket links are switched atomically in place, the tc
    # links keep their (identical) programs
    upgraded, _ = second_agent(topo, m=16369)
    for name, (link_id, prog_id) in upgraded.items():
        assert link_id == links[name][0], name
        if name.startswith("cgroup-"):
            assert prog_id != links[name][1], name
        else:
            assert prog_id == links[name][1], name
    assert chat.say("after upgrade") == "pod2:8080 after upgrade"
    assert connect(p1, VIP, 80)["reply"] == "pod2:8080 hi"
    maglev_info = libbpf.map_info(dp.maglev.fd)
    assert maglev_info.value_size == 4 * 16369


def test_destroy_leaves_nothing(topo: Topology, dp: Datapath) -> None:
    states = dp.links()
    prog_ids = {s.prog_id for s in states}
    link_ids = {s.link_id for s in states}
    map_ids = {libbpf.map_info(dp.map(name).fd).id for name in ("nm_ct", "nm_policy")}
    events = Events(dp)
    events.reader.close()

    dp.destroy()

    assert bpffs_entries(topo) == []
    deadline = time.monotonic() + 5  # programs and maps are freed after an RCU grace period
    while True:
        alive = [f"prog {i}" for i in prog_ids
                 if run(["bpftool", "prog", "show", "id", str(i)], check=False).returncode == 0]
        alive += [f"link {i}" for i in link_ids
                  if run(["bpftool", "link", "show", "id", str(i)], check=False).returncode == 0]
        alive += [f"map {i}" for i in map_ids
                  if run(["bpftool", "map", "show", "id", str(i)], check=False).returncode == 0]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert alive == []
    assert run(["bpftool", "cgroup", "show", str(topo.cgroup)]).stdout.strip() == ""
    # with nothing attached, the veths carry traffic again, unfiltered
    topo.pods[1].server("tcp", 8080)
    assert connect(topo.pods[0], topo.pods[1].ip)["ok"]
    dp.destroy()  # idempotent


def test_load_errors_are_clear(topo: Topology, tmp_path: Path) -> None:
    with pytest.raises(DatapathError, match="not a bpf filesystem"):
        Datapath("x", str(tmp_path), str(topo.cgroup)).load()
    with pytest.raises(DatapathError, match="not a prime"):
        Datapath("x", str(topo.bpffs), str(topo.cgroup), maglev_table_size=16380)
    with pytest.raises(DatapathError, match="missing"):
        Datapath("x", str(topo.bpffs), str(topo.cgroup), obj_dir=str(tmp_path)).load()


def test_verifier_rejection_carries_the_log(tmp_path: Path, bpf_objects: None) -> None:
    src = tmp_path / "bad.bpf.c"
    src.write_text(textwrap.dedent("""
        #include <linux/bpf.h>
        #include <bpf/bpf_helpers.h>
        SEC("tc")
        int bad(struct __sk_buff *skb)
        {
            /* reads past the packet without a bounds check */
            return *(int *)(long)skb->data;
        }
        char LICENSE[] SEC("license") = "GPL";
    """))
    obj = tmp_path / "bad.bpf.o"
    run(["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c",
         str(src), "-o", str(obj)])
    with libbpf.BpfObject(obj) as o, pytest.raises(libbpf.VerifierError) as info:
        o.load()
    assert "invalid access to packet" in info.value.log
    assert "bad" in info.value.log


def test_map_operations(topo: Topology, dp: Datapath) -> None:
    p = topo.pods[0]
    # LPM: the kernel returns the longest matching prefix for a full key (entries written the
    # agent's way: any protocol, any TCP port, TCP 8080..8083, from any peer)
    for pid, proto, port in ((1, None, None), (2, Proto.TCP, None), (3, Proto.TCP, (8080, 8083))):
        bpfharness.policy_rule(dp, p, Direction.INGRESS, Identity.ANY, PolicyVerdict.ALLOW, pid,
                               proto, port)
    assert len(list(dp.policy.items())) == 3

    def lookup(identity: int, proto: int, port: int) -> object:
        return dp.policy.get(PolicyKeyStruct(POLICY_KEY_BITS, p.ifindex, identity,
                                             Direction.INGRESS, proto, port))

    assert [lookup(0, 6, 8082).policy_id, lookup(0, 6, 8084).policy_id,  # type: ignore[attr-defined]
            lookup(0, 17, 8080).policy_id] == [3, 2, 1]  # type: ignore[attr-defined]
    assert lookup(5, 6, 80) is None

    # hash maps are read in batches; the result equals key-by-key iteration
    for i in range(1, 700):
        dp.backends.put(u32(i), Lb4Backend(ip4("10.1.0.0") + i, 80, 6, 0))
    batch = {k.value: bytes(v) for k, v in dp.backends.items()}
    single = {k.value: bytes(dp.backends.get(k)) for k in dp.backends.keys()}  # noqa: SIM118 (a map)
    assert batch == single and len(batch) == 699
    written, deleted = dp.sync_map("nm_lb4_be", [(u32(1), Lb4Backend(ip4("10.1.0.1"), 80, 6, 0))])
    assert (written, deleted) == (0, 698)
    assert dp.sync_map("nm_lb4_be", {bytes(u32(1)): Lb4Backend(ip4("10.9.9.9"), 80, 6, 0)}) == (1, 0)

    # per-CPU maps give one value per possible CPU
    topo.pods[1].server("tcp", 8080)
    assert connect(p, topo.pods[1].ip)["ok"]
    per_cpu = next(iter(dp.metrics.items()))[1]
    assert len(per_cpu) == libbpf.num_possible_cpus()

    # the ring buffer: a callback exception comes out of drain(), the next drain goes on
    seen: list[int] = []

    def boom(ev: object) -> None:
        seen.append(1)
        if len(seen) == 1:
            raise ValueError("boom")

    reader = dp.open_events(boom)
    with pytest.raises(ValueError, match="boom"):
        reader.drain()
    assert seen == [1]
    assert reader.drain() >= 1  # the rest of the ring (a connection made several events)
    reader.close()

    # netns cookies: what the socket programs report, per pod
    cookies = {libbpf.netns_cookie(f"/run/netns/{q.netns}") for q in topo.pods}
    assert len(cookies) == len(topo.pods)
    inside = p.python("""
        import json, socket
        s = socket.socket()
        print(json.dumps(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")))
    """)
    assert inside == libbpf.netns_cookie(f"/run/netns/{p.netns}")
    assert ctypes.sizeof(u32) == 4
    assert EventType.SOCK == 3


def test_a_map_size_from_cluster_json_recreates_the_pin_with_what_fits(
        topo: Topology, dp: Datapath) -> None:
    """cluster.json's maps (`up --map-size`) give a pinned map another size: the next load
    recreates it at that size with its entries copied (as many as fit), and a connection
    tracked in the old conntrack table goes on."""
    p1, p2 = topo.pods[:2]
    p2.server("tcp", 8080)
    dp.apply_lb(compile_lb([LbService(f"10.96.0.{30 + i}", 80, "TCP", [(p2.ip, 8080)])
                            for i in range(3)], maglev_m=dp.maglev_m))
    chat = Chat(topo, p1, "10.96.0.30", 80)
    assert chat.say("before") == "pod2:8080 before"
    assert libbpf.map_info(dp.ct.fd).max_entries == 65536
    ct_before = len(list(dp.ct.keys()))
    dp.close()
    resized = topo.datapath(map_sizes={"nm_lb4_svc": 4, "nm_ct": 131072})
    resized.load()
    try:
        assert libbpf.map_info(resized.services.fd).max_entries == 4
        assert len(list(resized.services.keys())) == 4  # 6 did not fit: what fits is copied
        assert libbpf.map_info(resized.ct.fd).max_entries == 131072
        assert len(list(resized.ct.keys())) >= ct_before > 0
        assert chat.say("after") == "pod2:8080 after"
    finally:
        resized.close()  # (the fixture's teardown destroys what is pinned)
