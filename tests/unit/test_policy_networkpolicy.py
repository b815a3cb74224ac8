"""NetworkPolicy compilation: enforcement, peers, ports (named, ranges), ipBlock, ids."""

from __future__ import annotations

import pytest

from nodemesh.identity import security_labels_from
from nodemesh.policy import (
    CidrRule,
    Compiler,
    Direction,
    IdentityRule,
    PolicyCompileError,
    PolicyInput,
    PolicyPod,
    PolicyVerdict,
    compile_all,
    compile_endpoint,
    evaluate,
)
from nodemesh.policy.networkpolicy import policy_types
from tests.netpol_cases import MODEL_IPS, State, netpol, policy_input, port, sel

IN, EG = Direction.INGRESS, Direction.EGRESS
ALLOW = PolicyVerdict.ALLOW


def model(*policies: dict) -> tuple[PolicyInput, dict[str, PolicyPod]]:
    state = State()
    for p in policies:
        state.policies[(p["kind"], p["metadata"]["namespace"], p["metadata"]["name"])] = p
    inp = policy_input(state)
    return inp, {f"{e.namespace}/{e.name}": e for e in inp.endpoints}


def ids(eps: dict[str, PolicyPod], *pods: str) -> set[int]:
    return {eps[p].identity for p in pods}


def test_no_policy_no_enforcement() -> None:
    inp, eps = model()
    p = compile_endpoint(eps["x/a"], inp)
    assert (p.ingress_enforced, p.egress_enforced) == (False, False)
    assert p.identity_rules == () and p.cidr_rules == () and p.policy_names == {}


def test_policy_types_default() -> None:
    assert policy_types({}) == ["Ingress"]
    assert policy_types({"egress": []}) == ["Ingress"]
    assert policy_types({"egress": [{}]}) == ["Ingress", "Egress"]
    assert policy_types({"policyTypes": ["Egress"], "ingress": [{}]}) == ["Egress"]


def test_defaulted_policy_types_are_applied() -> None:
    pol = netpol("p", {}, egress=[{}])
    del pol["spec"]["policyTypes"]
    inp, eps = model(pol)
    p = compile_endpoint(eps["x/a"], inp)
    assert p.ingress_enforced and p.egress_enforced  # Ingress always, Egress since it has rules
    assert {r.direction for r in p.identity_rules} == {EG}


def test_rules_of_an_unlisted_direction_are_ignored() -> None:
    inp, eps = model(netpol("p", {}, ingress=[{}], egress=[{}], types=["Egress"]))
    p = compile_endpoint(eps["x/a"], inp)
    assert (p.ingress_enforced, p.egress_enforced) == (False, True)
    assert all(r.direction == EG for r in p.identity_rules)


def test_selects_only_its_namespace_and_pods() -> None:
    inp, eps = model(netpol("p", sel(pod="a"), ingress=[]))
    assert compile_endpoint(eps["x/a"], inp).ingress_enforced
    assert not compile_endpoint(eps["x/b"], inp).ingress_enforced
    assert not compile_endpoint(eps["y/a"], inp).ingress_enforced


def test_empty_from_is_any_identity_all_ports() -> None:
    inp, eps = model(netpol("p", {}, ingress=[{}]))
    p = compile_endpoint(eps["x/a"], inp)
    assert p.identity_rules == (IdentityRule(IN, 0, 0, 0, 65535, ALLOW, next(iter(p.policy_names))),)


def test_peer_kinds() -> None:
    inp, eps = model(netpol("p", sel(pod="a"), ingress=[{"from": [
        {"podSelector": sel(pod="b")},  # x/b only (policy namespace)
        {"namespaceSelector": sel(ns="y")},  # all of y
        {"namespaceSelector": sel(ns="z"), "podSelector": sel(pod="c")},  # z/c
    ]}]))
    p = compile_endpoint(eps["x/a"], inp)
    assert {r.identity for r in p.identity_rules} == ids(eps, "x/b", "y/a", "y/b", "y/c", "z/c")


def test_namespace_labels_come_from_the_input() -> None:
    state = State()
    pol = netpol("p", sel(pod="a"), ingress=[{"from": [{"namespaceSelector": sel(team="blue")}]}])
    state.policies[("NetworkPolicy", "x", "p")] = pol
    inp = policy_input(state)
    # relabel y in the input only (identities still carry the old namespace labels)
    inp = PolicyInput(inp.endpoints, {**inp.namespaces, "y": {"ns": "y", "team": "blue"}},
                      inp.identities, inp.network_policies)
    eps = {f"{e.namespace}/{e.name}": e for e in inp.endpoints}
    p = compile_endpoint(eps["x/a"], inp)
    assert {r.identity for r in p.identity_rules} == ids(eps, "y/a", "y/b", "y/c")


def test_ports_numbers_ranges_protocols() -> None:
    inp, eps = model(netpol("p", sel(pod="a"), ingress=[{"ports": [
        port(80), port(53, "UDP"), port(1000, "TCP", 2000), port(protocol="SCTP"), port(9, "sctp"),
    ]}]))
    got = {(r.protocol, r.port_lo, r.port_hi) for r in compile_endpoint(eps["x/a"], inp).identity_rules}
    assert got == {(6, 80, 80), (17, 53, 53), (6, 1000, 2000), (132, 0, 65535), (132, 9, 9)}


def test_bad_protocol_names_the_field() -> None:
    inp, eps = model(netpol("p", sel(pod="a"), ingress=[{"ports": [port(80, "ICMP")]}]))
    with pytest.raises(PolicyCompileError, match=r"NetworkPolicy x/p: spec.ingress\[0\].ports\[0\].protocol"):
        compile_endpoint(eps["x/a"], inp)


def _endpoint(
    ns: str, name: str, ip: str, identity: int, ports: dict, labels: dict | None = None
) -> PolicyPod:
    return PolicyPod(ns, name, labels or {"app": name}, ip, identity, ports)


def _custom_input(*policies: dict) -> tuple[PolicyInput, dict[str, PolicyPod]]:
    """web (named port http=8080), api (http=9090, and UDP dns), two replicas of api."""
    eps = [
        _endpoint("x", "web", "10.0.0.1", 300, {"http": (("TCP", 8080),)}),
        _endpoint("x", "api-1", "10.0.0.2", 301, {"http": (("TCP", 9090),), "dns": (("UDP", 53),)},
                  {"app": "api", "pod-template-hash": "1"}),
        _endpoint("x", "api-2", "10.0.1.3", 301, {"http": (("TCP", 9091),)},
                  {"app": "api", "pod-template-hash": "2"}),
        _endpoint("y", "other", "10.0.2.4", 302, {}),
    ]
    identities = {
        300: security_labels_from({"app": "web"}, "x"),
        301: security_labels_from({"app": "api"}, "x"),
        302: security_labels_from({"app": "other"}, "y"),
    }
    inp = PolicyInput(eps, {"x": {}, "y": {}}, identities, list(policies))
    return inp, {e.name: e for e in eps}


def test_ingress_named_port_resolves_against_own_ports() -> None:
    inp, eps = _custom_input(netpol("p", {}, ingress=[{"ports": [port("http")]}]))
    assert {(r.port_lo, r.identity) for r in compile_endpoint(eps["web"], inp).identity_rules} == {(8080, 0)}
    assert {r.port_lo for r in compile_endpoint(eps["api-1"], inp).identity_rules} == {9090}
    assert compile_endpoint(eps["other"], inp).identity_rules == ()


def test_egress_named_port_resolves_per_destination_identity() -> None:
    inp, eps = _custom_input(netpol("p", sel(app="web"), egress=[{"ports": [port("http")]}]))
    got = {(r.identity, r.port_lo) for r in compile_endpoint(eps["web"], inp).identity_rules}
    # any destination: every pod that has a port named http; both api replicas share identity 301
    assert got == {(300, 8080), (301, 9090), (301, 9091)}
    inp, eps = _custom_input(netpol("p", sel(app="web"), egress=[{
        "to": [{"podSelector": sel(app="api")}], "ports": [port("http"), port("dns", "UDP")]}]))
    got = {(r.identity, r.protocol, r.port_lo) for r in compile_endpoint(eps["web"], inp).identity_rules}
    assert got == {(301, 6, 9090), (301, 6, 9091), (301, 17, 53)}


def test_named_port_protocol_must_match() -> None:
    inp, eps = _custom_input(netpol("p", sel(app="web"), egress=[{"ports": [port("dns")]}]))  # TCP default
    assert compile_endpoint(eps["web"], inp).identity_rules == ()


def test_egress_named_port_to_ip_block_becomes_pod_host_routes() -> None:
    inp, eps = _custom_input(netpol("p", sel(app="web"), egress=[{
        "to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}], "ports": [port("http")]}]))
    p = compile_endpoint(eps["web"], inp)
    assert {(r.cidr, r.port_lo) for r in p.cidr_rules} == {("10.0.0.1/32", 8080), ("10.0.0.2/32", 9090)}
    assert p.identity_rules == ()


def test_ip_block_canonical_ipv6_ignored() -> None:
    inp, eps = model(netpol("p", sel(pod="a"), egress=[{"to": [
        {"ipBlock": {"cidr": "10.1.2.3/8", "except": ["10.1.0.0/16", "fd00::/8"]}},
        {"ipBlock": {"cidr": "::/0"}},
    ]}]))
    p = compile_endpoint(eps["x/a"], inp)
    assert p.cidr_rules == (CidrRule(EG, "10.0.0.0/8", ("10.1.0.0/16",), 0, 0, 65535, ALLOW,
                                     next(iter(p.policy_names))),)
    assert p.identity_rules == ()
    assert p.egress_enforced


def test_ip_block_matches_pod_ips() -> None:
    block = {"ipBlock": {"cidr": f"{MODEL_IPS['y/b']}/32"}}
    inp, eps = model(netpol("p", sel(pod="a"), egress=[{"to": [block]}]))
    p = compile_endpoint(eps["x/a"], inp)
    yb, yc = eps["y/b"], eps["y/c"]
    assert evaluate(p, EG, yb.identity, yb.ip, "TCP", 80).allowed
    assert not evaluate(p, EG, yc.identity, yc.ip, "TCP", 80).allowed


def test_policy_ids_stable_and_named() -> None:
    a = netpol("a", {}, ingress=[{}])
    b = netpol("b", {}, ingress=[{"ports": [port(80)]}])
    inp1, eps = model(a, b)
    inp2, _ = model(b, a)
    p1 = compile_endpoint(eps["x/a"], inp1)
    p2 = compile_endpoint(eps["x/a"], inp2)
    assert p1 == p2
    assert sorted(p1.policy_names.values()) == ["NetworkPolicy x/a", "NetworkPolicy x/b"]
    inp3, _ = model(a)
    p3 = compile_endpoint(eps["x/a"], inp3)
    assert {v: k for k, v in p3.policy_names.items()}["NetworkPolicy x/a"] == \
        {v: k for k, v in p1.policy_names.items()}["NetworkPolicy x/a"]
    assert all(r.policy_id in p1.policy_names for r in p1.identity_rules)


def test_compile_all_and_compiler_agree() -> None:
    inp, eps = model(netpol("p", sel(pod="a"), ingress=[{"from": [{"namespaceSelector": {}}]}]))
    every = compile_all(inp)
    assert set(every) == set(eps)
    c = Compiler(inp)
    assert all(c.compile(e) == every[ref] for ref, e in eps.items())


def test_endpoint_missing_from_identities_is_still_a_peer() -> None:
    pol = netpol("p", sel(app="web"), ingress=[{"from": [{"podSelector": sel(app="new")}]}])
    inp, eps = _custom_input(pol)
    newcomer = _endpoint("x", "new", "10.0.0.9", 999, {})
    inp = PolicyInput([*inp.endpoints, newcomer], inp.namespaces, inp.identities, inp.network_policies)
    assert {r.identity for r in compile_endpoint(eps["web"], inp).identity_rules} == {999}


def test_subject_selection_sees_all_pod_labels() -> None:
    # Kubernetes semantics for the policy's own podSelector: even volatile labels select
    inp, eps = _custom_input(netpol("p", sel(**{"pod-template-hash": "2"}), ingress=[]))
    assert compile_endpoint(eps["api-2"], inp).ingress_enforced
    assert not compile_endpoint(eps["api-1"], inp).ingress_enforced
