/* SPDX-License-Identifier: GPL-2.0 */
/* nodemesh datapath: types and helpers shared by every program.
 *
 * UAPI headers only (no vmlinux.h): tc and cgroup programs need no kernel-internal struct.
 * Every struct that user space reads or writes is defined here or in the header of its concern
 * and mirrored in nodemesh/datapath/layout.py; tests/unit/test_datapath_layout.py compares the
 * two through the BTF of the compiled objects.
 */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* <linux/icmp.h> drags in libc headers through <linux/if.h>; the little ICMP we need: */
#define ICMP_ECHOREPLY      0
#define ICMP_DEST_UNREACH   3
#define ICMP_ECHO           8
#define ICMP_TIME_EXCEEDED  11
#define ICMP_PARAMETERPROB  12
struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	union {
		struct {
			__be16 id;
			__be16 sequence;
		} echo;
		__be32 gateway;
	} un;
};

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif
#ifndef EPERM
#define EPERM 1
#endif

#define NS_PER_SEC 1000000000ULL

/* Direction of a packet or connection, always from the pod's point of view. */
#define DIR_INGRESS 0 /* entering the pod (to_container) */
#define DIR_EGRESS  1 /* leaving the pod (from_container) */

/* TCP flag bits as in byte 13 of the TCP header. */
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define TCP_FLAG_ACK 0x10

/* nm_config[0]: written by the agent at start. */
/* The agent installed the proxy return route (fwmark PROXY_MARK -> table PROXY_ROUTE_TABLE:
 * local 0/0 dev lo): replies to the node Envoy's transparent upstream sockets may be marked. */
#define CFG_F_PROXY_RETURN 1
/* The node Envoy's mutual-TLS tunnel listeners are up on proxy_ip (TUNNEL_OUT_PORT,
 * TUNNEL_IN_PORT): TCP between pods of different nodes goes through them (lib/tunnel.h). */
#define CFG_F_TUNNEL 2
struct node_config {
	__be32 node_ip;  /* this node's underlay address (identity "host") */
	__be32 dns_ip;   /* node-local DNS (always reachable on UDP/TCP 53) */
	__be32 proxy_ip; /* node Envoy's address (always reachable, identity "host"); 0 = no L7 */
	__u32 flags;     /* CFG_F_* */
};

/* The proxy return path: a packet for a transparent socket of the node namespace gets this
 * mark (in the bits of PROXY_MARK_MASK; Cilium's MARK_MAGIC_TO_PROXY), and the agent's rule
 * `fwmark 0x200/0xf00 lookup 2004` with `local 0.0.0.0/0 dev lo table 2004` delivers it
 * locally instead of routing it to the pod whose address it carries. */
#define PROXY_MARK         0x200
#define PROXY_MARK_MASK    0xf00
#define PROXY_ROUTE_TABLE  2004
#define PROXY_RULE_PREF    9

/* The tunnel (docs/security.md). A pod's new TCP connection to a pod of another node is handed
 * (bpf_sk_assign) to the node Envoy's outbound listener, which carries it in mutual TLS with the
 * client workload's certificate to the destination's node; there the connection's SYN is handed
 * to the inbound listener, which checks the client's certificate and connects to the pod with
 * the client's own address. */
#define TUNNEL_OUT_PORT 15006
#define TUNNEL_IN_PORT  15008
/* On the node Envoy's upstream sockets whose client it has authenticated (the inbound side of the
 * tunnel, after mutual TLS; the L7 proxy, whose clients are this node's own pods): to_container
 * sees it on the packets of such a connection (skb->mark of a local socket) and records the
 * connection as authenticated. Outside PROXY_MARK_MASK, so the proxy routing rule ignores it. */
#define NM_MARK_AUTH    0x1000
/* On the outbound tunnel's upstream sockets: the client pod's egress policy was decided at its
 * veth when the connection entered the tunnel, so connect4_proxy does not decide it again. */
#define NM_MARK_TUNNEL  0x2000

/* nm_endpoints[ifindex of the host-side veth] */
#define EP_F_INGRESS_ENFORCED 1
#define EP_F_EGRESS_ENFORCED  2
/* TCP from other nodes into this pod enters through the node Envoy's inbound tunnel listener
 * (its mutual-TLS mode is not DISABLE on every port). */
#define EP_F_TUNNEL_IN        4
struct endpoint_info {
	__be32 ipv4;     /* the pod's IP: packets from the pod must carry it */
	__u32 identity;  /* the pod's security identity */
	__u32 flags;     /* EP_F_* */
	__u32 pad;
};

/* Remote identities reserved as Cilium numbers them. */
#define IDENTITY_ANY         0 /* "any identity" in policy keys, never an endpoint's */
#define IDENTITY_HOST        1
#define IDENTITY_WORLD       2
#define IDENTITY_UNMANAGED   3
#define IDENTITY_HEALTH      4
#define IDENTITY_INIT        5
#define IDENTITY_REMOTE_NODE 6
#define FIRST_POD_IDENTITY   256 /* pod identities are allocated from here up */

/* nm_ipcache: LPM over the IPv4 address. */
struct ipcache_key {
	__u32 prefixlen; /* 0..32 */
	__be32 addr;
};
/* ipcache_entry.flags: TCP from a local pod to this address goes through the outbound tunnel
 * (a pod of another node whose mutual-TLS mode is not DISABLE) ... */
#define IPC_F_TUNNEL       1
/* ... except on the ports nm_tunnel_port names, or only on them (a port-level mode). */
#define IPC_F_TUNNEL_PORTS 2
struct ipcache_entry {
	__u32 identity;
	__be32 node_ip;
	__u32 flags;     /* IPC_F_* */
	__u32 pad;
};

/* nm_tunnel_port: (pod IP, port) -> whether TCP to it goes through the tunnel, where a port's
 * mutual-TLS mode differs from its pod's (PeerAuthentication portLevelMtls). */
struct tunnel_port_key {
	__be32 addr;
	__be16 port;
	__u16 pad;
};
struct tunnel_port_val {
	__u8 tunnel;     /* 1: through the tunnel, 0: plain */
	__u8 pad[3];
};

/* nm_dns_limit and nm_event_budget values: one budget (lib/budget.h). */
struct rate_bucket {
	__u64 tat;  /* GCRA's theoretical arrival time (ns, bpf_ktime_get_ns) */
	__u64 over; /* what was over the budget so far (dropped queries, suppressed events) */
};

/* Policy verdicts (nm_policy, nm_policy_cidr, ct_entry.verdict). */
#define POLICY_NONE     0 /* no entry matched */
#define POLICY_ALLOW    1
#define POLICY_DENY     2
#define POLICY_REDIRECT 3

/* nm_policy: LPM over endpoint(32) identity(32) direction(8) protocol(8) dport(16).
 * prefixlen 72 = any protocol and port, 80 = this protocol and any port, 96 - k = a block of
 * 2^k ports. identity 0 = any identity. */
#define POLICY_KEY_BITS 96
struct policy_key {
	__u32 prefixlen;
	__u32 endpoint;  /* lxc ifindex (host order) */
	__u32 identity;  /* remote identity, 0 = any (host order) */
	__u8 direction;  /* DIR_INGRESS / DIR_EGRESS */
	__u8 protocol;
	__be16 dport;    /* ICMP: the type */
};
/* policy_entry.flags: the rule matches only a peer whose identity was authenticated
 * (CiliumNetworkPolicy authentication.mode: required). */
#define POLICY_F_AUTH 1
struct policy_entry {
	__u8 verdict;     /* POLICY_ALLOW / POLICY_DENY / POLICY_REDIRECT */
	__u8 flags;       /* POLICY_F_* */
	__u16 proxy_port; /* host order, POLICY_REDIRECT only */
	__u32 policy_id;  /* which rule decided: user space maps it to a name */
};

/* nm_policy_cidr: LPM over endpoint(32) direction(8) pad(24) addr(32); prefixlen = 64 + CIDR
 * length. The entry carries every port rule for addresses under it. */
#define POLICY_CIDR_KEY_BITS 96
struct policy_cidr_key {
	__u32 prefixlen;
	__u32 endpoint;
	__u8 direction;
	__u8 pad[3];
	__be32 addr;
};
struct policy_port_rule {
	__u8 protocol;    /* 0 = any */
	__u8 verdict;
	__u16 proxy_port; /* host order */
	__u16 port_lo;    /* host order, inclusive; ICMP: the type */
	__u16 port_hi;
	__u32 policy_id;
};
#define POLICY_CIDR_MAX_RULES 16
struct policy_cidr_entry {
	__u32 count;
	struct policy_port_rule rules[POLICY_CIDR_MAX_RULES];
};

/* nm_ct: one entry per connection and direction, keyed by the tuple as first seen. */
struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;    /* ICMP echo: the id */
	__be16 dport;    /* ICMP echo: 0 */
	__u8 protocol;
	__u8 direction;  /* DIR_INGRESS: entered the pod, DIR_EGRESS: left it */
	__u16 pad;
};

#define CT_CLOSING_TX 1 /* FIN from the side that opened the connection */
#define CT_CLOSING_RX 2 /* FIN from the other side */
#define CT_CLOSING_ALL (CT_CLOSING_TX | CT_CLOSING_RX)
#define CT_F_REPLY_SEEN 1
/* Opened by a socket of the node namespace (to_container saw skb->sk: forwarded packets lose
 * theirs crossing a veth into another namespace). Only the replies of such connections can be
 * for the node Envoy's transparent upstreams, so only they pay the return-path socket lookup. */
#define CT_F_NODE_SOCKET 2
/* Hairpin through the node Envoy (lib/proxy.h): a connection the proxy opened with the pod's own
 * address as source to the pod itself. to_container rewrote its source to nm_config.proxy_ip,
 * and the entry is keyed by that tuple (as the pod sees it); from_container gives the pod's
 * replies their destination back (the pod's own address) before the return path. Always set
 * together with CT_F_NODE_SOCKET. */
#define CT_F_HAIRPIN 4
/* The pod's connection to a pod of another node went into the node Envoy's outbound tunnel
 * listener (bpf_sk_assign on its SYN): every later packet the pod sends on it is marked
 * PROXY_MARK for local delivery to the listener's accepted socket, never routed out in clear. */
#define CT_F_TUNNEL 8
/* The peer's identity was authenticated: the connection entered the pod from a socket of the
 * node that carries NM_MARK_AUTH (the inbound tunnel after mutual TLS, the L7 proxy for a local
 * client), or straight from a pod of this node (the same-node fast path). */
#define CT_F_AUTH 16
struct ct_entry {
	__u64 expires_ns; /* bpf_ktime_get_ns() deadline */
	__u64 packets;
	__u64 bytes;
	__u32 src_identity;
	__u32 dst_identity;
	__u8 tcp_flags_seen;
	__u8 closing;     /* CT_CLOSING_* */
	__u8 verdict;     /* what the policy said at creation */
	__u8 flags;       /* CT_F_* */
	__u32 policy_id;
};

/* Socket LB. */
#define SVC_F_AFFINITY 1
#define SVC_F_MAGLEV   2
#define SVC_F_L7       4
struct lb4_key {
	__be32 address;     /* ClusterIP */
	__be16 dport;
	__u16 backend_slot; /* 0 = the service entry; 1..count = its backends */
	__u8 protocol;
	__u8 pad[3];
};
struct lb4_service {
	__u32 backend_id;       /* slot > 0 */
	__u16 count;            /* slot 0: number of backends */
	__u16 rev_nat_index;    /* service id, also the Maglev table key */
	__u8 flags;             /* SVC_F_* */
	__u8 pad;
	__u16 l7_proxy_port;    /* host order, SVC_F_L7 only */
	__u32 affinity_timeout; /* seconds, SVC_F_AFFINITY */
};
struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 protocol;
	__u8 flags;
};
struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u16 pad;
};
struct lb4_affinity_key {
	__u64 netns_cookie;
	__u16 rev_nat_index;
	__u16 pad;
	__u32 pad2;
};
struct lb4_affinity_val {
	__u64 last_used_ns;
	__u32 backend_id;
	__u32 pad;
};
struct lb4_reverse_sk_key {
	__u64 cookie;     /* socket cookie */
	__be32 address;   /* the backend the socket talks to */
	__be16 port;
	__u16 pad;
};
struct lb4_reverse_sk_val {
	__be32 address;   /* the VIP the application asked for */
	__be16 port;
	__u16 rev_nat_index;
};

/* nm_l7_redir: pod ports that L7 policy covers, per client identity. connect4 sends a TCP
 * connection of a client whose identity has an entry (or of any client, identity 0) to such a
 * destination (directly, or as the backend a ClusterIP picked) to the node Envoy's listener
 * for it; every other client connects straight to the pod, whose L3/L4 policy decides. */
struct l7_redir_key {
	__be32 addr;      /* the pod's IP */
	__be16 port;
	__u8 protocol;    /* IPPROTO_TCP (other protocols are not redirected) */
	__u8 pad;
	__u32 identity;   /* the client's security identity (host order); 0 = any client */
};
struct l7_redir_val {
	__u16 proxy_port; /* host order: the Envoy listener on nm_config.proxy_ip */
	__u16 pad;
	__u32 policy_id;  /* the L7 policy, for the event */
};

/* nm_netns: a local pod's network namespace (its cookie, bpf_get_netns_cookie()) -> its
 * identity and veth, for socket hooks that see neither an address nor a device: connect4 runs
 * before the socket is bound, and the L7 redirect is decided by the client's identity. */
struct netns_info {
	__u32 identity;
	__u32 ifindex;    /* host-side veth */
};

/* nm_lxc: a local pod's IP -> its endpoint, for hooks that see an address but no veth (the
 * proxy's connect4_proxy: whose egress policy applies to an upstream bound to that IP). */
struct lxc_info {
	__u32 ifindex;    /* host-side veth: the nm_endpoints / nm_policy key */
	__u32 identity;
};

/* nm_events records. */
#define EV_TRACE 1 /* a new connection passed a hook */
#define EV_DROP  2
#define EV_SOCK  3 /* a socket-LB translation */

/* flow_event.flags */
#define FLOW_F_TUNNEL 1 /* the connection went into the node Envoy's mutual-TLS tunnel (source side) */
#define FLOW_F_AUTH   2 /* the peer's identity was authenticated (destination side: CT_F_AUTH) */

/* Hubble's Verdict numbering would be 1, 2, 5, 7; the event keeps the compact values and
 * user space maps them (layout.Verdict). */
#define VERDICT_FORWARDED  1
#define VERDICT_DROPPED    2
#define VERDICT_REDIRECTED 3
#define VERDICT_TRANSLATED 4

struct flow_event {
	__u64 ts_ns;
	__u8 type;         /* EV_* */
	__u8 verdict;      /* VERDICT_* */
	__u8 reason;       /* drop reason, 0 when not a drop */
	__u8 direction;
	__u32 ifindex;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;      /* ICMP: the type */
	__u8 protocol;
	__u8 tcp_flags;
	__u16 rev_nat_index;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 policy_id;
	__u32 len;
	__u64 netns_cookie;
	__be32 orig_daddr;
	__be16 orig_dport;
	__u8 flags;        /* EV_F_* */
	__u8 pad;
};

struct metrics_key {
	__u8 reason;
	__u8 direction;
	__u8 verdict;
	__u8 pad;
};
struct metrics_val {
	__u64 packets;
	__u64 bytes;
};
struct flow_count_key {
	__u32 src_identity;
	__u32 dst_identity;
	__be16 dport;
	__u8 protocol;
	__u8 verdict;
	__u8 direction;
	__u8 pad[3];
};

/* What the parser extracts from a packet. Ports stay in network order, as on the wire and in
 * every map key; ICMP puts the echo id in sport and nothing in dport (the conntrack tuple),
 * and the type/code in icmp_type/icmp_code. */
struct nm_pkt {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
	__u32 len;
	/* ICMP errors (dest unreachable, time exceeded, parameter problem): the tuple of the
	 * packet that caused the error, as it was sent. */
	__u8 has_inner;
	__u8 inner_protocol;
	__u16 pad;
	__be32 inner_saddr;
	__be32 inner_daddr;
	__be16 inner_sport;
	__be16 inner_dport;
};

enum parse_result {
	PARSE_OK = 0,
	PARSE_ARP,       /* ARP: passed when the endpoint is known */
	PARSE_OTHER_L3,  /* IPv6 and anything else: unsupported */
	PARSE_INVALID,   /* truncated or malformed IPv4 */
	PARSE_FRAGMENT,  /* a non-first IPv4 fragment: no L4 header to look at */
};

static __always_inline int icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
	       type == ICMP_PARAMETERPROB;
}

/* Parse the inner header of an ICMP error: the original packet's IPv4 header and the first 8
 * bytes of its L4 header (RFC 792 guarantees them). */
static __always_inline void parse_icmp_inner(void *l4, void *data_end, struct nm_pkt *p)
{
	struct iphdr *in = l4 + sizeof(struct icmphdr);

	if ((void *)(in + 1) > data_end || in->ihl < 5)
		return;
	__u32 ihl = (__u32)(in->ihl & 0xf) * 4;
	void *inl4 = (void *)in + ihl;

	if (inl4 + 8 > data_end)
		return;
	p->inner_protocol = in->protocol;
	p->inner_saddr = in->saddr;
	p->inner_daddr = in->daddr;
	if (in->protocol == IPPROTO_TCP || in->protocol == IPPROTO_UDP) {
		/* source and destination port are the first 4 bytes of both headers */
		p->inner_sport = ((__be16 *)inl4)[0];
		p->inner_dport = ((__be16 *)inl4)[1];
	} else if (in->protocol == IPPROTO_ICMP) {
		struct icmphdr *ic = inl4;

		p->inner_sport = ic->un.echo.id;
		p->inner_dport = 0;
	} else {
		return;
	}
	p->has_inner = 1;
}

static __always_inline int parse_packet(struct __sk_buff *skb, struct nm_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	p->len = skb->len;
	if ((void *)(eth + 1) > data_end)
		return PARSE_INVALID;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return PARSE_ARP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_OTHER_L3;

	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
		return PARSE_INVALID;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->protocol = ip->protocol;
	if (ip->frag_off & bpf_htons(0x1fff))
		return PARSE_FRAGMENT;

	__u32 ihl = (__u32)(ip->ihl & 0xf) * 4;
	void *l4 = (void *)ip + ihl;

	switch (ip->protocol) {
	case IPPROTO_TCP: {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return PARSE_INVALID;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return PARSE_INVALID;
		p->sport = uh->source;
		p->dport = uh->dest;
		break;
	}
	case IPPROTO_ICMP: {
		struct icmphdr *ic = l4;

		if ((void *)(ic + 1) > data_end)
			return PARSE_INVALID;
		p->icmp_type = ic->type;
		p->icmp_code = ic->code;
		if (ic->type == ICMP_ECHO || ic->type == ICMP_ECHOREPLY)
			p->sport = ic->un.echo.id;
		else if (icmp_is_error(ic->type))
			parse_icmp_inner(l4, data_end, p);
		break;
	}
	default:
		/* other protocols: tracked by addresses only */
		break;
	}
	return PARSE_OK;
}

/* The port a policy rule matches: the destination port for TCP/UDP, the ICMP type (in the
 * same network-order 16-bit field) for ICMP, 0 for anything else. */
static __always_inline __be16 policy_port(const struct nm_pkt *p)
{
	if (p->protocol == IPPROTO_ICMP)
		return bpf_htons((__u16)p->icmp_type);
	if (p->protocol == IPPROTO_TCP || p->protocol == IPPROTO_UDP)
		return p->dport;
	return 0;
}
