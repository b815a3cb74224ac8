"""Admission: the checks that need what the store already holds, and ClusterIP allocation.

`validate_objects` looks at each object alone; `admit` looks at the incoming objects together
with the stored ones: namespaces must exist, immutable fields must not change, a Service gets a
ClusterIP (kept across re-applies), and a Service's named targetPort must exist in the pods it
selects. Like validation, it reports every problem at once and changes nothing on error.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Iterable

from nodemesh.errors import InvalidManifest
from nodemesh.model.kinds import KINDS, obj_key, obj_ref
from nodemesh.model.labels import service_selects

SERVICE_CIDR = "10.96.0.0/16"
# Never handed out by allocation: the addresses Kubernetes reserves for the API server and DNS.
RESERVED_IPS = ("10.96.0.1", "10.96.0.10")
ALWAYS_PRESENT_NAMESPACES = ("default",)

Existing = Callable[[str, str | None], list[dict]]


class CIDRFull(Exception):
    """No address is left to allocate."""


def allocate_cluster_ip(cidr: str, used: set[str]) -> str:
    """The lowest free address of `cidr`, skipping the network and broadcast addresses, the
    reserved addresses and `used`. Raises CIDRFull when there is none."""
    net = ipaddress.ip_network(cidr)
    skip = set(used) | set(RESERVED_IPS)
    for ip in net.hosts():  # hosts() leaves out the network and broadcast addresses
        if str(ip) not in skip:
            return str(ip)
    raise CIDRFull(f"no free address left in the service CIDR {cidr}")


def admit(incoming: list[dict], existing: Existing) -> list[dict]:
    """Check validated objects against the store (read through `existing(kind, namespace or
    None)`) and return the objects to store: with ClusterIPs allocated or kept."""
    objs = [copy.deepcopy(o) for o in incoming]
    errors: list[str] = []
    stored = _Stored(existing)
    errors += _check_namespaces(objs, stored)
    for o in objs:
        old = stored.get(o)
        if old is None:
            continue
        if o["kind"] == "Deployment" and o["spec"].get("selector") != old["spec"].get("selector"):
            errors.append(f"{obj_ref(o)}: spec.selector: field is immutable "
                          "(delete and re-create the Deployment to change it)")
        if o["kind"] == "Pod" and "nodeName" not in o["spec"] and old["spec"].get("nodeName"):
            # The scheduler wrote it; a re-apply keeps it, as kubectl's merge would.
            o["spec"]["nodeName"] = old["spec"]["nodeName"]
        if o["kind"] == "Pod" and o["spec"] != old["spec"]:
            errors.append(f"{obj_ref(o)}: spec: a Pod's spec cannot be changed "
                          "(delete and re-create the Pod, or use a Deployment)")
    errors += _assign_cluster_ips(objs, stored)
    errors += _check_named_target_ports(objs, stored)
    if errors:
        raise InvalidManifest(errors)
    return objs


class _Stored:
    """Caching reads of the store through the `existing` callback."""

    def __init__(self, existing: Existing) -> None:
        self._existing = existing
        self._cache: dict[tuple[str, str | None], list[dict]] = {}

    def list(self, kind: str, namespace: str | None = None) -> list[dict]:
        key = (kind, namespace)
        if key not in self._cache:
            self._cache[key] = list(self._existing(kind, namespace))
        return self._cache[key]

    def get(self, obj: dict) -> dict | None:
        info = KINDS[obj["kind"]]
        ns = obj["metadata"].get("namespace") if info.namespaced else None
        for o in self.list(obj["kind"], ns):
            if o["metadata"]["name"] == obj["metadata"]["name"]:
                return o
        return None


def _check_namespaces(objs: list[dict], stored: _Stored) -> list[str]:
    known = set(ALWAYS_PRESENT_NAMESPACES)
    known |= {n["metadata"]["name"] for n in stored.list("Namespace", None)}
    known |= {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    errors = []
    for o in objs:
        ns = o["metadata"].get("namespace")
        if KINDS[o["kind"]].namespaced and ns not in known:
            errors.append(f'{obj_ref(o)}: metadata.namespace: namespace "{ns}" does not exist '
                          f"(create it first, or apply a Namespace {ns} in the same apply)")
    return errors


def _ips_of(svc: dict) -> list[str]:
    spec = svc.get("spec") or {}
    ips = list(spec.get("clusterIPs") or [])
    if spec.get("clusterIP") and spec["clusterIP"] not in ips:
        ips.insert(0, spec["clusterIP"])
    return [ip for ip in ips if ip not in ("", "None")]


def _assign_cluster_ips(objs: list[dict], stored: _Stored) -> list[str]:
    errors: list[str] = []
    services = [o for o in objs if o["kind"] == "Service"]
    incoming_keys = {obj_key(s) for s in services}
    # Addresses held by stored services that this apply does not replace.
    owner: dict[str, str] = {}
    for s in stored.list("Service", None):
        if obj_key(s) not in incoming_keys:
            for ip in _ips_of(s):
                owner[ip] = obj_ref(s)
    net = ipaddress.ip_network(SERVICE_CIDR)
    pending = []
    for svc in services:
        spec = svc["spec"]
        old = stored.get(svc)
        old_ip = (old or {}).get("spec", {}).get("clusterIP")
        want = spec.get("clusterIP")
        if old_ip:
            if want is None:
                want = old_ip  # re-apply without a clusterIP keeps the stored one
            elif want != old_ip:
                errors.append(f'{obj_ref(svc)}: spec.clusterIP: field is immutable (is "{old_ip}", '
                              f'cannot become "{want}"; delete and re-create the Service)')
                continue
        if want is None:
            pending.append(svc)
            continue
        if want != "None":
            if ipaddress.ip_address(want) not in net:
                errors.append(f'{obj_ref(svc)}: spec.clusterIP: "{want}" is outside the '
                              f"service CIDR {SERVICE_CIDR}")
                continue
            if want in (str(net.network_address), str(net.broadcast_address)):
                errors.append(f'{obj_ref(svc)}: spec.clusterIP: "{want}" is the network or '
                              f"broadcast address of {SERVICE_CIDR}")
                continue
            if want in owner:
                errors.append(f'{obj_ref(svc)}: spec.clusterIP: "{want}" is already allocated '
                              f"to {owner[want]}")
                continue
            owner[want] = obj_ref(svc)
        spec["clusterIP"] = want
        spec["clusterIPs"] = [want]
    for svc in pending:
        try:
            ip = allocate_cluster_ip(SERVICE_CIDR, set(owner))
        except CIDRFull as e:
            errors.append(f"{obj_ref(svc)}: spec.clusterIP: {e}")
            continue
        owner[ip] = obj_ref(svc)
        svc["spec"]["clusterIP"] = ip
        svc["spec"]["clusterIPs"] = [ip]
    return errors


def _workloads(objs: list[dict], stored: _Stored, namespace: str) -> Iterable[tuple[dict, list]]:
    """(pod labels, containers) of every Pod and Deployment template in `namespace`, with the
    incoming objects replacing stored ones of the same name."""
    by_key: dict[tuple[str, str, str], dict] = {}
    for kind in ("Pod", "Deployment"):
        for o in stored.list(kind, namespace):
            by_key[obj_key(o)] = o
    for o in objs:
        if o["kind"] in ("Pod", "Deployment") and o["metadata"].get("namespace") == namespace:
            by_key[obj_key(o)] = o
    for o in by_key.values():
        if o["kind"] == "Pod":
            yield o["metadata"].get("labels") or {}, o["spec"].get("containers") or []
        else:
            tpl = o["spec"].get("template") or {}
            labels = (tpl.get("metadata") or {}).get("labels") or {}
            yield labels, (tpl.get("spec") or {}).get("containers") or []


def _check_named_target_ports(objs: list[dict], stored: _Stored) -> list[str]:
    errors = []
    for svc in (o for o in objs if o["kind"] == "Service"):
        spec = svc["spec"]
        selected = [c for labels, cs in _workloads(objs, stored, svc["metadata"]["namespace"])
                    if service_selects(spec.get("selector"), labels) for c in cs]
        if not selected:
            continue  # nothing selected yet: the port is resolved when pods appear
        declared = {(p.get("name"), p.get("protocol", "TCP"))
                    for c in selected for p in c.get("ports") or []}
        names = {name for name, _ in declared}
        for i, port in enumerate(spec.get("ports") or []):
            target = port.get("targetPort")
            if not isinstance(target, str):
                continue
            where = f"{obj_ref(svc)}: spec.ports[{i}].targetPort"
            if target not in names:
                errors.append(f'{where}: no container port named "{target}" in the pods this '
                              "service selects")
            elif (target, port["protocol"]) not in declared:
                errors.append(f'{where}: the container port named "{target}" is not '
                              f"{port['protocol']} in the pods this service selects")
    return errors
