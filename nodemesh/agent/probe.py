"""The kubelet's probes of the agent in Kubernetes mode: ``python3 -m nodemesh.agent.probe``.

The agent's health is on its root-only unix socket (no TCP port a probe could reach on a
host-network pod without exposing it on the node's address). The probe asks the agent there and
exits 0 when it answers well: ``live`` (the default) asks ``/healthz``; ``ready`` asks ``/status``,
which answers 503 while the agent stops. The node and the state directory come from the
arguments or the container's environment (``NODE_NAME``, ``NODEMESH_STATE_DIR``).
"""

from __future__ import annotations

import argparse
import os
import sys

from nodemesh.cluster.agentclient import AgentClient
from nodemesh.errors import NodemeshError


def agent_socket(state_dir: str, node: str) -> str:
    return os.path.join(state_dir, "nodes", node, "agent.sock")


def probe(state_dir: str, node: str, what: str = "live", timeout: float = 3.0) -> str | None:
    """None when the agent answers `what` well, else why not."""
    client = AgentClient(agent_socket(state_dir, node), node, timeout=timeout)
    try:
        client.get("/healthz" if what == "live" else "/status")
    except NodemeshError as e:
        return e.message
    except OSError as e:
        return f"node {node}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m nodemesh.agent.probe")
    p.add_argument("what", nargs="?", choices=("live", "ready"), default="live")
    p.add_argument("--node", default=os.environ.get("NODE_NAME"))
    p.add_argument("--state-dir", default=os.environ.get("NODEMESH_STATE_DIR", "/var/run/nodemesh"))
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    if not args.node:
        print("probe: no node: pass --node or set NODE_NAME", file=sys.stderr)
        return 2
    why = probe(args.state_dir, args.node, args.what, args.timeout)
    if why is not None:
        print(f"probe {args.what}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
