/* SPDX-License-Identifier: GPL-2.0 */
/* Budgets: a GCRA token bucket (one 64-bit time per key) in an LRU map of struct rate_bucket.
 * `cost_ns` is 1 s / the rate; `tolerance_ns` is cost_ns * the burst. Updates race between CPUs;
 * a budget is then a little loose, never tighter. */
#pragma once

#include "common.h"

/* 0: within the budget (it is charged); 1: over it. *over gets how many were over before this
 * one (for sampling), when over. */
static __always_inline int budget_over(void *map, const void *key, __u64 now, __u64 cost_ns,
				       __u64 tolerance_ns, __u64 *over)
{
	struct rate_bucket *b = bpf_map_lookup_elem(map, key);

	if (!b) {
		struct rate_bucket init = { .tat = now + cost_ns };

		bpf_map_update_elem(map, key, &init, BPF_ANY);
		return 0;
	}
	__u64 tat = b->tat > now ? b->tat : now;

	if (tat - now > tolerance_ns) {
		*over = __sync_fetch_and_add(&b->over, 1);
		return 1;
	}
	b->tat = tat + cost_ns;
	return 0;
}
