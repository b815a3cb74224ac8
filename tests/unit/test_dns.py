"""The node-local DNS server's pure parts: the record table and the answers."""

from __future__ import annotations

import socket
import struct

from nodemesh.cluster.dns import RCODE_NXDOMAIN, Records, answer, build_records


def query(name: str, qtype: int = 1, qid: int = 0x1234) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def parse(resp: bytes) -> tuple[int, int, list[str]]:
    qid, flags, _, an, _, _ = struct.unpack("!HHHHHH", resp[:12])
    off = 12
    while resp[off]:
        off += resp[off] + 1
    off += 5
    ips = []
    for _ in range(an):
        off += 2  # name pointer
        rtype, _, _, rdlen = struct.unpack("!HHIH", resp[off:off + 10])
        off += 10
        if rtype == 1:
            ips.append(socket.inet_ntoa(resp[off:off + 4]))
        off += rdlen
    return qid, flags & 0xF, ips


SVC = {"metadata": {"name": "web", "namespace": "shop"},
       "spec": {"clusterIP": "10.96.0.5", "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
HEADLESS = {"metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}}


def pod(name: str, ip: str, labels: dict, ready: bool = True) -> dict:
    return {"metadata": {"name": name, "namespace": "shop", "labels": labels},
            "status": {"podIP": ip, "conditions": [{"type": "Ready",
                                                    "status": "True" if ready else "False"}]}}


def records() -> Records:
    return build_records([SVC, HEADLESS], [pod("db-0", "10.244.1.7", {"app": "db"}),
                                          pod("db-1", "10.244.2.9", {"app": "db"}, ready=False),
                                          pod("web-0", "10.244.1.8", {"app": "web"})])


def test_service_name_answers_cluster_ip() -> None:
    qid, rcode, ips = parse(answer(query("web.shop.svc.cluster.local"), records()))
    assert (qid, rcode, ips) == (0x1234, 0, ["10.96.0.5"])


def test_names_are_case_insensitive() -> None:
    assert parse(answer(query("WEB.shop.svc.Cluster.Local"), records()))[2] == ["10.96.0.5"]


def test_headless_answers_ready_pod_ips() -> None:
    assert parse(answer(query("db.shop.svc.cluster.local"), records()))[2] == ["10.244.1.7"]


def test_pod_names() -> None:
    assert parse(answer(query("10-244-1-8.shop.pod.cluster.local"), records()))[2] == ["10.244.1.8"]


def test_unknown_names_are_nxdomain_and_search_expansions_fail_fast() -> None:
    assert parse(answer(query("web.shop.shop.svc.cluster.local"), records()))[1] == RCODE_NXDOMAIN
    assert parse(answer(query("example.com"), records()))[1] == RCODE_NXDOMAIN


def test_aaaa_of_known_name_is_empty_noerror() -> None:
    assert parse(answer(query("web.shop.svc.cluster.local", qtype=28), records()))[1:] == (0, [])


def test_intermediate_names_exist() -> None:
    assert parse(answer(query("shop.svc.cluster.local"), records()))[1] == 0


def test_srv_for_named_ports() -> None:
    resp = answer(query("_http._tcp.web.shop.svc.cluster.local", qtype=33), records())
    assert struct.unpack("!H", resp[6:8])[0] == 1
    assert struct.pack("!H", 80) in resp


def test_garbage_is_formerr_not_a_crash() -> None:
    assert answer(b"\x00" * 5, records()) == b""
    bad = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x3fabc"
    assert struct.unpack("!H", answer(bad, records())[2:4])[0] & 0xF == 1
