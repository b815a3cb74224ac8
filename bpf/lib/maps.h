/* SPDX-License-Identifier: GPL-2.0 */
/* Every map of the datapath, declared once. Both objects include this header; LIBBPF_PIN_BY_NAME
 * makes libbpf pin each map as <pin_root_path>/<name> (the node's bpffs directory) or reuse the
 * pin that is already there, so bpf_lxc.o and bpf_sock.o share one instance of every map and
 * the maps outlive the agent. */
#pragma once

#include "common.h"

#define NM_ENDPOINTS_MAX   4096
#define NM_IPCACHE_MAX     65536
#define NM_POLICY_MAX      65536
#define NM_POLICY_CIDR_MAX 16384
#define NM_CT_MAX          65536
#define NM_LB_SVC_MAX      65536
#define NM_LB_BE_MAX       65536
#define NM_LB_REVNAT_MAX   65536
#define NM_LB_MAGLEV_MAX   1024
#define NM_LB_AFFIN_MAX    16384
#define NM_LB_RSK_MAX      32768
#define NM_EVENTS_BYTES    (1 << 20)
#define NM_METRICS_MAX     1024
#define NM_FLOWCNT_MAX     8192
#define NM_L7_REDIR_MAX    16384
#define NM_LXC_MAX         NM_ENDPOINTS_MAX
#define NM_NETNS_MAX       NM_ENDPOINTS_MAX
#define NM_TUNNEL_PORT_MAX 4096
#define NM_TUNNEL_SOCK_OUT 0 /* nm_tunnel_socks slots: the node Envoy's tunnel listeners */
#define NM_TUNNEL_SOCK_IN  1

/* Default Maglev table size; the loader sets the real one (a prime) as the map's value size and
 * as the .rodata constant nm_maglev_m before load. */
#define NM_MAGLEV_M_DEFAULT 16381

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_ENDPOINTS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct endpoint_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NM_IPCACHE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NM_POLICY_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NM_POLICY_CIDR_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_cidr_key);
	__type(value, struct policy_cidr_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_policy_cidr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NM_CT_MAX);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_LB_SVC_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_lb4_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_LB_BE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_lb4_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_LB_REVNAT_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u16);
	__type(value, struct lb4_reverse_nat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_lb4_revnat SEC(".maps");

/* rev_nat_index -> __u32 backend_ids[M]. Declared by size (no BTF value type) because the
 * loader changes the value size to the agent's M before load. NO_PREALLOC: 64 KiB values. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_LB_MAGLEV_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(key_size, sizeof(__u16));
	__uint(value_size, sizeof(__u32) * NM_MAGLEV_M_DEFAULT);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_lb4_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NM_LB_AFFIN_MAX);
	__type(key, struct lb4_affinity_key);
	__type(value, struct lb4_affinity_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_lb4_affin SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NM_LB_RSK_MAX);
	__type(key, struct lb4_reverse_sk_key);
	__type(value, struct lb4_reverse_sk_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_lb4_rsk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, NM_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_events SEC(".maps");

/* Flow events the ring buffer had no room for (per CPU, one slot): counted, never hidden. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, NM_METRICS_MAX);
	__type(key, struct metrics_key);
	__type(value, struct metrics_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, NM_FLOWCNT_MAX);
	__type(key, struct flow_count_key);
	__type(value, struct metrics_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_flowcnt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_L7_REDIR_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l7_redir_key);
	__type(value, struct l7_redir_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_l7_redir SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_LXC_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __be32);
	__type(value, struct lxc_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_lxc SEC(".maps");

/* A local pod's network namespace cookie -> its identity and veth (the agent, per pod). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_NETNS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct netns_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_netns SEC(".maps");

/* (pod IP, port) whose mutual-TLS mode differs from its pod's (lib/tunnel.h; the agent). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_TUNNEL_PORT_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tunnel_port_key);
	__type(value, struct tunnel_port_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_tunnel_port SEC(".maps");

/* A pod's veth -> its budget for UDP queries to the node-local DNS (lib/dnslimit.h). LRU: a
 * pod that is gone leaves its entry to be evicted; a new pod on a reused veth index starts with
 * a fresh budget soon enough. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NM_ENDPOINTS_MAX);
	__type(key, __u32);
	__type(value, struct rate_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_dns_limit SEC(".maps");

/* Flow events' budget per source (lib/events.h): a veth's ifindex, or a socket's network
 * namespace cookie with the top bit set -> the budget and the events it suppressed. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NM_ENDPOINTS_MAX);
	__type(key, __u64);
	__type(value, struct rate_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_event_budget SEC(".maps");

/* The node Envoy's tunnel listeners (NM_TUNNEL_SOCK_*), put here by the agent: the netns
 * socket-lookup program (bpf_netns.bpf.c) hands the tunnel's connections to them. A socket
 * leaves the map by itself when Envoy closes it. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_tunnel_socks SEC(".maps");

static __always_inline struct node_config *node_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&nm_config, &zero);
}
