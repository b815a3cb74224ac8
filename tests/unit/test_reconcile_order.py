"""The reconcile step's order (nodemesh.agent.reconcile), with recording stand-ins for the two
syncers: this tests the orchestration only (the real datapath and Envoy are tested in
tests/integration, e.g. test_routes.py, test_envoy_crash.py, test_agent_crashloop.py)."""

from __future__ import annotations

import pytest

from nodemesh.agent.proxy import PushOutcome
from nodemesh.agent.reconcile import NodeReconciler
from nodemesh.cluster.config import plan_cluster
from nodemesh.node.snapshot import KINDS, Redirects
from nodemesh.store.informer import SyncedRevision

SERVICE = {"kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [{"port": 80}]}}
ROUTE = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
         "metadata": {"name": "r", "namespace": "default", "uid": "u-r", "generation": 1},
         "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                  "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}


class Informer:
    revision = 7

    def __init__(self, objects: dict) -> None:
        self.objects = objects

    def kinds(self, kinds) -> dict:
        return {k: list(self.objects.get(k, [])) for k in kinds}

    def add_listener(self, fn) -> None:
        pass


class Maps:
    maglev_m = 16381


class Datapath:
    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.synced = SyncedRevision()
        self.applied = Redirects()
        self.lb_state = None
        self.lowered: dict = {}
        self.dp = Maps()
        self.fail = False

    def adopt_local_endpoints(self) -> None:
        pass

    def attached(self) -> dict:
        return {}

    def capacities(self) -> dict:
        return {}

    def apply(self, snap) -> None:
        if self.fail:
            raise OSError("map write failed")
        self.calls.append(("apply", dict(snap.redirects_interim.service)))
        self.applied = snap.redirects_interim

    def apply_redirects(self, snap) -> None:
        self.calls.append(("apply_redirects", dict(snap.redirects.service)))
        self.applied = snap.redirects


class Xds:
    def sync_state(self, node: str) -> str:
        return "pending"


class Proxy:
    def __init__(self, calls: list, acks: bool = True) -> None:
        self.calls = calls
        self.acks = acks
        self.synced = SyncedRevision()
        self.ports: dict = {}
        self.certs = None
        self.envoy = None
        self.timer = None
        self.xds = Xds()
        self.redirects: dict = {}
        self.error = None
        self.context = None
        self.pushing = True
        self.node = "node1"

    def can_push(self) -> bool:
        return self.pushing

    def covering(self, pods) -> dict:
        return {}

    def push(self, envoy) -> PushOutcome:
        self.calls.append(("push", sorted(envoy.listener_targets.values())))
        self.ports = dict(envoy.result.ports)
        return PushOutcome(listeners_ok=self.acks, tunnel_acked=False)

    def envoy_back(self) -> None:
        self.calls.append(("envoy_back",))

    def report_mesh(self) -> None:
        self.calls.append(("report_mesh",))

    def finish(self, envoy, k) -> None:
        self.calls.append(("finish",))


def reconciler(objects: dict, acks: bool = True, proxy: bool = True):
    cfg = plan_cluster("t", "/nonexistent", 1, "/sys/fs/cgroup", mtls="off")
    calls: list = []
    dp, px = Datapath(calls), (Proxy(calls, acks) if proxy else None)
    r = NodeReconciler(cfg, "node1", store=None, informer=Informer(objects), datapath=dp,
                       proxy=px)
    r._kick_later = lambda seconds: calls.append(("retry", seconds))
    return r, calls, dp, px


def names(calls: list) -> list[str]:
    return [c[0] for c in calls]


def test_datapath_then_envoy_then_new_redirects_then_statuses():
    r, calls, dp, px = reconciler({"Service": [SERVICE], "HTTPRoute": [ROUTE]})
    r.reconcile()
    assert names(calls) == ["apply", "push", "envoy_back", "apply_redirects", "finish"]
    assert calls[0][1] == {}  # nothing redirected before Envoy has the listener
    assert len(calls[3][1]) == 1  # then the service's port goes to it
    assert dp.synced.value == 7 and px.synced.value == 7
    assert px.redirects == dp.applied.all()


def test_a_redirect_that_goes_is_removed_before_envoy_changes():
    r, calls, dp, _ = reconciler({"Service": [SERVICE], "HTTPRoute": [ROUTE]})
    r.reconcile()
    r.informer.objects["HTTPRoute"] = []
    calls.clear()
    r.reconcile()
    assert names(calls)[:2] == ["apply", "push"]
    assert calls[0][1] == {} and dp.applied == Redirects()


def test_redirects_wait_while_envoy_has_not_taken_the_listeners():
    r, calls, dp, _ = reconciler({"Service": [SERVICE], "HTTPRoute": [ROUTE]}, acks=False)
    r.reconcile()
    assert names(calls) == ["apply", "push", "retry", "finish"]
    assert dp.applied == Redirects()


def test_a_failed_datapath_stage_applies_nothing_further_and_marks_both_unsynced():
    r, calls, dp, px = reconciler({"Service": [SERVICE]})
    dp.fail = True
    with pytest.raises(OSError):
        r.reconcile()
    assert calls == []
    assert dp.synced.value == 0 and px.synced.value == 0


def test_before_the_proxy_is_set_up_only_the_datapath_is_applied():
    r, calls, _, px = reconciler({"Service": [SERVICE], "HTTPRoute": [ROUTE]})
    px.pushing = False
    r.reconcile()
    assert names(calls) == ["apply"]
    assert px.context is not None  # L7 flows can be read as soon as there is a context


def test_without_a_proxy_there_are_no_redirects():
    r, calls, dp, _ = reconciler({"Service": [SERVICE], "HTTPRoute": [ROUTE]}, proxy=False)
    r.reconcile()
    assert names(calls) == ["apply"] and dp.applied == Redirects()


def test_every_kind_the_snapshot_reads_is_gathered():
    seen = []

    class Recording(Informer):
        def kinds(self, kinds):
            seen.append(tuple(kinds))
            return super().kinds(kinds)

    r, _, _, _ = reconciler({})
    r.informer = Recording({})
    r.reconcile()
    assert seen[0] == KINDS
