/* SPDX-License-Identifier: GPL-2.0 */
/* Socket load balancing: ClusterIP VIP:port -> backend, once per connection (per datagram for
 * unconnected UDP), at the socket hooks. The tc programs therefore only ever see pod IPs.
 *
 * nm_lb4_svc holds, per (VIP, port, protocol), slot 0 = the service (backend count, flags, its
 * rev_nat_index) and slots 1..count = the backend ids; nm_lb4_be maps a backend id to its
 * address. Selection: Maglev (nm_lb4_maglev[rev_nat_index], M entries) or random; ClientIP
 * affinity pins a client network namespace to a backend. nm_lb4_rsk remembers, per socket
 * cookie and backend, which VIP the application asked for, for recvmsg4/getpeername4. */
#pragma once

#include "maps.h"

/* Set by the loader before load (a prime); with .rodata frozen the verifier knows it as a
 * constant, which bounds the Maglev table index. */
const volatile __u32 nm_maglev_m = NM_MAGLEV_M_DEFAULT;

static __always_inline __u64 lb_mix64(__u64 x)
{
	/* MurmurHash3's 64-bit finalizer: cheap, and every input bit reaches every output bit. */
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

static __always_inline struct lb4_service *lb4_lookup_service(__be32 address, __be16 port,
							      __u8 protocol)
{
	struct lb4_key key = {
		.address = address,
		.dport = port,
		.backend_slot = 0,
		.protocol = protocol,
	};

	return bpf_map_lookup_elem(&nm_lb4_svc, &key);
}

static __always_inline __u32 lb4_slot_backend(__be32 address, __be16 port, __u8 protocol,
					      __u16 slot)
{
	struct lb4_key key = {
		.address = address,
		.dport = port,
		.backend_slot = slot,
		.protocol = protocol,
	};
	struct lb4_service *s = bpf_map_lookup_elem(&nm_lb4_svc, &key);

	return s ? s->backend_id : 0;
}

/* Maglev: the hash covers the client's network namespace and its bound source port (0 before
 * bind: a socket LB sees no ephemeral port yet). 0 = no table. */
static __always_inline __u32 lb4_maglev_backend(const struct lb4_service *svc, __u64 netns_cookie,
						__u16 src_port)
{
	__u16 index = svc->rev_nat_index;
	__u32 *table = bpf_map_lookup_elem(&nm_lb4_maglev, &index);
	__u32 m = nm_maglev_m;

	if (!table || m == 0)
		return 0;
	__u64 slot = lb_mix64(netns_cookie ^ lb_mix64((__u64)src_port + 1)) % m;

	/* clang knows slot < m and would drop the check; the verifier needs it to bound the
	 * index (it does not derive bounds from a modulo). */
	asm volatile("" : "+r"(slot));
	if (slot >= m)
		return 0;
	return table[slot];
}

static __always_inline __u32 lb4_select_backend(const struct lb4_service *svc, __be32 address,
						__be16 port, __u8 protocol, __u64 netns_cookie,
						__u16 src_port)
{
	__u32 id = 0;

	if (svc->flags & SVC_F_MAGLEV)
		id = lb4_maglev_backend(svc, netns_cookie, src_port);
	if (!id) {
		__u16 slot = (__u16)(bpf_get_prandom_u32() % svc->count) + 1;

		id = lb4_slot_backend(address, port, protocol, slot);
	}
	return id;
}

/* ClientIP affinity keyed by the client's network namespace: the backend it used last, if that
 * was within the timeout and the backend still exists. */
static __always_inline __u32 lb4_affinity_backend(const struct lb4_service *svc,
						  __u64 netns_cookie, __u64 now)
{
	struct lb4_affinity_key key = {
		.netns_cookie = netns_cookie,
		.rev_nat_index = svc->rev_nat_index,
	};
	struct lb4_affinity_val *v = bpf_map_lookup_elem(&nm_lb4_affin, &key);

	if (!v)
		return 0;
	if (now - v->last_used_ns > (__u64)svc->affinity_timeout * NS_PER_SEC)
		return 0;
	return v->backend_id;
}

static __always_inline void lb4_affinity_update(const struct lb4_service *svc, __u64 netns_cookie,
						__u32 backend_id, __u64 now)
{
	struct lb4_affinity_key key = {
		.netns_cookie = netns_cookie,
		.rev_nat_index = svc->rev_nat_index,
	};
	struct lb4_affinity_val val = { .last_used_ns = now, .backend_id = backend_id };

	bpf_map_update_elem(&nm_lb4_affin, &key, &val, BPF_ANY);
}

/* Remember the VIP for reverse translation; written only when it changes, since sendmsg4 runs
 * for every datagram. */
static __always_inline void lb4_remember(__u64 sock_cookie, __be32 backend_addr,
					 __be16 backend_port, __be32 vip, __be16 vport,
					 __u16 rev_nat_index)
{
	struct lb4_reverse_sk_key key = {
		.cookie = sock_cookie,
		.address = backend_addr,
		.port = backend_port,
	};
	struct lb4_reverse_sk_val val = {
		.address = vip,
		.port = vport,
		.rev_nat_index = rev_nat_index,
	};
	struct lb4_reverse_sk_val *old = bpf_map_lookup_elem(&nm_lb4_rsk, &key);

	if (old && old->address == vip && old->port == vport && old->rev_nat_index == rev_nat_index)
		return;
	bpf_map_update_elem(&nm_lb4_rsk, &key, &val, BPF_ANY);
}
