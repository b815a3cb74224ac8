/* SPDX-License-Identifier: GPL-2.0 */
/* A per-pod budget for UDP queries to the node-local DNS, in the kernel (hostile neighbours,
 * docs/reliability.md): a pod that floods the DNS address has its queries over the budget
 * dropped on its own veth, before they reach the DNS server's socket queue, so the other pods'
 * lookups are not stuck behind the flood. The budget is a GCRA token bucket per veth
 * (nm_dns_limit, struct dns_bucket): NM_DNS_QPS queries a second, bursts of NM_DNS_BURST. It is twice the DNS
 * server's own per-client budget (nodemesh/cluster/dns.py), so a pod a little over it still gets
 * REFUSED answers from the server and only a flood is cut here. Drops are counted in nm_metrics
 * (reason DROP_RATE_LIMITED); one in NM_DNS_EVENT_EVERY gets a flow event, so the flood cannot
 * flood the events ring and the agent either. */
#pragma once

#include "common.h"
#include "maps.h"

#define NM_DNS_QPS         2000
#define NM_DNS_BURST       4000
#define NM_DNS_EVENT_EVERY 256
#define NM_DNS_COST_NS     (1000000000ULL / NM_DNS_QPS)
#define NM_DNS_TOLERANCE_NS (NM_DNS_COST_NS * NM_DNS_BURST)

static __always_inline int is_dns_query(const struct nm_pkt *p, const struct node_config *cfg)
{
	return cfg && cfg->dns_ip && p->protocol == IPPROTO_UDP && p->daddr == cfg->dns_ip &&
	       p->dport == bpf_htons(53);
}

/* 0: within the budget; 1: over it, drop (and *event says whether this drop gets an event).
 * Updates race between CPUs; the budget is then a little loose, never tighter. */
static __always_inline int dns_over_budget(__u32 ifindex, __u64 now, int *event)
{
	struct dns_bucket *b = bpf_map_lookup_elem(&nm_dns_limit, &ifindex);

	*event = 0;
	if (!b) {
		struct dns_bucket init = { .tat = now + NM_DNS_COST_NS };

		bpf_map_update_elem(&nm_dns_limit, &ifindex, &init, BPF_ANY);
		return 0;
	}
	__u64 tat = b->tat > now ? b->tat : now;

	if (tat - now > NM_DNS_TOLERANCE_NS) {
		__u64 n = __sync_fetch_and_add(&b->dropped, 1);

		*event = n % NM_DNS_EVENT_EVERY == 0;
		return 1;
	}
	b->tat = tat + NM_DNS_COST_NS;
	return 0;
}
