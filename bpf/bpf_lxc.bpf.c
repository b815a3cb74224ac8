/* SPDX-License-Identifier: GPL-2.0 */
/* The pod's veth: from_container runs at tcx ingress of the host-side veth (packets leaving the
 * pod), to_container at its tcx egress (packets entering the pod).
 *
 * Per packet: endpoint lookup by ifindex (none: drop, fail-closed), parse, source check (from
 * the pod), conntrack. Established flows, replies and related ICMP errors pass without a policy
 * lookup; a new connection gets one policy decision (the egress policy of the pod at
 * from_container, its ingress policy at to_container), one event, and a conntrack entry. Every
 * packet is counted in nm_metrics and nm_flowcnt.
 *
 * L7 (docs/l7.md): a REDIRECT verdict lets a TCP connection into the pod (it comes from the
 * client node's Envoy, which enforced the L7 rules), a connection that went around connect4's
 * redirect (one for this pod's identity or for any client) is dropped on its way out, and a
 * reply from a local backend to the node Envoy's transparent upstream socket is marked for
 * local delivery (lib/proxy.h). When the proxy's upstream goes to the client pod itself
 * (hairpin), to_container rewrites its source (the pod's own address) to nm_config.proxy_ip and
 * from_container rewrites the pod's replies back (lib/proxy.h, CT_F_HAIRPIN).
 *
 * Same-node fast path: from_container also runs the ingress side of a local destination pod
 * and redirects the packet into that pod's namespace (bpf_redirect_peer), bypassing the node's
 * IP stack and to_container (docs/datapath.md, "Same-node fast path"). */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/drop_reasons.h"
#include "lib/identity.h"
#include "lib/events.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/proxy.h"
#include "lib/tunnel.h"
#include "lib/dnslimit.h"

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

/* One pod's side of a packet: the pod on veth `ifindex` sends it (DIR_EGRESS) or receives it
 * (DIR_INGRESS). from_pod: the packet is still on the sending pod's veth (the same-node fast
 * path), so skb->sk is that pod's socket, not one of the node's. *plain says the packet may skip
 * the node's stack: a forward without a mark or a rewrite for the proxy. */
static __always_inline int handle_packet(struct __sk_buff *skb, struct nm_pkt *pp, int parsed,
					 const __u8 direction, __u32 ifindex, const int from_pod,
					 int *plain)
{
	struct nm_pkt p = *pp;
	struct endpoint_info *ep = bpf_map_lookup_elem(&nm_endpoints, &ifindex);
	struct node_config *cfg = node_config();

	*plain = 0;
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

	__u8 hairpin = 0;

	/* Entering the pod from its own address: the node Envoy's upstream to the pod itself.
	 * Plain traffic pays this comparison and nothing else. */
	if (direction == DIR_INGRESS && p.saddr == ep->ipv4) {
		int r = hairpin_snat(skb, &p, cfg);

		if (r < 0)
			return drop_packet(&p, DROP_INVALID_PACKET, direction, ifindex, 0,
					   local_identity, 0);
		hairpin = r;
	}

	__be32 remote = p.saddr;

	if (direction == DIR_EGRESS) {
		if (p.saddr != ep->ipv4)
			return drop_packet(&p, DROP_INVALID_SOURCE_IP, direction, ifindex,
					   local_identity, 0, 0);
		remote = p.daddr;
	}

	__u64 now = bpf_ktime_get_ns();

	/* A flood of DNS queries is cut here, before the DNS server's socket (lib/dnslimit.h). */
	if (direction == DIR_EGRESS && is_dns_query(&p, cfg)) {
		int event;

		if (dns_over_budget(ifindex, now, &event)) {
			metrics_add(DROP_RATE_LIMITED, direction, VERDICT_DROPPED, p.len);
			flowcnt_add(local_identity, IDENTITY_HOST, p.dport, p.protocol,
				    VERDICT_DROPPED, direction, p.len);
			if (event)
				emit_packet_event(&p, EV_DROP, VERDICT_DROPPED, DROP_RATE_LIMITED,
						  direction, ifindex, local_identity, IDENTITY_HOST,
						  0);
			return TC_ACT_SHOT;
		}
	}
	struct ct_key key;
	struct ct_entry *entry;

	switch (ct_lookup(&p, direction, now, &key, &entry)) {
	case CT_ESTABLISHED:
		if (entry)
			flowcnt_add(entry->src_identity, entry->dst_identity, key.dport,
				    p.protocol, VERDICT_FORWARDED, direction, p.len);
		metrics_add(0, direction, VERDICT_FORWARDED, p.len);
		/* The pod's side of a tunnelled connection: to the outbound listener's socket. */
		if (entry && (entry->flags & CT_F_TUNNEL)) {
			tunnel_mark(skb);
			return TC_ACT_OK;
		}
		*plain = !hairpin;
		return TC_ACT_OK;
	case CT_REPLY:
		/* counted under the connection's original orientation and port */
		if (entry)
			flowcnt_add(entry->src_identity, entry->dst_identity,
				    p.protocol == IPPROTO_ICMP ? 0 : p.sport, p.protocol,
				    VERDICT_FORWARDED, direction ^ 1, p.len);
		metrics_add(0, direction, VERDICT_FORWARDED, p.len);
		/* A local backend answering the node Envoy's upstream connection: the reply is
		 * addressed to the client pod, but the connection is the proxy's (its transparent
		 * socket in this namespace). Only replies leaving a pod, on connections a socket of
		 * the node opened, can be that: the others skip the socket lookup. */
		if (direction == DIR_EGRESS && entry && (entry->flags & CT_F_NODE_SOCKET)) {
			/* A hairpin: the reply goes to proxy_ip, the connection is the proxy's
			 * socket bound to this pod's own address. */
			if (entry->flags & CT_F_HAIRPIN) {
				if (hairpin_reply(skb, &p, ep->ipv4, cfg) < 0)
					return drop_packet(&p, DROP_INVALID_PACKET, direction,
							   ifindex, local_identity, 0, 0);
			} else if (proxy_return_enabled(cfg, p.protocol)) {
				proxy_return_mark(skb, p.saddr, p.daddr, p.sport, p.dport);
			}
			return TC_ACT_OK;
		}
		*plain = !hairpin;
		return TC_ACT_OK;
	case CT_RELATED:
		metrics_add(0, direction, VERDICT_FORWARDED, p.len);
		*plain = !hairpin;
		return TC_ACT_OK;
	default:
		break;
	}

	/* A new connection: only now is the remote identity needed (the established path takes
	 * it from the conntrack entry and skips the ipcache). */
	struct ipcache_entry *remote_entry = ipcache_of(remote);
	__u32 remote_identity = identity_from(remote, remote_entry, cfg);
	__u32 src_identity = direction == DIR_EGRESS ? local_identity : remote_identity;
	__u32 dst_identity = direction == DIR_EGRESS ? remote_identity : local_identity;
	struct policy_decision d = { .verdict = POLICY_ALLOW };
	/* The mutual-TLS tunnel (lib/tunnel.h): does this connection go into it (egress), and is
	 * the peer's identity proven (docs/security.md)? */
	int tunnel = 0;
	int authenticated;
	__u8 ev_flags = 0;

	if (direction == DIR_EGRESS) {
		tunnel = p.protocol == IPPROTO_TCP && tunnel_enabled(cfg) &&
			 tunnel_wanted(remote_entry, p.daddr, p.dport);
		/* The client node's Envoy checks the destination's certificate; a pod of this node
		 * is vouched for by the node itself. */
		authenticated = tunnel || (cfg && remote_entry && remote_entry->node_ip == cfg->node_ip &&
					   remote_identity >= FIRST_POD_IDENTITY);
	} else {
		int proxied = !from_pod && skb->sk != 0;

		authenticated = from_pod || (proxied && (skb->mark & NM_MARK_AUTH));
		if (proxied && (skb->mark & NM_MARK_AUTH))
			ev_flags |= FLOW_F_AUTH;
		/* TCP from another node into a pod the tunnel covers always comes from the inbound
		 * listener's socket (from_netdev hands every SYN to it): a connection without a socket
		 * went around it. */
		if (!from_pod && !skb->sk && p.protocol == IPPROTO_TCP &&
		    (ep->flags & EP_F_TUNNEL_IN) && tunnel_enabled(cfg) &&
		    remote_identity != IDENTITY_HOST &&
		    !(remote_entry && remote_entry->node_ip == cfg->node_ip))
			return drop_packet(&p, DROP_UNENCRYPTED_TRAFFIC, direction, ifindex,
					   src_identity, dst_identity, 0);
	}

	if (direction == DIR_EGRESS && cfg && cfg->proxy_ip) {
		/* connect4 sends this pod's TCP connections to a pod port that an L7 rule covers for
		 * its identity (an nm_l7_redir entry for it, or for any client) to the node Envoy.
		 * One that still arrives here addressed to that port went around it (a raw socket, a
		 * process outside the pods' cgroup, a namespace nm_netns does not know yet): the
		 * destination will let it in on the strength of its REDIRECT verdict, trusting that
		 * the client's proxy enforced L7, so it must not leave. A client without an entry is
		 * not redirected and passes on to the destination's L3/L4 policy. */
		struct l7_redir_val *r = l7_redirect_lookup(p.daddr, p.dport, p.protocol,
							    local_identity);

		if (r)
			return drop_packet(&p, DROP_PROXY_UNSUPPORTED, direction, ifindex,
					   src_identity, dst_identity, r->policy_id);
	}

	if (!always_allowed(&p, direction, remote_identity, cfg)) {
		__u32 enforced = ep->flags & (direction == DIR_EGRESS ? EP_F_EGRESS_ENFORCED :
									EP_F_INGRESS_ENFORCED);

		policy_decide(&d, ifindex, direction, enforced != 0, remote_identity, remote, &p,
			      authenticated);
	}
	if (d.verdict == POLICY_DENY)
		return drop_packet(&p, d.reason, direction, ifindex, src_identity, dst_identity,
				   d.policy_id);

	__u8 verdict = VERDICT_FORWARDED;

	if (d.verdict == POLICY_REDIRECT) {
		/* L7 policy on this port. Entering the pod over TCP, the connection comes from the
		 * client node's Envoy (connect4 redirected the client there, and Envoy connects with
		 * the client's address): the proxy enforced the L7 rules, L3/L4 is what this verdict
		 * already says. Anything else (leaving the pod, which connect4 would have sent to the
		 * proxy; UDP and the rest, which the proxy does not carry) must not turn an L7 rule
		 * into "allow the whole port": fail closed. */
		if (direction != DIR_INGRESS || p.protocol != IPPROTO_TCP)
			return drop_packet(&p, DROP_PROXY_UNSUPPORTED, direction, ifindex,
					   src_identity, dst_identity, d.policy_id);
		verdict = VERDICT_REDIRECTED;
	}

	/* Entering the pod with a socket attached: opened in the node namespace (the node
	 * Envoy's upstream, a probe), not forwarded from another pod or node (the node's IP stack
	 * orphans what it forwards; the fast path keeps the sender's socket, hence from_pod). */
	__u8 ct_flags = direction == DIR_INGRESS && !from_pod && skb->sk ? CT_F_NODE_SOCKET : 0;

	if (hairpin)
		ct_flags = CT_F_NODE_SOCKET | CT_F_HAIRPIN;
	if (ev_flags & FLOW_F_AUTH)
		ct_flags |= CT_F_AUTH;

	if (tunnel) {
		/* The SYN goes to the outbound listener; anything else opening a connection here
		 * (its entry was evicted mid-connection) is marked for the listener's socket too: if
		 * that is gone the node answers with a reset, and nothing leaves in clear. */
		if ((p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
			int r = tunnel_assign(skb, p.saddr, p.sport, cfg, TUNNEL_OUT_PORT);

			if (r)
				return drop_packet(&p, r, direction, ifindex, src_identity,
						   dst_identity, d.policy_id);
		} else {
			tunnel_mark(skb);
		}
		ct_flags |= CT_F_TUNNEL;
		ev_flags |= FLOW_F_TUNNEL;
	}

	if (ct_create(&key, &p, now, src_identity, dst_identity, d.verdict, d.policy_id,
		      ct_flags))
		return drop_packet(&p, DROP_CT_MAP_INSERTION_FAILED, direction, ifindex,
				   src_identity, dst_identity, d.policy_id);

	metrics_add(0, direction, verdict, p.len);
	flowcnt_add(src_identity, dst_identity, key.dport, p.protocol, verdict, direction, p.len);
	emit_flagged_event(&p, EV_TRACE, verdict, 0, direction, ifindex, src_identity,
			   dst_identity, d.policy_id, ev_flags);
	*plain = !hairpin && !(ct_flags & ~CT_F_AUTH);
	return TC_ACT_OK;
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	struct nm_pkt p = {};
	int parsed = parse_packet(skb, &p);
	int plain;
	int ret = handle_packet(skb, &p, parsed, DIR_EGRESS, skb->ifindex, 0, &plain);

	if (ret != TC_ACT_OK || !plain || parsed != PARSE_OK || p.daddr == p.saddr)
		return ret;

	/* Same-node fast path (as Cilium's host routing): a packet for another pod on this node
	 * gets that pod's ingress side here (conntrack, policy, counters, events: exactly what
	 * to_container would do on its veth) and goes straight into its namespace, without the
	 * node's IP stack. Whatever needs the node's stack (the proxy, a hairpin, marked replies)
	 * is not plain and takes the normal way. */
	struct lxc_info *dst = bpf_map_lookup_elem(&nm_lxc, &p.daddr);

	if (!dst)
		return ret;

	__u32 dst_ifindex = dst->ifindex;

	ret = handle_packet(skb, &p, parsed, DIR_INGRESS, dst_ifindex, 1, &plain);
	if (ret != TC_ACT_OK)
		return ret;
	return bpf_redirect_peer(dst_ifindex, 0);
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	struct nm_pkt p = {};
	int parsed = parse_packet(skb, &p);
	int plain;

	return handle_packet(skb, &p, parsed, DIR_INGRESS, skb->ifindex, 0, &plain);
}

char LICENSE[] SEC("license") = "GPL";
