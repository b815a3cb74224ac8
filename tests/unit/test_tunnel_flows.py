"""Flows of the mutual-TLS tunnel: events that went through it, and its failures."""

from __future__ import annotations

from nodemesh.agent.tunnelflows import tunnel_failure
from nodemesh.mtls.tunnel import INBOUND_LISTENER, OUTBOUND_LISTENER
from nodemesh.observe.flow import FlowEndpoint, StaticContext, flow_from_event

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = "spiffe://cluster.local/ns/default/sa/default"


def ctx(node: str = "node1") -> StaticContext:
    return StaticContext(
        node_name=node,
        by_ip={"10.244.1.5": FlowEndpoint(identity=300, namespace="default", pod_name="client",
                                      id=7 if node == "node1" else 0),
               "10.244.2.5": FlowEndpoint(identity=301, namespace="default", pod_name="web",
                                      id=9 if node == "node2" else 0)},
        spiffe_ids={"10.244.1.5": CLIENT, "10.244.2.5": SERVER})


def event(direction: int, flags: int) -> dict:
    return {"ts_ns": 0, "type": 1, "verdict": 1, "reason": 0, "direction": direction,
            "ifindex": 7, "saddr": "10.244.1.5", "daddr": "10.244.2.5", "sport": 40000,
            "dport": 8080, "protocol": 6, "tcp_flags": 2, "rev_nat_index": 0,
            "src_identity": 300, "dst_identity": 301, "policy_id": 0, "len": 60,
            "netns_cookie": 0, "orig_daddr": "0.0.0.0", "orig_dport": 0, "flags": flags}


def test_into_the_tunnel_at_the_source() -> None:
    f = flow_from_event(event(1, 1), ctx("node1"))
    assert f["auth_type"] == "MUTUAL_TLS"
    assert f["mtls"] == {"mutually_authenticated": True, "source_identity": CLIENT,
                         "destination_identity": SERVER}


def test_out_of_the_tunnel_at_the_destination() -> None:
    f = flow_from_event(event(0, 2), ctx("node2"))
    assert f["auth_type"] == "MUTUAL_TLS" and f["traffic_direction"] == "INGRESS"


def test_plain_flows_say_nothing_of_mtls() -> None:
    f = flow_from_event(event(1, 0), ctx())
    assert "auth_type" not in f and "mtls" not in f


def test_a_handshake_failure_names_both_identities() -> None:
    reason = ("TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
              "verify_cert_failed:_verify_SAN_list,_expected_SANs:_[spiffe://cluster.local/ns/"
              "default/sa/default],_certificate_SANs:_[spiffe://cluster.local/ns/prod/sa/evil]:"
              "TLS_error_end")
    entry = {"custom_tags": {"nodemesh.listener": OUTBOUND_LISTENER},
             "response_flags": ["UF", "URX"], "upstream_transport_failure_reason": reason,
             "downstream_remote_address": "10.244.1.5:40000",
             "downstream_local_address": "10.244.2.5:8080", "time": "2026-12-07T00:00:00Z"}
    f = tunnel_failure(entry, ctx(), b"x")
    assert f is not None and f["verdict"] == "DROPPED" and f["drop_reason_desc"] == "AUTH_REQUIRED"
    assert "spiffe://cluster.local/ns/prod/sa/evil" in f["Summary"]
    assert "spiffe://cluster.local/ns/default/sa/default" in f["Summary"]
    assert f["source"]["pod_name"] == "client" and f["destination"]["pod_name"] == "web"


def test_plaintext_to_strict_is_unencrypted_traffic() -> None:
    entry = {"custom_tags": {"nodemesh.listener": INBOUND_LISTENER}, "response_flags": ["NR"],
             "downstream_remote_address": "172.30.0.250:5000",
             "downstream_local_address": "10.244.2.5:8080"}
    f = tunnel_failure(entry, ctx("node2"), b"y")
    assert f is not None and f["drop_reason"] == 195
    assert "172.30.0.250" in f["Summary"] and "STRICT" in f["Summary"]


def test_plaintext_into_a_tls_chain_is_unencrypted_traffic() -> None:
    """Plaintext that reached a chain expecting TLS: BoringSSL names the first bytes."""
    for name in ("HTTP_REQUEST", "WRONG_VERSION_NUMBER"):
        entry = {"custom_tags": {"nodemesh.listener": INBOUND_LISTENER},
                 "downstream_transport_failure_reason":
                     f"TLS_error:|268435612:SSL_routines:OPENSSL_internal:{name}:TLS_error_end",
                 "downstream_remote_address": "172.30.0.250:5000",
                 "downstream_local_address": "10.244.2.5:8080"}
        f = tunnel_failure(entry, ctx("node2"), b"y")
        assert f is not None and f["drop_reason_desc"] == "UNENCRYPTED_TRAFFIC", name
        assert "auth_type" not in f


def test_plaintext_claiming_a_mesh_address_is_auth_required() -> None:
    entry = {"custom_tags": {"nodemesh.listener": INBOUND_LISTENER},
             "downstream_transport_failure_reason":
                 "TLS_error:|268435612:SSL_routines:OPENSSL_internal:HTTP_REQUEST:TLS_error_end",
             "downstream_remote_address": "10.244.1.5:5000",
             "downstream_local_address": "10.244.2.5:8080"}
    f = tunnel_failure(entry, ctx("node2"), b"y")
    assert f is not None and f["drop_reason_desc"] == "AUTH_REQUIRED"
    assert CLIENT in f["Summary"] and "plaintext" in f["Summary"]


def test_other_failures_are_not_flows() -> None:
    entry = {"custom_tags": {"nodemesh.listener": INBOUND_LISTENER}, "response_flags": ["UF"],
             "downstream_remote_address": "10.244.1.5:1", "downstream_local_address": "10.244.2.5:2"}
    assert tunnel_failure(entry, ctx("node2"), b"z") is None
    assert tunnel_failure({"custom_tags": {"nodemesh.listener": "svc/x"}}, ctx(), b"") is None
