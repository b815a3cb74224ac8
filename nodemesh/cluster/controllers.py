"""Cluster-level controllers: Deployments → Pods, scheduling, and garbage collection.

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
from collections.abc import Sequence
from dataclasses import dataclass, field

from nodemesh.cluster import scheduler
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
        for p in pods:
            if p["spec"].get("nodeName") or is_deleting(p):
                continue
            node = scheduler.choose_node(p, self.nodes, placed)
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

