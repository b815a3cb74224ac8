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
