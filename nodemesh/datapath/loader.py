"""Load the datapath into a node and keep its maps in sync: the API the agent uses.

`Datapath` owns one node's BPF state under `<bpffs>/<node>/` and is a facade over four parts,
one job each:

- `build.Build`: compile bpf/*.bpf.c into the objects (`ensure_built`);
- `pins.Pins`: the maps pinned by libbpf, by name, shared by bpf_lxc.o, bpf_sock.o, bpf_host.o
  and bpf_netns.o, and the links under `links/`; a new agent adopts them (a pinned map whose
  shape the new build changed is recreated, with its entries carried over where it can be; a
  link of another build is switched to the new program with an atomic link update);
- `attach.Attachments`: the socket programs on the node's cgroup, the tunnel's socket lookup on
  the node's namespace, the tc programs on each pod veth, the proxy's upstream policy check on
  the proxy's cgroup and the return-path program on the node's underlay device;
- `maps.Maps`: typed map handles, writes by diff (`sync_map`, `apply_lb`), events, counters.

`load` ties them together: open each object with its maps pinned, reconcile the pins of an
earlier build, load, then attach (or adopt) the node-wide hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nodemesh.datapath import libbpf
from nodemesh.datapath.attach import Attachments, cgroup2_root
from nodemesh.datapath.build import Build, DatapathError
from nodemesh.datapath.layout import ConfigFlags, EndpointFlags, FlowEvent
from nodemesh.datapath.lb import LbState, is_prime
from nodemesh.datapath.maps import (
    MAGLEV_MAP,
    Counter,
    Desired,
    FlowCountKeyT,
    Maps,
    MetricKey,
    RingReader,
)
from nodemesh.datapath.pins import LinkState, Pins, mount_bpffs, unmount

__all__ = ["Datapath", "DatapathError", "cgroup2_root", "mount_bpffs", "unmount"]


def _map_handle(name: str) -> property:
    return property(lambda self: getattr(self.maps, name), doc=f"the `{name}` map handle")


class Datapath:
    """One node's datapath: build, load, attach, sync, observe, destroy."""

    def __init__(self, node: str, bpffs_dir: str, cgroup_path: str, obj_dir: str = "build/bpf",
                 maglev_table_size: int = 16381, *, netns: str | None = None,
                 src_dir: str | None = None, map_sizes: Mapping[str, int] | None = None,
                 rodata: Mapping[str, int] | None = None) -> None:
        if not node or "/" in node or node.startswith("."):
            raise DatapathError(f"bad node name {node!r}")
        if not is_prime(maglev_table_size):
            raise DatapathError(f"--maglev-table-size {maglev_table_size} is not a prime")
        self.node = node
        self.maglev_m = maglev_table_size
        # max entries (bytes for a ring buffer) set before load, by map name; a map not named
        # keeps its size from bpf/lib/maps.h
        self.map_sizes = dict(map_sizes or {})
        # 64-bit `const volatile` globals set before load, by name, in every object that has one
        # (the budgets of bpf/lib/events.h and bpf/lib/dnslimit.h)
        self.rodata = dict(rodata or {})
        self.netns = libbpf.netns_path(netns) if netns else None
        self._objects: dict[str, libbpf.BpfObject] = {}
        self.build = Build(obj_dir, src_dir)
        self.pins = Pins(node, bpffs_dir)
        self.attachments = Attachments(node, self.pins, cgroup_path, self.netns, self._objects)
        self.maps = Maps(self.pins.pin_dir, maglev_table_size)

    # where things are (the parts' own, named here as before)
    obj_dir = property(lambda self: self.build.obj_dir)
    src_dir = property(lambda self: self.build.src_dir)
    bpffs_dir = property(lambda self: self.pins.bpffs_dir)
    pin_dir = property(lambda self: self.pins.pin_dir)
    links_dir = property(lambda self: self.pins.links_dir)
    cgroup_path = property(lambda self: self.attachments.cgroup_path)

    # -- build --------------------------------------------------------------------------------
    def objects(self) -> list[str]:
        return self.build.objects()

    def object_path(self, name: str) -> Path:
        return self.build.object_path(name)

    def ensure_built(self) -> None:
        self.build.ensure_built()

    # -- load ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Open and load the objects with their maps pinned under <bpffs>/<node>/, then attach
        (or adopt) the socket programs on the node cgroup and adopt existing tcx links."""
        self.pins.require_bpffs()
        self.attachments.require_cgroup()
        self.build.require_objects()
        self.close()
        self.pins.links_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.build.objects():
                obj = libbpf.BpfObject(self.build.object_path(name), self.pins.pin_dir)
                self._objects[name] = obj
                if obj.has_map(MAGLEV_MAP):
                    obj.map(MAGLEV_MAP).set_value_size(4 * self.maglev_m)
                for m in obj.maps():
                    size = self.map_sizes.get(m.name)
                    if size and size != m.max_entries:
                        m.set_max_entries(size)
                if name == "bpf_sock":
                    obj.set_rodata("nm_maglev_m", self.maglev_m.to_bytes(4, "little"))
                for var, value in self.rodata.items():
                    if obj.has_rodata(var):
                        obj.set_rodata(var, value.to_bytes(8, "little"))
                self.pins.reconcile_maps(obj)
                obj.load()
                self.pins.restore_migrated()
            self.attachments.attach_node()
        except BaseException:
            self.pins.forget_migrated()
            self.close()
            raise

    def program(self, name: str) -> libbpf.Program:
        """A loaded program by name, from whichever object has it (prog_test_run, info)."""
        self.attachments.require_loaded()
        for obj in self._objects.values():
            if any(p.name == name for p in obj.programs()):
                return obj.program(name)
        raise DatapathError(f"no program {name} in {', '.join(self._objects)}")

    def links(self) -> list[LinkState]:
        """Every pinned link of this node with its kernel ids."""
        return self.pins.links()

    # -- attach -------------------------------------------------------------------------------
    def attach_endpoint(self, ifname: str) -> int:
        return self.attachments.attach_endpoint(ifname)

    def detach_endpoint(self, ifname: str) -> None:
        self.attachments.detach_endpoint(ifname)

    def check_endpoint(self, ifname: str, ifindex: int) -> list[str]:
        return self.attachments.check_endpoint(ifname, ifindex)

    def attach_netdev(self, ifname: str) -> int:
        return self.attachments.attach_netdev(ifname)

    def detach_netdev(self, ifname: str) -> None:
        self.attachments.detach_netdev(ifname)

    def attach_proxy_cgroup(self, path: str | Path) -> None:
        self.attachments.attach_proxy_cgroup(path)

    def detach_proxy_cgroup(self) -> None:
        self.attachments.detach_proxy_cgroup()

    def install_proxy_routing(self) -> None:
        self.attachments.install_proxy_routing()

    def remove_proxy_routing(self) -> None:
        self.attachments.remove_proxy_routing()

    # -- maps ---------------------------------------------------------------------------------
    def map(self, name: str) -> libbpf.Map[Any, Any]:
        return self.maps.map(name)

    config = _map_handle("config")
    endpoints = _map_handle("endpoints")
    ipcache = _map_handle("ipcache")
    policy = _map_handle("policy")
    policy_cidr = _map_handle("policy_cidr")
    ct = _map_handle("ct")
    services = _map_handle("services")
    backends = _map_handle("backends")
    revnat = _map_handle("revnat")
    maglev = _map_handle("maglev")
    affinity = _map_handle("affinity")
    reverse_sk = _map_handle("reverse_sk")
    metrics = _map_handle("metrics")
    flowcnt = _map_handle("flowcnt")
    l7_redir = _map_handle("l7_redir")
    lxc = _map_handle("lxc")
    pod_netns = _map_handle("pod_netns")

    def set_endpoint(self, ifindex: int, ipv4: str, identity: int,
                     flags: EndpointFlags = EndpointFlags.NONE,
                     netns_cookie: int | None = None) -> None:
        self.maps.set_endpoint(ifindex, ipv4, identity, flags, netns_cookie)

    def remove_endpoint(self, ifindex: int) -> None:
        self.maps.remove_endpoint(ifindex)

    def set_lxc(self, ipv4: str, ifindex: int, identity: int) -> None:
        self.maps.set_lxc(ipv4, ifindex, identity)

    def set_netns(self, cookie: int, identity: int, ifindex: int) -> None:
        self.maps.set_netns(cookie, identity, ifindex)

    def remove_netns(self, cookie: int) -> None:
        self.maps.remove_netns(cookie)

    def set_l7_redirect(self, addr: str, port: int, proxy_port: int, policy_id: int = 0,
                        identity: int = 0) -> None:
        self.maps.set_l7_redirect(addr, port, proxy_port, policy_id, identity)

    def set_config(self, node_ip: str, dns_ip: str = "0.0.0.0", proxy_ip: str = "0.0.0.0",
                   flags: ConfigFlags = ConfigFlags.NONE) -> None:
        self.maps.set_config(node_ip, dns_ip, proxy_ip, flags)

    def set_tunnel_listeners(self, pid: int, ports: Mapping[int, int]) -> dict[int, int]:
        self.attachments.require_loaded()
        return self.maps.set_tunnel_listeners(pid, ports)

    def tunnel_listener_cookies(self) -> dict[int, int]:
        return self.maps.tunnel_listener_cookies()

    def sync_map(self, name: str, desired: Desired) -> tuple[int, int]:
        return self.maps.sync_map(name, desired)

    def apply_lb(self, state: LbState) -> dict[str, tuple[int, int]]:
        return self.maps.apply_lb(state)

    def current_lb_state(self) -> LbState:
        return self.maps.current_lb_state()

    # -- observe ------------------------------------------------------------------------------
    def open_events(self, callback: Callable[[FlowEvent], None],
                    raw: bool = False) -> RingReader:
        return self.maps.open_events(callback, raw)

    def read_metrics(self) -> dict[MetricKey, Counter]:
        return self.maps.read_metrics()

    def read_flow_counters(self) -> dict[FlowCountKeyT, Counter]:
        return self.maps.read_flow_counters()

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Release this process's handles; pinned maps and links stay (the kernel keeps
        forwarding)."""
        self.maps.close()
        for obj in self._objects.values():
            obj.close()
        self._objects.clear()

    def destroy(self) -> None:
        """Detach and unpin every link and map of this node, leaving nothing behind."""
        self.close()
        self.pins.destroy()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
