"""Flow-rate load test: N new flows per second through one node; does the agent stay bounded?

`python -m nodemesh.bench.loadtest [--rate 5000] [--seconds 20]` brings up a 1-node cluster in
a private state dir, runs a UDP client that opens a new flow (a new source port) for every
datagram to a server pod at a fixed rate (each flow is two datapath events: the client's egress
and the server's ingress), and samples the node agent's CPU time, RSS, flow-ring fill and lost
events every second. It prints one JSON object with the figures and removes the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

from nodemesh.cluster.agentclient import AgentClient

CLIENT = r"""
import socket, sys, time
ip, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
interval = 1.0 / rate; t0 = time.monotonic(); n = 0
while True:
    due = t0 + n * interval
    now = time.monotonic()
    if now - t0 > seconds:
        break
    if due > now:
        time.sleep(due - now)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", (ip, 9000)); s.close(); n += 1
print(n)
"""

MANIFEST = """
apiVersion: v1
kind: Pod
metadata: {name: sink, labels: {app: sink}}
spec:
  containers:
  - {name: sink, image: nodemesh/echo, args: ["--udp=9000"], ports: [{containerPort: 9000, protocol: UDP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: source, labels: {app: source}}
spec:
  containers: [{name: c, image: debian, command: [sleep, infinity]}]
"""


def _nm(state: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", state, *args],
                          capture_output=True, text=True, check=True, **kw)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(rate: float, seconds: float) -> dict:
    state = tempfile.mkdtemp(prefix="nodemesh-flowload-")
    name = "nmfl" + uuid.uuid4().hex[:6]
    _nm(state, "up", "--nodes", "1", "--name", name, timeout=120)
    try:
        _nm(state, "apply", "-f", "-", input=MANIFEST)
        deadline = time.monotonic() + 60
        while True:
            pods = json.loads(_nm(state, "get", "pods", "-o", "json").stdout)["items"]
            if len(pods) == 2 and all(p.get("status", {}).get("phase") == "Running" for p in pods):
                break
            if time.monotonic() > deadline:
                raise SystemExit("pods did not start")
            time.sleep(0.2)
        sink_ip = next(p["status"]["podIP"] for p in pods if p["metadata"]["name"] == "sink")
        client = AgentClient(os.path.join(state, "nodes", "node1", "agent.sock"), "node1")
        agent_pid = client.get("/status")["pid"]
        before = client.get("/status")
        cpu0, t0 = _cpu_seconds(agent_pid), time.monotonic()
        gen = subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", state, "exec",
                                "source", "--", sys.executable, "-c", CLIENT, sink_ip, str(rate),
                                str(seconds)], stdout=subprocess.PIPE, text=True)
        samples = []
        while gen.poll() is None:
            time.sleep(1.0)
            st = client.get("/status")
            samples.append({"t": round(time.monotonic() - t0, 1),
                            "cpu_s": round(_cpu_seconds(agent_pid) - cpu0, 2),
                            "rss_mib": round(_rss_mib(agent_pid), 1),
                            "ring": st["flows"]["ring"], "total": st["flows"]["total"],
                            "lost": st["flows"]["lostEvents"]})
        sent = int(gen.stdout.read().strip() or 0) if gen.stdout else 0
        time.sleep(0.5)
        after = client.get("/status")
        elapsed = time.monotonic() - t0
        cpu = _cpu_seconds(agent_pid) - cpu0
        flows = after["flows"]["total"] - before["flows"]["total"]
        return {
            "rate_asked": rate, "seconds": round(elapsed, 1), "datagrams_sent": sent,
            "flows_recorded": flows, "flows_per_second": round(flows / elapsed),
            "agent_cpu_seconds": round(cpu, 2), "agent_cpu_percent": round(100 * cpu / elapsed, 1),
            "agent_cpu_us_per_flow": round(1e6 * cpu / max(flows, 1), 1),
            "agent_rss_mib_max": max(s["rss_mib"] for s in samples) if samples else None,
            "ring_capacity": after["flows"]["capacity"],
            "ring_max": max(s["ring"] for s in samples) if samples else None,
            "lost_events": after["flows"]["lostEvents"], "samples": samples,
        }
    finally:
        subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", state, "down"],
                       capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nodemesh.bench.loadtest")
    ap.add_argument("--rate", type=float, default=2500.0,
                    help="new UDP flows per second (each is two flow records)")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.rate, args.seconds), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
