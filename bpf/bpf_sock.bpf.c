/* SPDX-License-Identifier: GPL-2.0 */
/* Socket hooks of the node's cgroup (it covers every pod):
 *   connect4     TCP and connected UDP: ClusterIP VIP:port -> backend, once per connection
 *   sendmsg4     unconnected UDP: the same, per datagram
 *   recvmsg4     UDP recvfrom(): backend -> VIP, so replies come from the address asked for
 *   getpeername4 backend -> VIP
 * A service without backends refuses connect()/sendto() at once with ECONNREFUSED. Every
 * translation and every refusal is an event. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/drop_reasons.h"
#include "lib/identity.h"
#include "lib/events.h"
#include "lib/lb.h"

#define SYS_REJECT  0
#define SYS_PROCEED 1

static __always_inline void emit_sock_event(struct bpf_sock_addr *ctx, __u8 type, __u8 verdict,
					    __u8 reason, __be32 daddr, __be16 dport,
					    __be32 vip, __be16 vport, __u16 rev_nat_index,
					    __u64 netns_cookie, const struct node_config *cfg)
{
	struct flow_event *e = bpf_ringbuf_reserve(&nm_events, sizeof(*e), 0);
	struct bpf_sock *sk = ctx->sk;
	__be32 saddr = 0;
	__u16 sport = 0;

	if (!e)
		return;
	if (sk) {
		saddr = sk->src_ip4;
		sport = (__u16)sk->src_port;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->type = type;
	e->verdict = verdict;
	e->reason = reason;
	e->direction = DIR_EGRESS;
	e->ifindex = 0;
	e->saddr = saddr;
	e->daddr = daddr;
	e->sport = bpf_htons(sport); /* bpf_sock.src_port is host order */
	e->dport = dport;
	e->protocol = (__u8)ctx->protocol;
	e->tcp_flags = 0;
	e->rev_nat_index = rev_nat_index;
	e->src_identity = saddr ? identity_of(saddr, cfg) : 0;
	e->dst_identity = verdict == VERDICT_DROPPED ? 0 : identity_of(daddr, cfg);
	e->policy_id = 0;
	e->len = 0;
	e->netns_cookie = netns_cookie;
	e->orig_daddr = vip;
	e->orig_dport = vport;
	e->pad = 0;
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

static __always_inline int refuse(struct bpf_sock_addr *ctx, __be32 vip, __be16 vport,
				  __u16 rev_nat_index, __u64 netns_cookie,
				  const struct node_config *cfg)
{
	metrics_add(DROP_NO_SERVICE, DIR_EGRESS, VERDICT_DROPPED, 0);
	emit_sock_event(ctx, EV_DROP, VERDICT_DROPPED, DROP_NO_SERVICE, vip, vport, vip, vport,
			rev_nat_index, netns_cookie, cfg);
	/* Returning 0 alone surfaces as EPERM; the application should see what a kube-proxy
	 * REJECT rule gives it. */
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
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
		return SYS_PROCEED;

	struct node_config *cfg = node_config();
	__u64 netns_cookie = bpf_get_netns_cookie(ctx);
	__u64 now = bpf_ktime_get_ns();
	__u16 rev_nat_index = svc->rev_nat_index;
	__be32 addr;
	__be16 port;
	__u8 verdict = VERDICT_TRANSLATED;

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
	}

	ctx->user_ip4 = addr;
	ctx->user_port = (__u32)port; /* must be a 4-byte write */
	lb4_remember(bpf_get_socket_cookie(ctx), addr, port, vip, vport, rev_nat_index);
	metrics_add(0, DIR_EGRESS, verdict, 0);
	emit_sock_event(ctx, EV_SOCK, verdict, 0, addr, port, vip, vport, rev_nat_index,
			netns_cookie, cfg);
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

	/* As Cilium does: translate only while the service still exists with that VIP, so a
	 * removed service stops pretending. */
	__u16 index = val->rev_nat_index;
	struct lb4_reverse_nat *rn = bpf_map_lookup_elem(&nm_lb4_revnat, &index);

	if (!rn || rn->address != val->address || rn->port != val->port) {
		bpf_map_delete_elem(&nm_lb4_rsk, &key);
		return SYS_PROCEED;
	}
	ctx->user_ip4 = val->address;
	ctx->user_port = (__u32)val->port;
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

char LICENSE[] SEC("license") = "GPL";
