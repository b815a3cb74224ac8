"""Pure parts of the local cluster: IPAM, scheduling, the Deployment controller, images, naming."""

from __future__ import annotations

import random

import pytest

from nodemesh.cluster import ipam, scheduler
from nodemesh.cluster.config import plan_cluster
from nodemesh.cluster.controllers import (
    HASH_LABEL,
    plan_deployment,
    plan_orphans,
    template_hash,
)
from nodemesh.errors import NodemeshError
from nodemesh.model import images


# ---- IPAM ------------------------------------------------------------------------------------
def test_ipam_skips_node_address_and_in_use() -> None:
    assert ipam.allocate("10.244.1.0/24", set()) == "10.244.1.2"
    assert ipam.allocate("10.244.1.0/24", {"10.244.1.2"}) == "10.244.1.3"


def test_ipam_round_robin_does_not_reuse_at_once() -> None:
    assert ipam.allocate("10.244.1.0/24", set(), last="10.244.1.5") == "10.244.1.6"
    assert ipam.allocate("10.244.1.0/24", set(), last="10.244.1.191") == "10.244.1.2"


def test_ipam_full_cidr_is_an_error() -> None:
    used = {f"10.244.1.{i}" for i in range(2, 192)}
    with pytest.raises(NodemeshError, match=r"full \(190 pods\)"):
        ipam.allocate("10.244.1.0/24", used)


def test_ipam_leaves_the_cni_range_to_the_cni_chain() -> None:
    assert ipam.cni_range("10.244.1.0/24") == ("10.244.1.192", "10.244.1.254")
    assert ipam.gateway("10.244.1.0/24") == "10.244.1.1"
    got = set()
    last = None
    for _ in range(300):
        last = ipam.allocate("10.244.1.0/24", set(), last)
        got.add(last)
    assert len(got) == 190 and max(int(ip.rsplit(".", 1)[1]) for ip in got) == 191
    assert ipam.cni_range("10.244.1.0/29") is None
    assert ipam.allocate("10.244.1.0/29", set(), "10.244.1.5") == "10.244.1.6"


# ---- scheduling ------------------------------------------------------------------------------
def _pod(name: str, node: str | None = None, owner: str | None = None) -> dict:
    meta: dict = {"name": name, "namespace": "default"}
    if owner:
        meta["ownerReferences"] = [{"uid": owner, "controller": True}]
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}}


def test_scheduler_spreads_replicas_of_one_owner() -> None:
    nodes = ["node1", "node2"]
    placed: list[dict] = []
    for i in range(4):
        p = _pod(f"p{i}", owner="d")
        p["spec"]["nodeName"] = scheduler.choose_node(p, nodes, placed)
        placed.append(p)
    assert sorted(p["spec"]["nodeName"] for p in placed) == ["node1", "node1", "node2", "node2"]


def test_scheduler_prefers_spreading_owner_over_total_load() -> None:
    placed = [_pod("a", "node1", "d"), _pod("x", "node2"), _pod("y", "node2")]
    assert scheduler.choose_node(_pod("b", owner="d"), ["node1", "node2"], placed) == "node2"


def test_scheduler_without_nodes() -> None:
    assert scheduler.choose_node(_pod("a"), [], []) is None


# ---- Deployment controller --------------------------------------------------------------------
def _dep(replicas: int, args: list[str] | None = None) -> dict:
    return {"kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "uid": "u1", "generation": 3},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "x",
                                                           "args": args or []}]}}}}


def _owned(dep: dict, name: str, ready: bool, ts: str = "2026-01-01T00:00:00Z") -> dict:
    return {"kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": ts,
                         "labels": {"app": "web", HASH_LABEL: template_hash(dep["spec"]["template"])},
                         "ownerReferences": [{"uid": "u1", "controller": True}]},
            "spec": {}, "status": {"conditions": [{"type": "Ready",
                                                   "status": "True" if ready else "False"}]}}


def test_plan_creates_missing_replicas_with_owner_and_hash() -> None:
    dep = _dep(3)
    plan = plan_deployment(dep, [], random.Random(1))
    assert len(plan.create) == 3
    p = plan.create[0]
    assert p["metadata"]["name"].startswith("web-" + template_hash(dep["spec"]["template"]))
    assert p["metadata"]["labels"]["app"] == "web"
    assert p["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert len({q["metadata"]["name"] for q in plan.create}) == 3
    assert plan.status["observedGeneration"] == 3


def test_plan_scales_down_not_ready_and_youngest_first() -> None:
    dep = _dep(1)
    pods = [_owned(dep, "old-ready", True, "2026-01-01T00:00:00Z"),
            _owned(dep, "young-ready", True, "2026-01-02T00:00:00Z"),
            _owned(dep, "not-ready", False, "2026-01-01T00:00:00Z")]
    plan = plan_deployment(dep, pods)
    assert [p["metadata"]["name"] for p in plan.delete] == ["not-ready", "young-ready"]


def test_plan_rolls_template_change_keeping_ready_pods_until_replaced() -> None:
    old = _dep(2)
    pods = [_owned(old, "o1", True), _owned(old, "o2", True)]
    new = _dep(2, ["--v2"])
    plan = plan_deployment(new, pods)
    assert len(plan.create) == 2 and plan.delete == []
    fresh = [_owned(new, "n1", True), _owned(new, "n2", False)]
    plan = plan_deployment(new, pods + fresh)
    assert plan.create == [] and len(plan.delete) == 1
    fresh[1]["status"]["conditions"][0]["status"] = "True"
    assert len(plan_deployment(new, pods + fresh).delete) == 2


def test_plan_status_counts() -> None:
    dep = _dep(2)
    plan = plan_deployment(dep, [_owned(dep, "a", True), _owned(dep, "b", False)])
    assert plan.status["readyReplicas"] == 1
    assert plan.status["updatedReplicas"] == 2
    assert plan.status["unavailableReplicas"] == 1


def test_orphans_and_objects_of_deleted_namespaces() -> None:
    orphan = _pod("o", "node1", owner="gone")
    kept = _pod("k", "node1", owner="u1")
    svc = {"kind": "Service", "metadata": {"name": "s", "namespace": "dead"}, "spec": {}}
    doomed = plan_orphans([orphan, kept], [{"metadata": {"uid": "u1"}}], {"default"},
                          [orphan, kept, svc])
    assert orphan in doomed and svc in doomed and kept not in doomed


def test_template_hash_is_stable_and_label_safe() -> None:
    t = _dep(1)["spec"]["template"]
    assert template_hash(t) == template_hash(dict(t))
    assert template_hash(t) != template_hash(_dep(1, ["x"])["spec"]["template"])
    assert template_hash(t).isalnum() and len(template_hash(t)) == 10


# ---- images ----------------------------------------------------------------------------------
@pytest.mark.parametrize("image,name", [
    ("registry.k8s.io/gateway-api/conformance/echo-advanced:v0.1.0",
     "registry.k8s.io/gateway-api/conformance/echo-advanced"),
    ("busybox", "busybox"), ("docker.io/library/busybox:1.36", "busybox"),
    ("localhost:5000/app:1@sha256:abc", "localhost:5000/app"),
])
def test_image_name(image: str, name: str) -> None:
    assert images.image_name(image) == name


def test_resolve_follows_kubernetes_command_args_rules() -> None:
    echo = "registry.k8s.io/gateway-api/conformance/echo-basic"
    assert images.resolve("p", {"name": "c", "image": echo, "args": ["--port=1"]})[-1] == "--port=1"
    assert images.resolve("p", {"name": "c", "image": "anything", "command": ["a"], "args": ["b"]}) \
        == ["a", "b"]
    assert images.resolve("p", {"name": "c", "image": "busybox", "args": ["sleep", "1"]}) == \
        ["sleep", "1"]
    with pytest.raises(NodemeshError, match="not in nodemesh's image table"):
        images.resolve("Pod default/p", {"name": "c", "image": "example.com/unknown:1"})


# ---- naming ----------------------------------------------------------------------------------
def test_plan_cluster_names_and_addresses() -> None:
    cfg = plan_cluster("nm", "/tmp/x", 3, "/sys/fs/cgroup")
    assert [n.name for n in cfg.nodes] == ["node1", "node2", "node3"]
    assert cfg.nodes[2].pod_cidr == "10.244.3.0/24"
    assert cfg.node_netns("node1") == "nm-node1"
    assert len(cfg.pod_host_ifname("0123abcd-0000")) <= 15
    assert cfg.pod_cgroup("node1", "u").startswith("/sys/fs/cgroup/nm/node1/")
    with pytest.raises(NodemeshError):
        plan_cluster("nm", "/tmp/x", 0, "/sys/fs/cgroup")
