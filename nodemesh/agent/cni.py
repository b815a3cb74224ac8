"""The agent's side of `nodemesh-cni`: pods whose sandbox a container runtime brings over CNI.

The plugin (`nodemesh.cni.plugin`) posts each CNI request to the agent's local API; this module
answers them (docs/cni.md):

- ADD: the Pod must be in the store, scheduled to this node, and marked as brought by CNI
  (`nodemesh.io/sandbox: cni`, `nodemesh.cluster.pods.brought_by_cni`; in Kubernetes mode
  every pod is). The host side of the
  pod's interface is found from the pod's end (the veth's peer), the attachment is recorded
  (`<node dir>/cni/`, so a new agent adopts it), and the sandbox goes the same way as the local
  pod runtime's (`PodHooks.ready`): programs attached (the veth drops everything), policy
  programmed, endpoint entry last. The answer comes only then; then the Pod's status gets the
  address and Ready. Any failure undoes all of it before the error is answered.
- DEL: the same in reverse (`PodHooks.removed`: the endpoint fails closed, programs detached);
  unknown attachments and gone network namespaces are fine.
- CHECK: the attachment is known, its address is the prevResult's, both programs are attached
  to its veth and its endpoint entry is programmed.
- GC (CNI 1.1.0): forgets the attachments of a network that the runtime no longer lists.

Each request runs in a worker thread of the agent; one attachment's requests run one at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

from nodemesh.agent.api import ApiError
from nodemesh.cluster.config import ClusterConfig
from nodemesh.cluster.pods import SANDBOX_ANNOTATION, SANDBOX_CNI, PodHooks, brought_by_cni
from nodemesh.cni.spec import Code
from nodemesh.host.files import read_json, write_json_atomic
from nodemesh.host.sandbox import Sandbox
from nodemesh.model.workloads import is_deleting
from nodemesh.store import Store
from nodemesh.store.base import now_rfc3339

log = logging.getLogger("nodemesh.cni")


class CniRefused(ApiError):
    """A CNI request the agent answers with an error result (`code` is the CNI error code)."""

    def __init__(self, code: int, message: str, details: str = "", status: int = 400) -> None:
        super().__init__(status, message, cniCode=int(code), details=details)


@dataclass
class CniPod:
    """One CNI attachment (container ID + interface) of a pod on this node."""

    uid: str
    namespace: str
    name: str
    sandbox: Sandbox
    container_id: str
    ifname: str
    network: str
    created: str

    @property
    def key(self) -> str:
        return f"{self.container_id}/{self.ifname}"

    def adoptable(self) -> bool:
        """A new agent attaches to it while its network namespace is there."""
        return os.path.exists(self.sandbox.netns)

    def to_json(self) -> dict:
        return {"uid": self.uid, "namespace": self.namespace, "name": self.name,
                "sandbox": self.sandbox.to_json(), "containerID": self.container_id,
                "ifname": self.ifname, "network": self.network, "created": self.created}

    @classmethod
    def from_json(cls, d: dict) -> CniPod:
        return cls(d["uid"], d["namespace"], d["name"], Sandbox.from_json(d["sandbox"]),
                   d["containerID"], d["ifname"], d.get("network", ""), d.get("created", ""))


def peer_interface(netns_path: str, ifname: str) -> str:
    """The name, in this (the node's) network namespace, of the other end of the pod's veth
    `ifname` in `netns_path`."""
    p = subprocess.run(["nsenter", f"--net={netns_path}", "ip", "-j", "link", "show", "dev",
                        ifname], capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        raise CniRefused(Code.INVALID_CONFIG, f"no interface {ifname} in the pod's network "
                         f"namespace {netns_path}: {p.stderr.strip()}")
    info = (json.loads(p.stdout) or [{}])[0]
    peer = info.get("link_index")
    if not peer or info.get("link_netnsid") is None:
        raise CniRefused(Code.INVALID_CONFIG, f"{ifname} in {netns_path} is not one end of a "
                         "veth (nodemesh attaches to the veth's other end, on the node)")
    try:
        return socket.if_indextoname(int(peer))
    except OSError:
        raise CniRefused(Code.INVALID_CONFIG, f"the other end of {ifname} (index {peer}) is not "
                         "in the node's network namespace; the plugin before nodemesh-cni must "
                         "put it there (as ptp and bridge do)") from None


def _field(body: dict, name: str, required: bool = True) -> str:
    v = body.get(name, "")
    if not isinstance(v, str) or (required and not v):
        raise CniRefused(Code.INVALID_ENV, f"request: {name}: required (a string)")
    return v


class CniPods:
    """The CNI attachments of this node (see the module)."""

    def __init__(self, cfg: ClusterConfig, node: str, store: Store, hooks: PodHooks,
                 every_pod: bool = False) -> None:
        # every_pod (Kubernetes mode): the kubelet brings every pod through CNI, so no pod
        # needs the annotation, and the API server (not this agent) finishes deletes.
        self.every_pod = every_pod
        self.cfg = cfg
        self.node = cfg.node(node)
        self.store = store
        self.hooks = hooks
        self.check_endpoint: Callable[[str], list[str]] | None = None  # the datapath's
        self.dir = os.path.join(cfg.node_dir(node), "cni")
        self.local: dict[str, CniPod] = {}  # pod uid -> attachment (the datapath adopts these)
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        os.makedirs(self.dir, exist_ok=True)
        for f in sorted(os.listdir(self.dir)):
            rec = read_json(os.path.join(self.dir, f))
            if rec:
                cp = CniPod.from_json(rec)
                self.local[cp.uid] = cp

    # ---- records ---------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key.replace("/", "@") + ".json")

    def _by_key(self, key: str) -> CniPod | None:
        return next((cp for cp in self.local.values() if cp.key == key), None)

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _forget(self, cp: CniPod) -> None:
        with self._lock:
            if self.local.get(cp.uid) is cp:
                self.local.pop(cp.uid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(cp.key))

    # ---- ADD -------------------------------------------------------------------------------
    def add(self, body: dict) -> dict:
        key = f"{_field(body, 'containerID')}/{_field(body, 'ifname')}"
        with self._key_lock(key):
            return self._add(body, key)

    def _pod_for(self, body: dict) -> dict:
        ref = body.get("pod") or {}
        ns, name = ref.get("namespace") or "", ref.get("name") or ""
        if not ns or not name:
            raise CniRefused(Code.INVALID_ENV, "request: pod.namespace and pod.name: required")
        pod = self.store.get("Pod", ns, name)
        where = f"pod {ns}/{name}"
        if pod is None:
            raise CniRefused(Code.POD_REFUSED, f"{where} is not in the store",
                             "create the Pod object (annotated "
                             f"{SANDBOX_ANNOTATION}: {SANDBOX_CNI}) before its sandbox")
        if ref.get("uid") and ref["uid"] != pod["metadata"]["uid"]:
            raise CniRefused(Code.POD_REFUSED, f"{where}: K8S_POD_UID {ref['uid']} is not the "
                             f"store's uid {pod['metadata']['uid']}")
        if not self.every_pod and not brought_by_cni(pod):
            raise CniRefused(Code.POD_REFUSED, f"{where} is run by the local cluster's pod "
                             f"runtime; annotate it {SANDBOX_ANNOTATION}: {SANDBOX_CNI} for a "
                             "sandbox that CNI brings")
        node = pod["spec"].get("nodeName") or ""
        if node != self.node.name:
            raise CniRefused(Code.POD_REFUSED, f"{where}: spec.nodeName is {node or 'empty'}, "
                             f"this is node {self.node.name}")
        if is_deleting(pod):
            raise CniRefused(Code.POD_REFUSED, f"{where} is being deleted")
        return pod

    def _add(self, body: dict, key: str) -> dict:
        container_id, ifname = key.split("/", 1)
        netns_path = _field(body, "netns")
        ip = _field(body, "ip")
        pod = self._pod_for(body)
        meta = pod["metadata"]
        ref = f"{meta['namespace']}/{meta['name']}"
        if not _in_cidr(ip, self.node.pod_cidr):
            raise CniRefused(Code.INVALID_CONFIG, f"pod {ref}: address {ip} is not in node "
                             f"{self.node.name}'s pod CIDR {self.node.pod_cidr} (the other nodes "
                             "route only that to it)")
        taken = [p for p in self.store.list("Pod") if (p.get("status") or {}).get("podIP") == ip
                 and p["metadata"]["uid"] != meta["uid"]]
        if taken:
            other = taken[0]["metadata"]
            raise CniRefused(Code.INVALID_CONFIG, f"pod {ref}: address {ip} is pod "
                             f"{other['namespace']}/{other['name']}'s")
        other = self.local.get(meta["uid"])
        if other is not None and other.key != key:
            raise CniRefused(Code.POD_REFUSED, f"pod {ref} already has a sandbox: container "
                             f"{other.container_id} ({other.ifname}); DEL that first")
        host_ifname = peer_interface(netns_path, ifname)
        sb = Sandbox(uid=meta["uid"], netns=netns_path, host_ifname=host_ifname, ip=ip, cgroup="")
        existing = self._by_key(key)
        if existing is not None and existing.sandbox != sb:
            # The runtime retried with another sandbox under the same name: drop the old one.
            self._remove(existing)
        cp = CniPod(meta["uid"], meta["namespace"], meta["name"], sb, container_id, ifname,
                    str(body.get("network") or ""), now_rfc3339())
        # Recorded first: an agent that dies half-way leaves a record for DEL (or the next
        # agent) to find.
        write_json_atomic(self._path(key), cp.to_json())
        with self._lock:
            self.local[cp.uid] = cp
        try:
            self._put_status(pod, cp, ready=False)
            self.hooks.ready(pod, sb)  # returns once the pod's policy is programmed
            self._put_status(pod, cp, ready=True)
        except Exception as e:
            log.exception("pod %s: CNI ADD of %s failed; undoing it", ref, key)
            with contextlib.suppress(Exception):
                self._remove(cp)
            if isinstance(e, ApiError):
                raise
            raise CniRefused(Code.AGENT_FAILED, f"pod {ref}: programming its datapath failed "
                             f"({type(e).__name__}: {e}); nothing of it is left",
                             status=500) from None
        log.info("pod %s: sandbox of container %s (%s, %s on %s) programmed", ref,
                 container_id, ifname, ip, host_ifname)
        return {"pod": ref, "uid": cp.uid, "ip": ip, "hostInterface": host_ifname}

    # ---- DEL -------------------------------------------------------------------------------
    def delete(self, body: dict) -> dict:
        key = f"{_field(body, 'containerID')}/{_field(body, 'ifname')}"
        with self._key_lock(key):
            cp = self._by_key(key)
            if cp is None:
                return {"removed": False}  # never added, or already removed: nothing to do
            self._remove(cp)
            log.info("pod %s/%s: sandbox of container %s removed", cp.namespace, cp.name,
                     cp.container_id)
            return {"removed": True}

    def _remove(self, cp: CniPod) -> None:
        """Fail closed, detach, take the address out of the pod's status, forget the record."""
        self.hooks.removed(cp.sandbox)
        if self.every_pod:
            self._forget(cp)
            return
        with self.store.transaction() as t:
            cur = t.get("Pod", cp.namespace, cp.name)
            if cur is not None and cur["metadata"]["uid"] == cp.uid:
                if is_deleting(cur):
                    t.delete("Pod", cp.namespace, cp.name)
                else:
                    t.put_status("Pod", cp.namespace, cp.name, self._status(cp, None))
        self._forget(cp)

    # ---- CHECK -----------------------------------------------------------------------------
    def check(self, body: dict) -> dict:
        key = f"{_field(body, 'containerID')}/{_field(body, 'ifname')}"
        with self._key_lock(key):
            cp = self._by_key(key)
            if cp is None:
                raise CniRefused(Code.UNKNOWN_CONTAINER, f"container {key.split('/')[0]} "
                                 f"({key.split('/')[1]}) has no sandbox on node {self.node.name}")
            ref = f"pod {cp.namespace}/{cp.name}"
            problems = []
            netns_path = _field(body, "netns", required=False)
            if netns_path and netns_path != cp.sandbox.netns:
                problems.append(f"network namespace {netns_path} is not the one ADD gave "
                                f"({cp.sandbox.netns})")
            ip = _field(body, "ip", required=False)
            if ip and ip != cp.sandbox.ip:
                problems.append(f"prevResult's address {ip} is not the one ADD gave "
                                f"({cp.sandbox.ip})")
            if self.check_endpoint is not None:
                problems += self.check_endpoint(cp.uid)
            if problems:
                raise CniRefused(Code.DATAPATH_NOT_IN_PLACE, f"{ref}: " + "; ".join(problems),
                                 "DEL and ADD the container again (a new ADD re-attaches)")
            return {"pod": f"{cp.namespace}/{cp.name}", "ok": True}

    # ---- GC (CNI 1.1.0) ----------------------------------------------------------------------
    def gc(self, body: dict) -> dict:
        network = str(body.get("network") or "")
        valid = {f"{a.get('containerID')}/{a.get('ifname')}"
                 for a in body.get("validAttachments") or [] if isinstance(a, dict)}
        removed = []
        for cp in list(self.local.values()):
            if cp.network == network and cp.key not in valid:
                with self._key_lock(cp.key):
                    if self._by_key(cp.key) is cp:
                        self._remove(cp)
                        removed.append(cp.key)
        return {"removed": removed}

    # ---- deleted Pods ----------------------------------------------------------------------
    def finish_deletes(self, pods: list[dict]) -> None:
        """A deleted Pod of this node that CNI brings is removed from the store once it has no
        sandbox here (with one, the runtime's DEL removes it: `_remove`)."""
        if self.every_pod:
            return
        for pod in pods:
            meta = pod["metadata"]
            if (pod["spec"].get("nodeName") != self.node.name or not brought_by_cni(pod)
                    or not is_deleting(pod) or meta["uid"] in self.local):
                continue
            with self.store.transaction() as t:
                cur = t.get("Pod", meta["namespace"], meta["name"])
                if cur is not None and cur["metadata"]["uid"] == meta["uid"] \
                        and meta["uid"] not in self.local:
                    t.delete("Pod", meta["namespace"], meta["name"])

    # ---- the Pod's status --------------------------------------------------------------------
    def _status(self, cp: CniPod, ready: bool | None) -> dict:
        """The Pod's status as the agent reports it for a CNI sandbox: ready (Running, its
        address, Ready), not yet ready (its address, so peers learn its identity), or None:
        the sandbox is gone (Pending, no address)."""
        tf = {True: "True", False: "False"}
        if ready is None:
            return {"phase": "Pending", "hostIP": self.node.ip,
                    "reason": "SandboxRemoved",
                    "message": f"CNI DEL removed the sandbox of container {cp.container_id}",
                    "conditions": [{"type": "PodScheduled", "status": "True"},
                                   {"type": "Ready", "status": "False"}]}
        return {
            "phase": "Running" if ready else "Pending",
            "hostIP": self.node.ip, "podIP": cp.sandbox.ip, "podIPs": [{"ip": cp.sandbox.ip}],
            "startTime": cp.created,
            "conditions": [{"type": "PodScheduled", "status": "True"},
                           {"type": "Initialized", "status": "True"},
                           {"type": "ContainersReady", "status": tf[ready]},
                           {"type": "Ready", "status": tf[ready]}],
            "sandbox": {"netns": cp.sandbox.netns, "hostInterface": cp.sandbox.host_ifname,
                        "cni": {"containerID": cp.container_id, "ifname": cp.ifname,
                                "network": cp.network}},
        }

    def _put_status(self, pod: dict, cp: CniPod, ready: bool) -> None:
        meta = pod["metadata"]
        with self.store.transaction() as t:
            cur = t.get("Pod", meta["namespace"], meta["name"])
            if cur is None or cur["metadata"]["uid"] != cp.uid:
                raise CniRefused(Code.POD_REFUSED, f"pod {meta['namespace']}/{meta['name']} "
                                 "was deleted during the ADD")
            if not self.every_pod:  # (in Kubernetes the kubelet reports the pod's status)
                t.put_status("Pod", meta["namespace"], meta["name"], self._status(cp, ready))

    def status(self) -> list[dict]:
        return [{"pod": f"{cp.namespace}/{cp.name}", "containerID": cp.container_id,
                 "ifname": cp.ifname, "ip": cp.sandbox.ip, "hostInterface": cp.sandbox.host_ifname}
                for cp in sorted(self.local.values(), key=lambda c: c.key)]


def _in_cidr(ip: str, cidr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)
    except ValueError:
        return False
