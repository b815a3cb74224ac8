/* SPDX-License-Identifier: GPL-2.0 */
/* Flow events and counters.
 *
 * Events go to the nm_events ring buffer with BPF_RB_NO_WAKEUP: a wakeup costs 12-15 us on
 * these machines, more than the whole program, so the agent drains the ring on a timer instead.
 * When the ring is full the event is lost, never the packet. Counters are per-CPU maps. */
#pragma once

#include "budget.h"

#include "maps.h"

static __always_inline void counter_add(struct metrics_val *v, __u32 len)
{
	/* Per-CPU slot, but a socket program (process context) can be interrupted on the same
	 * CPU by a tc program updating the same slot: atomics are cheap without contention. */
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, len);
}

static __always_inline void metrics_add(__u8 reason, __u8 direction, __u8 verdict, __u32 len)
{
	struct metrics_key key = { .reason = reason, .direction = direction, .verdict = verdict };
	struct metrics_val *v = bpf_map_lookup_elem(&nm_metrics, &key);

	if (v) {
		counter_add(v, len);
	} else {
		struct metrics_val init = { .packets = 1, .bytes = len };

		bpf_map_update_elem(&nm_metrics, &key, &init, BPF_NOEXIST);
	}
}

static __always_inline void flowcnt_add(__u32 src_identity, __u32 dst_identity, __be16 dport,
					__u8 protocol, __u8 verdict, __u8 direction, __u32 len)
{
	struct flow_count_key key = {
		.src_identity = src_identity,
		.dst_identity = dst_identity,
		.dport = dport,
		.protocol = protocol,
		.verdict = verdict,
		.direction = direction,
	};
	struct metrics_val *v = bpf_map_lookup_elem(&nm_flowcnt, &key);

	if (v) {
		counter_add(v, len);
	} else {
		struct metrics_val init = { .packets = 1, .bytes = len };

		bpf_map_update_elem(&nm_flowcnt, &key, &init, BPF_NOEXIST);
	}
}

/* A full ring buffer loses the event; the loss is counted in nm_lost for the agent to report. */
static __always_inline void count_lost_event(void)
{
	__u32 slot = 0;
	__u64 *lost = bpf_map_lookup_elem(&nm_lost, &slot);

	if (lost)
		*lost += 1;
}

/* Flow events' budget per source (hostile neighbours: a pod opening 100k connections a second
 * must not spend the agent's CPU on reading about them): nm_event_rate events a second per veth
 * (or per socket's network namespace), bursts of nm_event_burst, above what a busy pod's real
 * traffic makes. The loader sets both from cluster.json "limits" (0: no budget). Suppressed
 * events are counted per source in nm_event_budget (the agent reports them as lost events,
 * source "event_budget"); every packet stays counted in nm_metrics and nm_flowcnt, so drops are
 * never silent. */
#define NM_EVENT_SOCK_KEY (1ULL << 63) /* | netns cookie: a socket hook's source */
const volatile __u64 nm_event_rate = 20000;
const volatile __u64 nm_event_burst = 40000;

static __always_inline int event_suppressed(__u64 source)
{
	__u64 over = 0, rate = nm_event_rate;

	if (!rate)
		return 0;
	__u64 cost = 1000000000ULL / rate;

	return budget_over(&nm_event_budget, &source, bpf_ktime_get_ns(), cost,
			   cost * nm_event_burst, &over);
}

/* A packet event (EV_TRACE for a new connection, EV_DROP for a drop) from a tc hook. */
static __always_inline void emit_flagged_event(const struct nm_pkt *p, __u8 type, __u8 verdict,
					       __u8 reason, __u8 direction, __u32 ifindex,
					       __u32 src_identity, __u32 dst_identity,
					       __u32 policy_id, __u8 flags)
{
	if (event_suppressed(ifindex))
		return;

	struct flow_event *e = bpf_ringbuf_reserve(&nm_events, sizeof(*e), 0);

	if (!e) {
		count_lost_event();
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->type = type;
	e->verdict = verdict;
	e->reason = reason;
	e->direction = direction;
	e->ifindex = ifindex;
	e->saddr = p->saddr;
	e->daddr = p->daddr;
	e->sport = p->sport;
	e->dport = p->protocol == IPPROTO_ICMP ? bpf_htons((__u16)p->icmp_type) : p->dport;
	e->protocol = p->protocol;
	e->tcp_flags = p->tcp_flags;
	e->rev_nat_index = 0;
	e->src_identity = src_identity;
	e->dst_identity = dst_identity;
	e->policy_id = policy_id;
	e->len = p->len;
	e->netns_cookie = 0;
	e->orig_daddr = 0;
	e->orig_dport = 0;
	e->flags = flags;
	e->pad = 0;
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

static __always_inline void emit_packet_event(const struct nm_pkt *p, __u8 type, __u8 verdict,
					      __u8 reason, __u8 direction, __u32 ifindex,
					      __u32 src_identity, __u32 dst_identity,
					      __u32 policy_id)
{
	emit_flagged_event(p, type, verdict, reason, direction, ifindex, src_identity,
			   dst_identity, policy_id, 0);
}

/* The ring buffer has no value type, and clang only emits BTF for types that a map, a global or
 * a program signature reaches: this anchor puts struct flow_event into the objects' BTF so the
 * layout test can compare it with its Python twin. The section is not a map section; libbpf
 * skips it at load. */
static const struct flow_event nm_btf_flow_event __attribute__((used))
	SEC(".nm.btf_anchor") = {};
