/* SPDX-License-Identifier: GPL-2.0 */
/* A per-pod budget for UDP queries to the node-local DNS, in the kernel (hostile neighbours,
 * docs/reliability.md): a pod that floods the DNS address has its queries over the budget
 * dropped on its own veth, before they reach the DNS server's socket queue, so the other pods'
 * lookups are not stuck behind the flood. The budget is a GCRA token bucket per veth
 * (nm_dns_limit, lib/budget.h): nm_dns_qps queries a second, bursts of nm_dns_burst (set by
 * the loader from cluster.json "limits"; 0: no budget). By default it is twice the DNS server's
 * own per-client budget (nodemesh/cluster/dns.py), so a pod a little over it still gets
 * REFUSED answers from the server and only a flood is cut here. Drops are counted in nm_metrics
 * (reason DROP_RATE_LIMITED); one in NM_DNS_EVENT_EVERY gets a flow event, so the flood cannot
 * flood the events ring and the agent either. */
#pragma once

#include "common.h"
#include "maps.h"
#include "budget.h"

#define NM_DNS_EVENT_EVERY 256
const volatile __u64 nm_dns_qps = 2000;
const volatile __u64 nm_dns_burst = 4000;

static __always_inline int is_dns_query(const struct nm_pkt *p, const struct node_config *cfg)
{
	return cfg && cfg->dns_ip && p->protocol == IPPROTO_UDP && p->daddr == cfg->dns_ip &&
	       p->dport == bpf_htons(53);
}

/* 0: within the budget; 1: over it, drop (and *event says whether this drop gets an event). */
static __always_inline int dns_over_budget(__u32 ifindex, __u64 now, int *event)
{
	__u64 over = 0, qps = nm_dns_qps;

	*event = 0;
	if (!qps)
		return 0;
	__u64 cost = 1000000000ULL / qps;
	int r = budget_over(&nm_dns_limit, &ifindex, now, cost, cost * nm_dns_burst, &over);

	*event = r && over % NM_DNS_EVENT_EVERY == 0;
	return r;
}
