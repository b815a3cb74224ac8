/* SPDX-License-Identifier: GPL-2.0 */
/* The pod's veth: from_container runs at tcx ingress of the host-side veth (packets leaving the
 * pod), to_container at its tcx egress (packets entering the pod).
 *
 * Per packet: endpoint lookup by ifindex (none: drop, fail-closed), parse, source check (from
 * the pod), conntrack. Established flows, replies and related ICMP errors pass without a policy
 * lookup; a new connection gets one policy decision (the egress policy of the pod at
 * from_container, its ingress policy at to_container), one event, and a conntrack entry. Every
 * packet is counted in nm_metrics and nm_flowcnt. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/drop_reasons.h"
#include "lib/identity.h"
#include "lib/events.h"
#include "lib/conntrack.h"
#include "lib/policy.h"

static __always_inline int drop_packet(const struct nm_pkt *p, __u8 reason, __u8 direction,
				       __u32 ifindex, __u32 src_identity, __u32 dst_identity,
				       __u32 policy_id)
{
	metrics_add(reason, direction, VERDICT_DROPPED, p->len);
	flowcnt_add(src_identity, dst_identity, p->protocol == IPPROTO_ICMP ? 0 : p->dport,
		    p->protocol, VERDICT_DROPPED, direction, p->len);
	emit_packet_event(p, EV_DROP, VERDICT_DROPPED, reason, direction, ifindex, src_identity,
			  dst_identity, policy_id);
	return TC_ACT_SHOT;
}

/* Allowed without a policy lookup, as Kubernetes CNIs do: the pod's DNS queries to the
 * node-local DNS (and its answers), and anything the node itself opens towards its pods
 * (probes, nodemesh). */
static __always_inline int always_allowed(const struct nm_pkt *p, __u8 direction,
					  __u32 remote_identity, const struct node_config *cfg)
{
	int l4_dns = p->protocol == IPPROTO_UDP || p->protocol == IPPROTO_TCP;

	if (direction == DIR_EGRESS)
		return cfg && cfg->dns_ip && l4_dns && p->daddr == cfg->dns_ip &&
		       p->dport == bpf_htons(53);
	if (remote_identity == IDENTITY_HOST)
		return 1;
	return cfg && cfg->dns_ip && l4_dns && p->saddr == cfg->dns_ip &&
	       p->sport == bpf_htons(53);
}

static __always_inline int handle_packet(struct __sk_buff *skb, const __u8 direction)
{
	__u32 ifindex = skb->ifindex;
	struct nm_pkt p = {};
	int parsed = parse_packet(skb, &p);
	struct endpoint_info *ep = bpf_map_lookup_elem(&nm_endpoints, &ifindex);
	struct node_config *cfg = node_config();

	/* Fail-closed: the agent writes the endpoint only once the pod's policy is in place. */
	if (!ep)
		return drop_packet(&p, DROP_UNKNOWN_ENDPOINT, direction, ifindex, 0, 0, 0);

	__u32 local_identity = ep->identity;

	switch (parsed) {
	case PARSE_OK:
		break;
	case PARSE_ARP:
		metrics_add(0, direction, VERDICT_FORWARDED, p.len);
		return TC_ACT_OK;
	case PARSE_OTHER_L3:
		return drop_packet(&p, DROP_UNSUPPORTED_L3, direction, ifindex, 0, 0, 0);
	case PARSE_FRAGMENT:
		return drop_packet(&p, DROP_FRAG_NOT_SUPPORTED, direction, ifindex, 0, 0, 0);
	default:
		return drop_packet(&p, DROP_INVALID_PACKET, direction, ifindex, 0, 0, 0);
	}

	__be32 remote = p.saddr;

	if (direction == DIR_EGRESS) {
		if (p.saddr != ep->ipv4)
			return drop_packet(&p, DROP_INVALID_SOURCE_IP, direction, ifindex,
					   local_identity, 0, 0);
		remote = p.daddr;
	}

	__u64 now = bpf_ktime_get_ns();
	struct ct_key key;
	struct ct_entry *entry;

	switch (ct_lookup(&p, direction, now, &key, &entry)) {
	case CT_ESTABLISHED:
		if (entry)
			flowcnt_add(entry->src_identity, entry->dst_identity, key.dport,
				    p.protocol, VERDICT_FORWARDED, direction, p.len);
		metrics_add(0, direction, VERDICT_FORWARDED, p.len);
		return TC_ACT_OK;
	case CT_REPLY:
		/* counted under the connection's original orientation and port */
		if (entry)
			flowcnt_add(entry->src_identity, entry->dst_identity,
				    p.protocol == IPPROTO_ICMP ? 0 : p.sport, p.protocol,
				    VERDICT_FORWARDED, direction ^ 1, p.len);
		metrics_add(0, direction, VERDICT_FORWARDED, p.len);
		return TC_ACT_OK;
	case CT_RELATED:
		metrics_add(0, direction, VERDICT_FORWARDED, p.len);
		return TC_ACT_OK;
	default:
		break;
	}

	/* A new connection: only now is the remote identity needed (the established path takes
	 * it from the conntrack entry and skips the ipcache). */
	__u32 remote_identity = identity_of(remote, cfg);
	__u32 src_identity = direction == DIR_EGRESS ? local_identity : remote_identity;
	__u32 dst_identity = direction == DIR_EGRESS ? remote_identity : local_identity;
	struct policy_decision d = { .verdict = POLICY_ALLOW };

	if (!always_allowed(&p, direction, remote_identity, cfg)) {
		__u32 enforced = ep->flags & (direction == DIR_EGRESS ? EP_F_EGRESS_ENFORCED :
									EP_F_INGRESS_ENFORCED);

		policy_decide(&d, ifindex, direction, enforced != 0, remote_identity, remote, &p);
	}
	if (d.verdict == POLICY_DENY)
		return drop_packet(&p, d.reason, direction, ifindex, src_identity, dst_identity,
				   d.policy_id);
	if (d.verdict == POLICY_REDIRECT)
		/* TODO(L7 issue): bpf_sk_assign to the node Envoy. Until then an L7 rule must not
		 * turn into "allow everything on that port": fail closed. */
		return drop_packet(&p, DROP_PROXY_UNSUPPORTED, direction, ifindex, src_identity,
				   dst_identity, d.policy_id);

	if (ct_create(&key, &p, now, src_identity, dst_identity, d.verdict, d.policy_id))
		return drop_packet(&p, DROP_CT_MAP_INSERTION_FAILED, direction, ifindex,
				   src_identity, dst_identity, d.policy_id);

	metrics_add(0, direction, VERDICT_FORWARDED, p.len);
	flowcnt_add(src_identity, dst_identity, key.dport, p.protocol, VERDICT_FORWARDED,
		    direction, p.len);
	emit_packet_event(&p, EV_TRACE, VERDICT_FORWARDED, 0, direction, ifindex, src_identity,
			  dst_identity, d.policy_id);
	return TC_ACT_OK;
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	return handle_packet(skb, DIR_EGRESS);
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	return handle_packet(skb, DIR_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
