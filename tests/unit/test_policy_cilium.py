"""CiliumNetworkPolicy compilation: enforcement rules, selectors, entities, ports, L7, refusals."""

from __future__ import annotations

from typing import Any

import pytest

from nodemesh.identity import Identity
from nodemesh.policy import (
    Direction,
    EndpointPolicy,
    IdentityRule,
    L7Rule,
    PolicyCompileError,
    PolicyInput,
    PolicyPod,
    PolicyVerdict,
    compile_endpoint,
    evaluate,
    lower_policy,
)
from tests.netpol_cases import State, cnp, netpol, policy_input, sel, sel_labels

IN, EG = Direction.INGRESS, Direction.EGRESS
A, D, R = PolicyVerdict.ALLOW, PolicyVerdict.DENY, PolicyVerdict.REDIRECT
NS = "k8s:io.kubernetes.pod.namespace"
POD_A = sel(pod="a")


def model(*policies: dict) -> tuple[PolicyInput, dict[str, PolicyPod]]:
    state = State()
    for p in policies:
        state.policies[(p["kind"], p["metadata"]["namespace"], p["metadata"]["name"])] = p
    inp = policy_input(state)
    return inp, {f"{e.namespace}/{e.name}": e for e in inp.endpoints}


def compile_xa(spec: dict[str, Any] | None = None, **kw: Any) -> tuple[EndpointPolicy, dict[str, PolicyPod]]:
    inp, eps = model(cnp("p", spec, **kw))
    return compile_endpoint(eps["x/a"], inp), eps


def ids(eps: dict[str, PolicyPod], *pods: str) -> set[int]:
    return {eps[p].identity for p in pods}


def rule_ids(p: EndpointPolicy, direction: Direction = IN, verdict: PolicyVerdict = A) -> set[int]:
    return {r.identity for r in p.identity_rules if r.direction == direction and r.verdict == verdict}


# --- enforcement ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ingress", "egress"),
    [
        ({"endpointSelector": POD_A}, False, False),
        ({"endpointSelector": POD_A, "ingress": []}, False, False),  # empty = no rule (Cilium)
        ({"endpointSelector": POD_A, "ingress": [{}]}, True, False),
        ({"endpointSelector": POD_A, "egress": [{}]}, False, True),
        ({"endpointSelector": POD_A, "ingressDeny": [{"fromEntities": ["world"]}]}, True, False),
        ({"endpointSelector": POD_A, "egressDeny": [{"toEntities": ["world"]}]}, False, True),
        # enableDefaultDeny only switches off what a section switched on (Cilium)
        ({"endpointSelector": POD_A, "enableDefaultDeny": {"ingress": True}}, False, False),
        ({"endpointSelector": POD_A, "ingress": [], "enableDefaultDeny": {"ingress": True}}, False, False),
        ({"endpointSelector": POD_A, "ingress": [{}], "enableDefaultDeny": {"ingress": True}}, True, False),
        ({"endpointSelector": POD_A, "ingress": [{}], "enableDefaultDeny": {"ingress": False}}, False, False),
        ({"endpointSelector": POD_A, "egress": [{}], "enableDefaultDeny": {"ingress": False}}, False, True),
    ],
)
def test_default_deny(spec: dict, ingress: bool, egress: bool) -> None:
    p, _ = compile_xa(spec)
    assert (p.ingress_enforced, p.egress_enforced) == (ingress, egress)


def test_not_enforced_direction_still_applies_deny_rules() -> None:
    p, eps = compile_xa({"endpointSelector": POD_A, "enableDefaultDeny": {"ingress": False},
                         "ingressDeny": [{"fromEndpoints": [sel(pod="b")]}]})
    assert not p.ingress_enforced
    xb, xc = eps["x/b"], eps["x/c"]
    assert not evaluate(p, IN, xb.identity, xb.ip, "TCP", 80).allowed
    assert evaluate(p, IN, xc.identity, xc.ip, "TCP", 80).allowed


def test_empty_rule_allows_nothing() -> None:
    p, _ = compile_xa({"endpointSelector": POD_A, "ingress": [{}]})
    assert p.identity_rules == () and p.cidr_rules == ()
    assert p.policy_names  # it selected the pod


def test_not_selected() -> None:
    p, _ = compile_xa({"endpointSelector": sel(pod="b"), "ingress": [{}]})
    assert not p.ingress_enforced and p.policy_names == {}
    inp, eps = model(cnp("p", {"endpointSelector": {}, "ingress": [{}]}, namespace="y"))
    assert not compile_endpoint(eps["x/a"], inp).ingress_enforced
    assert compile_endpoint(eps["y/c"], inp).ingress_enforced


def test_node_selector_rule_never_selects_pods() -> None:
    p, _ = compile_xa({"nodeSelector": {}, "ingress": [{}]})
    assert not p.ingress_enforced


def test_endpoint_selector_namespace_is_the_policys() -> None:
    # Cilium replaces a foreign namespace match in endpointSelector with the policy's namespace
    p, _ = compile_xa({"endpointSelector": sel_labels({NS: "y", "pod": "a"}), "ingress": [{}]})
    assert p.ingress_enforced
    p, _ = compile_xa({"endpointSelector": sel_labels({NS: "x"}), "ingress": [{}]})
    assert p.ingress_enforced


def test_spec_and_specs_both_apply() -> None:
    p, eps = compile_xa(
        {"endpointSelector": POD_A, "ingress": [{"fromEndpoints": [sel(pod="b")]}]},
        specs=[{"endpointSelector": {}, "egress": [{"toEndpoints": [sel(pod="c")]}]},
               {"endpointSelector": sel(pod="b"), "ingress": [{}]}],
    )
    assert (p.ingress_enforced, p.egress_enforced) == (True, True)
    assert rule_ids(p, IN) == ids(eps, "x/b")
    assert rule_ids(p, EG) == ids(eps, "x/c")
    assert len(p.policy_names) == 1


# --- peers -------------------------------------------------------------------------------------


def test_from_endpoints_scoping() -> None:
    p, eps = compile_xa({"endpointSelector": POD_A, "ingress": [{"fromEndpoints": [
        {},  # the policy's namespace
        sel_labels({NS: "y", "pod": "b"}),
        sel_labels({"any:io.kubernetes.pod.namespace": "z", "pod": "c"}),
        sel_labels({"k8s:io.cilium.k8s.namespace.labels.ns": "y", "pod": "c"}),
        sel_labels({"reserved:host": ""}),
    ]}]})
    assert rule_ids(p) == ids(eps, "x/a", "x/b", "x/c", "y/b", "z/c", "y/c") | {Identity.HOST}


def test_from_endpoints_expression_on_namespace() -> None:
    p, eps = compile_xa({"endpointSelector": POD_A, "ingress": [{"fromEndpoints": [
        {"matchExpressions": [{"key": NS, "operator": "In", "values": ["y", "z"]}],
         "matchLabels": {"pod": "a"}},
    ]}]})
    assert rule_ids(p) == ids(eps, "y/a", "z/a")


def test_explicitly_empty_peer_list_selects_nothing() -> None:
    for r in ({"fromEndpoints": []}, {"fromEndpoints": [], "toPorts": [{"ports": [{"port": "80"}]}]},
              {"fromEntities": []}, {"fromCIDR": []}):
        p, _ = compile_xa({"endpointSelector": POD_A, "ingress": [r]})
        assert p.ingress_enforced and p.identity_rules == () and p.cidr_rules == (), r


def test_ports_without_peers_apply_to_any_peer() -> None:
    tcp80 = [{"ports": [{"port": "80", "protocol": "TCP"}]}]
    p, _ = compile_xa({"endpointSelector": POD_A, "ingress": [{"toPorts": tcp80}]})
    assert p.identity_rules == (IdentityRule(IN, 0, 6, 80, 80, A, next(iter(p.policy_names))),)


@pytest.mark.parametrize(
    ("entity", "want"),
    [
        ("all", {0}),
        ("world", {Identity.WORLD}),
        ("world-ipv4", {Identity.WORLD}),
        ("world-ipv6", set()),
        ("host", {Identity.HOST}),
        ("remote-node", {Identity.REMOTE_NODE}),
        ("health", {Identity.HEALTH}),
        ("init", {Identity.INIT}),
        ("unmanaged", {Identity.UNMANAGED}),
    ],
)
def test_entities(entity: str, want: set[int]) -> None:
    p, _ = compile_xa({"endpointSelector": POD_A, "ingress": [{"fromEntities": [entity]}]})
    assert rule_ids(p) == want


def test_cluster_entity() -> None:
    p, eps = compile_xa({"endpointSelector": POD_A, "egress": [{"toEntities": ["cluster"]}]})
    reserved = {Identity.HOST, Identity.REMOTE_NODE, Identity.INIT, Identity.HEALTH, Identity.UNMANAGED}
    assert rule_ids(p, EG) == {e.identity for e in eps.values()} | reserved
    assert Identity.WORLD not in rule_ids(p, EG)
    assert not evaluate(p, EG, Identity.WORLD, "8.8.8.8", "TCP", 443).allowed


def test_world_entity_lets_the_outside_in() -> None:
    p, eps = compile_xa({"endpointSelector": POD_A, "ingress": [{"fromEntities": ["world"]}]})
    assert evaluate(p, IN, Identity.WORLD, "8.8.8.8", "TCP", 80).allowed
    assert not evaluate(p, IN, eps["y/a"].identity, eps["y/a"].ip, "TCP", 80).allowed


def test_cidr_peers() -> None:
    p, _ = compile_xa({"endpointSelector": POD_A, "egress": [
        {"toCIDR": ["192.168.1.1", "10.0.0.0/8"]},
        {"toCIDRSet": [{"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "::/0"]}, {"cidr": "::/0"}],
         "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
    ]})
    got = {(r.cidr, r.excepts, r.protocol, r.port_lo) for r in p.cidr_rules}
    assert got == {
        ("192.168.1.1/32", (), 0, 0), ("10.0.0.0/8", (), 0, 0), ("0.0.0.0/0", ("10.0.0.0/8",), 6, 443),
    }


def test_service_account_selector() -> None:
    web = PolicyPod("x", "web", {"app": "web"}, "10.0.0.1", 300, {})
    cli = PolicyPod("x", "cli", {"app": "cli"}, "10.0.0.2", 301, {})
    from nodemesh.identity import security_labels_from

    inp = PolicyInput([web, cli], {"x": {}}, {
        300: security_labels_from({"app": "web"}, "x"),
        301: security_labels_from({"app": "cli"}, "x", service_account="robot"),
    }, (), [cnp("p", {"endpointSelector": sel(app="web"), "ingress": [{"fromEndpoints": [
        sel_labels({"io.cilium.k8s.policy.serviceaccount": "robot"})]}]})])
    assert rule_ids(compile_endpoint(web, inp)) == {301}


# --- ports -------------------------------------------------------------------------------------


def _ports(*ports: dict) -> set[tuple[int, int, int]]:
    p, _ = compile_xa({"endpointSelector": POD_A, "ingress": [{"toPorts": [{"ports": list(ports)}]}]})
    return {(r.protocol, r.port_lo, r.port_hi) for r in p.identity_rules}


def test_port_forms() -> None:
    assert _ports({"port": "80"}) == {(6, 80, 80), (17, 80, 80)}  # ANY is the default
    assert _ports({"port": 80, "protocol": "TCP"}) == {(6, 80, 80)}
    assert _ports({"port": "80", "protocol": "ANY", "endPort": 90}) == {(6, 80, 90), (17, 80, 90)}
    assert _ports({"port": "0", "protocol": "UDP"}) == {(17, 0, 65535)}
    assert _ports({"port": "0"}) == {(0, 0, 65535)}
    assert _ports({"protocol": "SCTP", "port": "9"}) == {(132, 9, 9)}
    assert _ports({"port": "serve-81-udp"}) == {(17, 81, 81)}
    assert _ports({"port": "serve-81-udp", "protocol": "TCP"}) == set()
    p, _ = compile_xa({"endpointSelector": POD_A, "ingress": [{"toPorts": [{}]}]})
    assert {(r.protocol, r.port_lo, r.port_hi) for r in p.identity_rules} == {(0, 0, 65535)}


def test_bad_port_names_the_field() -> None:
    where = r"CiliumNetworkPolicy x/p: spec.ingress\[0\].toPorts\[0\].ports\[0\]"
    with pytest.raises(PolicyCompileError, match=where):
        _ports({"port": "80", "protocol": "ICMP"})
    with pytest.raises(PolicyCompileError, match="bad port range"):
        _ports({"port": "90", "endPort": 80, "protocol": "TCP"})


def test_deny_rules() -> None:
    p, eps = compile_xa({"endpointSelector": POD_A,
                         "egressDeny": [{"toEndpoints": [sel_labels({NS: "y"})],
                                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]})
    assert {(r.identity, r.verdict, r.port_lo) for r in p.identity_rules} == \
        {(i, D, 80) for i in ids(eps, "y/a", "y/b", "y/c")}
    assert not evaluate(p, EG, eps["y/a"].identity, eps["y/a"].ip, "TCP", 80).allowed
    assert not evaluate(p, EG, eps["y/a"].identity, eps["y/a"].ip, "TCP", 81).allowed  # default deny
    with pytest.raises(PolicyCompileError, match="deny rules can not have L7"):
        compile_xa({"endpointSelector": POD_A, "ingressDeny": [{"toPorts": [
            {"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET"}]}}]}]})


# --- L7 ----------------------------------------------------------------------------------------


def test_http_rules_redirect_and_are_recorded() -> None:
    http = [{"method": "GET", "path": "/public"}]
    p, eps = compile_xa({"endpointSelector": POD_A, "ingress": [{
        "fromEndpoints": [sel(pod="b")],
        "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": http}}]}]})
    xb = eps["x/b"].identity
    assert p.identity_rules == (IdentityRule(IN, xb, 6, 80, 80, R, next(iter(p.policy_names))),)
    assert p.l7_rules == (L7Rule(IN, 6, 80, 80, (xb,), (), tuple(http), next(iter(p.policy_names))),)
    lp = lower_policy(p, 5, proxy_port=15001)
    d = evaluate(lp, IN, xb, eps["x/b"].ip, "TCP", 80)
    assert (d.verdict, d.proxy_port) == ("REDIRECTED", 15001)


def test_empty_http_list_is_plain_l4() -> None:
    p, _ = compile_xa({"endpointSelector": POD_A, "ingress": [{
        "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": []}}]}]})
    assert {r.verdict for r in p.identity_rules} == {A} and p.l7_rules == ()


def test_l4_allow_overlapping_a_redirect_gets_http_allow_all() -> None:
    inp, eps = model(
        cnp("l7", {"endpointSelector": POD_A, "ingress": [{
            "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                         "rules": {"http": [{"path": "/x"}]}}]}]}),
        netpol("l4", POD_A, ingress=[{"from": [{"podSelector": sel(pod="c")}]}]),
    )
    p = compile_endpoint(eps["x/a"], inp)
    xc = eps["x/c"].identity
    allow_all = [r for r in p.l7_rules if not r.http]
    assert [(r.remote_identities, r.port_lo, r.port_hi) for r in allow_all] == [((xc,), 80, 80)]
    # in the map: x/c on 80 goes to the proxy (which lets it through), on 81 straight through
    assert evaluate(p, IN, xc, eps["x/c"].ip, "TCP", 80).verdict == "REDIRECTED"
    assert evaluate(p, IN, xc, eps["x/c"].ip, "TCP", 81).verdict == "FORWARDED"


def test_http_with_cidr_peer() -> None:
    p, _ = compile_xa({"endpointSelector": POD_A, "egress": [{
        "toCIDR": ["10.0.0.0/8"],
        "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}], "rules": {"http": [{}]}}]}]})
    assert {(r.cidr, r.verdict) for r in p.cidr_rules} == {("10.0.0.0/8", R)}
    assert p.l7_rules[0].remote_cidrs == (("10.0.0.0/8", ()),)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "rule", "field"),
    [
        ("egress", {"toFQDNs": [{"matchName": "example.com"}]}, "egress[0].toFQDNs"),
        ("egress", {"toServices": [{"k8sService": {"serviceName": "s"}}]}, "egress[0].toServices"),
        ("ingress", {"fromRequires": [{}]}, "ingress[0].fromRequires"),
        ("ingress", {"fromNodes": [{}]}, "ingress[0].fromNodes"),
        ("ingress", {"icmps": [{"fields": [{"type": 8}]}]}, "ingress[0].icmps"),
        ("ingress", {"fromEntities": ["kube-apiserver"]}, "ingress[0].fromEntities[0]"),
        ("egress", {"toCIDRSet": [{"cidrGroupRef": "g"}]}, "egress[0].toCIDRSet[0]"),
        ("egress", {"toPorts": [{"ports": [{"port": "53"}], "rules": {"dns": [{"matchPattern": "*"}]}}]},
         "egress[0].toPorts[0].rules.dns"),
        ("ingress", {"toPorts": [{"ports": [{"port": "443"}], "terminatingTLS": {"secret": {"name": "s"}}}]},
         "ingress[0].toPorts[0].terminatingTLS"),
    ],
)
def test_unsupported_fields_are_refused_by_name(section: str, rule: dict, field: str) -> None:
    with pytest.raises(PolicyCompileError) as err:
        compile_xa({"endpointSelector": POD_A, section: [rule]})
    assert f"CiliumNetworkPolicy x/p: spec.{field}" in str(err.value)


# --- authentication.mode: required ---------------------------------------------------------------


def test_authentication_required_matches_only_authenticated_peers() -> None:
    spec = {"endpointSelector": POD_A,
            "ingress": [{"fromEndpoints": [sel(pod="b")], "authentication": {"mode": "required"},
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}
    p, eps = compile_xa(spec)
    b = eps["x/b"].identity
    assert all(r.auth for r in p.identity_rules)
    assert evaluate(p, IN, b, eps["x/b"].ip, "TCP", 80, authenticated=True).allowed
    denied = evaluate(p, IN, b, eps["x/b"].ip, "TCP", 80, authenticated=False)
    assert not denied.allowed and denied.drop_reason == 189  # AUTH_REQUIRED, naming the policy
    assert denied.policy_id != 0


def test_a_rule_without_authentication_still_lets_the_peer_in() -> None:
    # Rules are ORed: the one that asks no proof wins for the same peer, whatever the prefix.
    spec = {"endpointSelector": POD_A,
            "ingress": [{"fromEndpoints": [sel(pod="b")], "authentication": {"mode": "required"},
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]},
                        {"fromEndpoints": [sel(pod="b")]}]}
    p, eps = compile_xa(spec)
    b = eps["x/b"].identity
    assert evaluate(p, IN, b, eps["x/b"].ip, "TCP", 80, authenticated=False).allowed
    assert evaluate(p, IN, b, eps["x/b"].ip, "TCP", 81, authenticated=False).allowed


def test_authentication_disabled_is_no_requirement() -> None:
    spec = {"endpointSelector": POD_A,
            "ingress": [{"fromEndpoints": [sel(pod="b")], "authentication": {"mode": "disabled"}}]}
    p, _ = compile_xa(spec)
    assert not any(r.auth for r in p.identity_rules)


def test_authentication_on_cidr_peers_is_refused() -> None:
    spec = {"endpointSelector": POD_A,
            "ingress": [{"fromCIDR": ["10.0.0.0/8"], "authentication": {"mode": "required"}}]}
    with pytest.raises(PolicyCompileError, match=r"ingress\[0\]\.authentication"):
        compile_xa(spec)
