"""cgroup v2: find the unified hierarchy, create and remove groups, move and kill processes.

On hybrid hosts (this one) the v2 tree is mounted at /sys/fs/cgroup/unified; on most current
distributions /sys/fs/cgroup itself is the v2 mount. Socket BPF programs attach to a node's group
and cover every pod group below it.
"""

from __future__ import annotations

import contextlib
import os
import time

from nodemesh.errors import NodemeshError

CGROUP2_SUPER_MAGIC = 0x63677270


def find_cgroup2_root() -> str:
    """The mount point of the cgroup v2 hierarchy."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    candidates = []
    for parts in mounts:
        sep = parts.index("-")
        if parts[sep + 1] == "cgroup2":
            candidates.append(parts[4])
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in candidates:
            return preferred
    if candidates:
        return candidates[0]
    raise NodemeshError("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); "
                        "nodemesh needs cgroup v2 for its socket programs")


def create(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def add_process(path: str, pid: int) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def kill_all(path: str) -> None:
    """SIGKILL every process in the group and its descendants (cgroup.kill, kernel >= 5.14)."""
    kill_file = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill_file):
        with contextlib.suppress(OSError), open(kill_file, "w") as f:
            f.write("1")


def remove_tree(path: str, timeout: float = 5.0) -> None:
    """Kill what runs in `path` and below, then remove the groups, deepest first."""
    if not os.path.isdir(path):
        return
    kill_all(path)
    deadline = time.monotonic() + timeout
    while True:
        busy = False
        for root, dirs, _ in os.walk(path, topdown=False):
            for d in dirs:
                try:
                    os.rmdir(os.path.join(root, d))
                except FileNotFoundError:
                    pass
                except OSError:
                    busy = True
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            busy = True
        if not busy:
            return
        if time.monotonic() > deadline:
            raise NodemeshError(f"cgroup {path} is still busy after {timeout:.0f}s "
                                f"(processes: {procs(path)})")
        kill_all(path)
        time.sleep(0.05)
