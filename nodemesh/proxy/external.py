"""The node Envoy when the agent does not start it: ``"proxy": "external"`` in cluster.json.

On Kubernetes the node Envoy runs in a DaemonSet of its own (deploy/kubernetes/10-envoy.yaml), so
that restarting or upgrading the agent never restarts Envoy. The two halves meet in the node's
Envoy directory (``<state>/nodes/<node>/envoy``, a host directory both pods mount):

- the agent writes the bootstrap there (`write_bootstrap`: ADS over the agent's unix socket
  ``xds.sock``, admin on ``admin.sock``), serves xDS as always, and adopts the Envoy it finds
  recorded in ``envoy.json`` (as it adopts the one a previous agent started);
- the Envoy container runs ``python3 -m nodemesh.proxy.external ENVOY_DIR``: it waits for the
  bootstrap, records itself in ``envoy.json`` (its PID and start time: with ``hostPID`` both pods
  see the same PIDs), and becomes Envoy by exec (same process, so the record stays true).

Envoy reconnects to the xDS socket within seconds of an agent restart (the bootstrap's retry
backoff), and keeps serving meanwhile with what it has.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from nodemesh.host.files import read_json, write_json_atomic
from nodemesh.host.procs import ProcRef

BOOTSTRAP = "envoy-bootstrap.json"
PIDFILE = "envoy.json"


def write_bootstrap(envoy_dir: str, config: dict) -> str:
    """The agent's half: the bootstrap the Envoy container waits for (rewritten only when it
    changed, so a waiting launcher never reads half a file)."""
    os.makedirs(envoy_dir, exist_ok=True)
    path = os.path.join(envoy_dir, BOOTSTRAP)
    if read_json(path) != config:
        write_json_atomic(path, config)
    return path


def launch_argv(envoy_dir: str, envoy_path: str, concurrency: int = 2,
                log_level: str = "warning") -> list[str]:
    # No hot restart: its shared memory does not cross pods; a restarted container is a new
    # Envoy that takes over the listeners from xDS.
    return [envoy_path, "-c", os.path.join(envoy_dir, BOOTSTRAP), "--disable-hot-restart",
            "--concurrency", str(concurrency), "-l", log_level]


def record(envoy_dir: str, config: dict, argv: list[str], ref: ProcRef) -> dict:
    """What ``envoy.json`` says of an external Envoy (the fields `EnvoyProcess.adopt` reads)."""
    admin = ((config.get("admin") or {}).get("address") or {}).get("pipe", {}).get("path")
    return {**ref.to_json(), "node_id": (config.get("node") or {}).get("id", ""),
            "admin": {"socket_path": admin, "host": "127.0.0.1", "port": 15000,
                      "netns_path": None},
            "log": None, "bootstrap": os.path.join(envoy_dir, BOOTSTRAP), "argv": argv,
            "hotRestart": None, "external": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m nodemesh.proxy.external",
                                description="run the node Envoy from the bootstrap its agent writes")
    p.add_argument("envoy_dir")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--wait", type=float, default=0.0,
                   help="give up after this many seconds without a bootstrap (0: wait forever)")
    args = p.parse_args(argv)
    path = os.path.join(args.envoy_dir, BOOTSTRAP)
    deadline = time.monotonic() + args.wait if args.wait else None
    while (config := read_json(path)) is None:
        if deadline is not None and time.monotonic() > deadline:
            print(f"nodemesh-envoy: no bootstrap at {path} after {args.wait:.0f} s: is the "
                  "node's agent running with \"proxy\": \"external\"?", file=sys.stderr)
            return 1
        time.sleep(0.5)
    from nodemesh.proxy.envoy import envoy_binary

    cmd = launch_argv(args.envoy_dir, envoy_binary(), args.concurrency, args.log_level)
    rec = record(args.envoy_dir, config, cmd, ProcRef.of(os.getpid()))  # type: ignore[arg-type]
    if rec["admin"]["socket_path"]:
        # A socket left by an Envoy that was killed would make this one fail to bind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec["admin"]["socket_path"])
    write_json_atomic(os.path.join(args.envoy_dir, PIDFILE), rec)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
