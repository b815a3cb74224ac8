/* SPDX-License-Identifier: GPL-2.0 */
/* Socket hooks of the node's cgroup (it covers every pod):
 *   connect4     TCP and connected UDP: ClusterIP VIP:port -> backend, once per connection;
 *                TCP to a pod port that an L7 rule covers for this client (nm_l7_redir for the
 *                identity of the client's network namespace, nm_netns, or for any client;
 *                directly or as the backend a ClusterIP picked) -> the node Envoy's listener
 *   sendmsg4     unconnected UDP: the same, per datagram
 *   recvmsg4     UDP recvfrom(): backend -> VIP, so replies come from the address asked for
 *   getpeername4 backend (or proxy listener) -> VIP (or the pod IP:port asked for)
 * A service without backends refuses connect()/sendto() at once with ECONNREFUSED. Every
 * translation and every refusal is an event.
 *
 * And one hook of the proxy's cgroup (beside the pods', so none of the above touches Envoy):
 *   connect4_proxy  an upstream connection bound to a local pod's IP (Envoy's original_src)
 *                   must pass that pod's egress policy, as if the pod had opened it. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/drop_reasons.h"
#include "lib/identity.h"
#include "lib/events.h"
#include "lib/lb.h"
#include "lib/policy.h"
#include "lib/proxy.h"
#include "lib/tunnel.h"

#define SYS_REJECT  0
#define SYS_PROCEED 1

/* client: the pod whose identity decided an L7 redirect (names the source: the socket has no
 * address yet), or 0. */
static __always_inline void emit_sock_event(struct bpf_sock_addr *ctx, __u8 type, __u8 verdict,
					    __u8 reason, __be32 daddr, __be16 dport,
					    __be32 vip, __be16 vport, __u16 rev_nat_index,
					    __u64 netns_cookie, const struct node_config *cfg,
					    __u32 policy_id, const struct netns_info *client)
{
	if (event_suppressed(NM_EVENT_SOCK_KEY | netns_cookie))
		return;

	struct flow_event *e = bpf_ringbuf_reserve(&nm_events, sizeof(*e), 0);
	struct bpf_sock *sk = ctx->sk;
	__be32 saddr = 0;
	__u16 sport = 0;

	if (!e) {
		count_lost_event();
		return;
	}
	if (sk) {
		saddr = sk->src_ip4;
		sport = (__u16)sk->src_port;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->type = type;
	e->verdict = verdict;
	e->reason = reason;
	e->direction = DIR_EGRESS;
	e->ifindex = client ? client->ifindex : 0;
	e->saddr = saddr;
	e->daddr = daddr;
	e->sport = bpf_htons(sport); /* bpf_sock.src_port is host order */
	e->dport = dport;
	e->protocol = (__u8)ctx->protocol;
	e->tcp_flags = 0;
	e->rev_nat_index = rev_nat_index;
	e->src_identity = client ? client->identity : saddr ? identity_of(saddr, cfg) : 0;
	e->dst_identity = verdict == VERDICT_DROPPED ? 0 : identity_of(daddr, cfg);
	e->policy_id = policy_id;
	e->len = 0;
	e->netns_cookie = netns_cookie;
	e->orig_daddr = vip;
	e->orig_dport = vport;
	e->flags = 0;
	e->pad = 0;
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

static __always_inline int refuse(struct bpf_sock_addr *ctx, __be32 vip, __be16 vport,
				  __u16 rev_nat_index, __u64 netns_cookie,
				  const struct node_config *cfg)
{
	metrics_add(DROP_NO_SERVICE, DIR_EGRESS, VERDICT_DROPPED, 0);
	emit_sock_event(ctx, EV_DROP, VERDICT_DROPPED, DROP_NO_SERVICE, vip, vport, vip, vport,
			rev_nat_index, netns_cookie, cfg, 0, 0);
	/* Returning 0 alone surfaces as EPERM; the application should see what a kube-proxy
	 * REJECT rule gives it. */
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

/* A connection straight to a pod IP:port that an L7 rule covers for this client: to the node
 * Envoy's listener for it. getpeername() keeps showing the pod (nm_lb4_rsk with rev_nat_index
 * 0). A client no L7 rule covers connects to the pod itself, whose L3/L4 policy decides; so
 * does a socket whose network namespace nm_netns does not know (its from_container drops the
 * connection if its identity should have been redirected). */
static __always_inline int sock4_l7_redirect_direct(struct bpf_sock_addr *ctx, __be32 daddr,
						    __be16 dport, __u8 protocol)
{
	struct node_config *cfg = node_config();

	/* proxy_ip and the protocol first: an array lookup the verifier inlines, so without L7
	 * (and for UDP) a plain connect pays no hash lookup here */
	if (!cfg || !cfg->proxy_ip || protocol != IPPROTO_TCP)
		return SYS_PROCEED;

	__u64 netns_cookie = bpf_get_netns_cookie(ctx);
	struct netns_info *client = netns_client(netns_cookie);

	if (!client)
		return SYS_PROCEED;

	struct l7_redir_val *r = l7_redirect_lookup(daddr, dport, protocol, client->identity);

	if (!r || !r->proxy_port)
		return SYS_PROCEED;

	__be32 paddr = cfg->proxy_ip;
	__be16 pport = bpf_htons(r->proxy_port);
	__u32 policy_id = r->policy_id;

	ctx->user_ip4 = paddr;
	ctx->user_port = (__u32)pport; /* must be a 4-byte write */
	lb4_remember(bpf_get_socket_cookie(ctx), paddr, pport, daddr, dport, 0);
	metrics_add(0, DIR_EGRESS, VERDICT_REDIRECTED, 0);
	emit_sock_event(ctx, EV_SOCK, VERDICT_REDIRECTED, 0, paddr, pport, daddr, dport, 0,
			netns_cookie, cfg, policy_id, client);
	return SYS_PROCEED;
}

static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	__u8 protocol = (__u8)ctx->protocol;

	if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
		return SYS_PROCEED;

	__be32 vip = ctx->user_ip4;
	__be16 vport = (__be16)ctx->user_port; /* network order in the low 16 bits */
	struct lb4_service *svc = lb4_lookup_service(vip, vport, protocol);

	if (!svc)
		return sock4_l7_redirect_direct(ctx, vip, vport, protocol);

	struct node_config *cfg = node_config();
	__u64 netns_cookie = bpf_get_netns_cookie(ctx);
	__u64 now = bpf_ktime_get_ns();
	__u16 rev_nat_index = svc->rev_nat_index;
	__be32 addr;
	__be16 port;
	__u8 verdict = VERDICT_TRANSLATED;
	__u32 policy_id = 0;
	struct netns_info *client = 0;

	if ((svc->flags & SVC_F_L7) && svc->l7_proxy_port && cfg && cfg->proxy_ip) {
		/* Routed service: the node Envoy listens on one port per service, so it knows the
		 * service from the port; reverse translation still shows the VIP. */
		addr = cfg->proxy_ip;
		port = bpf_htons(svc->l7_proxy_port);
		verdict = VERDICT_REDIRECTED;
	} else {
		if (svc->count == 0)
			return refuse(ctx, vip, vport, rev_nat_index, netns_cookie, cfg);

		__u32 backend_id = 0;
		struct lb4_backend *be = 0;

		if (svc->flags & SVC_F_AFFINITY) {
			backend_id = lb4_affinity_backend(svc, netns_cookie, now);
			if (backend_id)
				be = bpf_map_lookup_elem(&nm_lb4_be, &backend_id);
		}
		if (!be) {
			struct bpf_sock *sk = ctx->sk;
			__u16 src_port = sk ? (__u16)sk->src_port : 0;

			backend_id = lb4_select_backend(svc, vip, vport, protocol, netns_cookie,
							src_port);
			be = backend_id ? bpf_map_lookup_elem(&nm_lb4_be, &backend_id) : 0;
		}
		/* A slot or backend missing: the agent is mid-update. Refusing is honest; the
		 * client retries. */
		if (!be)
			return refuse(ctx, vip, vport, rev_nat_index, netns_cookie, cfg);
		if (svc->flags & SVC_F_AFFINITY)
			lb4_affinity_update(svc, netns_cookie, backend_id, now);
		addr = be->address;
		port = be->port;
		/* The chosen backend's port is L7-covered for this client: the proxy, which knows
		 * the backend from its listener port; the application still sees the VIP. */
		if (cfg && cfg->proxy_ip && protocol == IPPROTO_TCP)
			client = netns_client(netns_cookie);
		if (client) {
			struct l7_redir_val *r = l7_redirect_lookup(addr, port, protocol,
								    client->identity);

			if (r && r->proxy_port) {
				addr = cfg->proxy_ip;
				port = bpf_htons(r->proxy_port);
				verdict = VERDICT_REDIRECTED;
				policy_id = r->policy_id;
			} else {
				client = 0; /* the event names a client only for its redirect */
			}
		}
	}

	ctx->user_ip4 = addr;
	ctx->user_port = (__u32)port; /* must be a 4-byte write */
	lb4_remember(bpf_get_socket_cookie(ctx), addr, port, vip, vport, rev_nat_index);
	metrics_add(0, DIR_EGRESS, verdict, 0);
	emit_sock_event(ctx, EV_SOCK, verdict, 0, addr, port, vip, vport, rev_nat_index,
			netns_cookie, cfg, policy_id, client);
	return SYS_PROCEED;
}

static __always_inline int sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_reverse_sk_key key = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	struct lb4_reverse_sk_val *val = bpf_map_lookup_elem(&nm_lb4_rsk, &key);

	if (!val)
		return SYS_PROCEED;

	/* As Cilium does: translate only while the service still exists with that VIP (or, for
	 * a direct L7 redirect, index 0, while the pod port is still redirected for this client:
	 * an entry for its identity or for any client; for any client only while nm_netns does
	 * not know the socket's namespace, as just after an upgrade), so a removed service stops
	 * pretending. */
	__u16 index = val->rev_nat_index;
	int live;

	if (index == 0) {
		struct netns_info *client = netns_client(bpf_get_netns_cookie(ctx));
		__u32 identity = client ? client->identity : IDENTITY_ANY;

		live = l7_redirect_lookup(val->address, val->port, (__u8)ctx->protocol,
					  identity) != 0;
	} else {
		struct lb4_reverse_nat *rn = bpf_map_lookup_elem(&nm_lb4_revnat, &index);

		live = rn && rn->address == val->address && rn->port == val->port;
	}
	if (!live) {
		bpf_map_delete_elem(&nm_lb4_rsk, &key);
		return SYS_PROCEED;
	}
	ctx->user_ip4 = val->address;
	ctx->user_port = (__u32)val->port;
	return SYS_PROCEED;
}

/* An event of connect4_proxy, told as the client pod's: its veth, its identity, egress. */
static __always_inline void emit_proxy_event(struct bpf_sock_addr *ctx, __u8 type, __u8 verdict,
					     __u8 reason, __u8 direction, __u32 ifindex,
					     const struct nm_pkt *p, __u32 src_identity,
					     __u32 dst_identity, __u32 policy_id)
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
	e->dport = p->dport;
	e->protocol = p->protocol;
	e->tcp_flags = 0;
	e->rev_nat_index = 0;
	e->src_identity = src_identity;
	e->dst_identity = dst_identity;
	e->policy_id = policy_id;
	e->len = 0;
	e->netns_cookie = bpf_get_netns_cookie(ctx);
	e->orig_daddr = 0;
	e->orig_dport = 0;
	e->flags = 0;
	e->pad = 0;
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

static __always_inline int proxy_refuse(struct bpf_sock_addr *ctx, __u8 reason, __u8 direction,
					__u32 ifindex, const struct nm_pkt *p,
					__u32 src_identity, __u32 dst_identity, __u32 policy_id)
{
	metrics_add(reason, direction, VERDICT_DROPPED, 0);
	flowcnt_add(src_identity, dst_identity, p->dport, p->protocol, VERDICT_DROPPED,
		    direction, 0);
	emit_proxy_event(ctx, EV_DROP, VERDICT_DROPPED, reason, direction, ifindex, p,
			 src_identity, dst_identity, policy_id);
	/* The default for a rejecting connect4 program, made explicit: Envoy reports the
	 * upstream as a connect failure (503). */
	bpf_set_retval(-EPERM);
	return SYS_REJECT;
}

/* The node Envoy's upstream connect() on behalf of a client that is not a pod of this node: the
 * inbound tunnel (after mutual TLS, NM_MARK_AUTH on the socket) or a plaintext connection it
 * passes through (PERMISSIVE). To a local pod, that pod's *ingress* policy decides now, for the
 * client's identity: a denied connection fails at once (the tunnel is closed, the client's own
 * connection with it) instead of waiting out a connect timeout on a SYN its veth drops.
 * to_container still decides the same on the packet. */
static __always_inline int sock4_proxy_ingress(struct bpf_sock_addr *ctx, struct bpf_sock *sk,
					       __be32 src, __u8 protocol)
{
	__be32 dst = ctx->user_ip4;
	struct lxc_info *lxc = bpf_map_lookup_elem(&nm_lxc, &dst);

	if (!lxc || protocol != IPPROTO_TCP)
		return SYS_PROCEED;

	__u32 ifindex = lxc->ifindex;
	__u32 local_identity = lxc->identity;
	struct node_config *cfg = node_config();
	struct nm_pkt p = {
		.saddr = src,
		.daddr = dst,
		.sport = bpf_htons((__u16)sk->src_port),
		.dport = (__be16)ctx->user_port,
		.protocol = protocol,
	};
	__u32 remote_identity = identity_of(src, cfg);
	struct endpoint_info *ep = bpf_map_lookup_elem(&nm_endpoints, &ifindex);

	if (!ep)
		return proxy_refuse(ctx, DROP_UNKNOWN_ENDPOINT, DIR_INGRESS, ifindex, &p,
				    remote_identity, local_identity, 0);

	struct policy_decision d = { .verdict = POLICY_ALLOW };

	if (!always_allowed(&p, DIR_INGRESS, remote_identity, cfg))
		policy_decide(&d, ifindex, DIR_INGRESS, (ep->flags & EP_F_INGRESS_ENFORCED) != 0,
			      remote_identity, src, &p, (sk->mark & NM_MARK_AUTH) != 0);
	if (d.verdict == POLICY_DENY)
		return proxy_refuse(ctx, d.reason, DIR_INGRESS, ifindex, &p, remote_identity,
				    local_identity, d.policy_id);
	return SYS_PROCEED;
}

/* The node Envoy's upstream connect(). Envoy's original_src binds the socket to the client
 * pod's IP before connecting, so the bound address says on whose behalf it connects: that
 * pod's egress policy decides, exactly as from_container decides a new connection of the pod
 * (which never sees this one: it leaves from the node namespace). Sockets not bound to a
 * local pod's address are the tunnel's: see sock4_proxy_ingress. */
static __always_inline int sock4_proxy_egress(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u8 protocol = (__u8)ctx->protocol;

	if (!sk || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP))
		return SYS_PROCEED;

	__be32 src = sk->src_ip4;

	if (!src || (sk->mark & NM_MARK_TUNNEL))
		return SYS_PROCEED;

	struct lxc_info *lxc = bpf_map_lookup_elem(&nm_lxc, &src);

	if (!lxc)
		return sock4_proxy_ingress(ctx, sk, src, protocol);

	__u32 ifindex = lxc->ifindex;
	__u32 local_identity = lxc->identity;
	struct node_config *cfg = node_config();
	struct nm_pkt p = {
		.saddr = src,
		.daddr = ctx->user_ip4,
		.sport = bpf_htons((__u16)sk->src_port), /* 0 until connect() picks one */
		.dport = (__be16)ctx->user_port,
		.protocol = protocol,
	};
	struct ipcache_entry *remote_entry = ipcache_of(p.daddr);
	__u32 remote_identity = identity_from(p.daddr, remote_entry, cfg);
	struct endpoint_info *ep = bpf_map_lookup_elem(&nm_endpoints, &ifindex);
	/* Authenticated destination (policy.h): Envoy carries the connection in the tunnel and
	 * checks the destination's certificate, or the destination is a pod of this node. */
	int authenticated = (protocol == IPPROTO_TCP && tunnel_enabled(cfg) &&
			     tunnel_wanted(remote_entry, p.daddr, p.dport)) ||
			    (cfg && remote_entry && remote_entry->node_ip == cfg->node_ip &&
			     remote_identity >= FIRST_POD_IDENTITY);

	/* Fail-closed as at the veth: an endpoint whose policy is not in place yet. */
	if (!ep)
		return proxy_refuse(ctx, DROP_UNKNOWN_ENDPOINT, DIR_EGRESS, ifindex, &p,
				    local_identity, remote_identity, 0);

	struct policy_decision d = { .verdict = POLICY_ALLOW };

	/* A pod reaching itself (through a Service or an L7 redirect: the hairpin) is not held to
	 * its own egress policy, as in Cilium's service loopback and as without a mesh, where the
	 * connection never leaves the pod. */
	if (p.daddr != src && !always_allowed(&p, DIR_EGRESS, remote_identity, cfg))
		policy_decide(&d, ifindex, DIR_EGRESS, (ep->flags & EP_F_EGRESS_ENFORCED) != 0,
			      remote_identity, p.daddr, &p, authenticated);
	/* REDIRECT (an egress L7 rule) is allowed: this is the proxy that enforces it. */
	if (d.verdict == POLICY_DENY)
		return proxy_refuse(ctx, d.reason, DIR_EGRESS, ifindex, &p, local_identity,
				    remote_identity, d.policy_id);

	metrics_add(0, DIR_EGRESS, VERDICT_FORWARDED, 0);
	flowcnt_add(local_identity, remote_identity, p.dport, protocol, VERDICT_FORWARDED,
		    DIR_EGRESS, 0);
	emit_proxy_event(ctx, EV_TRACE, VERDICT_FORWARDED, 0, DIR_EGRESS, ifindex, &p,
			 local_identity, remote_identity, d.policy_id);
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

SEC("cgroup/recvmsg4")
int recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}

SEC("cgroup/getpeername4")
int getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}

SEC("cgroup/connect4")
int connect4_proxy(struct bpf_sock_addr *ctx)
{
	return sock4_proxy_egress(ctx);
}

char LICENSE[] SEC("license") = "GPL";
