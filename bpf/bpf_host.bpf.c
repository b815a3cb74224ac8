/* SPDX-License-Identifier: GPL-2.0 */
/* The node's underlay device (eth0 of the node namespace), tcx ingress.
 *
 * One job: the return path of the node Envoy's upstream connections to backends on other
 * nodes. Envoy connects with the client pod's address (original_src), so the backend's reply
 * arrives here addressed to a local pod; it belongs to Envoy's transparent socket in this
 * namespace, and plain routing would forward it to the pod. A TCP packet that matches a
 * non-listening socket of this namespace is marked PROXY_MARK, which the agent's rule turns
 * into local delivery (lib/proxy.h). Everything else passes untouched: no parsing beyond the
 * TCP ports, no counters, no events, and nothing at all unless CFG_F_PROXY_RETURN is set. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/proxy.h"

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
	proxy_return_mark(skb, ip->saddr, ip->daddr, th->source, th->dest);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
