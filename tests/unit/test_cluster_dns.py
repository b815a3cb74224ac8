"""ClusterDns: the cluster daemon's DNS, on sockets it owns, follows the informer's Services and
Pods and writes each node's counters for that node's agent (real sockets on loopback)."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from nodemesh.cluster.dns import ClusterDns, read_counters
from tests.unit.test_dns_limit import query


class ListInformer:
    """The two informer methods ClusterDns uses, over a list the test changes."""

    def __init__(self) -> None:
        self.objects: dict[str, list[dict]] = {"Service": [], "Pod": []}
        self.listeners: list[Callable[[set[str]], None]] = []

    def add_listener(self, fn: Callable[[set[str]], None]) -> None:
        self.listeners.append(fn)

    def kinds(self, kinds: tuple[str, ...]) -> dict[str, list[dict]]:
        return {k: list(self.objects[k]) for k in kinds}

    def changed(self, kind: str) -> None:
        for fn in self.listeners:
            fn({kind})


def service(name: str, ip: str) -> dict:
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}


def loopback_sockets() -> tuple[socket.socket, socket.socket]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    return udp, tcp


def ask(port: int, name: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(query(name), ("127.0.0.1", port))
        return s.recv(512)


def a_records(resp: bytes) -> int:
    return struct.unpack("!H", resp[6:8])[0]


@pytest.fixture()
def dns(tmp_path) -> Iterator[tuple[ClusterDns, ListInformer, int]]:
    inf = ListInformer()
    inf.objects["Service"].append(service("web", "10.96.0.10"))
    d = ClusterDns(inf, lambda node: str(tmp_path / f"{node}.json"))
    d.REPORT_SECONDS = 0.05
    d.start()
    udp, tcp = loopback_sockets()
    port = udp.getsockname()[1]
    d.serve("node1", (udp, tcp))
    try:
        yield d, inf, port
    finally:
        d.stop()


def wait(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_answers_from_the_informer_and_follows_changes(dns) -> None:
    _, inf, port = dns
    assert wait(lambda: a_records(ask(port, "web.default.svc.cluster.local")) == 1)
    assert ask(port, "api.default.svc.cluster.local")[3] & 0x0F == 3  # NXDOMAIN: not yet
    inf.objects["Service"].append(service("api", "10.96.0.11"))
    inf.changed("Service")
    assert wait(lambda: a_records(ask(port, "api.default.svc.cluster.local")) == 1)
    inf.objects["Service"] = []
    inf.changed("Service")
    assert wait(lambda: ask(port, "web.default.svc.cluster.local")[3] & 0x0F == 3)


def test_unrelated_changes_do_not_rebuild(dns) -> None:
    d, inf, port = dns
    assert wait(lambda: a_records(ask(port, "web.default.svc.cluster.local")) == 1)
    before = d.records
    inf.changed("NetworkPolicy")
    time.sleep(0.1)
    assert d.records is before


def test_counters_are_written_for_the_node(dns, tmp_path) -> None:
    _, _, port = dns
    for _ in range(3):
        ask(port, "web.default.svc.cluster.local")
    assert wait(lambda: read_counters(str(tmp_path / "node1.json"))["answered"] >= 3)
    got = json.loads((tmp_path / "node1.json").read_text())
    assert got["refused"] == 0 and got["records"] >= 1


def test_counters_of_a_node_not_served_yet_are_zero(tmp_path) -> None:
    assert read_counters(str(tmp_path / "nothing.json")) == {
        "answered": 0, "refused": 0, "records": 0}
