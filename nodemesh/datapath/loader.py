"""Load the datapath into a node and keep its maps in sync: the API the agent uses.

`Datapath` owns one node's BPF state under `<bpffs>/<node>/`: the maps (pinned by libbpf, by
name, shared by bpf_lxc.o, bpf_sock.o and bpf_host.o), and the links under `links/`: the socket
programs on the node's cgroup (`cgroup-<program>`), the tc programs on each pod veth
(`tcx-<ifname>-ingress|egress`), the proxy's upstream policy check on the proxy's cgroup
(`proxy-connect4_proxy`) and the return-path program on the node's underlay device
(`netdev-<ifname>-ingress`). Pins make all of it outlive the agent; a new agent adopts it:
a link whose program is the same build is kept, one with another build is switched to the new
program with an atomic link update, so live connections never see a gap. A pinned map whose
shape the new build changed is recreated: with its entries copied when only its size or flags
changed, converted where `MIGRATIONS` says how (nm_l7_redir from before per-client redirects),
else empty until the agent's next sync refills it.

Maps are written by diff (`sync_map`, `apply_lb`): only changed entries are written, stale ones
deleted, so applying the same desired state twice writes nothing.

Everything that touches a device (tcx attach, ifindex lookup) runs in the node's network
namespace: the caller's, or `netns` given to the constructor (then a short-lived thread enters
it, and the caller's thread stays where it is).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from nodemesh.datapath import libbpf, routing
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
from nodemesh.datapath.lb import LbState, is_prime
from nodemesh.errors import NodemeshError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# load order: bpf_lxc creates the pins, the others reuse them
OBJECTS = ("bpf_lxc", "bpf_sock", "bpf_host", "bpf_netns")
SOCK_PROGRAMS = {
    "connect4": libbpf.BPF_CGROUP_INET4_CONNECT,
    "sendmsg4": libbpf.BPF_CGROUP_UDP4_SENDMSG,
    "recvmsg4": libbpf.BPF_CGROUP_UDP4_RECVMSG,
    "getpeername4": libbpf.BPF_CGROUP_INET4_GETPEERNAME,
}
TC_PROGRAMS = {  # pin suffix -> (program, tcx attach type)
    "ingress": ("from_container", libbpf.BPF_TCX_INGRESS),
    "egress": ("to_container", libbpf.BPF_TCX_EGRESS),
}
# the node Envoy's cgroup (beside the pods' cgroup): its upstream connect()s
PROXY_PROGRAM = "connect4_proxy"
PROXY_PIN = f"proxy-{PROXY_PROGRAM}"
# the node's underlay device: the proxy return path for backends on other nodes
NETDEV_PROGRAM = "from_netdev"
NETDEV_PIN_PREFIX = "netdev-"
# the node namespace's socket lookup: the tunnel's listeners (lib/tunnel.h)
NETNS_PROGRAM = "tunnel_lookup"
NETNS_PIN = f"netns-{NETNS_PROGRAM}"
TUNNEL_SOCKS_MAP = "nm_tunnel_socks"
CLANG_FLAGS = ["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
               "-I/usr/include/x86_64-linux-gnu"]
MAGLEV_MAP = "nm_lb4_maglev"


def _l7_redir_any_client(key: bytes, value: bytes) -> tuple[bytes, bytes]:
    """nm_l7_redir before per-client redirects ({addr, port, protocol, pad}: every client was
    redirected) -> the same entry for identity 0 (any client)."""
    return key + bytes(4), value


# Maps whose entries survive a shape change: map -> (old key size, old value size, convert an
# old entry's bytes to the new shape's). Without a migration a recreated map is empty until the
# agent's next sync; for nm_l7_redir that would let clients past the L7 rules in between (they
# would connect straight to pods whose REDIRECT verdicts admit them), so its old entries are
# carried over as identity 0, which keeps the from_container bypass drop in force (fail-closed)
# until the agent has written nm_netns and its per-identity entries.
MIGRATIONS: dict[str, tuple[int, int, Callable[[bytes, bytes], tuple[bytes, bytes]]]] = {
    "nm_l7_redir": (8, 8, _l7_redir_any_client),
}

T = TypeVar("T")
# what sync_map takes: {key bytes: value} or [(key struct or bytes, value), ...]
Desired = Mapping[Any, Any] | Iterable[tuple[Any, Any]]


class DatapathError(NodemeshError):
    """The datapath can not be built, loaded or attached; the message says what to do."""


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


class LinkState(NamedTuple):
    name: str  # pin name under links/
    link_id: int
    prog_id: int


def _enum(cls: Any, value: int) -> Any:
    try:
        return cls(value)
    except ValueError:
        return value


# --- host plumbing the agent and the tests share ----------------------------------------------
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


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup/unified on hybrid hosts,
    /sys/fs/cgroup on unified ones."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    raise DatapathError("no cgroup v2 hierarchy is mounted")


def mount_bpffs(path: str | Path) -> None:
    """Mount a private bpf filesystem at path (created if needed); no-op if one is there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if libbpf.is_bpffs(path):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise DatapathError(f"mount bpffs at {path}: {os.strerror(err)}")


def unmount(path: str | Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), 0) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted
            raise DatapathError(f"umount {path}: {os.strerror(err)}")


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


# --- the datapath -----------------------------------------------------------------------------
class Datapath:
    """One node's datapath: build, load, attach, sync, observe, destroy."""

    def __init__(self, node: str, bpffs_dir: str, cgroup_path: str, obj_dir: str = "build/bpf",
                 maglev_table_size: int = 16381, *, netns: str | None = None,
                 src_dir: str | None = None) -> None:
        if not node or "/" in node or node.startswith("."):
            raise DatapathError(f"bad node name {node!r}")
        if not is_prime(maglev_table_size):
            raise DatapathError(f"--maglev-table-size {maglev_table_size} is not a prime")
        self.node = node
        self.bpffs_dir = Path(bpffs_dir)
        self.pin_dir = self.bpffs_dir / node
        self.links_dir = self.pin_dir / "links"
        self.cgroup_path = Path(cgroup_path)
        obj = Path(obj_dir)
        self.obj_dir = obj if obj.is_absolute() else REPO_ROOT / obj
        self.src_dir = Path(src_dir) if src_dir else REPO_ROOT / "bpf"
        self.maglev_m = maglev_table_size
        self.netns = libbpf.netns_path(netns) if netns else None
        self._objects: dict[str, libbpf.BpfObject] = {}
        self._maps: dict[str, libbpf.Map[Any, Any]] = {}
        self._readers: list[RingReader] = []
        self._migrated: dict[str, list[tuple[bytes, bytes]]] = {}

    # -- build --------------------------------------------------------------------------------
    def _sources(self) -> list[Path]:
        return sorted(self.src_dir.glob("*.bpf.c"))

    def objects(self) -> list[str]:
        """The objects this build has: OBJECTS whose source is in the source tree (a build
        from before the tunnel has no bpf_netns; loading it is how an upgrade test runs it)."""
        return [name for name in OBJECTS if (self.src_dir / f"{name}.bpf.c").exists()]

    def object_path(self, name: str) -> Path:
        return self.obj_dir / f"{name}.bpf.o"

    def ensure_built(self) -> None:
        """Compile bpf/*.bpf.c when an object is missing or older than its sources/headers."""
        sources = self._sources()
        if not sources:
            raise DatapathError(f"no BPF sources in {self.src_dir}")
        headers = list(self.src_dir.glob("lib/*.h"))
        stale = []
        for src in sources:
            obj = self.obj_dir / src.name.replace(".bpf.c", ".bpf.o")
            newest = max(p.stat().st_mtime for p in [src, *headers])
            if not obj.exists() or obj.stat().st_mtime < newest:
                stale.append((src, obj))
        if not stale:
            return
        clang = shutil.which("clang")
        if clang is None:
            raise DatapathError("clang is not installed: `apt-get install clang llvm libbpf-dev` "
                                "(or `make setup`), then retry")
        self.obj_dir.mkdir(parents=True, exist_ok=True)
        for src, obj in stale:
            # compile to a temporary name and rename: another process may be loading the object
            fd, tmp = tempfile.mkstemp(dir=self.obj_dir, suffix=".o.tmp")
            os.close(fd)
            cmd = [clang, *CLANG_FLAGS, f"-I{self.src_dir}", "-c", str(src), "-o", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                os.unlink(tmp)
                raise DatapathError(f"compiling {src} failed:\n{res.stderr.strip()}")
            os.replace(tmp, obj)
            log.info("compiled %s", obj)

    # -- load ---------------------------------------------------------------------------------
    def _in_netns(self, fn: Callable[[], T]) -> T:
        return libbpf.run_in_netns(self.netns, fn) if self.netns else fn()

    def _reconcile_pins(self, obj: libbpf.BpfObject) -> None:
        """A pinned map whose shape differs from the object's (a new build changed a struct,
        or another --maglev-table-size) can not be reused: libbpf would refuse the load.
        Unpin it so a new one is created; the old programs keep the old map until their links
        are switched to the new programs."""
        for m in obj.maps():
            if m.internal:
                continue
            pin = self.pin_dir / m.name
            if not pin.exists():
                continue
            fd = libbpf.obj_get(pin)
            try:
                info = libbpf.map_info(fd)
            finally:
                os.close(fd)
            want = (m.type, m.key_size, m.value_size, m.max_entries, m.map_flags)
            have = (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)
            if want != have:
                carried = self._read_for_migration(m.name, pin, info, m.type)
                if carried is None:
                    log.warning("map %s changed shape %s -> %s: recreating it empty (the "
                                "agent's next sync refills the maps it writes)", pin, have, want)
                else:
                    log.warning("map %s changed shape %s -> %s: recreating it with its %d "
                                "entries converted", pin, have, want, len(carried))
                    self._migrated[m.name] = carried
                libbpf.unpin(pin)

    def _read_for_migration(self, name: str, pin: Path, info: libbpf.MapInfo,
                            new_type: int) -> list[tuple[bytes, bytes]] | None:
        """The entries of a pinned map of an older shape, converted to the new one (MIGRATIONS),
        or copied as they are when only its size or flags changed (same type, same key and
        value layout); None when there is no way to carry them over."""
        migration = MIGRATIONS.get(name)
        same_layout = (info.type == new_type and info.type not in libbpf.PERCPU_MAP_TYPES
                       and info.type != libbpf.BPF_MAP_TYPE_RINGBUF
                       and (info.key_size, info.value_size) == self._layout(name))
        if migration is None and same_layout:
            migration = (info.key_size, info.value_size, lambda k, v: (k, v))
        if migration is None or (info.key_size, info.value_size) != migration[:2]:
            return None
        key_t = ctypes.c_uint8 * info.key_size
        value_t = ctypes.c_uint8 * info.value_size
        old = libbpf.Map.from_pin(pin, key_t, value_t)
        try:
            return [migration[2](bytes(k), bytes(v)) for k, v in old.items()]
        finally:
            old.close()

    def _layout(self, name: str) -> tuple[int, int]:
        """(key size, value size) this build gives map `name` (0, 0 when unknown here)."""
        types = MAPS.get(name)
        if types is None or types[1] is None:
            return 0, 0
        return ctypes.sizeof(types[0]), ctypes.sizeof(types[1])

    def _restore_migrated(self) -> None:
        """Write the converted entries into the maps that the last load created (before any
        link is switched to the new programs, which use the new maps)."""
        for name in list(self._migrated):
            pin = self.pin_dir / name
            if not pin.exists():
                continue
            entries = self._migrated.pop(name)
            fd = libbpf.obj_get(pin)
            try:
                info = libbpf.map_info(fd)
            finally:
                os.close(fd)
            new = libbpf.Map.from_pin(pin, ctypes.c_uint8 * info.key_size,
                                      ctypes.c_uint8 * info.value_size)
            try:
                for k, v in entries:
                    new.put((ctypes.c_uint8 * len(k)).from_buffer_copy(k),
                            (ctypes.c_uint8 * len(v)).from_buffer_copy(v))
            finally:
                new.close()

    def load(self) -> None:
        """Open and load both objects with their maps pinned under <bpffs>/<node>/, then attach
        (or adopt) the socket programs on the node cgroup and adopt existing tcx links."""
        if not libbpf.is_bpffs(self.bpffs_dir):
            raise DatapathError(f"{self.bpffs_dir} is not a bpf filesystem: mount one "
                                f"(mount -t bpf bpf {self.bpffs_dir})")
        if not self.cgroup_path.is_dir():
            raise DatapathError(f"cgroup {self.cgroup_path} does not exist")
        for name in self.objects():
            if not self.object_path(name).exists():
                raise DatapathError(f"{self.object_path(name)} is missing: run `make bpf` or "
                                    "Datapath.ensure_built()")
        self.close()
        self.links_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.objects():
                obj = libbpf.BpfObject(self.object_path(name), self.pin_dir)
                self._objects[name] = obj
                if obj.has_map(MAGLEV_MAP):
                    obj.map(MAGLEV_MAP).set_value_size(4 * self.maglev_m)
                if name == "bpf_sock":
                    obj.set_rodata("nm_maglev_m", self.maglev_m.to_bytes(4, "little"))
                self._reconcile_pins(obj)
                obj.load()
                self._restore_migrated()
            self._attach_sock_programs()
            if "bpf_netns" in self._objects:
                self._in_netns(self._attach_netns_program)
            self._adopt_tcx_links()
            self._adopt_host_links()
        except BaseException:
            self._migrated.clear()
            self.close()
            raise

    def _attach_sock_programs(self) -> None:
        sock = self._objects["bpf_sock"]
        cgroup_id = os.stat(self.cgroup_path).st_ino  # a cgroup v2 directory's inode is its id
        for prog_name, attach_type in SOCK_PROGRAMS.items():
            prog = sock.program(prog_name)

            def ok(info: libbpf.LinkInfo, t: int = attach_type) -> bool:
                return (info.type == libbpf.BPF_LINK_TYPE_CGROUP and info.cgroup_id == cgroup_id
                        and info.u1 == t)

            what = self._adopt_link(f"cgroup-{prog_name}", prog, ok,
                                    lambda p=prog: p.attach_cgroup(self.cgroup_path))
            log.info("%s: cgroup %s link %s", self.node, prog_name, what)

    def _attach_netns_program(self) -> None:
        """tunnel_lookup on the node's network namespace (it passes every lookup until the
        tunnel is up)."""
        prog = self._objects["bpf_netns"].program(NETNS_PROGRAM)
        ino = os.stat("/proc/thread-self/ns/net").st_ino

        def ok(info: libbpf.LinkInfo) -> bool:
            return info.type == libbpf.BPF_LINK_TYPE_NETNS and info.netns_ino == ino

        what = self._adopt_link(NETNS_PIN, prog, ok, prog.attach_netns)
        log.info("%s: netns %s link %s", self.node, NETNS_PROGRAM, what)

    def set_tunnel_listeners(self, pid: int, ports: Mapping[int, int]) -> dict[int, int]:
        """Put the node Envoy's listening sockets (process `pid`, in this node's namespace) on
        `ports` into nm_tunnel_socks: slot -> port. Returns slot -> the socket's cookie for the
        slots it filled; a port with no listener leaves its slot as it is."""
        self._require_loaded()
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

    def _adopt_tcx_links(self) -> None:
        """Switch the tcx links of earlier agents to this build (their devices are checked
        again by attach_endpoint)."""
        lxc = self._objects["bpf_lxc"]
        for pin in sorted(self.links_dir.glob("tcx-*")):
            suffix = pin.name.rsplit("-", 1)[-1]
            if suffix not in TC_PROGRAMS:
                continue
            prog = lxc.program(TC_PROGRAMS[suffix][0])
            try:
                with libbpf.Link.from_pin(pin) as link:
                    info = link.info()
                    if info.tcx_ifindex == 0:  # device gone: the link is defunct
                        libbpf.unpin(pin)
                    elif not self._same_build(info.prog_id, prog.fd):
                        link.update_program(prog.fd)
                        log.info("%s: %s switched to the new program", self.node, pin.name)
            except libbpf.BpfError as e:
                log.warning("%s: dropping unusable link pin %s: %s", self.node, pin, e)
                libbpf.unpin(pin)

    def _adopt_host_links(self) -> None:
        """Switch the proxy-cgroup and underlay links of earlier agents to this build; their
        targets are the agent's to re-check (attach_proxy_cgroup, attach_netdev)."""
        pins = sorted(self.links_dir.glob(f"{NETDEV_PIN_PREFIX}*"))
        if (self.links_dir / PROXY_PIN).exists():
            pins.append(self.links_dir / PROXY_PIN)
        for pin in pins:
            if pin.name == PROXY_PIN:
                prog = self._objects["bpf_sock"].program(PROXY_PROGRAM)
            else:
                prog = self._objects["bpf_host"].program(NETDEV_PROGRAM)
            try:
                with libbpf.Link.from_pin(pin) as link:
                    info = link.info()
                    if info.type == libbpf.BPF_LINK_TYPE_TCX and info.tcx_ifindex == 0:
                        libbpf.unpin(pin)  # the device is gone: the link is defunct
                    elif not self._same_build(info.prog_id, prog.fd):
                        link.update_program(prog.fd)
                        log.info("%s: %s switched to the new program", self.node, pin.name)
            except libbpf.BpfError as e:
                log.warning("%s: dropping unusable link pin %s: %s", self.node, pin, e)
                libbpf.unpin(pin)

    @staticmethod
    def _fingerprint(prog_fd: int) -> tuple[bytes, frozenset[int], bytes]:
        """What makes two loaded programs the same build: the instruction tag (the kernel
        computes it with map references zeroed), the shared maps they use, and the contents of
        their .rodata (per-load internal maps, compared by value)."""
        tag = bytes(libbpf.prog_info(prog_fd).tag)
        shared: set[int] = set()
        rodata = b""
        for map_id in libbpf.prog_map_ids(prog_fd):
            fd = libbpf.map_fd_by_id(map_id)
            try:
                info = libbpf.map_info(fd)
                if info.name.endswith(b".rodata"):
                    rodata += libbpf.map_lookup_raw(fd, bytes(4), info.value_size) or b""
                elif b"." in info.name:
                    continue  # .bss/.data would be per-load state; we have none
                else:
                    shared.add(map_id)
            finally:
                os.close(fd)
        return tag, frozenset(shared), rodata

    def _same_build(self, prog_id: int, new_prog_fd: int) -> bool:
        try:
            old_fd = libbpf.prog_fd_by_id(prog_id)
        except libbpf.BpfError:
            return False
        try:
            return self._fingerprint(old_fd) == self._fingerprint(new_prog_fd)
        finally:
            os.close(old_fd)

    def _adopt_link(self, pin_name: str, prog: libbpf.Program,
                    target_ok: Callable[[libbpf.LinkInfo], bool],
                    create: Callable[[], libbpf.Link]) -> str:
        """Keep, update or (re)create the link pinned at links/<pin_name>; says which."""
        pin = self.links_dir / pin_name
        if pin.exists():
            try:
                with libbpf.Link.from_pin(pin) as link:
                    info = link.info()
                    if target_ok(info):
                        if self._same_build(info.prog_id, prog.fd):
                            return "kept"
                        link.update_program(prog.fd)
                        return "updated"
                    # another cgroup, a deleted device: this pin describes something else
                    with contextlib.suppress(libbpf.BpfError):
                        link.detach()
            except libbpf.BpfError as e:
                log.warning("%s: replacing unusable link pin %s: %s", self.node, pin, e)
            libbpf.unpin(pin)
        with create() as link:
            link.pin(pin)
        return "created"

    # -- endpoints ----------------------------------------------------------------------------
    def _require_loaded(self) -> None:
        if not self._objects:
            raise DatapathError("the datapath is not loaded: call load() first")

    def attach_endpoint(self, ifname: str) -> int:
        """Attach from_container (tcx ingress) and to_container (tcx egress) to the pod's
        host-side veth, pinned under links/. Idempotent; returns the ifindex."""
        self._require_loaded()
        lxc = self._objects["bpf_lxc"]

        def attach() -> int:
            try:
                ifindex = socket.if_nametoindex(ifname)
            except OSError:
                raise DatapathError(f"no interface {ifname} in the node's network namespace") \
                    from None
            for suffix, (prog_name, attach_type) in TC_PROGRAMS.items():
                prog = lxc.program(prog_name)

                def ok(info: libbpf.LinkInfo, t: int = attach_type) -> bool:
                    return (info.type == libbpf.BPF_LINK_TYPE_TCX and info.tcx_ifindex == ifindex
                            and info.tcx_attach_type == t)

                self._adopt_link(f"tcx-{ifname}-{suffix}", prog, ok,
                                 lambda p=prog, s=suffix: p.attach_tcx(ifindex, s == "ingress"))
            return ifindex

        return self._in_netns(attach)

    def detach_endpoint(self, ifname: str) -> None:
        """Detach and unpin the veth's links (the device may already be gone)."""
        for suffix in TC_PROGRAMS:
            self._detach_pin(self.links_dir / f"tcx-{ifname}-{suffix}")

    # -- the node's underlay device and the proxy ------------------------------------------
    def attach_netdev(self, ifname: str) -> int:
        """Attach from_netdev (tcx ingress) to the node's underlay device (eth0 of the node
        namespace): the proxy return path for backends on other nodes. It does nothing to a
        packet unless nm_config has ConfigFlags.PROXY_RETURN. Idempotent; returns the
        ifindex. Never attach it to a device of the host's own namespace."""
        self._require_loaded()
        prog = self._objects["bpf_host"].program(NETDEV_PROGRAM)

        def attach() -> int:
            try:
                ifindex = socket.if_nametoindex(ifname)
            except OSError:
                raise DatapathError(f"no interface {ifname} in the node's network namespace") \
                    from None

            def ok(info: libbpf.LinkInfo) -> bool:
                return (info.type == libbpf.BPF_LINK_TYPE_TCX and info.tcx_ifindex == ifindex
                        and info.tcx_attach_type == libbpf.BPF_TCX_INGRESS)

            self._adopt_link(f"{NETDEV_PIN_PREFIX}{ifname}-ingress", prog, ok,
                             lambda: prog.attach_tcx(ifindex, True))
            return ifindex

        return self._in_netns(attach)

    def detach_netdev(self, ifname: str) -> None:
        """Detach and unpin the underlay device's link (the device may already be gone)."""
        self._detach_pin(self.links_dir / f"{NETDEV_PIN_PREFIX}{ifname}-ingress")

    def attach_proxy_cgroup(self, path: str | Path) -> None:
        """Attach connect4_proxy to the node Envoy's cgroup: an upstream connect() bound to a
        local pod's IP must pass that pod's egress policy. The cgroup must be outside the
        node's (pods') cgroup: there the pods' connect4 would redirect Envoy's own upstreams
        back to Envoy. One proxy cgroup per node: attaching another moves the link.
        Idempotent."""
        self._require_loaded()
        cg = Path(path)
        if not cg.is_dir():
            raise DatapathError(f"cgroup {cg} does not exist")
        real, node_cg = cg.resolve(), self.cgroup_path.resolve()
        if real == node_cg or node_cg in real.parents:
            raise DatapathError(f"the proxy cgroup {cg} must not be the node cgroup "
                                f"{self.cgroup_path} or below it")
        if real == cgroup2_root().resolve():
            raise DatapathError("refusing to attach to the root cgroup")
        prog = self._objects["bpf_sock"].program(PROXY_PROGRAM)
        cgroup_id = os.stat(cg).st_ino

        def ok(info: libbpf.LinkInfo) -> bool:
            return (info.type == libbpf.BPF_LINK_TYPE_CGROUP and info.cgroup_id == cgroup_id
                    and info.u1 == libbpf.BPF_CGROUP_INET4_CONNECT)

        what = self._adopt_link(PROXY_PIN, prog, ok, lambda: prog.attach_cgroup(cg))
        log.info("%s: proxy cgroup %s link %s", self.node, cg, what)

    def detach_proxy_cgroup(self) -> None:
        self._detach_pin(self.links_dir / PROXY_PIN)

    def _detach_pin(self, pin: Path) -> None:
        if not pin.exists():
            return
        try:
            with libbpf.Link.from_pin(pin) as link:
                link.detach()
        except libbpf.BpfError as e:
            if e.errno not in (errno.ENOLINK, errno.EINVAL, errno.ENOENT):
                raise
        libbpf.unpin(pin)

    def install_proxy_routing(self) -> None:
        """routing.install_proxy_routing in this node's namespace; then set_config(...,
        flags=ConfigFlags.PROXY_RETURN)."""
        routing.install_proxy_routing(self.netns)

    def remove_proxy_routing(self) -> None:
        """routing.remove_proxy_routing in this node's namespace (clear the flag first)."""
        routing.remove_proxy_routing(self.netns)

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

    def links(self) -> list[LinkState]:
        """Every pinned link of this node with its kernel ids."""
        out = []
        if not self.links_dir.is_dir():
            return out
        for pin in sorted(self.links_dir.iterdir()):
            try:
                with libbpf.Link.from_pin(pin) as link:
                    info = link.info()
                    out.append(LinkState(pin.name, info.id, info.prog_id))
            except libbpf.BpfError:
                continue
        return out

    def program(self, name: str) -> libbpf.Program:
        """A loaded program by name, from whichever object has it (prog_test_run, info)."""
        self._require_loaded()
        for obj in self._objects.values():
            if any(p.name == name for p in obj.programs()):
                return obj.program(name)
        raise DatapathError(f"no program {name} in {', '.join(self._objects)}")

    # -- maps ---------------------------------------------------------------------------------
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

    def sync_map(self, name: str, desired: Desired) -> tuple[int, int]:
        """Make the map hold exactly `desired`: write the entries that differ, then delete the
        stale ones. Returns (written, deleted). `desired` is a dict keyed by key bytes (or by
        hashable ctypes scalars), or an iterable of (key, value) pairs, since ctypes structs
        are not hashable."""
        writes, deletes = self._diff(name, desired)
        self._write(name, writes)
        self._delete(name, deletes)
        return len(writes), len(deletes)

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
        for name in ("nm_lb4_be", "nm_lb4_maglev", "nm_lb4_revnat"):
            self._write(name, plans[name][0])
        svc_writes = plans["nm_lb4_svc"][0]

        def slot(k: bytes) -> int:
            return Lb4Key.from_buffer_copy(k).backend_slot

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
        out = {name: (len(w), len(d)) for name, (w, d) in plans.items()}
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

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Release this process's handles; pinned maps and links stay (the kernel keeps
        forwarding)."""
        for r in self._readers:
            r.close()
        self._readers.clear()
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        for obj in self._objects.values():
            obj.close()
        self._objects.clear()

    def destroy(self) -> None:
        """Detach and unpin every link and map of this node, leaving nothing behind."""
        self.close()
        if self.links_dir.is_dir():
            for pin in self.links_dir.iterdir():
                try:
                    with libbpf.Link.from_pin(pin) as link:
                        link.detach()
                except libbpf.BpfError:
                    pass  # defunct already; unpinning frees it
                libbpf.unpin(pin)
            self.links_dir.rmdir()
        if self.pin_dir.is_dir():
            for pin in self.pin_dir.iterdir():
                libbpf.unpin(pin)
            self.pin_dir.rmdir()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
