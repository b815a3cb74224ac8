"""One pod's sandbox: its network namespace, the veth to its node, its address and its cgroup.

Runs in the node's network namespace (the agent's). The pod gets `eth0` with its /32 address and
a default route through the gateway address the caller names; the node gets `lxc…` with a /32 route to the
pod. Creation is idempotent (an agent that died half-way finishes the job), and removal takes
whatever is left.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodemesh.host import cgroup, netns


@dataclass(frozen=True)
class Sandbox:
    uid: str
    netns: str
    host_ifname: str
    ip: str
    cgroup: str

    def to_json(self) -> dict:
        return {"uid": self.uid, "netns": self.netns, "hostInterface": self.host_ifname,
                "ip": self.ip, "cgroup": self.cgroup}

    @classmethod
    def from_json(cls, d: dict) -> Sandbox:
        return cls(d["uid"], d["netns"], d["hostInterface"], d["ip"], d["cgroup"])


def create(sb: Sandbox, gateway: str) -> None:
    """Create the sandbox with its default route via `gateway`; the caller must be in the node's
    network namespace."""
    netns.add_netns(sb.netns)
    if not netns.link_exists(sb.host_ifname):
        if netns.link_exists("eth0", sb.netns):  # a half-made pod from an earlier attempt
            netns.ip_batch(["link del eth0"], sb.netns)
        netns.ip_batch([f"link add {sb.host_ifname} type veth peer name eth0 netns {sb.netns}"])
    netns.ip_batch([
        "link set lo up",
        f"addr replace {sb.ip}/32 dev eth0",
        "link set eth0 up",
        f"route replace {gateway} dev eth0 scope link",
        f"route replace default via {gateway} dev eth0",
    ], sb.netns)
    netns.ip_batch([
        f"link set {sb.host_ifname} up",
        f"route replace {sb.ip}/32 dev {sb.host_ifname}",
    ])
    cgroup.create(sb.cgroup)


def remove(sb: Sandbox) -> None:
    """Remove the sandbox (processes in its cgroup are killed first)."""
    cgroup.remove_tree(sb.cgroup)
    netns.delete_netns(sb.netns)  # takes eth0 and, with it, the node's end of the veth
    if netns.link_exists(sb.host_ifname):
        netns.ip_batch([f"link del {sb.host_ifname}"])
