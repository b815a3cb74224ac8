"""The local cluster's etcd members, without root: the store flags, the plan, the certificates,
the member's command line, and moving a process between namespaces (refused with threads)."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodemesh.cluster.config import ClusterConfig, plan_cluster
from nodemesh.cluster.etcdmembers import ensure_pki, member_argv, plan_store
from nodemesh.errors import NodemeshError
from nodemesh.host import netns


def _err(**kw) -> NodemeshError:
    with pytest.raises(NodemeshError) as e:
        plan_store("nm", "/s", **kw)
    assert e.value.exit_code == 2
    return e.value


def test_sqlite_is_the_default() -> None:
    assert plan_store("nm", "/s") == {"type": "sqlite"}
    assert plan_cluster("nm", "/s", 1, "/cg").store == {"type": "sqlite"}


@pytest.mark.parametrize("n", [1, 3, 5])
def test_members_on_the_underlay(n: int) -> None:
    s = plan_store("nm", "/s", "etcd", n)
    assert s["type"] == "etcd"
    assert [m["name"] for m in s["members"]] == [f"etcd{i}" for i in range(1, n + 1)]
    assert [m["ip"] for m in s["members"]] == [f"172.30.0.{20 + i}" for i in range(1, n + 1)]
    assert [m["netns"] for m in s["members"]] == [f"nm-etcd{i}" for i in range(1, n + 1)]
    assert s["endpoints"] == [f"https://172.30.0.{20 + i}:2379" for i in range(1, n + 1)]
    assert (s["ca"], s["cert"], s["key"]) == ("/s/etcd/pki/ca.crt", "/s/etcd/pki/client.crt",
                                              "/s/etcd/pki/client.key")
    assert s["access_netns"] == "nm-underlay"
    # No member address collides with a node's (nodes take .1-.16) or the access address.
    nodes = {n.ip for n in plan_cluster("nm", "/s", 16, "/cg").nodes}
    assert not nodes & {m["ip"] for m in s["members"]}
    assert s["access_ip"] not in nodes | {m["ip"] for m in s["members"]}
    assert ipaddress.ip_address(s["access_ip"]) in ipaddress.ip_network("172.30.0.0/24")


def test_three_members_by_default() -> None:
    assert len(plan_store("nm", "/s", "etcd")["members"]) == 3


@pytest.mark.parametrize("n", [0, 2, 4, 6, -1])
def test_member_count_must_be_odd_and_small(n: int) -> None:
    assert "--store-members" in _err(store_type="etcd", members=n).message


def test_flag_errors_name_the_flag() -> None:
    assert "--store" in _err(store_type="consul").message
    assert "--store-members" in _err(members=3).message  # with sqlite
    assert "--etcd-ca" in _err(store_type="etcd", ca="/x").message  # without endpoints
    assert "--etcd-ca" in _err(store_type="etcd", endpoints="https://127.0.0.1:2379").message
    assert "--etcd-endpoints" in _err(store_type="etcd", endpoints="127.0.0.1:2379").message
    assert "--store-members" in _err(store_type="etcd", members=3,
                                     endpoints="https://127.0.0.1:2379").message


def test_external_etcd_files_must_exist(tmp_path) -> None:
    for f in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / f).write_text("x")
    kw = dict(store_type="etcd", endpoints="https://127.0.0.1:2379, https://127.0.0.1:3379",
              ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "c.pem"), key=str(tmp_path / "k.pem"))
    s = plan_store("nm", "/s", **kw)
    assert s == {"type": "etcd", "endpoints": ["https://127.0.0.1:2379", "https://127.0.0.1:3379"],
                 "ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "c.pem"),
                 "key": str(tmp_path / "k.pem"), "members": []}
    e = _err(**{**kw, "key": str(tmp_path / "missing.pem")})
    assert "--etcd-key" in e.message and "no such file" in e.message


def test_cli_refuses_bad_member_count_before_anything(tmp_path) -> None:
    state = tmp_path / "state"
    p = subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", str(state), "up",
                        "--store", "etcd", "--store-members", "4"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "--store-members 4: must be 1, 3 or 5" in p.stderr
    assert not state.exists()


def _cfg(tmp_path, n: int = 3) -> ClusterConfig:
    return plan_cluster("nm", str(tmp_path), 2, "/cg",
                        store=plan_store("nm", str(tmp_path), "etcd", n))


def test_store_record_round_trips_through_cluster_json(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    d = cfg.to_json()
    assert d["store"]["type"] == "etcd" and len(d["store"]["members"]) == 3
    back = ClusterConfig.from_json(d)
    assert back.store == cfg.store and back.store_members == cfg.store_members
    # A cluster.json from before the store field is SQLite.
    d.pop("store")
    assert ClusterConfig.from_json(d).store_type == "sqlite"


def test_pki(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    assert ensure_pki(cfg) is True
    assert ensure_pki(cfg) is False  # once
    pki = tmp_path / "etcd" / "pki"
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    for m in cfg.store_members:
        crt = x509.load_pem_x509_certificate((pki / f"{m['name']}.crt").read_bytes())
        crt.verify_directly_issued_by(ca)
        sans = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.ip_address(m["ip"]) in sans.get_values_for_type(x509.IPAddress)
        eku = crt.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    client = x509.load_pem_x509_certificate((pki / "client.crt").read_bytes())
    client.verify_directly_issued_by(ca)
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    for key in pki.glob("*.key"):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    assert stat.S_IMODE(os.stat(pki).st_mode) == 0o700


def test_member_argv_requires_tls_everywhere(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    argv = member_argv(cfg, cfg.store_members[1])
    assert argv[0] == "/usr/bin/etcd"
    assert "--client-cert-auth" in argv and "--peer-client-cert-auth" in argv
    assert argv[argv.index("--listen-client-urls") + 1] == "https://172.30.0.22:2379"
    assert argv[argv.index("--listen-peer-urls") + 1] == "https://172.30.0.22:2380"
    assert argv[argv.index("--initial-cluster") + 1] == ",".join(
        f"etcd{i}=https://172.30.0.2{i}:2380" for i in (1, 2, 3))
    assert argv[argv.index("--data-dir") + 1] == str(tmp_path / "etcd" / "etcd2" / "data")
    assert not any(u.startswith("http://") for u in argv)


def test_enter_for_store_is_a_noop_for_sqlite_and_external_etcd() -> None:
    before = netns.current_netns_id()
    netns.enter_for_store({"type": "sqlite"})
    netns.enter_for_store({"type": "etcd", "endpoints": ["https://127.0.0.1:2379"], "members": []})
    netns.enter_for_store(None)
    assert netns.current_netns_id() == before


def test_a_process_with_threads_is_not_moved(tmp_path, monkeypatch) -> None:
    target = tmp_path / "somewhere-else"
    target.write_text("")
    monkeypatch.setattr(netns, "netns_path", lambda name: str(target))
    monkeypatch.setattr(netns, "setns_path", lambda *a: pytest.fail("setns with threads"))
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(NodemeshError, match="threads"):
            netns.enter_process_netns("somewhere-else")
    finally:
        stop.set()
        t.join()


def test_check_store_netns_refuses_a_namespace_without_a_route() -> None:
    if netns.has_route_to("172.30.0.21"):
        pytest.skip("this namespace has a route to the underlay's addresses")
    assert netns.has_route_to("127.0.0.1")
    store = {"type": "etcd", "access_netns": "nm-underlay",
             "endpoints": ["https://172.30.0.21:2379"]}
    with pytest.raises(NodemeshError, match="host's network namespace"):
        netns.check_store_netns(store)
    netns.check_store_netns({"type": "sqlite"})


def test_up_refuses_to_change_the_store_of_a_cluster(tmp_path) -> None:
    from nodemesh.cluster import lifecycle

    plan_cluster("nmx", str(tmp_path), 1, "/cg").save()  # a SQLite cluster
    with pytest.raises(NodemeshError, match="--store") as e:
        lifecycle.up(str(tmp_path), 1, "nmx", progress=lambda _: None,
                     store=plan_store("nmx", str(tmp_path), "etcd", 3))
    assert e.value.exit_code == 2


def test_up_without_etcd_installed_says_so_and_creates_nothing(tmp_path, monkeypatch) -> None:
    from nodemesh.cluster import etcdmembers, lifecycle

    monkeypatch.setattr(etcdmembers, "ETCD", str(tmp_path / "no-etcd"))
    state = tmp_path / "s"
    with pytest.raises(NodemeshError, match="etcd-server"):
        lifecycle.up(str(state), 1, "nmx", progress=lambda _: None,
                     store=plan_store("nmx", str(state), "etcd", 1))
    assert not state.exists()


def test_external_etcd_warnings() -> None:
    from nodemesh.cluster.etcdmembers import external_warnings

    w = external_warnings({"endpoints": ["https://127.0.0.1:2379", "https://10.0.0.5:2379",
                                         "https://172.30.0.40:2379"]})
    assert len(w) == 2
    assert "loopback" in w[0] and "no uplink" in w[1]
