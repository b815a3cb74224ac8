"""The agent's certificate manager against a real CA server on a unix socket."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator

import pytest

from nodemesh.agent.certs import CertManager, renewal_due
from nodemesh.certs.authority import BuiltinCA, CaError
from nodemesh.certs.client import CaUnavailable
from nodemesh.certs.leaf import verify_chain
from nodemesh.certs.server import CaServer

TD = "cluster.local"
CLIENT = f"spiffe://{TD}/ns/default/sa/client"
OTHER = f"spiffe://{TD}/ns/prod/sa/api"


@pytest.fixture
def ca(tmp_path) -> Iterator[tuple[BuiltinCA, str, list[str]]]:
    authority = BuiltinCA.create(str(tmp_path / "ca"), TD)
    sock = str(tmp_path / "ca.sock")
    allowed = [CLIENT]
    server = CaServer(authority, sock, lambda pid: "node1" if pid == os.getpid() else None,
                      lambda node, ident: None if ident in allowed else f"{node} runs no {ident}",
                      max_ttl_seconds=3600)
    server.start()
    try:
        yield authority, sock, allowed
    finally:
        server.stop()


def manager(tmp_path, sock: str, ttl: float = 3600) -> CertManager:
    return CertManager("node1", sock, str(tmp_path / "certs.json"), ttl)


def test_ensure_gets_a_leaf_and_keeps_it_private(tmp_path, ca) -> None:
    authority, sock, _ = ca
    m = manager(tmp_path, sock)
    m.set_bundle(authority.roots(), authority.status()["activeRoot"]["fingerprint"])
    leaf = m.ensure(CLIENT)
    assert verify_chain(leaf.chain_pem, authority.roots()) is None
    assert m.ready() == {CLIENT}
    st = os.stat(tmp_path / "certs.json")
    assert stat.S_IMODE(st.st_mode) == 0o600
    # A restarted agent keeps what it had: the same leaf, no new request.
    again = manager(tmp_path, "/nonexistent.sock")
    assert again.snapshot()[CLIENT].serial == leaf.serial


def test_the_ca_refuses_identities_not_on_the_node(tmp_path, ca) -> None:
    _, sock, _ = ca
    m = manager(tmp_path, sock)
    with pytest.raises(CaError, match="node1 runs no"):
        m.ensure(OTHER)
    assert OTHER not in m.ready()
    assert "node1 runs no" in (m.last_error or "")


def test_ca_down_is_a_clear_error(tmp_path) -> None:
    m = manager(tmp_path, str(tmp_path / "missing.sock"))
    with pytest.raises(CaUnavailable, match="certificate authority unavailable"):
        m.ensure(CLIENT, timeout=0.3)


def test_renewal_at_half_life_and_dropping_unused(tmp_path, ca) -> None:
    _, sock, _ = ca
    m = manager(tmp_path, sock, ttl=4)
    changes = []
    m.on_change.append(lambda: changes.append(1))
    first = m.ensure(CLIENT)
    assert renewal_due(first) <= first.not_after.timestamp() - 1.5
    time.sleep(max(0.0, renewal_due(first) - time.time()) + 0.1)
    assert m.sync({CLIENT})
    renewed = m.snapshot()[CLIENT]
    assert renewed.serial != first.serial and m.renewals == 1
    # No local pod has the identity any more: the leaf goes.
    assert m.sync(set())
    assert m.snapshot() == {} and len(changes) >= 3


def test_a_rotation_renews_at_once(tmp_path, ca) -> None:
    authority, sock, _ = ca
    m = manager(tmp_path, sock)
    m.set_bundle(authority.roots(), authority.status()["activeRoot"]["fingerprint"])
    before = m.ensure(CLIENT)
    authority.prepare()
    authority.rotate()
    active = authority.status()["activeRoot"]["fingerprint"]
    assert m.set_bundle(authority.roots(), active)
    m.sync({CLIENT})
    after = m.snapshot()[CLIENT]
    assert after.serial != before.serial and after.issuer_fingerprint == active


def test_pods_of_one_identity_starting_together_share_one_certificate(tmp_path, ca) -> None:
    import threading

    authority, sock, _ = ca
    m = manager(tmp_path, sock)
    m.set_bundle(authority.roots(), authority.status()["activeRoot"]["fingerprint"])
    serials: list[str] = []
    start = threading.Barrier(8)

    def pod() -> None:
        start.wait()
        serials.append(m.ensure(CLIENT).serial)

    threads = [threading.Thread(target=pod) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(serials) == 8 and len(set(serials)) == 1, serials
    assert m.renewals == 0
