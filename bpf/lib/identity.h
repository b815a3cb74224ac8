/* SPDX-License-Identifier: GPL-2.0 */
/* Address -> security identity, through the ipcache (LPM, longest prefix wins). */
#pragma once

#include "maps.h"

/* The ipcache entry of an address (its longest prefix), or 0. */
static __always_inline struct ipcache_entry *ipcache_of(__be32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };

	return bpf_map_lookup_elem(&nm_ipcache, &key);
}

/* The identity of an address whose ipcache entry (ipcache_of) the caller already has. */
static __always_inline __u32 identity_from(__be32 addr, const struct ipcache_entry *e,
					   const struct node_config *cfg)
{
	/* The node's own address is "host" even before the agent has written the ipcache: the
	 * always-allow rule for node -> pod traffic must not depend on map contents. */
	if (cfg && cfg->node_ip && addr == cfg->node_ip)
		return IDENTITY_HOST;
	/* The node Envoy's address belongs to the node too (its upstreams carry the client's
	 * address instead, so this lends "host" to a proxied connection only when the client is
	 * the backend itself: the hairpin, whose source to_container rewrote to proxy_ip). */
	if (cfg && cfg->proxy_ip && addr == cfg->proxy_ip)
		return IDENTITY_HOST;
	/* No entry, not even 0.0.0.0/0: outside the cluster. */
	return e ? e->identity : IDENTITY_WORLD;
}

static __always_inline __u32 identity_of(__be32 addr, const struct node_config *cfg)
{
	return identity_from(addr, ipcache_of(addr), cfg);
}
