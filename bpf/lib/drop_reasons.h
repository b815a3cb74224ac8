/* SPDX-License-Identifier: GPL-2.0 */
/* Drop reasons: the values of Hubble's flow.proto DropReason (cilium/api/v1/flow/flow.proto),
 * so a nodemesh drop reads the same in Hubble tooling. The twin is layout.DropReason. */
#pragma once

#define DROP_INVALID_SOURCE_IP        132 /* INVALID_SOURCE_IP: a pod sent with an address not its own */
#define DROP_POLICY_DENIED            133 /* POLICY_DENIED: no rule allows it and the pod is isolated */
#define DROP_INVALID_PACKET           134 /* INVALID_PACKET_DROPPED: truncated or malformed IPv4 */
#define DROP_UNSUPPORTED_L3           139 /* UNSUPPORTED_L3_PROTOCOL: IPv6 and other non-IPv4/ARP */
#define DROP_CT_MAP_INSERTION_FAILED  155 /* CT_MAP_INSERTION_FAILED: conntrack full */
#define DROP_FRAG_NOT_SUPPORTED       157 /* IP_FRAGMENTATION_NOT_SUPPORTED: non-first fragment */
#define DROP_NO_SERVICE               158 /* SERVICE_BACKEND_NOT_FOUND: ClusterIP without backends */
#define DROP_SOCKET_LOOKUP_FAILED     178 /* SOCKET_LOOKUP_FAILED: the node Envoy's tunnel listener is not there */
#define DROP_SOCKET_ASSIGN_FAILED     179 /* SOCKET_ASSIGN_FAILED: bpf_sk_assign to the tunnel listener failed */
#define DROP_PROXY_UNSUPPORTED        180 /* PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL: L7 redirect (later issue) */
#define DROP_POLICY_DENY              181 /* POLICY_DENY: an explicit deny rule matched */
#define DROP_AUTH_REQUIRED            189 /* AUTH_REQUIRED: a rule that requires an authenticated peer, and the peer was not */
#define DROP_UNENCRYPTED_TRAFFIC      195 /* UNENCRYPTED_TRAFFIC: TCP from another node that went around the tunnel */
#define DROP_RATE_LIMITED             198 /* DROP_RATE_LIMITED: a pod over its node-local DNS query budget */
#define DROP_UNKNOWN_ENDPOINT         203 /* DROP_EP_NOT_READY: the veth has no nm_endpoints entry (fail-closed) */
