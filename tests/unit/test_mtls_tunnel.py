"""The tunnel's pure parts: datapath flags, listeners and clusters, checked with Envoy itself."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest

from nodemesh.certs.authority import BuiltinCA
from nodemesh.certs.leaf import make_csr, new_key
from nodemesh.certs.pem import key_to_pem
from nodemesh.datapath.layout import IpcacheFlags
from nodemesh.mtls.peerauth import Mode, WorkloadMode
from nodemesh.mtls.tunnel import (
    INBOUND_LISTENER,
    OUTBOUND_LISTENER,
    MeshPod,
    TunnelInput,
    datapath_tunnel,
    mesh_pods,
    plan_tunnel,
)
from nodemesh.route.protos import to_dict
from nodemesh.route.tls import ROOTS_SECRET
from nodemesh.route.validate import envoy_path

TD = "cluster.local"
PERMISSIVE = WorkloadMode(Mode.PERMISSIVE)


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


PODS = (
    MeshPod("10.244.1.5", "default", "a", "node1", "client"),
    MeshPod("10.244.1.6", "default", "b", "node1", "default", WorkloadMode(
        Mode.PERMISSIVE, {8080: Mode.STRICT})),
    MeshPod("10.244.2.5", "default", "c", "node2", "server"),
    MeshPod("10.244.2.6", "prod", "d", "node2", "default", WorkloadMode(Mode.DISABLE)),
    MeshPod("10.244.2.7", "prod", "e", "node2", "default", WorkloadMode(
        Mode.DISABLE, {9090: Mode.STRICT})),
    MeshPod("10.244.2.8", "prod", "f", "node2", "default", WorkloadMode(
        Mode.STRICT, {7070: Mode.DISABLE})),
)
READY = frozenset({spiffe("default", "client"), spiffe("default", "default")})


def test_datapath_flags_follow_the_modes() -> None:
    dp = datapath_tunnel(PODS, "node1")
    assert dp.ipcache_flags == {
        "10.244.2.5": IpcacheFlags.TUNNEL,
        # DISABLE: no tunnel; a STRICT port of a DISABLE pod is the exception
        "10.244.2.7": IpcacheFlags.TUNNEL_PORTS,
        "10.244.2.8": IpcacheFlags.TUNNEL | IpcacheFlags.TUNNEL_PORTS,
    }
    assert dp.port_overrides == (("10.244.2.7", 9090, True), ("10.244.2.8", 7070, False))
    assert dp.inbound_pods == {"10.244.1.5", "10.244.1.6"}
    # The other node's view of the same pods: its own pods receive through the tunnel.
    other = datapath_tunnel(PODS, "node2")
    assert other.inbound_pods == {"10.244.2.5", "10.244.2.7", "10.244.2.8"}
    assert set(other.ipcache_flags) == {"10.244.1.5", "10.244.1.6"}


def test_plan_covers_only_identities_with_certificates() -> None:
    plan = plan_tunnel(TunnelInput("node1", TD, PODS, frozenset({spiffe("default", "client")})))
    assert plan.sources == {"10.244.1.5"}
    assert plan.inbound_pods == {"10.244.1.5"}
    assert plan.secrets == {spiffe("default", "client")}
    assert plan.local_identities == READY
    names = {lst.name for lst in plan.listeners}
    assert names == {OUTBOUND_LISTENER, INBOUND_LISTENER}


def test_no_certificate_no_outbound_listener() -> None:
    plan = plan_tunnel(TunnelInput("node1", TD, PODS, frozenset()))
    assert [lst.name for lst in plan.listeners] == [INBOUND_LISTENER]
    assert not plan.sources and not plan.secrets


def test_outbound_chains_expect_the_destination_identity() -> None:
    plan = plan_tunnel(TunnelInput("node1", TD, PODS, READY))
    out = to_dict(next(lst for lst in plan.listeners if lst.name == OUTBOUND_LISTENER))
    chains = {c["name"]: c for c in out["filter_chains"]}
    assert "outbound/default/client/default/server" in chains
    assert "outbound/default/client/*" in chains  # a destination not known yet
    expect = chains["outbound/default/client/default/server"]["filters"][0]["typed_config"]
    assert expect["on_new_connection"][0]["format_string"]["text_format_source"][
        "inline_string"] == spiffe("default", "server")
    assert out["transparent"] is True
    tree = json.dumps(out["filter_chain_matcher"])
    assert "10.244.1.5" in tree and "10.244.2.5" in tree


def test_no_chain_for_plaintext_to_strict_pods() -> None:
    plan = plan_tunnel(TunnelInput("node1", TD, PODS, READY))
    inbound = to_dict(next(lst for lst in plan.listeners if lst.name == INBOUND_LISTENER))
    tree = json.dumps(inbound["filter_chain_matcher"])
    # a is STRICT: not among the plaintext destinations; b is PERMISSIVE but 8080 is STRICT
    plain = json.loads(tree)["on_no_match"]["matcher"]["matcher_tree"]
    ranges = plain["custom_match"]["typed_config"]["range_matchers"]
    ips = [r["address_prefix"] for m in ranges for r in m["ranges"]]
    assert "10.244.1.5" not in ips and "10.244.1.6" in ips
    ports = next(m for m in ranges if m["ranges"][0]["address_prefix"] == "10.244.1.6")
    port_map = ports["on_match"]["matcher"]["matcher_tree"]["exact_match_map"]["map"]
    assert port_map["8080"]["action"]["name"] == "refuse"
    assert ports["on_match"]["matcher"]["on_no_match"]["action"]["name"] == "inbound/plain"


def test_mesh_pods_reads_identities_and_modes() -> None:
    pods = [
        {"metadata": {"namespace": "x", "name": "p", "labels": {"app": "web"}},
         "spec": {"nodeName": "node1", "serviceAccountName": "web"},
         "status": {"podIP": "10.244.1.9"}},
        {"metadata": {"namespace": "x", "name": "q"}, "spec": {"nodeName": "node2"},
         "status": {"podIP": "10.244.2.9"}},
        {"metadata": {"namespace": "x", "name": "r"}, "spec": {"nodeName": "node2"},
         "status": {}},  # no address yet: not a peer
        {"metadata": {"namespace": "x", "name": "s", "deletionTimestamp": "2026-01-01T00:00:00Z"},
         "spec": {"nodeName": "node2"}, "status": {"podIP": "10.244.2.10"}},
    ]
    pa = [{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
           "metadata": {"namespace": "x", "name": "web",
                        "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"}}}]
    got = {p.name: p for p in mesh_pods(pods, pa)}
    assert set(got) == {"p", "q"}
    assert got["p"].service_account == "web" and got["p"].mode.mode == Mode.PERMISSIVE
    assert got["q"].service_account == "default" and got["q"].mode.mode == Mode.STRICT


def _static(plan, chain: bytes, key: bytes, roots: bytes) -> dict:
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k != "sds_config"}
        if isinstance(o, list):
            return [strip(x) for x in o]
        return o

    secrets = [{"name": s, "tls_certificate": {"certificate_chain": {"inline_bytes": _b64(chain)},
                                               "private_key": {"inline_bytes": _b64(key)}}}
               for s in sorted(plan.secrets)]
    secrets.append({"name": ROOTS_SECRET,
                    "validation_context": {"trusted_ca": {"inline_bytes": _b64(roots)}}})
    listeners = [strip(to_dict(x)) for x in plan.listeners]
    for lst in listeners:  # validate mode binds nothing, but keep it off the wildcard
        lst["address"]["socket_address"]["address"] = "127.0.0.1"
    xds = {"name": "xds_cluster", "type": "STATIC", "connect_timeout": "1s",
           "typed_extension_protocol_options": {
               "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                   "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                            "HttpProtocolOptions",
                   "explicit_http_config": {"http2_protocol_options": {}}}},
           "load_assignment": {"cluster_name": "xds_cluster", "endpoints": [{"lb_endpoints": [
               {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                            "port_value": 15010}}}}]}]}}
    return {"static_resources": {"listeners": listeners,
                                 "clusters": [strip(to_dict(c)) for c in plan.clusters] + [xds],
                                 "secrets": secrets}}


def _b64(b: bytes) -> str:
    import base64

    return base64.b64encode(b).decode()


@pytest.mark.skipif(not os.path.exists(envoy_path()), reason="no Envoy binary")
def test_envoy_accepts_the_plan() -> None:
    with tempfile.TemporaryDirectory() as d:
        ca = BuiltinCA.create(os.path.join(d, "ca"), TD)
        key = new_key()
        chain = ca.sign(make_csr(key, spiffe("default", "client")), spiffe("default", "client"),
                        3600)
        plan = plan_tunnel(TunnelInput("node1", TD, PODS, READY))
        path = os.path.join(d, "bootstrap.json")
        with open(path, "w") as f:
            json.dump(_static(plan, chain, key_to_pem(key), b"".join(ca.roots())), f)
        r = subprocess.run([envoy_path(), "--mode", "validate", "-c", path, "-l", "error",
                            "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:] or r.stdout[-2000:]
