"""Build and remove the nodes of a local cluster and the underlay that joins them.

Each node is a network namespace with one interface (`eth0`) on a bridge that lives in a
namespace of its own (the underlay). Nodes route each other's pod CIDRs over it. There is no
uplink and no default route anywhere: nothing can leave the machine.
"""

from __future__ import annotations

import ipaddress

from nodemesh.cluster.config import NODE_DNS_IP, POD_GATEWAY, UNDERLAY_CIDR, ClusterConfig
from nodemesh.host import cgroup, netns

BRIDGE = "br0"


def underlay_port(node_index: int) -> str:
    return f"u{node_index}"


def create_underlay(cfg: ClusterConfig) -> None:
    ns = cfg.underlay_netns
    netns.add_netns(ns)
    if not netns.link_exists(BRIDGE, ns):
        netns.ip_batch([f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up",
                        "link set lo up"], ns)


def create_node(cfg: ClusterConfig, node_name: str) -> None:
    """Create (or complete) one node: namespace, underlay link, addresses, routes, sysctls."""
    node = cfg.node(node_name)
    ns = cfg.node_netns(node.name)
    netns.add_netns(ns)
    port = underlay_port(node.index)
    prefix = ipaddress.ip_network(UNDERLAY_CIDR).prefixlen
    if not netns.link_exists("eth0", ns):
        # Created in the underlay namespace, then one end moved into the node.
        netns.ip_batch([f"link add {port} type veth peer name eth0 netns {ns}",
                        f"link set {port} master {BRIDGE}", f"link set {port} up"],
                       cfg.underlay_netns)
    cmds = [
        "link set lo up",
        f"addr replace {node.ip}/{prefix} dev eth0",
        "link set eth0 up",
        # The pods' gateway and the node-local DNS answer on the node's loopback.
        f"addr replace {POD_GATEWAY}/32 dev lo",
        f"addr replace {NODE_DNS_IP}/32 dev lo",
    ]
    for other in cfg.nodes:
        if other.name != node.name:
            cmds.append(f"route replace {other.pod_cidr} via {other.ip} dev eth0")
    netns.ip_batch(cmds, ns)
    _node_sysctls(ns)
    cgroup.create(cfg.node_cgroup(node.name))
    cgroup.create(cfg.proxy_cgroup(node.name))


def _node_sysctls(ns: str) -> None:
    netns.run(["ip", "netns", "exec", ns, "sh", "-c",
               "echo 1 > /proc/sys/net/ipv4/ip_forward;"
               "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter;"
               "echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter;"
               "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;"
               "echo '{} {}' > /proc/sys/net/ipv4/ip_local_port_range".format(
                   *netns.NODE_PORT_RANGE)])


def member_port(index: int) -> str:
    return f"e{index}"


def create_store_members(cfg: ClusterConfig) -> None:
    """The etcd members' namespaces on the underlay (one `eth0` each, no other route), and the
    underlay namespace's own address on the bridge, from which the daemon and the CLI reach
    them (docs/store.md)."""
    prefix = ipaddress.ip_network(UNDERLAY_CIDR).prefixlen
    access_ip = cfg.store.get("access_ip")
    if access_ip:
        netns.ip_batch([f"addr replace {access_ip}/{prefix} dev {BRIDGE}"], cfg.underlay_netns)
    for i, m in enumerate(cfg.store_members, start=1):
        ns = m["netns"]
        netns.add_netns(ns)
        port = member_port(i)
        if not netns.link_exists("eth0", ns):
            netns.ip_batch([f"link add {port} type veth peer name eth0 netns {ns}",
                            f"link set {port} master {BRIDGE}", f"link set {port} up"],
                           cfg.underlay_netns)
        netns.ip_batch(["link set lo up", f"addr replace {m['ip']}/{prefix} dev eth0",
                        "link set eth0 up"], ns)


def create_cluster_network(cfg: ClusterConfig) -> None:
    cgroup.create(cfg.cgroup_dir)
    create_underlay(cfg)
    create_store_members(cfg)
    for node in cfg.nodes:
        create_node(cfg, node.name)


def remove_cluster_network(cfg: ClusterConfig) -> None:
    """Remove every namespace whose name carries the cluster's prefix, and its cgroup tree."""
    for ns in netns.list_netns(f"{cfg.name}-"):
        netns.delete_netns(ns)
    cgroup.remove_tree(cfg.cgroup_dir)
