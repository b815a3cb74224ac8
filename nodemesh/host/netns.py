"""Network namespaces and links through iproute2, and entering namespaces through setns(2).

Python 3.11 has no `os.setns`, so `enter` calls libc directly. Named namespaces live under
/run/netns as `ip netns` keeps them. Everything here is a thin wrapper: callers decide what to
build, these functions only run the commands and turn failures into readable errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading

from nodemesh.errors import NodemeshError

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def setns_path(path: str, nstype: int) -> None:
    """Move the calling thread into the namespace at `path` (a /run/netns file or /proc/PID/ns/X)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def enter_netns(name: str) -> None:
    setns_path(netns_path(name), CLONE_NEWNET)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18


def make_mounts_private() -> None:
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")


def bind_mount(src: str, dst: str) -> None:
    _check(_libc.mount(src.encode(), dst.encode(), None, MS_BIND, None), f"bind {src} on {dst}")


def mount(source: str, target: str, fstype: str) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None),
           f"mount {fstype} on {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), 2), f"umount {target}")  # MNT_DETACH


def sethostname(name: str) -> None:
    b = name.encode()
    _check(_libc.sethostname(b, len(b)), "sethostname")


def run(args: list[str], *, input: str | None = None, check: bool = True) -> str:
    """Run a command and return its stdout; a failure raises with the command's own message."""
    p = subprocess.run(args, input=input, capture_output=True, text=True)
    if check and p.returncode != 0:
        msg = (p.stderr or p.stdout).strip()
        raise NodemeshError(f"{' '.join(args[:6])}{' ...' if len(args) > 6 else ''}: {msg}")
    return p.stdout


def ip_batch(commands: list[str], netns: str | None = None) -> None:
    """Run several `ip` commands in one process (one fork for a whole pod's plumbing)."""
    if not commands:
        return
    args = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    run(args, input="\n".join(commands) + "\n")


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def list_netns(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def add_netns(name: str) -> None:
    if not netns_exists(name):
        run(["ip", "netns", "add", name])


def delete_netns(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "delete", name], check=False)
        # `ip netns delete` leaves the file behind when the mount is busy; try once more by hand.
        if os.path.exists(netns_path(name)):
            with contextlib.suppress(OSError):
                umount(netns_path(name))
            with contextlib.suppress(OSError):
                os.unlink(netns_path(name))


def link_exists(ifname: str, netns: str | None = None) -> bool:
    args = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", ifname]
    return subprocess.run(args, capture_output=True).returncode == 0


# Ephemeral (source) ports, disjoint between a node's namespace (its Envoy's transparent
# upstream connections carry a client pod's address with a port the node's kernel picks) and
# the pods' namespaces (the pod's own connections): a pod's connection and one the node Envoy
# makes for that pod can never have the same addresses and ports, which would leave one of them
# hanging at the destination (docs/l7.md, "Source ports").
NODE_PORT_RANGE = (1024, 19999)
POD_PORT_RANGE = (20000, 65000)


def write_sysctl(key: str, value: str) -> None:
    """Set a sysctl of the calling thread's network namespace (/proc/sys/net is per netns)."""
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


# ---- a whole process in a namespace, for clients of a networked store --------------------------
# setns(2) moves one thread. A thread created afterwards inherits its creator's namespace, so a
# process that moves while it has only one thread moves for good: every thread it starts later
# (gRPC's pollers, resolvers, executors included) makes its sockets there. A process that already
# runs threads cannot be moved as a whole; `enter_process_netns` refuses it rather than leave some
# threads behind. `in_netns_thread` runs one call in a fresh thread of another namespace (a socket
# created there stays there, and a child started there starts there), which is how such a process
# still reaches its original namespace (the host's loopback, agents that bind metrics on it).

_original_netns_fd: int | None = None


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _ns_id(path: str) -> int:
    """The inode of a namespace: from the link's text under /proc (readable without ptrace
    rights over the process, unlike stat through it), from the file for a /run/netns mount."""
    if path.startswith("/proc/"):
        return int(os.readlink(path).partition("[")[2].rstrip("]"))
    return os.stat(path).st_ino


def current_netns_id() -> int:
    """The network namespace of the calling thread (not the process's main thread)."""
    return _ns_id(f"/proc/self/task/{threading.get_native_id()}/ns/net")


def has_route_to(ip: str) -> bool:
    """Whether the calling thread's namespace has a route to `ip` other than a default route
    (main table): where only the default route leads, traffic to it leaves the machine (the
    host's namespace), or goes nowhere."""
    import ipaddress
    import struct

    addr = int(ipaddress.IPv4Address(ip))
    if ipaddress.IPv4Address(ip).is_loopback:
        return True
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/net/route") as f:
            lines = f.read().splitlines()[1:]
    except FileNotFoundError:
        return False
    for line in lines:
        fields = line.split()
        # (addresses in hex, as the kernel holds them: network order read as a native int)
        dest, mask = (int.from_bytes(struct.pack("=I", int(h, 16)), "big")
                      for h in (fields[1], fields[7]))
        if mask and addr & mask == dest:
            return True
    return False


def enter_process_netns(name: str) -> None:
    """Move this whole process into network namespace `name`, once, before any thread runs.

    The namespace the process came from stays reachable through `in_original_netns`. A no-op
    when the process is there already."""
    global _original_netns_fd
    target = netns_path(name)
    if not os.path.exists(target):
        raise NodemeshError(f"network namespace {name} does not exist (is the cluster up? "
                            "`nodemesh up` creates it)")
    if current_netns_id() == _ns_id(target):
        return
    if thread_count() != 1:
        raise NodemeshError(f"cannot move into network namespace {name}: the process already "
                            f"runs {thread_count()} threads (enter it before starting any)")
    fd = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    setns_path(target, CLONE_NEWNET)
    if _original_netns_fd is None:
        _original_netns_fd = fd
    else:
        os.close(fd)


def in_netns_thread(path: str | int, fn, *args, **kwargs):
    """Call fn(*args, **kwargs) in a new thread that first enters the network namespace at
    `path` (a file, or an open fd of one); return its result or raise its exception."""
    result: list = []

    def run() -> None:
        try:
            if isinstance(path, int):
                _check(_libc.setns(path, CLONE_NEWNET), "setns")
            else:
                setns_path(path, CLONE_NEWNET)
            result.append((True, fn(*args, **kwargs)))
        except BaseException as e:
            result.append((False, e))

    t = threading.Thread(target=run, name="netns-call")
    t.start()
    t.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def in_original_netns(fn, *args, **kwargs):
    """fn(...) in the namespace the process was in before `enter_process_netns` (directly when
    it never moved)."""
    if _original_netns_fd is None:
        return fn(*args, **kwargs)
    return in_netns_thread(_original_netns_fd, fn, *args, **kwargs)


def enter_for_store(store: dict | None) -> None:
    """Put this process where it can reach the cluster's store over the network.

    `store` is cluster.json's ``store``: an etcd on the local cluster's underlay names the
    namespace its clients outside the nodes use (``access_netns``, the underlay's, which holds
    an address on the bridge); the process moves there as a whole (call it before any thread
    starts). SQLite, or an etcd the user runs (reached from where the caller is): nothing to do.
    """
    ns = (store or {}).get("access_netns")
    if (store or {}).get("type") == "etcd" and ns:
        enter_process_netns(ns)


def check_store_netns(store: dict | None) -> None:
    """Refuse to connect to the local cluster's etcd from a namespace without a route to its
    members, such as the host's: there their addresses (172.30.0.x) would follow the default
    route off the machine. A store client calls this before it opens a connection (agents are
    in their node's namespace, the daemon and the CLI in the underlay's: both pass)."""
    s = store or {}
    if s.get("type") != "etcd" or not s.get("access_netns"):
        return
    hosts = [u.partition("://")[2].rsplit(":", 1)[0] for u in s.get("endpoints") or []]
    if not all(has_route_to(h) for h in hosts):
        raise NodemeshError(
            "refusing to connect to the cluster's etcd from the host's network namespace "
            f"(its members are reachable only on the underlay): call "
            f"nodemesh.host.netns.enter_for_store() first, or run inside {s['access_netns']}")
