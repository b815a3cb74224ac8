"""Attach the loaded programs to one node's hooks, as pinned links (see `pins`).

- the socket programs on the node's cgroup (`cgroup-<program>`), which covers every pod;
- the tunnel's socket lookup on the node's network namespace (`netns-tunnel_lookup`);
- the tc programs on each pod veth (`tcx-<ifname>-ingress|egress`);
- the return-path program on the node's underlay device (`netdev-<ifname>-ingress`);
- the proxy's upstream policy check on the proxy's cgroup (`proxy-connect4_proxy`);
- and the proxy return route in the node's namespace (`routing`).

Everything that touches a device (tcx attach, ifindex lookup) runs in the node's network
namespace: the caller's, or `netns` (then a short-lived thread enters it, and the caller's
thread stays where it is).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from nodemesh.datapath import libbpf, routing
from nodemesh.datapath.build import DatapathError
from nodemesh.datapath.pins import Pins

log = logging.getLogger(__name__)

SOCK_PROGRAMS = {
    "connect4": libbpf.BPF_CGROUP_INET4_CONNECT,
    "sendmsg4": libbpf.BPF_CGROUP_UDP4_SENDMSG,
    "recvmsg4": libbpf.BPF_CGROUP_UDP4_RECVMSG,
    "getpeername4": libbpf.BPF_CGROUP_INET4_GETPEERNAME,
}
TC_PROGRAMS = {  # pin suffix -> (program, tcx attach type)
    "ingress": ("from_container", libbpf.BPF_TCX_INGRESS),
    "egress": ("to_container", libbpf.BPF_TCX_EGRESS),
}
# the node Envoy's cgroup (beside the pods' cgroup): its upstream connect()s
PROXY_PROGRAM = "connect4_proxy"
PROXY_PIN = f"proxy-{PROXY_PROGRAM}"
# the node's underlay device: the proxy return path for backends on other nodes
NETDEV_PROGRAM = "from_netdev"
NETDEV_PIN_PREFIX = "netdev-"
# the node namespace's socket lookup: the tunnel's listeners (lib/tunnel.h)
NETNS_PROGRAM = "tunnel_lookup"
NETNS_PIN = f"netns-{NETNS_PROGRAM}"

T = TypeVar("T")


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup/unified on hybrid hosts,
    /sys/fs/cgroup on unified ones."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    raise DatapathError("no cgroup v2 hierarchy is mounted")


class Attachments:
    """The hooks of one node. `objects` is the loader's dict of loaded objects by name (empty
    until it loads them); links are kept by `pins`."""

    def __init__(self, node: str, pins: Pins, cgroup_path: str | Path, netns: str | None,
                 objects: Mapping[str, libbpf.BpfObject]) -> None:
        self.node = node
        self.pins = pins
        self.cgroup_path = Path(cgroup_path)
        self.netns = netns
        self._objects = objects

    def in_netns(self, fn: Callable[[], T]) -> T:
        return libbpf.run_in_netns(self.netns, fn) if self.netns else fn()

    def require_cgroup(self) -> None:
        if not self.cgroup_path.is_dir():
            raise DatapathError(f"cgroup {self.cgroup_path} does not exist")

    def require_loaded(self) -> None:
        if not self._objects:
            raise DatapathError("the datapath is not loaded: call load() first")

    # -- at load: the node-wide hooks, and the links of earlier agents -----------------------
    def attach_node(self) -> None:
        """Attach (or adopt) the socket programs on the node cgroup and the tunnel lookup on
        the node's namespace, and switch the tcx, proxy-cgroup and underlay links of earlier
        agents to this build."""
        self.attach_sock_programs()
        if "bpf_netns" in self._objects:
            self.in_netns(self.attach_netns_program)
        self.adopt_tcx_links()
        self.adopt_host_links()

    def attach_sock_programs(self) -> None:
        sock = self._objects["bpf_sock"]
        cgroup_id = os.stat(self.cgroup_path).st_ino  # a cgroup v2 directory's inode is its id
        for prog_name, attach_type in SOCK_PROGRAMS.items():
            prog = sock.program(prog_name)

            def ok(info: libbpf.LinkInfo, t: int = attach_type) -> bool:
                return (info.type == libbpf.BPF_LINK_TYPE_CGROUP and info.cgroup_id == cgroup_id
                        and info.u1 == t)

            what = self.pins.adopt_link(f"cgroup-{prog_name}", prog, ok,
                                        lambda p=prog: p.attach_cgroup(self.cgroup_path))
            log.info("%s: cgroup %s link %s", self.node, prog_name, what)

    def attach_netns_program(self) -> None:
        """tunnel_lookup on the node's network namespace (it passes every lookup until the
        tunnel is up)."""
        prog = self._objects["bpf_netns"].program(NETNS_PROGRAM)
        ino = os.stat("/proc/thread-self/ns/net").st_ino

        def ok(info: libbpf.LinkInfo) -> bool:
            return info.type == libbpf.BPF_LINK_TYPE_NETNS and info.netns_ino == ino

        what = self.pins.adopt_link(NETNS_PIN, prog, ok, prog.attach_netns)
        log.info("%s: netns %s link %s", self.node, NETNS_PROGRAM, what)

    def adopt_tcx_links(self) -> None:
        """Switch the tcx links of earlier agents to this build (their devices are checked
        again by attach_endpoint)."""
        lxc = self._objects["bpf_lxc"]
        pins = [pin for pin in sorted(self.pins.links_dir.glob("tcx-*"))
                if pin.name.rsplit("-", 1)[-1] in TC_PROGRAMS]
        self.pins.adopt_existing(
            pins, lambda pin: lxc.program(TC_PROGRAMS[pin.name.rsplit("-", 1)[-1]][0]),
            tcx_only=True)

    def adopt_host_links(self) -> None:
        """Switch the proxy-cgroup and underlay links of earlier agents to this build; their
        targets are the agent's to re-check (attach_proxy_cgroup, attach_netdev)."""
        links_dir = self.pins.links_dir
        pins = sorted(links_dir.glob(f"{NETDEV_PIN_PREFIX}*"))
        if (links_dir / PROXY_PIN).exists():
            pins.append(links_dir / PROXY_PIN)

        def program_for(pin: Path) -> libbpf.Program:
            if pin.name == PROXY_PIN:
                return self._objects["bpf_sock"].program(PROXY_PROGRAM)
            return self._objects["bpf_host"].program(NETDEV_PROGRAM)

        self.pins.adopt_existing(pins, program_for)

    # -- pod veths -----------------------------------------------------------------------------
    def attach_endpoint(self, ifname: str) -> int:
        """Attach from_container (tcx ingress) and to_container (tcx egress) to the pod's
        host-side veth, pinned under links/. Idempotent; returns the ifindex."""
        self.require_loaded()
        lxc = self._objects["bpf_lxc"]

        def attach() -> int:
            ifindex = _ifindex(ifname)
            for suffix, (prog_name, attach_type) in TC_PROGRAMS.items():
                prog = lxc.program(prog_name)
                self.pins.adopt_link(f"tcx-{ifname}-{suffix}", prog,
                                     _tcx_link(ifindex, attach_type),
                                     lambda p=prog, s=suffix: p.attach_tcx(ifindex, s == "ingress"))
            return ifindex

        return self.in_netns(attach)

    def check_endpoint(self, ifname: str, ifindex: int) -> list[str]:
        """What is wrong with a pod veth's programs: [] when both tcx links are pinned and
        attached to that device (index `ifindex`) in their direction."""
        self.require_loaded()

        def check() -> list[str]:
            try:
                now = _ifindex(ifname)
            except DatapathError as e:
                return [str(e)]
            problems = []
            if now != ifindex:
                problems.append(f"{ifname} has index {now}, its endpoint was made for {ifindex}")
            for suffix, (prog_name, attach_type) in TC_PROGRAMS.items():
                pin = self.pins.links_dir / f"tcx-{ifname}-{suffix}"
                try:
                    with libbpf.Link.from_pin(pin) as link:
                        info = link.info()
                except (libbpf.BpfError, OSError) as e:
                    problems.append(f"program {prog_name} ({suffix}) has no usable link pin "
                                    f"{pin}: {e}")
                    continue
                if not _tcx_link(now, attach_type)(info):
                    problems.append(f"program {prog_name} is not attached to {ifname} "
                                    f"({suffix}): its link {info.id} is detached")
            return problems

        return self.in_netns(check)

    def detach_endpoint(self, ifname: str) -> None:
        """Detach and unpin the veth's links (the device may already be gone)."""
        for suffix in TC_PROGRAMS:
            self.pins.detach(f"tcx-{ifname}-{suffix}")

    # -- the node's underlay device and the proxy ------------------------------------------
    def attach_netdev(self, ifname: str) -> int:
        """Attach from_netdev (tcx ingress) to the node's underlay device (eth0 of the node
        namespace): the proxy return path for backends on other nodes. It does nothing to a
        packet unless nm_config has ConfigFlags.PROXY_RETURN. Idempotent; returns the
        ifindex. Never attach it to a device of the host's own namespace."""
        self.require_loaded()
        prog = self._objects["bpf_host"].program(NETDEV_PROGRAM)

        def attach() -> int:
            ifindex = _ifindex(ifname)
            self.pins.adopt_link(f"{NETDEV_PIN_PREFIX}{ifname}-ingress", prog,
                                 _tcx_link(ifindex, libbpf.BPF_TCX_INGRESS),
                                 lambda: prog.attach_tcx(ifindex, True))
            return ifindex

        return self.in_netns(attach)

    def detach_netdev(self, ifname: str) -> None:
        """Detach and unpin the underlay device's link (the device may already be gone)."""
        self.pins.detach(f"{NETDEV_PIN_PREFIX}{ifname}-ingress")

    def attach_proxy_cgroup(self, path: str | Path) -> None:
        """Attach connect4_proxy to the node Envoy's cgroup: an upstream connect() bound to a
        local pod's IP must pass that pod's egress policy. The cgroup must be outside the
        node's (pods') cgroup: there the pods' connect4 would redirect Envoy's own upstreams
        back to Envoy. One proxy cgroup per node: attaching another moves the link.
        Idempotent."""
        self.require_loaded()
        cg = Path(path)
        if not cg.is_dir():
            raise DatapathError(f"cgroup {cg} does not exist")
        real, node_cg = cg.resolve(), self.cgroup_path.resolve()
        if real == node_cg or node_cg in real.parents:
            raise DatapathError(f"the proxy cgroup {cg} must not be the node cgroup "
                                f"{self.cgroup_path} or below it")
        if real == cgroup2_root().resolve():
            raise DatapathError("refusing to attach to the root cgroup")
        prog = self._objects["bpf_sock"].program(PROXY_PROGRAM)
        cgroup_id = os.stat(cg).st_ino

        def ok(info: libbpf.LinkInfo) -> bool:
            return (info.type == libbpf.BPF_LINK_TYPE_CGROUP and info.cgroup_id == cgroup_id
                    and info.u1 == libbpf.BPF_CGROUP_INET4_CONNECT)

        what = self.pins.adopt_link(PROXY_PIN, prog, ok, lambda: prog.attach_cgroup(cg))
        log.info("%s: proxy cgroup %s link %s", self.node, cg, what)

    def detach_proxy_cgroup(self) -> None:
        self.pins.detach(PROXY_PIN)

    def install_proxy_routing(self) -> None:
        """routing.install_proxy_routing in this node's namespace; then set_config(...,
        flags=ConfigFlags.PROXY_RETURN)."""
        routing.install_proxy_routing(self.netns)

    def remove_proxy_routing(self) -> None:
        """routing.remove_proxy_routing in this node's namespace (clear the flag first)."""
        routing.remove_proxy_routing(self.netns)


def _ifindex(ifname: str) -> int:
    """The index of a device of the node's namespace (the caller is in it)."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise DatapathError(f"no interface {ifname} in the node's network namespace") from None


def _tcx_link(ifindex: int, attach_type: int):
    """Whether a pinned link is the tcx link of that device and direction (to adopt it)."""
    def ok(info: libbpf.LinkInfo) -> bool:
        return (info.type == libbpf.BPF_LINK_TYPE_TCX and info.tcx_ifindex == ifindex
                and info.tcx_attach_type == attach_type)
    return ok
