"""What a cluster has on this machine, found the way `nodemesh down` removes it: by name (network
namespaces, the cgroup tree), by state dir (mounts, processes that name it) — so `down` can
check its own work and tests, the benchmark and the conformance runner can assert a clean
machine."""

from __future__ import annotations

import contextlib
import os


def leftovers(name: str, state_dir: str, *, include_state_dir: bool = True) -> list[str]:
    """Everything of cluster `name` (state in `state_dir`) still on the machine; [] when clean."""
    found: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        found += [f"netns {n}" for n in sorted(os.listdir("/run/netns"))
                  if n.startswith(name + "-")]
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.isdir(os.path.join(root, name)):
            found.append(f"cgroup {root}/{name}")
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f
                  if line.split()[4].startswith(state_dir.rstrip("/") + "/")
                  or line.split()[4] == state_dir]
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state_dir in cmd or f"/{name}/" in cmd:
            found.append(f"process {pid}: {cmd[:120]}")
    if include_state_dir and os.path.exists(state_dir):
        found.append(f"state dir {state_dir}")
    return found
