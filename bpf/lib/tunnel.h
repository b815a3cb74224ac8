/* SPDX-License-Identifier: GPL-2.0 */
/* The kernel side of the mutual-TLS tunnel between node Envoys (docs/security.md).
 *
 * Source node: a pod's new TCP connection to a pod of another node (the ipcache says so with
 * IPC_F_TUNNEL, the agent's choice per destination and port) is handed by from_container to
 * the node Envoy's outbound listener (proxy_ip:TUNNEL_OUT_PORT, IP_TRANSPARENT) with
 * bpf_sk_assign, and every packet of it is marked PROXY_MARK, which the proxy routing rule turns
 * into local delivery: the connection ends in Envoy with its original addresses and nothing of
 * it is routed out in clear. Envoy carries it in mutual TLS with the client workload's
 * certificate to the same destination address, bound to the client's address (original_src).
 *
 * Destination node: from_netdev hands the SYN of a TCP connection from another node to a local
 * pod whose mode is not DISABLE to the inbound listener (proxy_ip:TUNNEL_IN_PORT); the rest of
 * the connection's packets find the accepted socket by the return-path lookup (lib/proxy.h).
 * Envoy checks the client's certificate and connects to the pod with the client's address, so
 * the pod's own veth still applies its L3/L4 policy to the real client.
 *
 * Without the listener (no Envoy, or it is restarting) the packet is dropped, never sent on in
 * clear: a tunnelled destination is reached through the tunnel or not at all. */
#pragma once

#include "maps.h"
#include "drop_reasons.h"

static __always_inline int tunnel_enabled(const struct node_config *cfg)
{
	return cfg && cfg->proxy_ip && (cfg->flags & CFG_F_TUNNEL);
}

/* Does TCP to daddr:dport leave this node through the tunnel? The flags of the address's ipcache
 * entry `e`, with nm_tunnel_port for ports whose mode differs from their pod's. */
static __always_inline int tunnel_wanted(const struct ipcache_entry *e, __be32 daddr,
					 __be16 dport)
{
	if (!e || !(e->flags & (IPC_F_TUNNEL | IPC_F_TUNNEL_PORTS)))
		return 0;
	if (e->flags & IPC_F_TUNNEL_PORTS) {
		struct tunnel_port_key pk = { .addr = daddr, .port = dport };
		struct tunnel_port_val *v = bpf_map_lookup_elem(&nm_tunnel_port, &pk);

		if (v)
			return v->tunnel;
	}
	return (e->flags & IPC_F_TUNNEL) != 0;
}

/* A SYN for the tunnel: mark it for local delivery, where the node's socket lookup finds the
 * connection's own socket (a TIME-WAIT of an earlier connection on the same tuple, which then
 * makes room for it) or, for a new one, the netns socket-lookup program (bpf_netns.bpf.c) hands
 * it to Envoy's listener on proxy_ip:port. Handing the SYN to the listener here with
 * bpf_sk_assign would skip that first step: the kernel then drops a SYN whose tuple a TIME-WAIT
 * socket still holds. 0, or the drop reason when the listener is not there. */
static __always_inline int tunnel_assign(struct __sk_buff *skb, __be32 saddr, __be16 sport,
					 const struct node_config *cfg, __u16 port)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	int listening;

	tuple.ipv4.saddr = saddr;
	tuple.ipv4.sport = sport;
	tuple.ipv4.daddr = cfg->proxy_ip;
	tuple.ipv4.dport = bpf_htons(port);
	sk = bpf_sk_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return DROP_SOCKET_LOOKUP_FAILED;
	listening = sk->state == BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	if (!listening)
		return DROP_SOCKET_LOOKUP_FAILED;
	skb->mark = (skb->mark & ~PROXY_MARK_MASK) | PROXY_MARK;
	return 0;
}

static __always_inline void tunnel_mark(struct __sk_buff *skb)
{
	skb->mark = (skb->mark & ~PROXY_MARK_MASK) | PROXY_MARK;
}
