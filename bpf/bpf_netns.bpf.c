/* SPDX-License-Identifier: GPL-2.0 */
/* The node namespace's socket lookup (BPF_SK_LOOKUP, attached to the node's network namespace).
 *
 * One job: the listener of a tunnelled connection. The tc programs mark a tunnelled SYN for
 * local delivery (lib/tunnel.h) but leave its destination alone (the pod's address and port);
 * when the kernel looks for a listener for it, this program names the node Envoy's: the
 * outbound tunnel listener for a destination of another node that the tunnel covers, the
 * inbound one for a local pod that receives through the tunnel (EP_F_TUNNEL_IN). The kernel
 * asks only after it looked for the connection's own socket, so a SYN that reuses the tuple of
 * an earlier connection still in TIME-WAIT recycles it as for any other listener, and the
 * reuseport group of the listener (one socket per Envoy worker) picks the worker. Lookups for
 * anything else pass untouched. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/identity.h"
#include "lib/tunnel.h"

SEC("sk_lookup")
int tunnel_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	struct node_config *cfg = node_config();

	if (!tunnel_enabled(cfg))
		return SK_PASS;

	__be32 local = ctx->local_ip4;
	__u32 slot;
	struct lxc_info *lxc = bpf_map_lookup_elem(&nm_lxc, &local);

	if (lxc) {
		__u32 ifindex = lxc->ifindex;
		struct endpoint_info *ep = bpf_map_lookup_elem(&nm_endpoints, &ifindex);

		if (!ep || !(ep->flags & EP_F_TUNNEL_IN))
			return SK_PASS;
		slot = NM_TUNNEL_SOCK_IN;
	} else {
		__be16 port = bpf_htons((__u16)ctx->local_port);

		if (!tunnel_wanted(ipcache_of(local), local, port))
			return SK_PASS;
		slot = NM_TUNNEL_SOCK_OUT;
	}

	struct bpf_sock *sk = bpf_map_lookup_elem(&nm_tunnel_socks, &slot);

	if (!sk)
		return SK_PASS; /* no listener: the SYN gets a reset, never delivered in clear */
	bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
