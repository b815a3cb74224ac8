"""Memory of processes (RSS, PSS, private; from /proc/PID/smaps_rollup) and of a node's pinned
BPF maps (memlock, from `bpftool map show pinned`)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

FIELDS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "private", "Private_Dirty": "private"}


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """Bytes of RSS, PSS and private (clean + dirty) memory of one process, or None if gone."""
    out = {"rss": 0, "pss": 0, "private": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                key = parts[0].rstrip(":")
                if key in FIELDS and len(parts) >= 2:
                    out[FIELDS[key]] += int(parts[1]) * 1024
    except OSError:
        return None
    return out


def processes_memory(pids: list[int]) -> dict[str, Any]:
    """Summed RSS/PSS/private bytes of `pids` (the processes still alive are counted)."""
    total = {"rss": 0, "pss": 0, "private": 0}
    n = 0
    for pid in pids:
        m = smaps_rollup(pid)
        if m is None:
            continue
        n += 1
        for k in total:
            total[k] += m[k]
    return {**total, "processes": n}


def bpf_maps_memlock(pin_dir: str) -> dict[str, Any]:
    """memlock bytes of every map pinned directly under `pin_dir` (the node's maps)."""
    maps: dict[str, int] = {}
    try:
        names = sorted(os.listdir(pin_dir))
    except OSError:
        return {"bytes": 0, "maps": {}, "error": f"{pin_dir}: not found"}
    for name in names:
        path = os.path.join(pin_dir, name)
        if os.path.isdir(path):
            continue
        p = subprocess.run(["bpftool", "-j", "map", "show", "pinned", path],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            continue
        try:
            info = json.loads(p.stdout)
        except ValueError:
            continue
        maps[name] = int(info.get("bytes_memlock", 0))
    return {"bytes": sum(maps.values()), "maps": maps}
