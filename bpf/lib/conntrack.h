/* SPDX-License-Identifier: GPL-2.0 */
/* Connection tracking, one entry per connection and direction.
 *
 * An entry is keyed by the tuple as first seen at a hook plus the direction it was seen in:
 * from_container creates DIR_EGRESS entries (the pod opened the connection), to_container
 * creates DIR_INGRESS entries (someone opened a connection to the pod). A packet is
 *   ESTABLISHED when its own tuple and direction have an entry,
 *   REPLY       when the reversed tuple has an entry of the other direction (the pod answers a
 *               connection made to it, or gets the answer to its own),
 *   RELATED     when it is an ICMP error about a tracked connection,
 *   NEW         otherwise: the caller makes the one policy decision and creates the entry.
 * The two ends of a pod-to-pod connection on one node therefore have two entries that differ
 * only in the direction byte, each owned by its pod.
 *
 * Lifetimes follow Cilium's defaults: 60 s until the other side answered a TCP connection, 6 h
 * for an established TCP connection, 10 s once both sides sent FIN (or anyone sent RST), 60 s of
 * idleness for UDP, ICMP and the rest. The map is an LRU: an expired entry is simply a miss and is
 * overwritten, no garbage collector is needed. */
#pragma once

#include "maps.h"

#define CT_LIFETIME_SYN_NS    (60ULL * NS_PER_SEC)
#define CT_LIFETIME_TCP_NS    (21600ULL * NS_PER_SEC)
#define CT_LIFETIME_CLOSE_NS  (10ULL * NS_PER_SEC)
#define CT_LIFETIME_NONTCP_NS (60ULL * NS_PER_SEC)
/* Rewrite expires_ns only when it moves by more than this: every write dirties a cache line
 * that other CPUs handling the same connection read. */
#define CT_REFRESH_NS         (1ULL * NS_PER_SEC)

enum ct_status {
	CT_NEW = 0,
	CT_ESTABLISHED,
	CT_REPLY,
	CT_RELATED,
};

static __always_inline void ct_key_of(struct ct_key *k, const struct nm_pkt *p, __u8 direction)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->sport = p->sport;
	k->dport = p->protocol == IPPROTO_ICMP ? 0 : p->dport;
	k->protocol = p->protocol;
	k->direction = direction;
	k->pad = 0;
}

/* The key the other end of the connection has: addresses swapped, ports swapped (ICMP keeps
 * the echo id in sport), the other direction. */
static __always_inline void ct_key_reverse(struct ct_key *r, const struct ct_key *k)
{
	r->saddr = k->daddr;
	r->daddr = k->saddr;
	if (k->protocol == IPPROTO_ICMP) {
		r->sport = k->sport;
		r->dport = k->dport;
	} else {
		r->sport = k->dport;
		r->dport = k->sport;
	}
	r->protocol = k->protocol;
	r->direction = k->direction ^ 1;
	r->pad = 0;
}

static __always_inline __u64 ct_lifetime(__u8 protocol, __u8 closing, __u8 flags)
{
	if (protocol != IPPROTO_TCP)
		return CT_LIFETIME_NONTCP_NS;
	if ((closing & CT_CLOSING_ALL) == CT_CLOSING_ALL)
		return CT_LIFETIME_CLOSE_NS;
	if (flags & CT_F_REPLY_SEEN)
		return CT_LIFETIME_TCP_NS;
	return CT_LIFETIME_SYN_NS;
}

static __always_inline int ct_alive(const struct ct_entry *e, const struct nm_pkt *p, __u64 now,
				    int is_reply)
{
	if (e->expires_ns <= now)
		return 0;
	/* A bare SYN from the opener on a tuple whose connection is closing is a new connection
	 * reusing the ports: it gets a fresh policy decision. */
	if (!is_reply && p->protocol == IPPROTO_TCP && e->closing &&
	    (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return 0;
	return 1;
}

static __always_inline void ct_refresh(struct ct_entry *e, const struct nm_pkt *p, int is_reply,
				       __u64 now)
{
	__u8 closing = e->closing;
	__u8 flags = e->flags;

	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, p->len);
	if (is_reply)
		flags |= CT_F_REPLY_SEEN;
	if (p->protocol == IPPROTO_TCP) {
		if (p->tcp_flags & TCP_FLAG_RST)
			closing |= CT_CLOSING_ALL;
		else if (p->tcp_flags & TCP_FLAG_FIN)
			closing |= is_reply ? CT_CLOSING_RX : CT_CLOSING_TX;
		if ((e->tcp_flags_seen | p->tcp_flags) != e->tcp_flags_seen)
			e->tcp_flags_seen |= p->tcp_flags;
	}
	if (closing != e->closing)
		e->closing = closing;
	if (flags != e->flags)
		e->flags = flags;

	__u64 expires = now + ct_lifetime(p->protocol, closing, flags);

	/* Shortening (closing) always lands; lengthening only when worth a write. */
	if (expires < e->expires_ns || expires - e->expires_ns > CT_REFRESH_NS)
		e->expires_ns = expires;
}

/* ICMP errors about a tracked connection: the embedded packet is one the pod (or its peer)
 * sent, in either orientation of the connection. */
static __always_inline int ct_lookup_related(const struct nm_pkt *p, __u8 direction, __u64 now)
{
	struct ct_key k = {
		.saddr = p->inner_saddr,
		.daddr = p->inner_daddr,
		.sport = p->inner_sport,
		.dport = p->inner_dport,
		.protocol = p->inner_protocol,
		.direction = direction ^ 1,
	};
	struct ct_key r;
	struct ct_entry *e;

	e = bpf_map_lookup_elem(&nm_ct, &k);
	if (e && e->expires_ns > now)
		return 1;
	ct_key_reverse(&r, &k);
	r.direction = direction;
	e = bpf_map_lookup_elem(&nm_ct, &r);
	return e && e->expires_ns > now;
}

/* Classify the packet; on ESTABLISHED/REPLY refresh the entry and return it in *entry. *fwd is
 * filled with the key a NEW connection is created under. */
static __always_inline int ct_lookup(const struct nm_pkt *p, __u8 direction, __u64 now,
				     struct ct_key *fwd, struct ct_entry **entry)
{
	struct ct_key rev;
	struct ct_entry *e;

	*entry = 0;
	ct_key_of(fwd, p, direction);
	e = bpf_map_lookup_elem(&nm_ct, fwd);
	if (e && ct_alive(e, p, now, 0)) {
		ct_refresh(e, p, 0, now);
		*entry = e;
		return CT_ESTABLISHED;
	}
	ct_key_reverse(&rev, fwd);
	e = bpf_map_lookup_elem(&nm_ct, &rev);
	if (e && ct_alive(e, p, now, 1)) {
		ct_refresh(e, p, 1, now);
		*entry = e;
		return CT_REPLY;
	}
	if (p->protocol == IPPROTO_ICMP && p->has_inner && ct_lookup_related(p, direction, now))
		return CT_RELATED;
	return CT_NEW;
}

/* Returns 0 or the error of the map update (conntrack full: the caller drops). */
static __always_inline int ct_create(const struct ct_key *k, const struct nm_pkt *p, __u64 now,
				     __u32 src_identity, __u32 dst_identity, __u8 verdict,
				     __u32 policy_id, __u8 flags)
{
	__u8 closing = 0;

	if (p->protocol == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_RST))
		closing = CT_CLOSING_ALL;

	struct ct_entry e = {
		.expires_ns = now + ct_lifetime(p->protocol, closing, 0),
		.packets = 1,
		.bytes = p->len,
		.src_identity = src_identity,
		.dst_identity = dst_identity,
		.tcp_flags_seen = p->protocol == IPPROTO_TCP ? p->tcp_flags : 0,
		.closing = closing,
		.verdict = verdict,
		.flags = flags,
		.policy_id = policy_id,
	};

	return bpf_map_update_elem(&nm_ct, k, &e, BPF_ANY);
}
