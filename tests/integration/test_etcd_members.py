"""`nodemesh up --store etcd`: the local cluster's etcd members, for real.

Three members, each in a network namespace of its own on the underlay, with peer and client TLS;
etcdctl (run inside the underlay's or a node's namespace, never from the host's) checks them with
the certificates cluster.json records. The daemon, the CLI and the UI reach the members from the
underlay's namespace: the host's has no route to them but its default one (off the machine), so
nothing here ever connects to a member from it. A member SIGKILLed comes back; `down` leaves
nothing. And `--etcd-endpoints`: an etcd the test runs on the host's loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from nodemesh.host import netns
from tests.integration.clusterharness import REPO, Cluster, new_cluster, reap, running_cluster

pytestmark = pytest.mark.root

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ETCDCTL_API": "3"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster(2, "--store", "etcd", "--store-members", "3") as c:
        yield c


def _store(c: Cluster) -> dict:
    with open(os.path.join(c.state_dir, "cluster.json")) as f:
        return json.load(f)["store"]


def _in(ns: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _etcdctl(c: Cluster, ns: str, *args: str, endpoints: list[str] | None = None,
             tls: bool = True) -> subprocess.CompletedProcess:
    s = _store(c)
    creds = ["--cacert", s["ca"], "--cert", s["cert"], "--key", s["key"]] if tls else []
    return _in(ns, "etcdctl", "--endpoints", ",".join(endpoints or s["endpoints"]),
               "--dial-timeout", "3s", "--command-timeout", "5s", *creds, *args)


def _pid(c: Cluster, member: str) -> int:
    with open(os.path.join(c.state_dir, "etcd", member, "member.json")) as f:
        return int(json.load(f)["pid"])


def _wait_healthy(c: Cluster, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        p = _etcdctl(c, f"{c.name}-underlay", "endpoint", "health", "-w", "json")
        try:
            items = json.loads(p.stdout or "[]")
        except ValueError:
            items = []
        if items and all(i.get("health") for i in items):
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"etcd not healthy after {timeout}s: {p.stdout} {p.stderr}")
        time.sleep(0.3)


def test_cluster_json_records_the_store(cluster: Cluster) -> None:
    s = _store(cluster)
    pki = os.path.join(cluster.state_dir, "etcd", "pki")
    assert s["type"] == "etcd"
    assert s["endpoints"] == [f"https://172.30.0.{i}:2379" for i in (21, 22, 23)]
    assert (s["ca"], s["cert"], s["key"]) == (f"{pki}/ca.crt", f"{pki}/client.crt",
                                              f"{pki}/client.key")
    assert s["members"] == [{"name": f"etcd{i}", "ip": f"172.30.0.{20 + i}",
                             "netns": f"{cluster.name}-etcd{i}"} for i in (1, 2, 3)]
    for f in os.listdir(pki):
        mode = os.stat(os.path.join(pki, f)).st_mode & 0o777
        assert mode == (0o600 if f.endswith(".key") else 0o644), f


def test_three_members_each_in_its_namespace(cluster: Cluster) -> None:
    for m in _store(cluster)["members"]:
        pid = _pid(cluster, m["name"])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0] == b"/usr/bin/etcd"
        ident = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                               text=True).stdout.strip()
        assert ident == m["netns"]
        addrs = _in(m["netns"], "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert f"{m['ip']}/24" in addrs
        assert _in(m["netns"], "ip", "route", "show", "default").stdout.strip() == ""  # no uplink
    items = _wait_healthy(cluster)
    assert len(items) == 3
    p = _etcdctl(cluster, f"{cluster.name}-underlay", "member", "list", "-w", "json")
    members = json.loads(p.stdout)["members"]
    assert sorted(m["name"] for m in members) == ["etcd1", "etcd2", "etcd3"]
    assert all(u.startswith("https://") for m in members for u in m["peerURLs"] + m["clientURLs"])
    st = json.loads(_etcdctl(cluster, f"{cluster.name}-underlay", "endpoint", "status",
                             "-w", "json").stdout)
    leaders = {i["Status"]["leader"] for i in st}
    assert len(leaders) == 1 and leaders != {0}


def test_plain_http_and_clients_without_a_certificate_are_refused(cluster: Cluster) -> None:
    s = _store(cluster)
    ul = f"{cluster.name}-underlay"
    for port in (2379, 2380):  # clients and peers
        plain = _in(ul, "curl", "-sS", "-m", "5", f"http://172.30.0.21:{port}/health")
        assert '"health":"true"' not in plain.stdout
        assert plain.returncode != 0 or "HTTP request to an HTTPS server" in plain.stdout
        nocert = _in(ul, "curl", "-sS", "-m", "5", "--cacert", s["ca"],
                     f"https://172.30.0.21:{port}/health")
        assert nocert.returncode != 0, nocert.stdout
    ok = _in(ul, "curl", "-sS", "-m", "5", "--cacert", s["ca"], "--cert", s["cert"], "--key",
             s["key"], "https://172.30.0.21:2379/health")
    assert '"health":"true"' in ok.stdout, ok.stdout + ok.stderr
    # etcdctl without the client certificate, over TLS with the CA only: refused.
    p = _in(ul, "etcdctl", "--endpoints", s["endpoints"][0], "--cacert", s["ca"],
            "--dial-timeout", "2s", "--command-timeout", "3s", "get", "x")
    assert p.returncode != 0


def test_write_and_read_with_the_recorded_certificates(cluster: Cluster) -> None:
    ul = f"{cluster.name}-underlay"
    assert _etcdctl(cluster, ul, "put", "/nodemesh-test/k", "v1").returncode == 0
    # From a node's namespace, as an agent reaches it, through another member.
    node = f"{cluster.name}-node2"
    p = _etcdctl(cluster, node, "get", "/nodemesh-test/k", "--print-value-only",
                 endpoints=[_store(cluster)["endpoints"][2]])
    assert p.stdout.strip() == "v1", p.stderr


def test_the_host_namespace_has_no_route_to_the_members() -> None:
    # Only the default route (off the machine) would take a packet there: nobody may connect
    # to a member from here, and the store clients' guard refuses to.
    assert not netns.has_route_to("172.30.0.21")
    with pytest.raises(Exception, match="host's network namespace"):
        netns.check_store_netns({"type": "etcd", "access_netns": "x-underlay",
                                 "endpoints": ["https://172.30.0.21:2379"]})


def test_the_daemon_reaches_the_store_from_the_underlay(cluster: Cluster) -> None:
    pid = cluster.daemon_pid()
    underlay = os.stat(f"/run/netns/{cluster.name}-underlay").st_ino
    tasks = os.listdir(f"/proc/{pid}/task")
    assert len(tasks) > 1  # it runs threads (the informer, the CA server...)
    for t in tasks:
        link = os.readlink(f"/proc/{pid}/task/{t}/ns/net")
        assert link == f"net:[{underlay}]", (t, link)
    # ... while the agents it starts bind their metrics on the host's loopback.
    with open(os.path.join(cluster.state_dir, "nodes", "node1", "metrics.json")) as f:
        port = json.load(f)["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(12)[9:12] == b"200"


PROBE = textwrap.dedent("""
    # What a store client does after enter_for_store: connect from a thread started later (as
    # gRPC's are), over TLS with the recorded client certificate.
    import json, os, socket, ssl, sys, threading
    from nodemesh.cluster.config import load_cluster
    from nodemesh.host import netns
    cfg = load_cluster(sys.argv[1])
    s = cfg.store
    out = {}
    try:
        netns.check_store_netns(s)
        out["guard_before"] = "passed"
    except Exception as e:
        out["guard_before"] = str(e)
    netns.enter_for_store(s)
    netns.check_store_netns(s)
    def probe():
        ctx = ssl.create_default_context(cafile=s["ca"])
        ctx.load_cert_chain(s["cert"], s["key"])
        with socket.create_connection(("172.30.0.22", 2379), timeout=5) as raw:
            out["source"] = raw.getsockname()[0]
            with ctx.wrap_socket(raw, server_hostname="172.30.0.22") as t:
                t.sendall(b"GET /health HTTP/1.0\\r\\n\\r\\n")
                out["reply"] = t.recv(4096).decode(errors="replace")
        out["thread_netns"] = os.readlink(f"/proc/self/task/{threading.get_native_id()}/ns/net")
    th = threading.Thread(target=probe); th.start(); th.join()
    print(json.dumps(out))
""")


def test_a_cli_process_reaches_the_store_from_the_underlay(cluster: Cluster) -> None:
    p = subprocess.run([sys.executable, "-c", PROBE, cluster.state_dir], capture_output=True,
                       text=True, timeout=30, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert "host's network namespace" in out["guard_before"]  # it had not entered yet
    underlay = os.stat(f"/run/netns/{cluster.name}-underlay").st_ino
    assert out["thread_netns"] == f"net:[{underlay}]"
    assert out["source"] == "172.30.0.254"  # the underlay's own address: no host's has it
    assert '"health":"true"' in out["reply"]


def test_status_shows_the_store_and_its_members(cluster: Cluster) -> None:
    out = cluster.run("status").out
    assert "store:      etcd, 3 member(s)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("etcd")]
    assert [r[0] for r in rows] == ["etcd1", "etcd2", "etcd3"]
    assert all("healthy" in r for r in rows), out
    assert sum(r[6] == "yes" for r in rows) == 1, out  # one leader
    # And the store-using commands work from there, and the harness's own reads.
    assert cluster.get("nodes", namespace="")["items"]
    assert cluster.store_revision() > 0
    cluster.wait_synced(timeout=30)
    # None of it left a TCP connection (or its TIME_WAIT) to the underlay in the host's
    # namespace, where it would have gone off the machine.
    ss = subprocess.run(["ss", "-tan"], capture_output=True, text=True).stdout
    assert "172.30.0." not in ss, ss


def test_the_ui_listens_on_the_host_loopback(cluster: Cluster) -> None:
    ui = subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", cluster.state_dir,
                           "ui", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        line = ui.stdout.readline()  # type: ignore[union-attr]
        assert "http://127.0.0.1:" in line, line + ui.stderr.read()  # type: ignore[union-attr]
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(12)[9:12] == b"200"
        ident = subprocess.run(["ip", "netns", "identify", str(ui.pid)], capture_output=True,
                               text=True).stdout.strip()
        assert ident == f"{cluster.name}-underlay"
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(10)


def test_status_names_an_unhealthy_member(cluster: Cluster) -> None:
    pid = _pid(cluster, "etcd3")
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        out = cluster.run("status").out
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    rows = {r[0]: r for r in (line.split() for line in out.splitlines()) if r and
            r[0].startswith("etcd")}
    assert rows["etcd3"][5] == "unhealthy", out  # (PROCESS is two words: pid N)
    assert rows["etcd1"][5] == rows["etcd2"][5] == "healthy", out
    assert took < 10, took
    _wait_healthy(cluster)


def test_a_killed_member_comes_back(cluster: Cluster) -> None:
    ul = f"{cluster.name}-underlay"
    assert _etcdctl(cluster, ul, "put", "/nodemesh-test/before", "kept").returncode == 0
    old = _pid(cluster, "etcd2")
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while _pid(cluster, "etcd2") == old:
        assert time.monotonic() < deadline, "etcd2 was not restarted"
        time.sleep(0.1)
    new = _pid(cluster, "etcd2")
    ident = subprocess.run(["ip", "netns", "identify", str(new)], capture_output=True,
                           text=True).stdout.strip()
    assert ident == f"{cluster.name}-etcd2"
    _wait_healthy(cluster)
    p = _etcdctl(cluster, ul, "get", "/nodemesh-test/before", "--print-value-only",
                 endpoints=[_store(cluster)["endpoints"][1]])
    assert p.stdout.strip() == "kept"
    rows = [line.split() for line in cluster.run("status").out.splitlines()
            if line.startswith("etcd2")]
    assert rows[0][-1] == "1", rows  # RESTARTS


def test_a_new_daemon_adopts_the_running_members(cluster: Cluster) -> None:
    pids = [_pid(cluster, m["name"]) for m in _store(cluster)["members"]]
    daemon = cluster.daemon_pid()
    assert daemon
    os.kill(daemon, signal.SIGKILL)
    reap(daemon)
    cluster.up()  # recovers: a new daemon, which finds the members running
    deadline = time.monotonic() + 15
    while cluster.daemon_pid() == daemon:  # (it records itself once it runs)
        assert time.monotonic() < deadline, "no new daemon"
        time.sleep(0.1)
    new = cluster.daemon_pid()
    ident = subprocess.run(["ip", "netns", "identify", str(new)], capture_output=True,
                           text=True).stdout.strip()
    assert ident == f"{cluster.name}-underlay"
    assert [_pid(cluster, m["name"]) for m in _store(cluster)["members"]] == pids
    _wait_healthy(cluster)


def test_down_removes_the_members_and_their_data(cluster: Cluster) -> None:
    pids = [_pid(cluster, m["name"]) for m in _store(cluster)["members"]]
    daemon = cluster.daemon_pid()
    cluster.run("down", timeout=120)
    if daemon:
        reap(daemon)
    for pid in pids:
        reap(pid, 2)
        assert "etcd/etcd" not in _cmdline(pid), f"etcd pid {pid} still runs"
    assert not netns.list_netns(f"{cluster.name}-")
    assert not os.path.exists(cluster.state_dir)
    assert not cluster.leftovers()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def test_bad_member_count_creates_nothing(tmp_path) -> None:
    state = tmp_path / "s"
    p = subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", str(state), "up",
                        "--name", "nmtbad", "--store", "etcd", "--store-members", "2"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--store-members 2" in p.stderr
    assert not state.exists() and not netns.list_netns("nmtbad-")


# ---- an etcd the user runs ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loopback_etcd(tmp_path) -> Iterator[dict]:
    """A one-member etcd with TLS on the host's loopback, certificates made as `up` makes them."""
    from nodemesh.cluster.config import ClusterConfig
    from nodemesh.cluster.etcdmembers import ensure_pki

    ensure_pki(ClusterConfig(name="ext", state_dir=str(tmp_path), nodes=(),
                             store={"members": [{"name": "ext", "ip": "127.0.0.1"}]}))
    pki = tmp_path / "etcd" / "pki"
    cport, pport = _free_port(), _free_port()
    argv = ["/usr/bin/etcd", "--name", "ext", "--data-dir", str(tmp_path / "data"),
            "--listen-client-urls", f"https://127.0.0.1:{cport}",
            "--advertise-client-urls", f"https://127.0.0.1:{cport}",
            "--listen-peer-urls", f"https://127.0.0.1:{pport}",
            "--initial-advertise-peer-urls", f"https://127.0.0.1:{pport}",
            "--initial-cluster", f"ext=https://127.0.0.1:{pport}",
            "--cert-file", str(pki / "ext.crt"), "--key-file", str(pki / "ext.key"),
            "--trusted-ca-file", str(pki / "ca.crt"), "--client-cert-auth",
            "--peer-cert-file", str(pki / "ext.crt"), "--peer-key-file", str(pki / "ext.key"),
            "--peer-trusted-ca-file", str(pki / "ca.crt"), "--peer-client-cert-auth",
            "--logger", "zap", "--log-outputs", "stderr"]
    with open(tmp_path / "etcd.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=ENV)
    try:
        yield {"endpoint": f"https://127.0.0.1:{cport}", "ca": str(pki / "ca.crt"),
               "cert": str(pki / "client.crt"), "key": str(pki / "client.key"), "proc": proc}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_an_etcd_the_user_runs(loopback_etcd: dict) -> None:
    e = loopback_etcd
    # What this checks: the flags, the record, status and down. The agents of this cluster
    # cannot reach an etcd on the host's loopback (their loopback is their node's), and `up`
    # says so; an etcd the user runs is for agents on hosts of their own (docs/store.md).
    c = new_cluster(1, "--etcd-endpoints", e["endpoint"], "--etcd-ca", e["ca"], "--etcd-cert",
                    e["cert"], "--etcd-key", e["key"], "--mtls", "off")
    try:
        assert _store(c) == {"type": "etcd", "endpoints": [e["endpoint"]], "ca": e["ca"],
                             "cert": e["cert"], "key": e["key"], "members": []}
        assert not [n for n in netns.list_netns(f"{c.name}-") if "etcd" in n]
        out = c.run("status").out
        assert f"etcd at {e['endpoint']} (run by you)" in out
        row = next(line.split() for line in out.splitlines()
                   if line.startswith("-") and e["endpoint"] in line)
        assert "healthy" in row and "yes" in row, out  # one member: the leader
    finally:
        c.down()
    assert not c.leftovers()
    assert e["proc"].poll() is None  # `down` leaves the user's etcd alone
