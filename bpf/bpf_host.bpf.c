/* SPDX-License-Identifier: GPL-2.0 */
/* The node's underlay device (eth0 of the node namespace), tcx ingress.
 *
 * Two jobs. The inbound side of the mutual-TLS tunnel (lib/tunnel.h): the SYN of a TCP
 * connection from another node to a local pod that the tunnel covers (EP_F_TUNNEL_IN) is handed
 * to the node Envoy's inbound listener, or dropped when that listener is not there (nothing
 * reaches such a pod around the tunnel). And the return path of the node Envoy's upstream
 * connections to backends on other nodes. Envoy connects with the client pod's address (original_src), so the backend's reply
 * arrives here addressed to a local pod; it belongs to Envoy's transparent socket in this
 * namespace, and plain routing would forward it to the pod. A TCP packet that matches a
 * non-listening socket of this namespace is marked PROXY_MARK, which the agent's rule turns
 * into local delivery (lib/proxy.h). Everything else passes untouched: no parsing beyond the
 * TCP ports, no counters, no events, and nothing at all unless CFG_F_PROXY_RETURN is set. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/drop_reasons.h"
#include "lib/identity.h"
#include "lib/events.h"
#include "lib/proxy.h"
#include "lib/tunnel.h"

/* A SYN for a local pod that the tunnel covers: to the inbound listener. 0: not such a packet
 * (go on), 1: handed over, < 0: -reason, to be dropped. */
static __always_inline int tunnel_inbound(struct __sk_buff *skb, const struct node_config *cfg,
					  const struct iphdr *ip, const struct tcphdr *th,
					  struct lxc_info **lxc_out)
{
	__u8 flags = ((const __u8 *)th)[13];

	if ((flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN || !tunnel_enabled(cfg))
		return 0;

	__be32 daddr = ip->daddr;
	struct lxc_info *lxc = bpf_map_lookup_elem(&nm_lxc, &daddr);

	if (!lxc)
		return 0;

	__u32 ifindex = lxc->ifindex;
	struct endpoint_info *ep = bpf_map_lookup_elem(&nm_endpoints, &ifindex);

	if (!ep || !(ep->flags & EP_F_TUNNEL_IN))
		return 0;
	*lxc_out = lxc;

	int r = tunnel_assign(skb, ip->saddr, th->source, cfg, TUNNEL_IN_PORT);

	return r ? -r : 1;
}

/* A new connection from the network straight to the tunnel listeners' ports (they bind the
 * wildcard address, see mtls.tunnel): they take only what the socket lookup hands them, so the
 * node refuses these at the wire, counted as the host's policy drop. */
static __always_inline int tunnel_port_from_network(const struct node_config *cfg,
						    const struct iphdr *ip,
						    const struct tcphdr *th)
{
	__u8 flags = ((const __u8 *)th)[13];
	__be32 daddr = ip->daddr;

	if ((flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN || !tunnel_enabled(cfg))
		return 0;
	if (th->dest != bpf_htons(TUNNEL_OUT_PORT) && th->dest != bpf_htons(TUNNEL_IN_PORT))
		return 0;
	return bpf_map_lookup_elem(&nm_lxc, &daddr) == 0;
}

SEC("tc")
int from_netdev(struct __sk_buff *skb)
{
	/* skb->protocol is metadata: non-IPv4 leaves before any map or packet access */
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;

	struct node_config *cfg = node_config();

	if (!cfg || !(cfg->flags & CFG_F_PROXY_RETURN))
		return TC_ACT_OK;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP || ip->ihl < 5 ||
	    (ip->frag_off & bpf_htons(0x1fff)))
		return TC_ACT_OK;

	struct tcphdr *th = (void *)ip + (__u32)(ip->ihl & 0xf) * 4;

	if ((void *)(th + 1) > data_end)
		return TC_ACT_OK;

	/* The inbound tunnel first: a SYN is never a reply to one of the node's sockets, and a
	 * TIME-WAIT socket of an earlier tunnelled connection on the same tuple must not catch it. */
	struct lxc_info *lxc = 0;
	int t = tunnel_inbound(skb, cfg, ip, th, &lxc);

	if (t > 0)
		return TC_ACT_OK;
	if (t < 0 && lxc) {
		struct nm_pkt p = {
			.saddr = ip->saddr, .daddr = ip->daddr, .sport = th->source,
			.dport = th->dest, .protocol = IPPROTO_TCP, .tcp_flags = TCP_FLAG_SYN,
			.len = skb->len,
		};
		__u32 src_identity = identity_of(ip->saddr, cfg);
		__u32 dst_identity = lxc->identity;
		__u32 ifindex = lxc->ifindex;

		metrics_add((__u8)-t, DIR_INGRESS, VERDICT_DROPPED, p.len);
		flowcnt_add(src_identity, dst_identity, p.dport, IPPROTO_TCP, VERDICT_DROPPED,
			    DIR_INGRESS, p.len);
		emit_packet_event(&p, EV_DROP, VERDICT_DROPPED, (__u8)-t, DIR_INGRESS, ifindex,
				  src_identity, dst_identity, 0);
		return TC_ACT_SHOT;
	}
	if (t == 0 && tunnel_port_from_network(cfg, ip, th)) {
		struct nm_pkt p = {
			.saddr = ip->saddr, .daddr = ip->daddr, .sport = th->source,
			.dport = th->dest, .protocol = IPPROTO_TCP, .tcp_flags = TCP_FLAG_SYN,
			.len = skb->len,
		};
		__u32 src_identity = identity_of(ip->saddr, cfg);

		metrics_add(DROP_POLICY_DENIED, DIR_INGRESS, VERDICT_DROPPED, p.len);
		flowcnt_add(src_identity, IDENTITY_HOST, p.dport, IPPROTO_TCP, VERDICT_DROPPED,
			    DIR_INGRESS, p.len);
		emit_packet_event(&p, EV_DROP, VERDICT_DROPPED, DROP_POLICY_DENIED, DIR_INGRESS,
				  skb->ifindex, src_identity, IDENTITY_HOST, 0);
		return TC_ACT_SHOT;
	}
	proxy_return_mark(skb, ip->saddr, ip->daddr, th->source, th->dest);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
