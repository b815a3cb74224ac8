"""Cluster-level controllers: Deployments → Pods, scheduling, garbage collection, node lifecycle.

`plan_*` functions are pure (objects in, decisions out) and unit tested; `Controllers.sync` reads
the store, applies the decisions in one transaction per object, and is what the cluster daemon
runs whenever the store changes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from nodemesh.cluster import scheduler
from nodemesh.model.nodes import (
    LEASE_NAMESPACE,
    OUT_OF_SERVICE_TAINTS,
    UNREACHABLE_TAINT,
    node_status_text,
    node_unreachable,
    unreachable_nodes,
)
from nodemesh.model.workloads import is_deleting, pod_ready
from nodemesh.store import Store
from nodemesh.store.base import now_rfc3339

log = logging.getLogger("nodemesh.controllers")
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
HASH_LABEL = "pod-template-hash"


def template_hash(template: dict) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return "".join(_SUFFIX_ALPHABET[b % len(_SUFFIX_ALPHABET)] for b in digest[:10])


def owned_by(pod: dict, owner: dict) -> bool:
    return any(ref.get("uid") == owner["metadata"]["uid"]
               for ref in pod["metadata"].get("ownerReferences") or [])


@dataclass
class DeploymentPlan:
    create: list[dict] = field(default_factory=list)
    delete: list[dict] = field(default_factory=list)
    status: dict = field(default_factory=dict)


def plan_deployment(dep: dict, pods: Sequence[dict], rng: random.Random | None = None
                    ) -> DeploymentPlan:
    """What to create and delete so `dep` has its replicas of its current template.

    A template change rolls: new pods are created at once, and old pods go as new ones become
    ready, so the Deployment never has fewer ready pods than it had.
    """
    rng = rng or random.Random()
    meta, spec = dep["metadata"], dep["spec"]
    replicas = int(spec.get("replicas", 1))
    h = template_hash(spec["template"])
    live = [p for p in pods if not is_deleting(p)]
    new = [p for p in live if p["metadata"].get("labels", {}).get(HASH_LABEL) == h]
    old = [p for p in live if p not in new]
    plan = DeploymentPlan()
    if len(new) < replicas:
        for _ in range(replicas - len(new)):
            plan.create.append(_pod_from_template(dep, h, rng))
    elif len(new) > replicas:
        # Drop the least useful first: not ready, then the youngest.
        youngest_first = sorted(new, key=lambda p: p["metadata"].get("creationTimestamp", ""),
                                reverse=True)
        ranked = sorted(youngest_first, key=pod_ready)  # stable: keeps youngest-first within
        plan.delete.extend(ranked[: len(new) - replicas])
    ready_new = sum(1 for p in new if pod_ready(p))
    keep_old = max(0, min(len(old), replicas - ready_new))
    old_sorted = sorted(old, key=lambda p: pod_ready(p), reverse=True)  # keep ready ones longest
    plan.delete.extend(old_sorted[keep_old:])
    ready_all = sum(1 for p in live if pod_ready(p))
    plan.status = {
        "observedGeneration": meta.get("generation", 1),
        "replicas": len(live),
        "updatedReplicas": len(new),
        "readyReplicas": ready_all,
        "availableReplicas": ready_all,
        "unavailableReplicas": max(0, replicas - ready_all),
    }
    return plan


def _pod_from_template(dep: dict, h: str, rng: random.Random) -> dict:
    meta, tmpl = dep["metadata"], copy.deepcopy(dep["spec"]["template"])
    tmeta = tmpl.get("metadata") or {}
    suffix = "".join(rng.choice(_SUFFIX_ALPHABET) for _ in range(5))
    labels = dict(tmeta.get("labels") or {})
    labels[HASH_LABEL] = h
    pod_meta: dict = {
        "name": f"{meta['name']}-{h}-{suffix}",
        "namespace": meta["namespace"],
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
            "uid": meta["uid"], "controller": True,
        }],
    }
    if tmeta.get("annotations"):
        pod_meta["annotations"] = dict(tmeta["annotations"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": tmpl["spec"]}


def plan_orphans(pods: Sequence[dict], deployments: Sequence[dict],
                 namespaces: set[str], objects: Sequence[dict]) -> list[dict]:
    """Objects to delete: pods whose controlling Deployment is gone, anything in a deleted namespace."""
    dep_uids = {d["metadata"]["uid"] for d in deployments}
    out = []
    for p in pods:
        owner = scheduler.owner_uid(p)
        if owner is not None and owner not in dep_uids and not is_deleting(p):
            out.append(p)
    for o in objects:
        ns = o["metadata"].get("namespace")
        if ns and ns not in namespaces and not (o["kind"] == "Pod" and is_deleting(o)) \
                and o not in out:
            out.append(o)
    return out


def request_delete(txn, obj: dict) -> None:
    """Delete an object; a scheduled Pod is only marked, its node's agent removes it when gone."""
    meta = obj["metadata"]
    ns, name = meta.get("namespace") or "", meta["name"]
    if obj["kind"] == "Pod" and obj["spec"].get("nodeName"):
        cur = txn.get("Pod", ns, name)
        if cur is not None and not is_deleting(cur):
            cur["metadata"]["deletionTimestamp"] = now_rfc3339()
            txn.put(cur)
        return
    txn.delete(obj["kind"], ns, name)


class Controllers:
    """Runs the plans against a store. Stateless between calls: every sync reads afresh."""

    def __init__(self, store: Store, nodes: Sequence[str]) -> None:
        self.store = store
        self.nodes = list(nodes)
        self.rng = random.Random()

    def sync(self) -> None:
        self.sync_deployments()
        self.schedule()
        self.collect_garbage()

    def sync_deployments(self) -> None:
        for dep in self.store.list("Deployment"):
            ns = dep["metadata"]["namespace"]
            pods = [p for p in self.store.list("Pod", ns) if owned_by(p, dep)]
            plan = plan_deployment(dep, pods, self.rng)
            if not (plan.create or plan.delete or plan.status != dep.get("status")):
                continue
            with self.store.transaction() as t:
                cur = t.get("Deployment", ns, dep["metadata"]["name"])
                if cur is None or cur["metadata"]["uid"] != dep["metadata"]["uid"]:
                    continue
                if cur["metadata"]["resourceVersion"] != dep["metadata"]["resourceVersion"]:
                    continue  # changed meanwhile: the next sync sees the new one
                for p in plan.create:
                    t.create(p)
                for p in plan.delete:
                    request_delete(t, p)
                t.put_status("Deployment", ns, dep["metadata"]["name"], plan.status)

    def schedule(self) -> None:
        pods = self.store.list("Pod")
        placed = [p for p in pods if p["spec"].get("nodeName")]
        # Not onto a node the lifecycle took out of service (its unreachable taint): such a
        # pod stays Pending until a node is back.
        out = unreachable_nodes(self.store.list("Node"))
        nodes = [n for n in self.nodes if n not in out]
        for p in pods:
            if p["spec"].get("nodeName") or is_deleting(p):
                continue
            node = scheduler.choose_node(p, nodes, placed)
            if node is None:
                continue
            with self.store.transaction() as t:
                cur = t.get("Pod", p["metadata"]["namespace"], p["metadata"]["name"])
                if cur is None or cur["spec"].get("nodeName"):
                    continue
                cur["spec"]["nodeName"] = node
                placed.append(t.put(cur))

    def collect_garbage(self) -> None:
        objs = self.store.list()
        namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
        namespaces.add("default")
        pods = [o for o in objs if o["kind"] == "Pod"]
        deps = [o for o in objs if o["kind"] == "Deployment"]
        namespaced = [o for o in objs if o["metadata"].get("namespace")]
        doomed = plan_orphans(pods, deps, namespaces, namespaced)
        if doomed:
            with self.store.transaction() as t:
                for o in doomed:
                    request_delete(t, o)



# ---- node lifecycle: leases → the Node's Ready condition and unreachable taints ------------------
@dataclass(frozen=True)
class LeaseSeen:
    """What the node lifecycle controller last saw of one node's lease: its renewTime, and when
    (the controller's monotonic clock) that value was first seen. Expiry is measured on the
    controller's own clock, as Kubernetes does, so the nodes' clocks do not matter. `renewed`:
    the lease changed while the controller watched (not only found so when it started)."""

    renew_time: str | None
    since: float
    renewed: bool = False


@dataclass
class NodeUpdate:
    """One Node whose Ready condition and taints change."""

    node: str
    ready: dict
    unreachable: bool  # add the node.kubernetes.io/unreachable taints (else remove them)


def _lease_spec(lease: dict | None) -> dict:
    return (lease or {}).get("spec") or {}


def plan_node_lifecycle(nodes: Sequence[dict], leases: Sequence[dict],
                        seen: dict[str, LeaseSeen], now: float, now_text: str,
                        default_seconds: float, following_since: float | None = None
                        ) -> tuple[dict[str, LeaseSeen], list[NodeUpdate]]:
    """The node lifecycle controller's decisions (pure).

    `leases` are the ``kube-node-lease`` Leases; `seen` is the previous call's first result;
    `now` the controller's monotonic clock (`now_text` the wall clock, for conditions);
    `following_since` when the controller's view of the store became current again (after the
    store was unreachable or the controller was stopped): no lease expires sooner than its
    duration after that, since renewals could not be seen before it.

    A node whose lease has not changed for its ``leaseDurationSeconds`` (`default_seconds`
    without a lease) gets ``Ready=Unknown`` (reason ``LeaseExpired``) and the unreachable taint;
    a node whose lease is renewed while it watches gets ``Ready=True`` back. A lease found
    fresh when the controller starts changes nothing until it is renewed or expires.
    """
    by_node = {(lease["metadata"]["name"]): lease for lease in leases
               if lease["metadata"].get("namespace") == LEASE_NAMESPACE}
    new_seen: dict[str, LeaseSeen] = {}
    updates: list[NodeUpdate] = []
    for node in nodes:
        name = node["metadata"]["name"]
        lease = by_node.get(name)
        spec = _lease_spec(lease)
        renew_time = spec.get("renewTime")
        seconds = float(spec.get("leaseDurationSeconds") or default_seconds)
        prev = seen.get(name)
        if prev is None:
            cur = LeaseSeen(renew_time, now)
        elif renew_time != prev.renew_time:
            cur = LeaseSeen(renew_time, now, renewed=renew_time is not None)
        else:
            cur = prev
        new_seen[name] = cur
        since = max(cur.since, following_since) if following_since is not None else cur.since
        expired = now - since > seconds
        is_ready = node_status_text(node) == "Ready"
        tainted = node_unreachable(node)
        ref = f"{LEASE_NAMESPACE}/{name}"
        if expired:
            if tainted and not is_ready:
                continue
            last = f"last renewed {renew_time}" if renew_time else "never renewed"
            updates.append(NodeUpdate(name, {
                "type": "Ready", "status": "Unknown", "reason": "LeaseExpired",
                "message": f"the agent has not renewed its lease {ref} for {seconds:g}s "
                           f"({last}); its pods are no backend of any Service until it does",
                "lastHeartbeatTime": _rfc3339(renew_time), "lastTransitionTime": now_text},
                unreachable=True))
        elif cur.renewed and (tainted or not is_ready):
            updates.append(NodeUpdate(name, {
                "type": "Ready", "status": "True", "reason": "AgentReady",
                "message": f"the agent renews its lease {ref} (lease {seconds:g}s)",
                "lastHeartbeatTime": _rfc3339(renew_time), "lastTransitionTime": now_text},
                unreachable=False))
    return new_seen, updates


def _rfc3339(micro_time: str | None) -> str | None:
    """A Lease's MicroTime (2026-12-07T15:04:05.123456Z) at the seconds of a condition."""
    return micro_time.split(".")[0] + "Z" if micro_time and "." in micro_time else micro_time


def apply_node_update(node: dict, update: NodeUpdate, now_text: str) -> tuple[dict, dict]:
    """The Node's new spec and status for `update` (pure): the Ready condition replaced, the
    unreachable taints (NoSchedule and NoExecute, as Kubernetes sets them) added or removed,
    every other condition and taint kept."""
    new = copy.deepcopy(node)
    spec = new.setdefault("spec", {})
    taints = [t for t in spec.get("taints") or [] if t.get("key") not in OUT_OF_SERVICE_TAINTS]
    if update.unreachable:
        taints += [{"key": UNREACHABLE_TAINT, "effect": effect, "timeAdded": now_text}
                   for effect in ("NoSchedule", "NoExecute")]
    if taints:
        spec["taints"] = taints
    else:
        spec.pop("taints", None)
    status = copy.deepcopy(node.get("status") or {})
    conditions = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
    status["conditions"] = [{k: v for k, v in update.ready.items() if v is not None},
                            *conditions]
    new.pop("status", None)
    return new, status


class NodeLifecycle:
    """Runs `plan_node_lifecycle` against the daemon's informer and writes its decisions."""

    def __init__(self, store: Store, informer, default_seconds: float) -> None:
        self.store = store
        self.informer = informer
        self.default_seconds = default_seconds
        self.seen: dict[str, LeaseSeen] = {}

    def step(self, now: float | None = None) -> list[NodeUpdate]:
        following = self.informer.following_since()
        if following is None:
            return []  # the store is not followed now: nothing can be judged (or written)
        now = time.monotonic() if now is None else now
        now_text = now_rfc3339()
        self.seen, updates = plan_node_lifecycle(
            self.informer.list("Node"), self.informer.list("Lease", LEASE_NAMESPACE),
            self.seen, now, now_text, self.default_seconds, following)
        for u in updates:
            for attempt in self.store.retrying():
                with attempt as t:
                    cur = t.get("Node", "", u.node)
                    if cur is None:
                        continue
                    spec_obj, status = apply_node_update(cur, u, now_text)
                    t.put(spec_obj)
                    t.put_status("Node", "", u.node, status)
            log.warning("node %s: %s (%s)", u.node,
                        "NotReady" if u.unreachable else "Ready", u.ready["message"])
        return updates
