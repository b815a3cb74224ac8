/* SPDX-License-Identifier: GPL-2.0 */
/* The kernel side of the node Envoy (docs/l7.md): which destinations go to the proxy, and how
 * replies find the proxy's transparent upstream sockets.
 *
 * Envoy's upstream connections carry the client pod's address (original_src: an IP_TRANSPARENT
 * socket bound to the client's IP), so a backend's reply is addressed to the client pod, and
 * plain routing would hand it to that pod, which knows nothing of the connection. Before that
 * happens (on the backend's veth when it is local, on the node's underlay device when it is
 * not) we ask the node namespace's TCP socket table whether the packet belongs to one of its
 * own sockets; if it does, PROXY_MARK makes the routing rule deliver it locally. */
#pragma once

#include "maps.h"

/* The local pod a socket belongs to, by its network namespace, or 0 (not a pod the agent
 * told us about: the node itself, a pod not yet programmed). */
static __always_inline struct netns_info *netns_client(__u64 netns_cookie)
{
	return bpf_map_lookup_elem(&nm_netns, &netns_cookie);
}

/* The node Envoy's listener for a connection of a client with this identity to addr:port, or
 * 0: the entry for that identity, else the one for any client (identity 0). Only clients some
 * L7 rule covers have one; the others go straight to the destination, whose L3/L4 policy
 * decides (Cilium's order: L3/L4 in the kernel first, L7 in the proxy). TCP only: Envoy's L7
 * filters are HTTP/gRPC, and the return path below is TCP's. */
static __always_inline struct l7_redir_val *l7_redirect_lookup(__be32 addr, __be16 port,
							       __u8 protocol, __u32 identity)
{
	struct l7_redir_key key = {
		.addr = addr,
		.port = port,
		.protocol = protocol,
		.identity = identity,
	};
	struct l7_redir_val *r;

	if (protocol != IPPROTO_TCP)
		return 0;
	if (identity != IDENTITY_ANY) {
		r = bpf_map_lookup_elem(&nm_l7_redir, &key);
		if (r)
			return r;
		key.identity = IDENTITY_ANY;
	}
	return bpf_map_lookup_elem(&nm_l7_redir, &key);
}

/* Does the packet saddr:sport -> daddr:dport belong to a TCP socket of the current (node)
 * network namespace that is not a listener? Listeners are excluded because a wildcard listener
 * of the node (0.0.0.0:80) would otherwise claim every forwarded packet to port 80; the
 * established/SYN-SENT/TIME-WAIT/request sockets found by the 4-tuple are exactly the node's
 * own connections. If so, mark the packet for local delivery and say so. */
static __always_inline int proxy_return_mark(struct __sk_buff *skb, __be32 saddr, __be32 daddr,
					     __be16 sport, __be16 dport)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	int own;

	/* The tuple as the receiving socket sees it: source = the remote end (the backend). */
	tuple.ipv4.saddr = saddr;
	tuple.ipv4.daddr = daddr;
	tuple.ipv4.sport = sport;
	tuple.ipv4.dport = dport;
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	own = sk->state != BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	if (!own)
		return 0;
	skb->mark = (skb->mark & ~PROXY_MARK_MASK) | PROXY_MARK;
	return 1;
}

/* The per-packet gate: only with the agent's route in place, only TCP. */
static __always_inline int proxy_return_enabled(const struct node_config *cfg, __u8 protocol)
{
	return protocol == IPPROTO_TCP && cfg && (cfg->flags & CFG_F_PROXY_RETURN);
}

/* Hairpin: the node Envoy picked the client pod itself as the backend. Its upstream socket is
 * bound to the pod's own address (original_src), so the packet that enters the pod (A) reads
 * A:E -> A:dport: A's kernel drops it as a martian (its own address from outside), and, let in
 * with accept_local, would answer A:dport -> A:E inside its own namespace, never to Envoy.
 * As Cilium does with its loopback address, to_container rewrites the source to
 * nm_config.proxy_ip (169.254.42.1): A sees proxy_ip:E -> A:dport (identity host), conntrack
 * marks the entry CT_F_HAIRPIN, and from_container rewrites A's replies proxy_ip:E <- A:dport
 * back to A:dport -> A:E, the tuple Envoy's socket has, before the return path delivers them
 * to it. TCP and UDP (addresses are in their checksums' pseudo-header). */
#define NM_IP_CSUM_OFF  (ETH_HLEN + __builtin_offsetof(struct iphdr, check))
#define NM_IP_SADDR_OFF (ETH_HLEN + __builtin_offsetof(struct iphdr, saddr))
#define NM_IP_DADDR_OFF (ETH_HLEN + __builtin_offsetof(struct iphdr, daddr))

/* Rewrite the IPv4 address at addr_off (NM_IP_SADDR_OFF / NM_IP_DADDR_OFF) of a TCP or UDP
 * packet from `from` to `to`: the L4 checksum (pseudo-header: also right for CHECKSUM_PARTIAL
 * packets, whose checksum field holds the pseudo-header sum; a UDP checksum of 0, "none", stays
 * 0), the IP header checksum, the address. 0, or nonzero when a helper failed. Invalidates
 * every packet pointer. */
static __always_inline int nat_rewrite_addr(struct __sk_buff *skb, __u8 protocol, __u32 addr_off,
					    __be32 from, __be32 to)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u64 l4_flags = BPF_F_PSEUDO_HDR | sizeof(to);
	__u32 csum_off;

	if ((void *)(ip + 1) > data_end)
		return -1;
	csum_off = ETH_HLEN + (__u32)(ip->ihl & 0xf) * 4;
	if (protocol == IPPROTO_TCP) {
		csum_off += __builtin_offsetof(struct tcphdr, check);
	} else {
		csum_off += __builtin_offsetof(struct udphdr, check);
		l4_flags |= BPF_F_MARK_MANGLED_0;
	}
	if (bpf_l4_csum_replace(skb, csum_off, from, to, l4_flags))
		return -1;
	if (bpf_l3_csum_replace(skb, NM_IP_CSUM_OFF, from, to, sizeof(to)))
		return -1;
	return bpf_skb_store_bytes(skb, addr_off, &to, sizeof(to), 0);
}

/* to_container, for a packet whose source is the pod's own address (the caller compared: the
 * only cost plain traffic pays). It can come only from a socket of the node namespace: the pod's
 * own packets to itself never leave it, another pod's packets carrying it are dropped at that
 * pod's veth (the source check), and a forwarded packet has no socket here (one that early
 * demux gave a socket is dropped by ip_forward). So it is translated only with skb->sk set,
 * with proxy_ip set, and for TCP/UDP; otherwise it goes on untouched (and the pod drops it, as
 * before).
 * 1: translated (p->saddr is now proxy_ip), 0: not a hairpin, < 0: the rewrite failed. */
static __always_inline int hairpin_snat(struct __sk_buff *skb, struct nm_pkt *p,
					const struct node_config *cfg)
{
	if (!cfg || !cfg->proxy_ip || !skb->sk ||
	    (p->protocol != IPPROTO_TCP && p->protocol != IPPROTO_UDP))
		return 0;
	if (nat_rewrite_addr(skb, p->protocol, NM_IP_SADDR_OFF, p->saddr, cfg->proxy_ip))
		return -1;
	p->saddr = cfg->proxy_ip;
	return 1;
}

/* Is pod_ip:sport -> pod_ip:dport (a pod's reply, as the receiving socket sees it) for a socket
 * of the node namespace bound to pod_ip? TCP: any socket but a listener (the 4-tuple is
 * exact); UDP: the socket the lookup picks, if bound to the pod's address (a wildcard-bound
 * socket of the node is not the one that sent from it). */
static __always_inline int hairpin_socket(struct __sk_buff *skb, __u8 protocol, __be32 pod_ip,
					  __be16 sport, __be16 dport)
{
	struct bpf_sock_tuple tuple = {};
	int own;

	tuple.ipv4.saddr = pod_ip;
	tuple.ipv4.daddr = pod_ip;
	tuple.ipv4.sport = sport;
	tuple.ipv4.dport = dport;
	if (protocol == IPPROTO_TCP) {
		struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
							 BPF_F_CURRENT_NETNS, 0);

		if (!sk)
			return 0;
		own = sk->state != BPF_TCP_LISTEN;
		bpf_sk_release(sk);
		return own;
	}
	struct bpf_sock *sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4),
						BPF_F_CURRENT_NETNS, 0);

	if (!sk)
		return 0;
	own = sk->src_ip4 == pod_ip;
	bpf_sk_release(sk);
	return own;
}

/* from_container, a reply on a CT_F_HAIRPIN connection: p is pod_ip:dport -> proxy_ip:E. With
 * the return route in place and the proxy's socket (pod_ip:E <-> pod_ip:dport) still there,
 * rewrite the destination to pod_ip and mark the packet for local delivery, as every reply to
 * the proxy's upstreams. Otherwise it stays addressed to proxy_ip, an address of the node, which
 * answers it (a RST, a port unreachable) in the tuple the pod knows; un-translated, it would be
 * routed back into the pod as a new hairpin. 1: delivered to the proxy, 0: left, < 0: the
 * rewrite failed. */
static __always_inline int hairpin_reply(struct __sk_buff *skb, const struct nm_pkt *p,
					 __be32 pod_ip, const struct node_config *cfg)
{
	if (!cfg || !(cfg->flags & CFG_F_PROXY_RETURN) ||
	    (p->protocol != IPPROTO_TCP && p->protocol != IPPROTO_UDP))
		return 0;
	if (!hairpin_socket(skb, p->protocol, pod_ip, p->sport, p->dport))
		return 0;
	if (nat_rewrite_addr(skb, p->protocol, NM_IP_DADDR_OFF, p->daddr, pod_ip))
		return -1;
	skb->mark = (skb->mark & ~PROXY_MARK_MASK) | PROXY_MARK;
	return 1;
}
