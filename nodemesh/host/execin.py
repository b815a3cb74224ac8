"""Run a command inside a running pod: its cgroup, then its network, UTS and mount namespaces.

`run(spec)` forks the command with a pre-exec step that joins the pod. A process that has used
gRPC (the etcd store's client) must not run Python in a forked child: `nodemesh exec` on etcd
hands the same spec to ``python -m nodemesh.host.execin SPEC`` by exec, a fresh process image
without gRPC's threads, which then forks as usual.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from nodemesh.host import cgroup, netns


def run(spec: dict[str, Any]) -> int:
    """Run ``spec["cmd"]`` in the pod whose shim is ``spec["shim_pid"]``; its exit code (126
    when it cannot run, 127 when it is not there, 128 + N when killed by signal N)."""
    cmd = spec["cmd"]

    def enter() -> None:
        cgroup.add_process(spec["cgroup"], os.getpid())
        for ns, flag in (("net", netns.CLONE_NEWNET), ("uts", netns.CLONE_NEWUTS),
                         ("mnt", netns.CLONE_NEWNS)):
            netns.setns_path(f"/proc/{spec['shim_pid']}/ns/{ns}", flag)
        os.chdir(spec.get("cwd") or "/")
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    try:
        p = subprocess.run(cmd, env=spec["env"], preexec_fn=enter)
    except FileNotFoundError:
        print(f"error: {cmd[0]}: command not found in the pod", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"error: {cmd[0]}: permission denied", file=sys.stderr)
        return 126
    return p.returncode if p.returncode >= 0 else 128 - p.returncode


def exec_fresh(spec: dict[str, Any]) -> None:
    """Replace this process by ``python -m nodemesh.host.execin`` running `spec` (no return)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "nodemesh.host.execin", json.dumps(spec)])


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
