"""What fits in the datapath's maps (pure): whole objects refused past a map's capacity, oldest
first, each refusal naming the map, its size and what was left out; map sizes from
`up --map-size` checked."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from nodemesh.cluster.config import (
    MAP_SIZE_DEFAULTS,
    ClusterConfig,
    NodeConfig,
    map_sizes_for_new_cluster,
    parse_map_sizes,
    plan_cluster,
)
from nodemesh.datapath.lb import LbService
from nodemesh.errors import NodemeshError
from nodemesh.node.fit import Refusal, age_key, fit_ipcache, fit_policy, fit_services
from nodemesh.node.snapshot import Endpoint, build_node_snapshot, fallbacks
from nodemesh.policy.lower import LoweredPolicy
from tests.unit.test_node_snapshot import inputs, objects, pod, service


# ---- services ---------------------------------------------------------------------------------
def ports(name: str, vip: str, n_backends: int, n_ports: int = 1, algorithm: str = "random",
          first_backend: int = 2) -> tuple[list[LbService], dict]:
    out, names = [], {}
    for i in range(n_ports):
        backends = [(f"10.244.1.{first_backend + b}", 8080) for b in range(n_backends)]
        out.append(LbService(vip, 80 + i, "TCP", backends, algorithm))
        names[(vip, 80 + i)] = ("default", name)
    return out, names


def many(*specs: tuple) -> tuple[list[LbService], dict]:
    all_ports, all_names = [], {}
    for spec in specs:
        p, n = ports(*spec)
        all_ports += p
        all_names.update(n)
    return all_ports, all_names


def test_everything_fits_without_capacities_or_with_room():
    p, n = many(("a", "10.96.0.1", 2), ("b", "10.96.0.2", 2))
    assert fit_services(p, n, {}, {}) == ({("default", "a"), ("default", "b")}, [])
    assert fit_services(p, n, {}, {"nm_lb4_svc": 6})[1] == []


def test_the_service_past_capacity_is_left_out_whole_and_named():
    p, n = many(("a", "10.96.0.1", 2), ("b", "10.96.0.2", 2), ("c", "10.96.0.3", 2))
    admitted, refusals = fit_services(p, n, {}, {"nm_lb4_svc": 8})
    assert admitted == {("default", "a"), ("default", "b")}
    assert refusals == [Refusal("nm_lb4_svc", 8, 9, "Service", ("default/c",))]
    msg = refusals[0].message()
    assert "nm_lb4_svc" in msg and "holds 8" in msg and "9 entries needed" in msg
    assert "nodemesh up --map-size nm_lb4_svc=N" in msg and "default/c" in msg


def test_never_half_a_service_a_multi_port_one_goes_whole():
    p, n = many(("a", "10.96.0.1", 1), ("b", "10.96.0.2", 1, 3))  # a: 2 entries, b: 6
    admitted, refusals = fit_services(p, n, {}, {"nm_lb4_svc": 7})
    assert admitted == {("default", "a")}
    assert refusals[0].objects == ("default/b",)


def test_a_smaller_later_service_still_gets_room():
    p, n = many(("a", "10.96.0.1", 2), ("b", "10.96.0.2", 5), ("c", "10.96.0.3", 1))
    admitted, refusals = fit_services(p, n, {}, {"nm_lb4_svc": 6})
    assert admitted == {("default", "a"), ("default", "c")}
    assert refusals[0].objects == ("default/b",) and refusals[0].needed == 11


def test_the_oldest_services_keep_their_place():
    p, n = many(("a", "10.96.0.1", 2), ("z", "10.96.0.2", 2))
    order = {("default", "z"): ("2026-01-01T00:00:00Z", "default", "z"),
             ("default", "a"): ("2026-01-02T00:00:00Z", "default", "a")}
    admitted, refusals = fit_services(p, n, order, {"nm_lb4_svc": 3})
    assert admitted == {("default", "z")} and refusals[0].objects == ("default/a",)


def test_revnat_backends_and_maglev_are_counted_too():
    p, n = many(("a", "10.96.0.1", 2, 2), ("b", "10.96.0.2", 1, 1))
    assert fit_services(p, n, {}, {"nm_lb4_revnat": 2})[1] == [
        Refusal("nm_lb4_revnat", 2, 3, "Service", ("default/b",))]
    # backends are shared: b's backend is one of a's (no new entry); c brings two new ones
    p, n = many(("a", "10.96.0.1", 2), ("b", "10.96.0.2", 1), ("c", "10.96.0.3", 2, 1, "random", 7))
    admitted, refusals = fit_services(p, n, {}, {"nm_lb4_be": 3})
    assert admitted == {("default", "a"), ("default", "b")}
    assert refusals == [Refusal("nm_lb4_be", 3, 4, "Service", ("default/c",))]
    p, n = many(("a", "10.96.0.1", 1, 1, "maglev"), ("b", "10.96.0.2", 1, 1, "maglev"),
                ("c", "10.96.0.3", 0, 1, "maglev"))  # c has no backend: no Maglev table
    admitted, refusals = fit_services(p, n, {}, {"nm_lb4_maglev": 1})
    assert admitted == {("default", "a"), ("default", "c")}
    assert refusals[0].map == "nm_lb4_maglev" and refusals[0].needed == 2


def test_a_service_over_two_maps_is_named_under_both():
    p, n = many(("a", "10.96.0.1", 1), ("b", "10.96.0.2", 1))
    _, refusals = fit_services(p, n, {}, {"nm_lb4_svc": 2, "nm_lb4_revnat": 1})
    assert [(r.map, r.objects) for r in refusals] == [("nm_lb4_revnat", ("default/b",)),
                                                      ("nm_lb4_svc", ("default/b",))]


def test_fit_is_deterministic_whatever_the_input_order():
    p, n = many(*[(f"s{i}", f"10.96.0.{i + 1}", i % 3) for i in range(20)])
    first = fit_services(p, n, {}, {"nm_lb4_svc": 15})
    assert fit_services(list(reversed(p)), dict(reversed(list(n.items()))), {},
                        {"nm_lb4_svc": 15}) == first


def test_age_key_orders_by_creation_then_name():
    old = {"metadata": {"name": "z", "namespace": "b", "creationTimestamp": "2026-01-01T00:00:00Z"}}
    new = {"metadata": {"name": "a", "namespace": "a", "creationTimestamp": "2026-01-02T00:00:00Z"}}
    assert sorted([new, old], key=age_key) == [old, new]


# ---- ipcache ----------------------------------------------------------------------------------
def test_ipcache_pods_past_capacity_are_left_out():
    pods = [("u1", "default/a"), ("u2", "default/b"), ("u3", "default/c")]
    assert fit_ipcache(5, pods, {}) == ({"u1", "u2", "u3"}, [])
    assert fit_ipcache(5, pods, {"nm_ipcache": 8}) == ({"u1", "u2", "u3"}, [])
    fits, refusals = fit_ipcache(5, pods, {"nm_ipcache": 7})
    assert fits == {"u1", "u2"}
    assert refusals == [Refusal("nm_ipcache", 7, 8, "Pod", ("default/c",))]
    assert fit_ipcache(5, pods, {"nm_ipcache": 3})[0] == set()


# ---- policy -----------------------------------------------------------------------------------
def low(n: int, cidr: int = 0) -> SimpleNamespace:
    return SimpleNamespace(policy=dict.fromkeys(range(n)), cidr=dict.fromkeys(range(cidr)))


def test_policy_fits_or_keeps_the_previous_entries_or_fails_closed():
    a, b, c = low(3), low(4), low(2)
    pods = [(1, "default/a"), (2, "default/b"), (3, "default/c")]
    fit = fit_policy(pods, {1: a, 2: b, 3: c}, {}, {"nm_policy": 10})
    assert fit.chosen == {1: a, 2: b, 3: c} and fit.refusals == [] and fit.errors == {}
    # b grows past what is left: it keeps its previous entries; c still fits
    prev_b = low(1)
    fit = fit_policy(pods, {1: a, 2: low(9), 3: c}, {2: prev_b}, {"nm_policy": 8})
    assert fit.chosen == {1: a, 2: prev_b, 3: c}
    assert "keeping its previous entries" in fit.errors["default/b"]
    assert fit.refusals == [Refusal("nm_policy", 8, 14, "Pod", ("default/b",))]
    # no previous that fits: none (its veth stays closed)
    fit = fit_policy(pods, {1: a, 2: low(9), 3: c}, {}, {"nm_policy": 8})
    assert 2 not in fit.chosen and "drops all traffic" in fit.errors["default/b"]


def test_policy_cidr_map_counted_and_no_capacity_keeps_old_behaviour():
    pods = [(1, "default/a"), (2, "default/b")]
    fit = fit_policy(pods, {1: low(1, 3), 2: low(1, 3)}, {}, {"nm_policy_cidr": 4})
    assert fit.refusals[0].map == "nm_policy_cidr" and fit.refusals[0].objects == ("default/b",)
    prev = low(2)
    fit = fit_policy(pods, {1: low(1)}, {2: prev}, {})
    assert fit.chosen[2] is prev and fit.refusals == []


# ---- the snapshot -----------------------------------------------------------------------------
def web_objects(n_services: int) -> dict:
    return objects(
        Pod=[pod("w1", "10.244.1.2", labels={"app": "web"}),
             pod("w2", "10.244.1.3", labels={"app": "web"}),
             pod("r", "10.244.2.2", node="node2", labels={"app": "r"})],
        Service=[service(f"s{i}", f"10.96.0.{10 + i}", {"app": "web"}, [{"port": 80}])
                 for i in range(n_services)])


ATTACHED = {"uid-w1": Endpoint("uid-w1", "default", "w1", "10.244.1.2", 7),
            "uid-w2": Endpoint("uid-w2", "default", "w2", "10.244.1.3", 8)}


def test_snapshot_without_capacities_is_unchanged():
    snap = build_node_snapshot(inputs(web_objects(3), attached=ATTACHED))
    limited = build_node_snapshot(inputs(web_objects(3), attached=ATTACHED,
                                         capacities=dict(MAP_SIZE_DEFAULTS)))
    assert snap.refusals == limited.refusals == []
    assert limited.lb.svc.keys() == snap.lb.svc.keys()
    assert [bytes(k) for k, _ in limited.ipcache] == [bytes(k) for k, _ in snap.ipcache]


def test_snapshot_leaves_the_services_past_capacity_out_of_the_lb():
    snap = build_node_snapshot(inputs(web_objects(3), attached=ATTACHED,
                                      capacities={"nm_lb4_svc": 7}))
    assert [(r.map, r.capacity, r.needed, r.objects) for r in snap.refusals] == [
        ("nm_lb4_svc", 7, 9, ("default/s2",))]
    assert {k[0] for k in snap.lb.rev_nat} == {"10.96.0.10", "10.96.0.11"}
    assert len(snap.lb.svc) == 6 and snap.lb_interim.svc.keys() == snap.lb.svc.keys()
    assert snap.programmed == {"uid-w1", "uid-w2"}  # pods are not affected


def test_snapshot_ipcache_keeps_local_pods_first_and_programs_only_those_in_it():
    # fixed entries: world + 2 nodes + 3 node addresses = 6; room for 2 of 3 pods
    snap = build_node_snapshot(inputs(web_objects(0), attached=ATTACHED,
                                      capacities={"nm_ipcache": 8}))
    assert [(r.map, r.objects) for r in snap.refusals] == [("nm_ipcache", ("default/r",))]
    assert len(snap.ipcache) == 8 and snap.programmed == {"uid-w1", "uid-w2"}
    snap = build_node_snapshot(inputs(web_objects(0), attached=ATTACHED,
                                      capacities={"nm_ipcache": 7}))
    assert snap.refusals[0].objects == ("default/r", "default/w2")
    assert snap.programmed == {"uid-w1"}  # w2 has no identity here: its veth stays closed


def test_snapshot_policy_past_capacity_keeps_previous_and_reports_it():
    allow = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "p", "namespace": "default"},
             "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}],
                                                       "ports": [{"port": 80}]}]}}
    objs = dataclasses.replace(inputs(web_objects(0)), objects={
        **web_objects(0), "NetworkPolicy": [allow]}).objects
    full = build_node_snapshot(inputs(objs, attached=ATTACHED))
    per_pod = {i: len(p.policy) for i, p in full.policy.items()}
    assert per_pod[7] > 0
    cap = per_pod[7] + per_pod[8] - 1
    snap = build_node_snapshot(inputs(objs, attached=ATTACHED, capacities={"nm_policy": cap}))
    assert [(r.map, r.objects) for r in snap.refusals] == [("nm_policy", ("default/w2",))]
    assert "drops all traffic" in snap.policy_errors["default/w2"]
    assert snap.programmed == {"uid-w1"}
    base = build_node_snapshot(inputs(web_objects(0), attached=ATTACHED))
    snap = build_node_snapshot(inputs(objs, attached=ATTACHED, capacities={"nm_policy": cap},
                                      previous_policy=base.policy))
    # w2 keeps its previous entries (none: it was not isolated), but the new policy isolates
    # its ingress, so that direction fails closed rather than staying open
    kept = snap.policy[8]
    assert kept.policy == base.policy[8].policy and kept.cidr == base.policy[8].cidr
    assert (base.policy[8].ingress_enforced, kept.ingress_enforced) == (False, True)
    assert kept.egress_enforced is False and snap.programmed == {"uid-w1", "uid-w2"}
    assert "keeping its previous entries" in snap.policy_errors["default/w2"]


def test_fallbacks_close_the_directions_the_new_policy_isolates():
    prev = {7: LoweredPolicy(7, False, True, {}, {}), 8: LoweredPolicy(8, True, False, {}, {})}
    got = fallbacks({7: (True, False), 9: (True, True)}, prev)
    assert (got[7].ingress_enforced, got[7].egress_enforced) == (True, True)  # tightened
    assert got[8] is prev[8]   # no new policy for it (it did not compile): as it was
    assert 9 not in got        # no previous: nothing to fall back to (its veth stays closed)
    assert fallbacks({7: (False, False)}, prev)[7] is prev[7]  # never loosened


# ---- map sizes (cluster.json) -------------------------------------------------------------------
def test_parse_map_sizes_and_clear_errors():
    assert parse_map_sizes(["nm_lb4_svc=8", "nm_events=4096"]) == {"nm_lb4_svc": 8,
                                                                 "nm_events": 4096}
    assert parse_map_sizes([]) == {}
    for bad, words in (("nm_nope=5", "no map 'nm_nope'"), ("nm_ct=0", "from 1 to"),
                       ("nm_ct=x", "from 1 to"), ("nm_ct", "NAME=N"),
                       ("nm_events=5000", "power of 2"), ("nm_events=1024", "power of 2")):
        with pytest.raises(NodemeshError) as e:
            parse_map_sizes([bad])
        assert e.value.exit_code == 2 and "--map-size" in str(e.value)
        assert words in str(e.value)


def test_cluster_json_maps_block_round_trips_with_its_help():
    cfg = plan_cluster("nm", "/tmp/x", 1, "/sys/fs/cgroup")
    assert cfg.maps == MAP_SIZE_DEFAULTS
    with map_sizes_for_new_cluster({"nm_lb4_svc": 8}):
        cfg = plan_cluster("nm", "/tmp/x", 1, "/sys/fs/cgroup")
    assert cfg.maps["nm_lb4_svc"] == 8 and cfg.maps["nm_ct"] == MAP_SIZE_DEFAULTS["nm_ct"]
    d = cfg.to_json()
    assert "--map-size" in d["maps_help"]
    assert ClusterConfig.from_json(d) == cfg
    old = ClusterConfig("nm", "/tmp/x", (NodeConfig("node1", 1, "172.30.0.1", "10.244.1.0/24"),))
    assert old.maps == {} and old.map_sizes == MAP_SIZE_DEFAULTS  # an older cluster.json
    assert "maps_help" not in old.to_json()
