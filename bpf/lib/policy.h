/* SPDX-License-Identifier: GPL-2.0 */
/* The policy decision for a new connection.
 *
 * Three lookups: nm_policy with the exact remote identity, nm_policy with identity 0 (any), and
 * nm_policy_cidr with the remote address. Each LPM lookup returns its longest match; across the
 * three, any DENY wins over any REDIRECT, which wins over ALLOW. Nothing matched: allowed unless
 * the endpoint is isolated (enforced) in that direction. Deny entries apply even to a pod that is
 * not isolated, as Cilium's deny policies do. */
#pragma once

#include "maps.h"
#include "drop_reasons.h"

struct policy_decision {
	__u8 verdict;     /* POLICY_ALLOW / POLICY_DENY / POLICY_REDIRECT */
	__u8 reason;      /* drop reason when not allowed */
	__u16 proxy_port; /* POLICY_REDIRECT */
	__u32 policy_id;
	__u32 auth_policy_id; /* a rule that would have matched an authenticated peer */
};

/* Fold one match into the running decision: deny > redirect > allow; the first match of a
 * verdict keeps its policy id (exact identity before wildcard before CIDR). */
static __always_inline __u8 policy_rank(__u8 verdict)
{
	switch (verdict) {
	case POLICY_DENY:
		return 3;
	case POLICY_REDIRECT:
		return 2;
	case POLICY_ALLOW:
		return 1;
	default:
		return 0;
	}
}

static __always_inline void policy_fold(struct policy_decision *d, __u8 verdict, __u16 proxy_port,
					__u32 policy_id)
{
	if (policy_rank(verdict) > policy_rank(d->verdict)) {
		d->verdict = verdict;
		d->proxy_port = proxy_port;
		d->policy_id = policy_id;
	}
}

static __always_inline void policy_lookup_cidr(struct policy_decision *d, __u32 endpoint,
					       __u8 direction, __be32 remote, __u8 protocol,
					       __u16 port)
{
	struct policy_cidr_key key = {
		.prefixlen = POLICY_CIDR_KEY_BITS,
		.endpoint = endpoint,
		.direction = direction,
		.addr = remote,
	};
	struct policy_cidr_entry *e = bpf_map_lookup_elem(&nm_policy_cidr, &key);

	if (!e)
		return;
	for (__u32 i = 0; i < POLICY_CIDR_MAX_RULES; i++) {
		if (i >= e->count)
			break;
		struct policy_port_rule *r = &e->rules[i];

		if (r->protocol && r->protocol != protocol)
			continue;
		if (port < r->port_lo || port > r->port_hi)
			continue;
		policy_fold(d, r->verdict, r->proxy_port, r->policy_id);
	}
}

/* An entry that requires an authenticated peer (POLICY_F_AUTH) counts only when the peer is
 * authenticated; otherwise it is remembered, so that a connection nothing else allows is dropped
 * as AUTH_REQUIRED (it would have been allowed with a proven identity) rather than as
 * POLICY_DENIED. */
static __always_inline void policy_fold_entry(struct policy_decision *d,
					      const struct policy_entry *e, int authenticated)
{
	if ((e->flags & POLICY_F_AUTH) && !authenticated) {
		if (!d->auth_policy_id)
			d->auth_policy_id = e->policy_id;
		return;
	}
	policy_fold(d, e->verdict, e->proxy_port, e->policy_id);
}

/* `authenticated`: the peer's identity is proven (docs/security.md): for ingress, the connection
 * came through the inbound tunnel after mutual TLS, from the L7 proxy for a local client, or from
 * a pod of this node; for egress, it goes into the tunnel (the client node's Envoy verifies the
 * destination's certificate) or to a pod of this node. */
static __always_inline void policy_decide(struct policy_decision *d, __u32 endpoint,
					  __u8 direction, __u8 enforced, __u32 remote_identity,
					  __be32 remote_addr, const struct nm_pkt *p,
					  int authenticated)
{
	__be16 port = policy_port(p);
	struct policy_key key = {
		.prefixlen = POLICY_KEY_BITS,
		.endpoint = endpoint,
		.identity = remote_identity,
		.direction = direction,
		.protocol = p->protocol,
		.dport = port,
	};
	struct policy_entry *e;

	d->verdict = POLICY_NONE;
	d->reason = 0;
	d->proxy_port = 0;
	d->policy_id = 0;

	d->auth_policy_id = 0;

	e = bpf_map_lookup_elem(&nm_policy, &key);
	if (e)
		policy_fold_entry(d, e, authenticated);
	if (remote_identity != IDENTITY_ANY) {
		key.identity = IDENTITY_ANY;
		e = bpf_map_lookup_elem(&nm_policy, &key);
		if (e)
			policy_fold_entry(d, e, authenticated);
	}
	policy_lookup_cidr(d, endpoint, direction, remote_addr, p->protocol, bpf_ntohs(port));

	switch (d->verdict) {
	case POLICY_DENY:
		d->reason = DROP_POLICY_DENY;
		break;
	case POLICY_ALLOW:
	case POLICY_REDIRECT:
		break;
	default:
		if (enforced) {
			d->verdict = POLICY_DENY;
			d->reason = d->auth_policy_id ? DROP_AUTH_REQUIRED : DROP_POLICY_DENIED;
			d->policy_id = d->auth_policy_id;
		} else {
			d->verdict = POLICY_ALLOW;
		}
	}
}

/* Allowed without a policy lookup, as Kubernetes CNIs do: the pod's DNS queries to the
 * node-local DNS (and its answers), anything the node itself opens towards its pods (probes,
 * nodemesh), and anything between a pod and the node Envoy's address (any port: connect4 sends
 * redirected connections there, and the proxy enforces the policy that asked for it). */
static __always_inline int always_allowed(const struct nm_pkt *p, __u8 direction,
					  __u32 remote_identity, const struct node_config *cfg)
{
	int l4_dns = p->protocol == IPPROTO_UDP || p->protocol == IPPROTO_TCP;

	if (!cfg)
		return direction == DIR_INGRESS && remote_identity == IDENTITY_HOST;
	if (direction == DIR_EGRESS)
		return (cfg->proxy_ip && p->daddr == cfg->proxy_ip) ||
		       (cfg->dns_ip && l4_dns && p->daddr == cfg->dns_ip &&
			p->dport == bpf_htons(53));
	if (remote_identity == IDENTITY_HOST)
		return 1;
	return (cfg->proxy_ip && p->saddr == cfg->proxy_ip) ||
	       (cfg->dns_ip && l4_dns && p->saddr == cfg->dns_ip && p->sport == bpf_htons(53));
}
