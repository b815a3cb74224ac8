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
