"""The node lifecycle controller's plan (pure): a lease that lapses takes its node out of
service (Ready=Unknown, the unreachable taint); a renewal brings it back."""

from __future__ import annotations

from nodemesh.cluster.controllers import apply_node_update, plan_node_lifecycle
from nodemesh.model.nodes import node_status_text, node_unreachable, unreachable_nodes

T = "2026-12-07T15:00:00Z"


def node(name: str = "node1", ready: str = "True", tainted: bool = False) -> dict:
    spec: dict = {"podCIDR": "10.244.1.0/24"}
    if tainted:
        spec["taints"] = [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]
    return {"kind": "Node", "metadata": {"name": name}, "spec": spec,
            "status": {"conditions": [{"type": "Ready", "status": ready},
                                      {"type": "DatapathTablesFull", "status": "False"}]}}


def lease(name: str, renew: str, seconds: int = 3, ns: str = "kube-node-lease") -> dict:
    return {"kind": "Lease", "metadata": {"name": name, "namespace": ns},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": seconds,
                     "renewTime": renew}}


def step(nodes, leases, seen, now, following=None):
    return plan_node_lifecycle(nodes, leases, seen, now, T, 15, following)


def test_a_lease_found_when_the_controller_starts_changes_nothing_until_it_lapses():
    seen, ups = step([node()], [lease("node1", "r1")], {}, 100.0)
    assert ups == []
    seen, ups = step([node()], [lease("node1", "r1")], seen, 102.9)
    assert ups == []
    seen, ups = step([node()], [lease("node1", "r1")], seen, 103.1)
    [u] = ups
    assert u.node == "node1" and u.unreachable
    assert u.ready["status"] == "Unknown" and u.ready["reason"] == "LeaseExpired"
    assert "kube-node-lease/node1" in u.ready["message"] and "3s" in u.ready["message"]


def test_renewals_keep_a_node_ready_and_a_lapse_is_measured_from_the_last_one_seen():
    seen, _ = step([node()], [lease("node1", "r1")], {}, 100.0)
    for i, t in enumerate((101.0, 102.0, 103.0, 104.0)):
        seen, ups = step([node()], [lease("node1", f"r{i + 2}")], seen, t)
        assert ups == []  # already Ready and untainted: nothing to write
    seen, ups = step([node()], [lease("node1", "r5")], seen, 106.9)
    assert ups == []
    seen, ups = step([node()], [lease("node1", "r5")], seen, 107.1)
    assert [u.unreachable for u in ups] == [True]


def test_a_node_out_of_service_comes_back_when_its_lease_is_renewed():
    out = node(ready="Unknown", tainted=True)
    seen, ups = step([out], [lease("node1", "r1")], {}, 100.0)
    assert ups == []  # found so: not renewed while watched yet
    seen, ups = step([out], [lease("node1", "r1")], seen, 110.0)
    assert ups == []  # already out: nothing to write again
    seen, ups = step([out], [lease("node1", "r2")], seen, 111.0)
    [u] = ups
    assert not u.unreachable and u.ready["status"] == "True" and u.ready["reason"] == "AgentReady"


def test_a_node_without_a_lease_goes_out_after_the_default_duration():
    seen, ups = step([node(ready="Unknown")], [], {}, 100.0)
    assert ups == []
    seen, ups = step([node(ready="Unknown")], [], seen, 115.5)
    [u] = ups
    assert u.unreachable and "never renewed" in u.ready["message"] and "15s" in u.ready["message"]


def test_leases_elsewhere_count_for_nothing():
    seen, _ = step([node()], [lease("node1", "r1", ns="default")], {}, 100.0)
    seen, ups = step([node()], [lease("node1", "r2", ns="default")], seen, 116.0)
    assert [u.unreachable for u in ups] == [True]


def test_no_lease_lapses_sooner_than_its_duration_after_the_store_is_followed_again():
    seen, _ = step([node()], [lease("node1", "r1")], {}, 100.0)
    # The store was unreachable until 110: renewals could not be seen; grace from then.
    seen, ups = step([node()], [lease("node1", "r1")], seen, 111.0, following=110.0)
    assert ups == []
    seen, ups = step([node()], [lease("node1", "r1")], seen, 113.5, following=110.0)
    assert [u.unreachable for u in ups] == [True]


def test_each_node_is_judged_on_its_own_lease():
    nodes = [node("node1"), node("node2")]
    seen, _ = step(nodes, [lease("node1", "a"), lease("node2", "b")], {}, 100.0)
    seen, ups = step(nodes, [lease("node1", "a2"), lease("node2", "b")], seen, 103.5)
    assert [(u.node, u.unreachable) for u in ups] == [("node2", True)]


def test_apply_node_update_sets_the_condition_and_taints_and_keeps_the_rest():
    n = node()
    n["spec"]["taints"] = [{"key": "example.com/other", "effect": "NoSchedule"}]
    seen, _ = step([n], [lease("node1", "r1")], {}, 100.0)
    _, [u] = step([n], [lease("node1", "r1")], seen, 104.0)
    spec_obj, status = apply_node_update(n, u, T)
    assert node_unreachable(spec_obj) and "status" not in spec_obj
    keys = [(t["key"], t["effect"]) for t in spec_obj["spec"]["taints"]]
    assert keys == [("example.com/other", "NoSchedule"),
                    ("node.kubernetes.io/unreachable", "NoSchedule"),
                    ("node.kubernetes.io/unreachable", "NoExecute")]
    types = [c["type"] for c in status["conditions"]]
    assert types == ["Ready", "DatapathTablesFull"]
    out = {**spec_obj, "status": status}
    assert node_status_text(out) == "NotReady" and unreachable_nodes([out]) == {"node1"}
    # ... and back
    seen, _ = step([out], [lease("node1", "r1")], {}, 200.0)
    _, [back] = step([out], [lease("node1", "r2")], seen, 201.0)
    spec_obj, status = apply_node_update(out, back, T)
    assert [t["key"] for t in spec_obj["spec"]["taints"]] == ["example.com/other"]
    assert node_status_text({**spec_obj, "status": status}) == "Ready"


def test_the_informer_says_since_when_it_follows_the_store_without_a_gap(tmp_path):
    import time

    from nodemesh.store.informer import Informer
    from nodemesh.store.sqlite import SqliteStore

    inf = Informer(SqliteStore(str(tmp_path / "store.db")))
    assert inf.following_since() is None  # not started: nothing followed yet
    inf.start()
    try:
        assert inf.wait_synced(5)
        first = inf.following_since()
        assert first is not None and first <= time.monotonic()
        time.sleep(0.1)
        assert inf.following_since() == first  # still the same unbroken stretch
        inf._last_answer -= Informer.FOLLOW_GAP_SECONDS + 1  # as if this process had stopped
        assert inf.following_since() is None
        deadline = time.monotonic() + 3
        while inf.following_since() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        again = inf.following_since()
        assert again is not None and again > first  # a new stretch begins after the gap
    finally:
        inf.stop()
        inf.join(2)
