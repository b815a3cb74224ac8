"""A node and its pods in private network namespaces, for BPF datapath tests (root).

    netns nmbpf-<tag>-node   lo: node IP, node-local DNS IP, 169.254.1.1 (the pods' gateway),
                             169.254.42.1 (PROXY_IP, the node Envoy's address)
                             lxc1..lxcN (host side of each pod's veth, proxy_arp on), a /32
                             route per pod, ip_forward on, IPv6 off; no uplink, no default route
                             (join_underlay adds eth0 towards a second node: see there)
    netns nmbpf-<tag>-pN     eth0 with the pod's /32, default via 169.254.1.1 (on-link)
    cgroup <cgroup2>/nmbpf-test-<tag>/      the node cgroup (the socket programs attach here)
           <cgroup2>/nmbpf-test-<tag>/pN/   one child per pod; pod processes run in it
           <cgroup2>/nmbpf-test-<tag>-proxy/  the node Envoy's cgroup, beside the pods' (as
                                            the agent runs it): connect4_proxy attaches here
    <tmp>/bpffs                             a private bpffs mount

Processes run "in a pod" join the pod's cgroup, then enter its network namespace with setns
(not `ip netns exec`, which remounts /sys and hides the cgroup tree). Everything is recorded as
it is created and `down()` removes it in reverse order, also after a failure half-way up.

A second node is another Topology with its own addresses (`second_node`) joined to the first
by `join_underlay`: a veth pair between the two node namespaces, both ends named eth0, with an
underlay /24 and routes to each other's pod /24 and node IP.

`Policies` (and `policy_rule`) write policy the way the agent does: rules → EndpointPolicy →
`lower_policy` → `policy_map_pairs` → `Datapath.sync_map`.

Also the pytest fixtures the test_bpf_* modules share: `topo` (one topology per module) and
`dp` (a loaded Datapath per test, destroyed afterwards, with every pod programmed).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodemesh.datapath import libbpf
from nodemesh.datapath.layout import (
    PORT_MAX,
    PORT_MIN,
    Direction,
    EndpointFlags,
    FlowEvent,
    Identity,
    IpcacheEntry,
    IpcacheKey,
    PolicyVerdict,
    Proto,
    ip4,
    policy_map_pairs,
)
from nodemesh.datapath.loader import Datapath, cgroup2_root, mount_bpffs, unmount
from nodemesh.policy import CidrRule, EndpointPolicy, IdentityRule, lower_policy

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
GATEWAY = "169.254.1.1"
NODE_IP = "10.77.255.1"
DNS_IP = "10.77.255.53"
POD_NET = "10.77.0"
POD_IDENTITY_BASE = 1000  # pod N has identity 1000 + N
PROXY_IP = "169.254.42.1"  # the node Envoy's address (docs/l7.md), on every node's lo
UNDERLAY_NET = "10.79.0"  # join_underlay: node A's eth0 is .1, node B's .2

# A small server: TCP answers every read with "<name> <data>", UDP every datagram likewise.
SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    name, proto, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    # "peer": say who connected (the address the server saw) after the data
    show_peer = sys.argv[5:6] == ["peer"]
    if proto == "tcp":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1024)
        print("ready", flush=True)
        def serve(c, peer):
            with c:
                while True:
                    d = c.recv(4096)
                    if not d:
                        return
                    tail = f" from {peer[0]}".encode() if show_peer else b""
                    c.sendall(name.encode() + b" " + d + tail)
        while True:
            c, a = s.accept()
            threading.Thread(target=serve, args=(c, a), daemon=True).start()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, port))
        print("ready", flush=True)
        while True:
            d, a = s.recvfrom(4096)
            tail = f" from {a[0]}".encode() if show_peer else b""
            s.sendto(name.encode() + b" " + d + tail, a)
    """
)

# A stand-in for the node Envoy: listens on listen_ip:port; per client connection it reads one
# message, opens an upstream connection to upstream_ip:port and relays one exchange, answering
# "via-proxy <upstream's answer>" or "upstream-error <errno name or exception>". With
# "transparent" the upstream socket is what Envoy's original_src makes: IP_TRANSPARENT, bound to
# the client's address before connect(). "echo" answers "proxy <client IP> <data>" itself.
PROXY = textwrap.dedent(
    """
    import errno, socket, sys, threading
    listen_ip, listen_port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    upstream = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 5 else None
    timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 1.5
    IP_TRANSPARENT = 19
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((listen_ip, listen_port))
    s.listen(128)
    print("ready", flush=True)
    def serve(c, peer):
        with c:
            data = c.recv(4096)
            if mode == "echo":
                c.sendall(f"proxy {peer[0]} ".encode() + data)
                return
            u = socket.socket()
            u.settimeout(timeout)
            try:
                if mode == "transparent":
                    u.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                    u.bind((peer[0], 0))
                u.connect(upstream)
                u.sendall(data)
                c.sendall(b"via-proxy " + u.recv(4096))
            except OSError as e:
                name = errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
                c.sendall(f"upstream-error {name}".encode())
            finally:
                u.close()
    while True:
        c, a = s.accept()
        threading.Thread(target=serve, args=(c, a), daemon=True).start()
    """
)


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM = 0x16, 0x17


def _ethtool_value(netns: str, ifname: str, cmd: int, data: int = 0) -> int:
    """One legacy ethtool get/set (struct ethtool_value) on a device of netns (no ethtool
    binary needed)."""

    def call() -> int:
        value = ctypes.create_string_buffer(struct.pack("II", cmd, data))
        ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)).ljust(40, b"\0")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
        return int(struct.unpack("II", value.raw[:8])[1])

    return libbpf.run_in_netns(f"/run/netns/{netns}", call)


def set_tx_checksum(netns: str, ifname: str, on: bool) -> None:
    _ethtool_value(netns, ifname, ETHTOOL_STXCSUM, int(on))
    assert _ethtool_value(netns, ifname, ETHTOOL_GTXCSUM) == int(on), (netns, ifname)


def _enter(cgroup: Path | None, netns: str) -> Callable[[], None]:
    """preexec_fn: join the cgroup (while /sys is still ours), then enter the netns."""

    def fn() -> None:
        if cgroup is not None:
            with open(cgroup / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        libbpf.setns(f"/run/netns/{netns}")

    return fn


@dataclass
class Pod:
    topo: Topology
    index: int
    netns: str
    ip: str
    lxc: str
    cgroup: Path
    ifindex: int = 0
    netns_cookie: int = 0  # what bpf_get_netns_cookie() says for the pod's sockets (nm_netns)

    @property
    def identity(self) -> int:
        return self.topo.identity_base + self.index

    @property
    def name(self) -> str:
        return f"pod{self.index}"

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        """A process in the pod (its cgroup and netns), tracked for cleanup."""
        return self.topo.popen(argv, self.netns, self.cgroup, **kw)

    def run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        p = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            self.topo.forget(p)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def python(self, code: str, timeout: float = 60) -> object:
        """Run a Python snippet in the pod; it must print one JSON document, which is
        returned."""
        res = self.run([PYTHON, "-c", textwrap.dedent(code)], timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"snippet failed in {self.name}:\n{res.stderr}")
        return json.loads(res.stdout)

    @contextlib.contextmanager
    def software_checksums(self) -> Iterator[None]:
        """Turn TX checksum offload off on both ends of the pod's veth (lxcN in the node, eth0
        in the pod) for the duration: TCP and UDP then cross the veth with checksums computed
        in full (TCP's CHECKSUM_PARTIAL is completed at the device, after the tc hooks, from
        the pseudo-header sum they rewrote) and the receiving stacks verify them, so a wrong
        checksum rewrite in the datapath is a lost packet instead of going unnoticed."""
        ends = ((self.topo.node_ns, self.lxc), (self.netns, "eth0"))
        for netns, ifname in ends:
            set_tx_checksum(netns, ifname, False)
        try:
            yield
        finally:
            for netns, ifname in ends:
                set_tx_checksum(netns, ifname, True)

    def server(self, proto: str = "tcp", port: int = 8080, name: str | None = None,
               host: str = "0.0.0.0", peer: bool = False) -> subprocess.Popen[str]:
        """Start the echo server and wait until it listens; peer: append " from <client IP>"
        to every answer (TCP and UDP)."""
        p = self.popen([PYTHON, "-c", SERVER, name or f"{self.name}:{port}", proto, host,
                        str(port), *(["peer"] if peer else [])],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.topo.wait_ready(p)
        return p


@dataclass
class Topology:
    pods_wanted: int = 4
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    pod_net: str = POD_NET  # pod N is <pod_net>.N
    node_ip: str = NODE_IP
    dns_ip: str = DNS_IP
    identity_base: int = POD_IDENTITY_BASE  # pod N has identity identity_base + N
    pods: list[Pod] = field(default_factory=list)
    peers: list[Topology] = field(default_factory=list)  # nodes joined by join_underlay
    _undo: list[tuple[str, Callable[[], object]]] = field(default_factory=list)
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node_ns = f"nmbpf-{self.tag}-node"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"nmbpf-{self.tag}-"))
        self.bpffs = self.tmp / "bpffs"
        self.cgroup = cgroup2_root() / f"nmbpf-test-{self.tag}"
        self.proxy_cgroup = cgroup2_root() / f"nmbpf-test-{self.tag}-proxy"
        self._undo.append(("tmpdir", lambda: shutil.rmtree(self.tmp, ignore_errors=True)))

    # -- building -----------------------------------------------------------------------------
    def _netns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._undo.append((f"netns {name}", lambda: run(["ip", "netns", "del", name], check=False)))
        # IPv6 off before any device arrives: no DAD, router solicitations or MLD noise
        self.sysctl(name, "net.ipv6.conf.all.disable_ipv6", 1)
        self.sysctl(name, "net.ipv6.conf.default.disable_ipv6", 1)

    @staticmethod
    def sysctl(netns: str, key: str, value: object) -> None:
        def write() -> None:
            # /proc/sys/net is resolved against the opening thread's network namespace
            Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")

        libbpf.run_in_netns(f"/run/netns/{netns}", write)

    def up(self) -> Topology:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        n = self.node_ns
        self._netns(n)
        run(["ip", "-n", n, "link", "set", "lo", "up"])
        for addr in (f"{self.node_ip}/32", f"{self.dns_ip}/32"):
            run(["ip", "-n", n, "addr", "add", addr, "dev", "lo"])
        # scope link: the gateway and proxy addresses answer but are never picked as a source
        for addr in (GATEWAY, PROXY_IP):
            run(["ip", "-n", n, "addr", "add", f"{addr}/32", "dev", "lo", "scope", "link"])
        self.sysctl(n, "net.ipv4.ip_forward", 1)

        self.cgroup.mkdir()
        self._undo.append(("cgroup", lambda: self._rmdir_cgroup(self.cgroup)))
        self.proxy_cgroup.mkdir()
        self._undo.append(("proxy cgroup", lambda: self._rmdir_cgroup(self.proxy_cgroup)))
        mount_bpffs(self.bpffs)
        self._undo.append(("bpffs", lambda: unmount(self.bpffs)))

        for i in range(1, self.pods_wanted + 1):
            pns = f"nmbpf-{self.tag}-p{i}"
            self._netns(pns)
            lxc, ip = f"lxc{i}", f"{self.pod_net}.{i}"
            # created inside the node netns, peer moved straight into the pod: nothing ever
            # appears in the host's namespace
            run(["ip", "-n", n, "link", "add", lxc, "type", "veth", "peer", "name", "eth0",
                 "netns", pns])
            run(["ip", "-n", n, "link", "set", lxc, "up"])
            self.sysctl(n, f"net.ipv4.conf.{lxc}.proxy_arp", 1)
            run(["ip", "-n", n, "route", "add", f"{ip}/32", "dev", lxc, "scope", "link"])
            run(["ip", "-n", pns, "link", "set", "lo", "up"])
            run(["ip", "-n", pns, "link", "set", "eth0", "up"])
            run(["ip", "-n", pns, "addr", "add", f"{ip}/32", "dev", "eth0"])
            run(["ip", "-n", pns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link"])
            run(["ip", "-n", pns, "route", "add", "default", "via", GATEWAY, "dev", "eth0"])
            cg = self.cgroup / f"p{i}"
            cg.mkdir()
            self._undo.append((f"cgroup p{i}", lambda cg=cg: self._rmdir_cgroup(cg)))
            ifindex = libbpf.run_in_netns(f"/run/netns/{n}",
                                          lambda lxc=lxc: socket.if_nametoindex(lxc))
            cookie = libbpf.netns_cookie(f"/run/netns/{pns}")
            self.pods.append(Pod(self, i, pns, ip, lxc, cg, ifindex, cookie))

    def join_underlay(self, other: Topology) -> None:
        """Connect this node and `other` like two machines on one L2 segment: a veth pair
        eth0 (here, <UNDERLAY_NET>.1/24) <-> eth0 (there, .2/24), and on each side routes to
        the other's pod /24 and node IP through it. Undone with this topology (deleting either
        end deletes the pair)."""
        a, b = self.node_ns, other.node_ns
        run(["ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
             "netns", b])
        self._undo.append(("underlay", lambda: run(["ip", "-n", a, "link", "del", "eth0"],
                                                   check=False)))
        for ns, me, peer_topo, peer_addr in ((a, 1, other, 2), (b, 2, self, 1)):
            run(["ip", "-n", ns, "addr", "add", f"{UNDERLAY_NET}.{me}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            via = f"{UNDERLAY_NET}.{peer_addr}"
            run(["ip", "-n", ns, "route", "add", f"{peer_topo.pod_net}.0/24", "via", via])
            run(["ip", "-n", ns, "route", "add", f"{peer_topo.node_ip}/32", "via", via])
        self.peers.append(other)
        other.peers.append(self)

    @staticmethod
    def _rmdir_cgroup(path: Path) -> None:
        for _ in range(50):  # processes leave a cgroup asynchronously after they die
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)
        path.rmdir()

    # -- processes ----------------------------------------------------------------------------
    def popen(self, argv: list[str], netns: str, cgroup: Path | None,
              **kw: object) -> subprocess.Popen[str]:
        kw.setdefault("text", True)
        p = subprocess.Popen(argv, preexec_fn=_enter(cgroup, netns), start_new_session=True,
                             **kw)  # type: ignore[call-overload]
        self._procs.append(p)
        return p

    def track(self, p: subprocess.Popen[str]) -> subprocess.Popen[str]:
        """Stop p (by PID) at teardown, like the processes started in pods."""
        self._procs.append(p)
        return p

    def node_popen(self, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        """A process in the node netns, outside the pods' cgroups."""
        return self.popen(argv, self.node_ns, None, **kw)

    def proxy(self, port: int, mode: str = "transparent", upstream: tuple[str, int] | None = None,
              timeout: float = 1.5) -> subprocess.Popen[str]:
        """Start the stand-in node Envoy (PROXY) on PROXY_IP:port in the proxy cgroup."""
        argv = [PYTHON, "-c", PROXY, PROXY_IP, str(port), mode]
        if upstream:
            argv += [upstream[0], str(upstream[1]), str(timeout)]
        p = self.proxy_popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.wait_ready(p)
        return p

    def node_server(self, proto: str, host: str, port: int, name: str) -> subprocess.Popen[str]:
        p = self.node_popen([PYTHON, "-c", SERVER, name, proto, host, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.wait_ready(p)
        return p

    def proxy_popen(self, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        """A process in the node netns and the proxy cgroup: where the node Envoy runs."""
        return self.popen(argv, self.node_ns, self.proxy_cgroup, **kw)

    def node_python(self, code: str, timeout: float = 30, proxy: bool = False) -> object:
        """Run a snippet in the node netns (proxy: in the proxy cgroup); it prints one JSON
        document, which is returned."""
        start = self.proxy_popen if proxy else self.node_popen
        p = start([PYTHON, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            self.forget(p)
        if p.returncode != 0:
            raise AssertionError(f"snippet failed in the node:\n{err}")
        return json.loads(out)

    def wait_ready(self, p: subprocess.Popen[str], timeout: float = 10) -> None:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if ready else ""
        if line.strip() != "ready":
            err = p.stderr.read() if p.stderr and p.poll() is not None else ""
            raise AssertionError(f"server did not start: {line!r} {err}")

    def forget(self, p: subprocess.Popen[str]) -> None:
        self.stop(p)
        with contextlib.suppress(ValueError):
            self._procs.remove(p)

    @staticmethod
    def stop(p: subprocess.Popen[str]) -> None:
        """Stop one process we started, by its PID (and its session)."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=3)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        for p in reversed(self._procs):
            self.stop(p)
        self._procs.clear()

    # -- the datapath -------------------------------------------------------------------------
    def datapath(self, **kw: object) -> Datapath:
        return Datapath(self.tag, str(self.bpffs), str(self.cgroup), netns=self.node_ns,
                        **kw)  # type: ignore[arg-type]

    def program(self, dp: Datapath, flags: dict[int, EndpointFlags] | None = None) -> None:
        """Load nothing; attach every pod and write config, ipcache and endpoints (nm_endpoints,
        nm_lxc, nm_netns, as the agent does; pod i gets flags[i], default none = not isolated).
        The pods of joined nodes go into the ipcache too, their node IPs as remote-node."""
        dp.set_config(self.node_ip, self.dns_ip)
        dp.ipcache.put(IpcacheKey.of("0.0.0.0/0"), IpcacheEntry(int(Identity.WORLD), 0, 0, 0))
        dp.ipcache.put(IpcacheKey.of(f"{self.node_ip}/32"),
                       IpcacheEntry(int(Identity.HOST), 0, 0, 0))
        for pod in self.pods:
            dp.ipcache.put(IpcacheKey.of(f"{pod.ip}/32"),
                           IpcacheEntry(pod.identity, ip4(self.node_ip), 0, 0))
        for peer in self.peers:
            dp.ipcache.put(IpcacheKey.of(f"{peer.node_ip}/32"),
                           IpcacheEntry(int(Identity.REMOTE_NODE), ip4(peer.node_ip), 0, 0))
            for pod in peer.pods:
                dp.ipcache.put(IpcacheKey.of(f"{pod.ip}/32"),
                               IpcacheEntry(pod.identity, ip4(peer.node_ip), 0, 0))
        for pod in self.pods:
            assert dp.attach_endpoint(pod.lxc) == pod.ifindex
            dp.set_endpoint(pod.ifindex, pod.ip, pod.identity,
                            (flags or {}).get(pod.index, EndpointFlags.NONE),
                            netns_cookie=pod.netns_cookie)

    # -- teardown -----------------------------------------------------------------------------
    def down(self) -> None:
        self.stop_all()
        errors = []
        for what, undo in reversed(self._undo):
            try:
                undo()
            except Exception as e:  # keep going: remove everything we can
                errors.append(f"{what}: {e}")
        self._undo.clear()
        if errors:
            raise RuntimeError("teardown incomplete: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        out = []
        names = run(["ip", "netns", "list"]).stdout
        out += [line.split()[0] for line in names.splitlines() if f"nmbpf-{self.tag}-" in line]
        for cg in (self.cgroup, self.proxy_cgroup):
            if cg.exists():
                out.append(str(cg))
        if self.tmp.exists():
            out.append(str(self.tmp))
        out += [f"pid {p.pid}" for p in self._procs if p.poll() is None]
        return out


def connect(client: Pod, ip: str, port: int = 8080, proto: str = "tcp",
            src: str | None = None) -> dict:
    """Open one connection (or send one datagram) and report: ok + the reply + the local port,
    or the error."""
    return client.python(f"""
        import json, socket
        kind = socket.SOCK_STREAM if "{proto}" == "tcp" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET, kind)
        s.settimeout(0.7)
        if {src!r}:
            s.bind(({src!r}, 0))
        try:
            s.connect(("{ip}", {port}))
            s.send(b"hi")
            reply = s.recv(100).decode()
            print(json.dumps({{"ok": True, "reply": reply, "sport": s.getsockname()[1]}}))
        except OSError as e:
            print(json.dumps({{"ok": False, "error": type(e).__name__,
                               "sport": s.getsockname()[1]}}))
    """)


class Chat:
    """A long-lived TCP connection from a pod: say() sends a line, returns the reply or None."""

    CLIENT = textwrap.dedent("""
        import socket, sys
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        print("ready", flush=True)
        for line in sys.stdin:
            s.settimeout(1.0)
            try:
                s.sendall(line.strip().encode())
                print(s.recv(100).decode(), flush=True)
            except OSError as e:
                print("error " + type(e).__name__, flush=True)
    """)

    def __init__(self, topo: Topology, client: Pod, ip: str, port: int = 8080) -> None:
        self.p = client.popen([PYTHON, "-c", self.CLIENT, ip, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        topo.wait_ready(self.p)

    def say(self, msg: str) -> str | None:
        assert self.p.stdin and self.p.stdout
        self.p.stdin.write(msg + "\n")
        self.p.stdin.flush()
        ready, _, _ = select.select([self.p.stdout], [], [], 5)
        line = self.p.stdout.readline().strip() if ready else ""
        return None if not line or line.startswith("error") else line


class Events:
    """Collects flow events; drain() before looking."""

    def __init__(self, dp: Datapath) -> None:
        self.items: list[FlowEvent] = []
        self.reader = dp.open_events(self.items.append)

    def drain(self) -> list[FlowEvent]:
        self.reader.drain()
        return self.items

    def where(self, **fields: object) -> list[FlowEvent]:
        self.drain()
        return [e for e in self.items if all(getattr(e, k) == v for k, v in fields.items())]

    def wait_for(self, timeout: float = 2.0, **fields: object) -> list[FlowEvent]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.where(**fields)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def dump(self) -> str:
        return "\n".join(e.describe() for e in self.drain())


def bpffs_entries(topo: Topology) -> list[str]:
    """What is in the bpffs besides the kernel's own iterators (progs.debug, maps.debug)."""
    return sorted(str(p.relative_to(topo.bpffs)) for p in topo.bpffs.rglob("*")
                  if not p.name.endswith(".debug"))


# --- policy, written the agent's way ---------------------------------------------------------
PortSel = int | tuple[int, int] | None  # one port, an inclusive range, or every port


def _ports(port: PortSel) -> tuple[int, int]:
    if port is None:
        return PORT_MIN, PORT_MAX
    if isinstance(port, tuple):
        return port
    return port, port


class Policies:
    """The policy maps of one datapath, written as the agent writes them: each pod's rules make
    an `EndpointPolicy`, `lower_policy` lowers it, `layout.policy_map_pairs` turns the result
    into nm_policy / nm_policy_cidr entries and `Datapath.sync_map` makes the maps hold exactly
    those of every pod. Setting a rule replaces the pod's rule for the same direction, peer,
    protocol and ports (as an edited policy would); the verdict then follows from all of a
    pod's rules together (deny over redirect over allow). Enforcement (nm_endpoints flags) is
    the tests' own business (`Datapath.set_endpoint`)."""

    _of: weakref.WeakKeyDictionary[Datapath, Policies] = weakref.WeakKeyDictionary()

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.pods: dict[int, Pod] = {}
        self.rules: dict[int, dict[tuple, IdentityRule | CidrRule]] = {}

    @classmethod
    def of(cls, dp: Datapath) -> Policies:
        if dp not in cls._of:
            cls._of[dp] = cls(dp)
        return cls._of[dp]

    def identity_rule(self, pod: Pod, direction: Direction, identity: int,
                      verdict: PolicyVerdict, policy_id: int, protocol: int | None = Proto.TCP,
                      port: PortSel = 8080, proxy_port: int = 0) -> None:
        """A rule against a remote identity (Identity.ANY = every peer); protocol None: every
        protocol (and then every port); ICMP rules give the ICMP type as the port."""
        if protocol is None and port is not None:
            raise ValueError("a port needs a protocol")
        proto = Proto.ANY if protocol is None else Proto(protocol)
        lo, hi = _ports(port)
        self._set(pod, (direction, "identity", identity, proto, lo, hi),
                  IdentityRule(direction, identity, proto, lo, hi, verdict, policy_id, proxy_port))

    def cidr_rule(self, pod: Pod, direction: Direction, cidr: str, verdict: PolicyVerdict,
                  policy_id: int, protocol: int = Proto.ANY, port: PortSel = None,
                  excepts: tuple[str, ...] = ()) -> None:
        """A rule against addresses (an ipBlock: `cidr` without its `excepts`)."""
        lo, hi = _ports(port)
        self._set(pod, (direction, "cidr", cidr, protocol, lo, hi),
                  CidrRule(direction, cidr, excepts, Proto(protocol), lo, hi, verdict, policy_id))

    def _set(self, pod: Pod, where: tuple, rule: IdentityRule | CidrRule) -> None:
        self.pods[pod.ifindex] = pod
        self.rules.setdefault(pod.ifindex, {})[where] = rule
        self.sync()

    def sync(self) -> None:
        lowered = []
        for ifindex, rules in self.rules.items():
            pod = self.pods[ifindex]
            ep = EndpointPolicy(
                endpoint=f"test/{pod.name}", identity=pod.identity, ingress_enforced=False,
                egress_enforced=False,
                identity_rules=tuple(r for r in rules.values() if isinstance(r, IdentityRule)),
                cidr_rules=tuple(r for r in rules.values() if isinstance(r, CidrRule)))
            lowered.append(lower_policy(ep, ifindex))
        policy_pairs, cidr_pairs = policy_map_pairs(lowered)
        self.dp.sync_map("nm_policy", policy_pairs)
        self.dp.sync_map("nm_policy_cidr", cidr_pairs)


def policy_rule(dp: Datapath, pod: Pod, direction: Direction, identity: int,
                verdict: PolicyVerdict, policy_id: int, protocol: int | None = Proto.TCP,
                port: PortSel = 8080, proxy_port: int = 0) -> None:
    """`Policies.identity_rule` on this datapath's policies."""
    Policies.of(dp).identity_rule(pod, direction, identity, verdict, policy_id, protocol, port,
                                  proxy_port)


# --- pytest fixtures --------------------------------------------------------------------------
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, cgroups, BPF)")


@pytest.fixture(scope="session")
def bpf_objects() -> None:
    _need_root()
    Datapath("build-check", "/nonexistent", "/nonexistent").ensure_built()


@pytest.fixture(scope="module")
def topo(bpf_objects: None) -> Iterator[Topology]:
    """One node with four pods, shared by the tests of a module."""
    t = Topology().up()
    try:
        yield t
    finally:
        t.down()
        left = t.leftovers()
        assert not left, f"left behind: {left}"


@pytest.fixture
def dp(topo: Topology) -> Iterator[Datapath]:
    """A freshly loaded datapath (new maps) with every pod attached and programmed, not
    isolated; destroyed after the test with every process the test started."""
    d = topo.datapath()
    try:
        d.load()
        topo.program(d)
        yield d
    finally:
        topo.stop_all()
        d.destroy()
        left = bpffs_entries(topo)
        assert not left, f"bpffs not empty: {left}"
