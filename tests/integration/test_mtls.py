"""Mutual TLS between nodes, against the real kernel, the real Envoys and a capture of the wire.

One cluster with 10-second certificates (renewed every few seconds through the whole module) and
one with `--mtls off` as the control that proves the capture would see the marker. Clients run
in pods of node1, servers in pods of node2; the attacker lives on the underlay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.integration.capture import capture
from tests.integration.clusterharness import Cluster, new_cluster

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF

MARKER = "MARKER-7c1b-CLEARTEXT"

SERVER = {"apiVersion": "v1", "kind": "Pod",
          "metadata": {"name": "web", "labels": {"app": "web"}},
          "spec": {"nodeName": "node2", "containers": [{
              "name": "echo", "image": "registry.k8s.io/gateway-api/conformance/echo-basic",
              "ports": [{"containerPort": 8080, "name": "http"},
                        {"containerPort": 9090, "name": "tcp"}]}]}}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                              {"name": "tcp", "port": 9090, "targetPort": 9090}]}}


def client(name: str, sa: str = "client", node: str = "node1", labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "c", "image": "debian",
                                     "command": ["sleep", "infinity"]}]}}


def server(name: str, sa: str, node: str = "node2") -> dict:
    obj = json.loads(json.dumps(SERVER))
    obj["metadata"] = {"name": name, "labels": {"app": name}}
    obj["spec"]["serviceAccountName"] = sa
    obj["spec"]["nodeName"] = node
    return obj


# In a pod: send `text` over TCP to ip:port and expect the echo; prints the seconds it took.
TCP_ECHO = r"""
import socket, sys, time
ip, port, text = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
t0 = time.monotonic()
s = socket.create_connection((ip, port), timeout=5); s.sendall(text); got = b""
while len(got) < len(text):
    chunk = s.recv(4096)
    if not chunk: break
    got += chunk
s.close()
assert got == text, got
print(round(time.monotonic() - t0, 4))
"""

# In a pod: requests (a new connection each) for `seconds`; prints {"ok": n, "failed": n, ...}.
STEADY = r"""
import json, socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds; ok = failed = 0; errors = []
while time.monotonic() < end:
    try:
        s = socket.create_connection((ip, port), timeout=3)
        s.sendall(b"GET /steady HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk: break
            data += chunk
        s.close()
        if data.startswith(b"HTTP/1.1 200"): ok += 1
        else: failed += 1; errors.append(data[:60].decode("latin-1"))
    except OSError as e:
        failed += 1; errors.append(str(e))
    time.sleep(0.05)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
"""


def ip_of(c: Cluster, pod: str) -> str:
    return c.get("pod", pod)["status"]["podIP"]  # type: ignore[index]


def svc_ip(c: Cluster, name: str) -> str:
    return c.get("svc", name)["spec"]["clusterIP"]  # type: ignore[index]


def seen(packets, text: str) -> bool:
    return any(text.encode() in p.payload for p in packets)


def setup_app(c: Cluster) -> None:
    c.apply([SERVER, SERVICE, client("client")])
    c.wait_pods(count=2)
    c.wait_synced()


def send_markers(c: Cluster) -> None:
    """The marker over HTTP and raw TCP, by pod IP and by ClusterIP, from node1 to node2."""
    web, vip = ip_of(c, "web"), svc_ip(c, "web")
    for target in (f"http://{web}:8080/{MARKER}-http-pod", f"http://{vip}/{MARKER}-http-svc"):
        r = c.exec("client", "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                   target)
        assert r.out == "200", r
    for ip, port, tag in ((web, "9090", "tcp-pod"), (vip, "9090", "tcp-svc")):
        c.exec("client", sys.executable, "-c", TCP_ECHO, ip, port, f"{MARKER}-{tag}")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    c = new_cluster(2, "--cert-ttl", "10s")
    try:
        setup_app(c)
        yield c
    finally:
        c.down()
        left = c.leftovers()
        assert not left, f"cluster {c.name} left things behind: {left}"


@pytest.fixture(scope="module")
def clear() -> Iterator[Cluster]:
    c = new_cluster(2, "--mtls", "off")
    try:
        setup_app(c)
        yield c
    finally:
        c.down()
        assert not c.leftovers()


def underlay(c: Cluster) -> str:
    return f"{c.name}-underlay"


def test_the_marker_never_crosses_the_underlay_in_clear(mesh: Cluster) -> None:
    web = ip_of(mesh, "web")
    with capture(underlay(mesh)) as packets:
        send_markers(mesh)
    assert not seen(packets, MARKER), "the marker crossed the underlay in clear"
    # The capture saw the connections: TLS records (0x16 handshake, 0x17 data) to the pod.
    to_web = [p for p in packets if p.dst == web and p.payload]
    assert {p.dport for p in to_web} >= {8080, 9090}
    assert all(p.payload[:1] in (b"\x16", b"\x17", b"\x14", b"\x15") for p in to_web), \
        [p.payload[:8] for p in to_web if p.payload[:1] not in (b"\x16", b"\x17")]


def test_the_control_sees_the_marker_without_mtls(clear: Cluster) -> None:
    with capture(underlay(clear)) as packets:
        send_markers(clear)
    for tag in ("http-pod", "http-svc", "tcp-pod", "tcp-svc"):
        assert seen(packets, f"{MARKER}-{tag}"), tag
    assert clear.run("get", "certificates").err.startswith("mutual TLS is off")


def test_first_connection_of_fresh_identities_is_at_once(mesh: Cluster) -> None:
    mesh.apply([server("fresh-server", "fresh-server"), client("fresh-client", "fresh-client")])
    mesh.wait_pods(count=4)
    target = ip_of(mesh, "fresh-server")
    src = ip_of(mesh, "fresh-client")
    with capture(underlay(mesh)) as packets:
        took = float(mesh.exec("fresh-client", sys.executable, "-c", TCP_ECHO, target, "9090",
                               "first").out)
    syns = [p for p in packets if p.syn_only and p.src == src and p.dst == target]
    assert len(syns) == 1, f"{len(syns)} SYNs on the underlay: one was retransmitted"
    assert took < 0.1, f"the first connection took {took * 1000:.0f} ms"


def test_flows_metrics_and_cli_show_mutual_tls(mesh: Cluster) -> None:
    mesh.exec("client", sys.executable, "-c", TCP_ECHO, ip_of(mesh, "web"), "9090", "flows")
    time.sleep(0.3)
    flows = [json.loads(line)["flow"] for line in mesh.run(
        "observe", "-o", "json", "--last", "50", "--from-pod", "default/client",
        "--to-pod", "default/web").out.splitlines()]
    tunnelled = [f for f in flows if f.get("auth_type") == "MUTUAL_TLS"]
    assert {f["traffic_direction"] for f in tunnelled} == {"EGRESS", "INGRESS"}, flows
    ids = tunnelled[-1]["mtls"]
    assert ids["source_identity"] == "spiffe://cluster.local/ns/default/sa/client"
    assert ids["destination_identity"] == "spiffe://cluster.local/ns/default/sa/default"
    # Istio's label on the connection counter.
    with open(f"{mesh.state_dir}/nodes/node1/metrics.json") as f:
        metrics = json.load(f)
    body = subprocess.run(["curl", "-s", f"http://127.0.0.1:{metrics['port']}/metrics"],
                          capture_output=True, text=True, timeout=10).stdout
    assert 'connection_security_policy="mutual_tls"' in body
    certs = mesh.run("get", "certificates").out
    assert "spiffe://cluster.local/ns/default/sa/client" in certs and "node1" in certs
    described = mesh.run("describe", "pod", "client").out
    assert "spiffe://cluster.local/ns/default/sa/client" in described
    assert "expires" in described
    status = mesh.run("status").out
    assert "mtls:       on, trust domain cluster.local, CA root" in status
    ca = json.loads(mesh.run("ca", "status", "-o", "json").out)
    assert ca["trustDomain"] == "cluster.local" and ca["nodes"]["node1"] >= 1


def _steady(c: Cluster, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", c.state_dir,
                             "exec", "client", "--", sys.executable, "-c", STEADY,
                             ip_of(c, "web"), "8080", str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def test_renewals_under_traffic_fail_nothing(mesh: Cluster) -> None:
    before = sum(mesh.agent(n)["proxy"]["mtls"]["renewals"] for n in ("node1", "node2"))
    load = _steady(mesh, 60)
    result = json.loads(load.communicate(timeout=120)[0])
    after = sum(mesh.agent(n)["proxy"]["mtls"]["renewals"] for n in ("node1", "node2"))
    assert result["failed"] == 0, result
    assert result["ok"] > 300, result
    assert after - before >= 8, f"only {after - before} renewals in 60 s of 10 s certificates"


def test_ca_rotation_under_traffic_fails_nothing(mesh: Cluster) -> None:
    old = json.loads(mesh.run("ca", "status", "-o", "json").out)["activeRoot"]["fingerprint"]
    load = _steady(mesh, 25)
    time.sleep(2)
    out = mesh.run("ca", "rotate", "--timeout", "60").out
    result = json.loads(load.communicate(timeout=90)[0])
    assert result["failed"] == 0, (result, out)
    new = json.loads(mesh.run("ca", "status", "-o", "json").out)
    assert new["activeRoot"]["fingerprint"] != old and new["roots"] == 1, new
    certs = json.loads(mesh.run("get", "certificates", "-o", "json").out)["items"]
    issuers = {c["issuer"] for n in certs for c in n["certificates"]}
    assert issuers == {new["activeRoot"]["fingerprint"]}, issuers


# ---- plaintext from outside the mesh -------------------------------------------------------

ATTACKER = "172.30.0.250"


def attacker(c: Cluster, spoof: str | None = None) -> None:
    """An address on the underlay (and, with `spoof`, a pod's address too, with node2's route
    for it pointed at the attacker, as an attacker on the wire would arrange)."""
    ns = underlay(c)
    subprocess.run(["ip", "-n", ns, "addr", "replace", f"{ATTACKER}/24", "dev", "br0"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "replace", "10.244.2.0/24", "via", "172.30.0.2"],
                   check=True)
    if spoof:
        subprocess.run(["ip", "-n", ns, "addr", "replace", f"{spoof}/32", "dev", "br0"],
                       check=True)
        subprocess.run(["ip", "-n", f"{c.name}-node2", "route", "replace", f"{spoof}/32", "via",
                        ATTACKER], check=True)


def attacker_done(c: Cluster, spoof: str | None = None) -> None:
    if spoof:
        subprocess.run(["ip", "-n", underlay(c), "addr", "del", f"{spoof}/32", "dev", "br0"],
                       check=False)
        subprocess.run(["ip", "-n", f"{c.name}-node2", "route", "del", f"{spoof}/32"],
                       check=False)


def from_underlay(c: Cluster, url: str, source: str = ATTACKER) -> str:
    r = subprocess.run(["ip", "netns", "exec", underlay(c), "curl", "-s", "-m", "3",
                        "--interface", source, "-o", "/dev/null", "-w", "%{http_code}", url],
                       capture_output=True, text=True, timeout=20)
    return r.stdout


def test_the_tunnel_ports_are_closed_to_the_network(mesh: Cluster) -> None:
    """The tunnel listeners take only what the datapath hands them: a connection from the
    underlay, or from a pod of another node, to a node's own address on 15006/15008 is dropped
    at the wire (a DROPPED flow to the host)."""
    attacker(mesh)
    for port in (15006, 15008):
        assert from_underlay(mesh, f"http://172.30.0.2:{port}/") == "000"
        r = mesh.exec("client", "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                      f"http://172.30.0.2:{port}/", check=False)
        assert r.out == "000" and r.code == 28, r  # timed out: the SYN was dropped
    time.sleep(1.5)
    drops = [json.loads(line)["flow"] for line in mesh.run(
        "observe", "-o", "json", "--last", "30", "--node", "node2", "--verdict", "DROPPED"
    ).out.splitlines()]
    to_host = {(f["IP"]["source"], f["l4"]["TCP"]["destination_port"]) for f in drops
               if f.get("drop_reason_desc") == "POLICY_DENIED"
               and f["IP"]["destination"] == "172.30.0.2"}
    client_ip = ip_of(mesh, "client")
    assert to_host >= {(ATTACKER, 15006), (ATTACKER, 15008), (client_ip, 15006),
                       (client_ip, 15008)}, drops


def _listening(netns: str | None) -> list[tuple[str, str]]:
    """(local address:port, process) of the TCP and UDP sockets listening in a namespace."""
    cmd = ["ss", "-H", "-ltunp"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=10).stdout
    rows = []
    for line in out.splitlines():
        cols = line.split()
        rows.append((cols[4], " ".join(cols[6:])))
    return rows


def test_what_listens_where(mesh: Cluster) -> None:
    """docs/security.md's table: the cluster's processes listen only on loopback in the host's
    namespace, and in a node's only on the node's own service addresses and the tunnel ports."""
    pids = {str(mesh.daemon_pid())}
    for node in ("node1", "node2"):
        with open(f"{mesh.state_dir}/nodes/{node}/agent.json") as f:
            pids.add(str(json.load(f)["pid"]))
        with open(f"{mesh.state_dir}/nodes/{node}/envoy/envoy.json") as f:
            pids.add(str(json.load(f)["pid"]))
    ours = [(addr, proc) for addr, proc in _listening(None)
            if any(f"pid={pid}," in proc for pid in pids)]
    assert ours, "found none of the cluster's sockets in the host namespace"
    assert all(addr.startswith("127.0.0.1:") for addr, _ in ours), ours
    for node in ("node1", "node2"):
        for addr, proc in _listening(f"{mesh.name}-{node}"):
            assert (addr in ("169.254.20.10:53", "0.0.0.0:15006", "0.0.0.0:15008")
                    or addr.startswith("169.254.42.1:")), (node, addr, proc)
    # so a pod or the underlay asking a node's address for the metrics port gets nothing
    with open(f"{mesh.state_dir}/nodes/node2/metrics.json") as f:
        port = json.load(f)["port"]
    attacker(mesh)
    assert from_underlay(mesh, f"http://172.30.0.2:{port}/metrics") == "000"
    r = mesh.exec("client", "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://172.30.0.2:{port}/metrics", check=False)
    assert r.out == "000", r
    # the files that hold keys or the store: root only, in a root-only directory
    assert os.stat(mesh.state_dir).st_mode & 0o777 == 0o700
    secret = ["store.db", "ca/ca.key", "ca/ca.json",
              *(f"nodes/{n}/certs.json" for n in ("node1", "node2"))]
    for name in secret:
        assert os.stat(f"{mesh.state_dir}/{name}").st_mode & 0o777 == 0o600, name


def peer_auth(mode: str) -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "web-mode"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": mode}}}


def test_strict_refuses_plaintext_from_outside_and_permissive_lets_it_in(mesh: Cluster) -> None:
    web = ip_of(mesh, "web")
    attacker(mesh)
    # STRICT (the default): refused, and the flow says why.
    assert from_underlay(mesh, f"http://{web}:8080/strict") == "000"
    time.sleep(1.5)
    drops = [json.loads(line)["flow"] for line in mesh.run(
        "observe", "-o", "json", "--last", "20", "--node", "node2", "--verdict", "DROPPED"
    ).out.splitlines()]
    assert any(f.get("drop_reason_desc") == "UNENCRYPTED_TRAFFIC"
               and f["IP"]["source"] == ATTACKER for f in drops), drops
    # PERMISSIVE: passed through in clear.
    mesh.apply([peer_auth("PERMISSIVE")])
    mesh.wait_synced()
    time.sleep(0.5)
    assert from_underlay(mesh, f"http://{web}:8080/permissive") == "200"
    # ... and mesh clients still go through the tunnel.
    r = mesh.exec("client", "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://{web}:8080/")
    assert r.out == "200"
    mesh.run("delete", "peerauthentication", "web-mode")
    mesh.wait_synced()


def test_a_spoofed_pod_address_is_refused_in_strict_and_required_auth(mesh: Cluster) -> None:
    web, client_ip = ip_of(mesh, "web"), ip_of(mesh, "client")
    attacker(mesh, spoof=client_ip)
    try:
        # STRICT: the claimed address proves nothing without the certificate.
        assert from_underlay(mesh, f"http://{web}:8080/spoof", client_ip) == "000"
        # PERMISSIVE lets plaintext in, but a rule that requires authentication does not
        # match it: the real client (tunnelled) gets in, the spoofed one does not.
        policy = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                  "metadata": {"name": "web-authenticated"},
                  "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                           "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                        "authentication": {"mode": "required"}}]}}
        mesh.apply([peer_auth("PERMISSIVE"), policy])
        mesh.wait_synced()
        time.sleep(0.5)
        assert from_underlay(mesh, f"http://{web}:8080/spoof", client_ip) == "000"
        time.sleep(1.5)
        drops = [json.loads(line)["flow"] for line in mesh.run(
            "observe", "-o", "json", "--last", "30", "--node", "node2", "--verdict", "DROPPED"
        ).out.splitlines()]
        assert any(f.get("drop_reason_desc") == "AUTH_REQUIRED"
                   and f["IP"]["source"] == client_ip for f in drops), drops
        # The real client, once node2's route to it is its own again, gets in.
        attacker_done(mesh, spoof=client_ip)
        r = mesh.exec("client", "curl", "-s", "-m", "5", "-o", "/dev/null", "-w",
                      "%{http_code}", f"http://{web}:8080/real")
        assert r.out == "200"
    finally:
        attacker_done(mesh, spoof=client_ip)
        mesh.run("delete", "cnp", "web-authenticated", "--ignore-not-found")
        mesh.run("delete", "peerauthentication", "web-mode", "--ignore-not-found")
        mesh.wait_synced()


def test_disable_sends_cross_node_traffic_in_clear(mesh: Cluster) -> None:
    mesh.apply([peer_auth("DISABLE")])
    mesh.wait_synced()
    time.sleep(0.5)
    try:
        with capture(underlay(mesh)) as packets:
            r = mesh.exec("client", "curl", "-s", "-m", "5", "-o", "/dev/null", "-w",
                          "%{http_code}", f"http://{ip_of(mesh, 'web')}:8080/{MARKER}-disable")
        assert r.out == "200"
        assert seen(packets, f"{MARKER}-disable")
    finally:
        mesh.run("delete", "peerauthentication", "web-mode")
        mesh.wait_synced()


def test_a_handshake_with_a_foreign_certificate_is_a_dropped_flow(mesh: Cluster) -> None:
    """A TLS client with a certificate of another CA (from the underlay): refused by the
    destination's inbound listener, a DROPPED flow naming the reason."""
    attacker(mesh)
    rogue = r"""
import datetime, socket, ssl, sys, tempfile
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
k = ec.generate_private_key(ec.SECP256R1()); now = datetime.datetime.now(datetime.timezone.utc)
name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "rogue")])
c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
     .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
     .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
         "spiffe://cluster.local/ns/default/sa/rogue")]), critical=False)
     .sign(k, hashes.SHA256()))
cf = tempfile.NamedTemporaryFile(suffix=".pem", delete=False)
cf.write(c.public_bytes(serialization.Encoding.PEM) + k.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
cf.close()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE; ctx.load_cert_chain(cf.name); ctx.set_alpn_protocols(["nodemesh-tunnel"])
s = socket.socket(); s.bind((sys.argv[2], 0)); s.settimeout(3); s.connect((sys.argv[1], 8080))
try:
    t = ctx.wrap_socket(s); t.sendall(b"GET / HTTP/1.0\r\n\r\n"); print(t.recv(100))
except (ssl.SSLError, OSError) as e:
    print("refused", e)
"""
    r = subprocess.run(["ip", "netns", "exec", underlay(mesh), sys.executable, "-c", rogue,
                        ip_of(mesh, "web"), ATTACKER], capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith("refused") or r.stdout.strip() == "b''", r
    time.sleep(1.5)
    drops = [json.loads(line)["flow"] for line in mesh.run(
        "observe", "-o", "json", "--last", "20", "--node", "node2", "--verdict", "DROPPED"
    ).out.splitlines()]
    refused = [f for f in drops if f.get("drop_reason_desc") == "AUTH_REQUIRED"
               and f["IP"]["source"] == ATTACKER]
    assert refused, drops
    assert "mutual TLS from 172.30.0.250 refused" in refused[-1]["Summary"]


HOLD = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8080), timeout=5)
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
"""


def test_node_and_pod_source_ports_never_meet(mesh: Cluster) -> None:
    """The node Envoys' upstream connections carry the client pod's address with a port their
    node picks; the pods pick theirs from another range, so a pod's own connection and one made
    for it can never share addresses and ports (one of them would hang at the destination)."""
    from nodemesh.host.netns import NODE_PORT_RANGE, POD_PORT_RANGE

    web, client_ip = ip_of(mesh, "web"), ip_of(mesh, "client")
    held = subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", mesh.state_dir,
                             "exec", "client", "--", sys.executable, "-c", HOLD, web],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout
        pod_port = int(held.stdout.readline())
        assert POD_PORT_RANGE[0] <= pod_port <= POD_PORT_RANGE[1]
        upstream = []  # the Envoys' connections that carry the client's address, both nodes
        for node in ("node1", "node2"):
            out = subprocess.run(["ip", "netns", "exec", f"{mesh.name}-{node}", "ss", "-Htn",
                                  "state", "established", "src", client_ip],
                                 capture_output=True, text=True, check=True).stdout
            upstream += [int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines()]
        assert len(upstream) >= 2, upstream  # node1's tunnel out, node2's to the pod
        assert all(NODE_PORT_RANGE[0] <= p <= NODE_PORT_RANGE[1] for p in upstream), upstream
    finally:
        held.kill()
        held.wait(timeout=10)
