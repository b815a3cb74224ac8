"""The node's pod runtime: makes the pods the store assigns to this node exist, and reports them.

For each pod scheduled here: allocate an address, build the sandbox (netns, veth, cgroup), let
the datapath program it (hooks), write the shim's spec and start the shim. For each pod that is
gone or being deleted: stop the shim, remove the sandbox, and (for a graceful delete) remove the
object. Local records under ``<state>/pods/<uid>/`` make this restart-safe: a new agent adopts
running shims instead of recreating pods.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nodemesh.cluster import ipam
from nodemesh.cluster.config import CLUSTER_DOMAIN, NODE_DNS_IP, POD_GATEWAY, ClusterConfig
from nodemesh.cluster.controllers import is_deleting
from nodemesh.errors import Conflict, NodemeshError
from nodemesh.host import cgroup, procs, sandbox
from nodemesh.host.files import read_json, write_json_atomic
from nodemesh.host.procs import ProcRef
from nodemesh.model import images
from nodemesh.model.kinds import obj_ref
from nodemesh.store import Store
from nodemesh.store.base import now_rfc3339
from nodemesh.store.informer import Informer

log = logging.getLogger("nodemesh.pods")


# A Pod whose sandbox a container runtime brings through CNI (nodemesh-cni, docs/cni.md): the
# local pod runtime does not run it; the agent learns of its sandbox from the CNI ADD.
SANDBOX_ANNOTATION = "nodemesh.io/sandbox"
SANDBOX_CNI = "cni"


def brought_by_cni(pod: dict) -> bool:
    return (pod["metadata"].get("annotations") or {}).get(SANDBOX_ANNOTATION) == SANDBOX_CNI


@dataclass
class PodHooks:
    """The one way the agent learns of a pod's sandbox (netns, veth, address, the pod's labels):
    the local pod runtime (PodManager) and the CNI plugin's requests (nodemesh.agent.cni) both
    call `ready` and `removed`; the datapath and the proxy fill the lists in."""

    sandbox_ready: list[Callable[[dict, sandbox.Sandbox], None]] = field(default_factory=list)
    sandbox_removed: list[Callable[[sandbox.Sandbox], None]] = field(default_factory=list)

    def ready(self, pod: dict, sb: sandbox.Sandbox) -> None:
        """A pod's sandbox exists: returns once its veth's policy is programmed."""
        for hook in self.sandbox_ready:
            hook(pod, sb)

    def removed(self, sb: sandbox.Sandbox) -> None:
        """A pod's sandbox is going: its endpoint fails closed, its programs are detached."""
        for hook in self.sandbox_removed:
            hook(sb)


@dataclass
class LocalPod:
    uid: str
    namespace: str
    name: str
    sandbox: sandbox.Sandbox
    created: str
    shim: ProcRef | None = None

    def adoptable(self) -> bool:
        """Whether a new agent should attach to this pod's veth (its shim ran)."""
        return self.shim is not None

    def to_json(self, node: str) -> dict:
        return {"uid": self.uid, "namespace": self.namespace, "name": self.name, "node": node,
                "sandbox": self.sandbox.to_json(), "created": self.created,
                "shim": self.shim.to_json() if self.shim else None}


def container_env(pod: dict, container: dict, node_ip: str, pod_ip: str,
                  pod_dir: str = "") -> dict[str, str]:
    """The environment of a container process: a base, image defaults, then the spec's `env`."""
    meta = pod["metadata"]
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": "/root",
        "HOSTNAME": meta["name"],
        "LANG": "C.UTF-8",
    }
    if pod_dir:  # scratch space that goes with the pod (images such as nginx keep files there)
        env["NODEMESH_POD_DIR"] = pod_dir
    if images.image_name(container.get("image") or "") in (*images.ECHO_IMAGES,
                                                          "nodemesh/demo-app"):
        env.update({"POD_NAME": meta["name"], "NAMESPACE": meta["namespace"],
                    "POD_IP": pod_ip, "NODE_NAME": pod["spec"].get("nodeName", "")})
    fields = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.hostIP": node_ip,
    }
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "valueFrom" in e:
            path = e["valueFrom"].get("fieldRef", {}).get("fieldPath", "")
            if path.startswith("metadata.labels['"):
                env[e["name"]] = (meta.get("labels") or {}).get(path[17:-2], "")
            elif path.startswith("metadata.annotations['"):
                env[e["name"]] = (meta.get("annotations") or {}).get(path[22:-2], "")
            else:
                env[e["name"]] = fields.get(path, "")
        else:
            env[e["name"]] = ""
    return env


class PodManager:
    def __init__(self, cfg: ClusterConfig, node: str, store: Store, informer: Informer,
                 hooks: PodHooks | None = None, workers: int = 4) -> None:
        self.cfg = cfg
        self.node = cfg.node(node)
        self.store = store
        self.informer = informer
        self.hooks = hooks or PodHooks()
        self.local: dict[str, LocalPod] = {}
        self._ipam_lock = threading.Lock()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pod")
        self._ipam_path = os.path.join(cfg.node_dir(node), "ipam.json")
        self._reported: dict[str, dict] = {}
        self._retry_after: dict[str, tuple[float, float]] = {}  # uid -> (monotonic time, backoff)
        os.makedirs(cfg.pods_dir(), exist_ok=True)
        self.load_local()

    # ---- local records -----------------------------------------------------------------------
    def load_local(self) -> None:
        for uid in os.listdir(self.cfg.pods_dir()):
            rec = read_json(os.path.join(self.cfg.pod_dir(uid), "runtime.json"))
            if rec and rec.get("node") == self.node.name:
                self.local[uid] = LocalPod(rec["uid"], rec["namespace"], rec["name"],
                                           sandbox.Sandbox.from_json(rec["sandbox"]),
                                           rec.get("created", ""), ProcRef.from_json(rec.get("shim")))

    def shim_ref(self, uid: str) -> ProcRef | None:
        lp = self.local.get(uid)
        return lp.shim if lp else None

    # ---- reconcile ---------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Start the work that brings local pods in line with the store (non-blocking)."""
        desired = {p["metadata"]["uid"]: p for p in self.informer.list("Pod")
                   if p["spec"].get("nodeName") == self.node.name and not brought_by_cni(p)}
        for uid, lp in list(self.local.items()):
            pod = desired.get(uid)
            if pod is None or is_deleting(pod):
                self._submit(uid, self._teardown, lp, pod)
        for uid, pod in desired.items():
            if is_deleting(pod):
                if uid not in self.local:
                    self._submit(uid, self._finish_delete, pod)
                continue
            lp = self.local.get(uid)
            if lp is None:
                self._submit(uid, self._create, pod)
            else:
                ref = self.shim_ref(uid)
                if ref is None or not ref.alive():
                    self._submit(uid, self._restart_shim, pod, lp)

    def _submit(self, uid: str, fn: Callable, *args: object) -> None:
        with self._busy_lock:
            if uid in self._busy or self._retry_after.get(uid, (0.0, 0.0))[0] > time.monotonic():
                return
            self._busy.add(uid)

        def run() -> None:
            try:
                fn(*args)
                self._retry_after.pop(uid, None)
            except Exception as e:  # one pod's failure must not stop the others
                log.exception("pod %s: %s failed", uid, fn.__name__)
                backoff = min(max(self._retry_after.get(uid, (0.0, 0.5))[1] * 2, 1.0), 30.0)
                self._retry_after[uid] = (time.monotonic() + backoff, backoff)
                self._report_failure(uid, args, e)
            finally:
                with self._busy_lock:
                    self._busy.discard(uid)

        self._pool.submit(run)

    def _report_failure(self, uid: str, args: tuple, err: Exception) -> None:
        pod = next((a for a in args if isinstance(a, dict)), None)
        if pod is None:
            return
        meta = pod["metadata"]
        status = dict(pod.get("status") or {})
        # A lost race (Conflict, e.g. on etcd) is transient: the pod stays Pending and is retried.
        failed = isinstance(err, NodemeshError) and not isinstance(err, Conflict)
        status.update({"phase": "Failed" if failed else "Pending",
                       "reason": type(err).__name__, "message": str(err)})
        for attempt in self.store.retrying():
            with attempt as t:
                cur = t.get("Pod", meta["namespace"], meta["name"])
                if cur is not None and cur["metadata"]["uid"] == uid:
                    t.put_status("Pod", meta["namespace"], meta["name"], status)

    def _allocate_ip(self, pod: dict) -> str:
        with self._ipam_lock:
            in_use = {lp.sandbox.ip for lp in self.local.values()}
            in_use |= {p.get("status", {}).get("podIP") for p in self.informer.list("Pod")
                       if p["spec"].get("nodeName") == self.node.name}
            last = (read_json(self._ipam_path) or {}).get("last")
            ip = ipam.allocate(self.node.pod_cidr, {i for i in in_use if i}, last)
            write_json_atomic(self._ipam_path, {"last": ip})
            return ip

    def _create(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        t0 = time.monotonic()
        argvs = [images.resolve(obj_ref(pod), c) for c in pod["spec"]["containers"]]
        ip = self._allocate_ip(pod)
        sb = self.cfg.pod_sandbox(self.node.name, uid, ip)
        pod_dir = self.cfg.pod_dir(uid)
        os.makedirs(os.path.join(pod_dir, "logs"), exist_ok=True)
        lp = LocalPod(uid, meta["namespace"], meta["name"], sb, now_rfc3339())
        # Record first: if we die half-way, the next agent knows what to finish or remove.
        write_json_atomic(os.path.join(pod_dir, "runtime.json"), lp.to_json(self.node.name))
        self.local[uid] = lp
        sandbox.create(sb, POD_GATEWAY)
        # Publish the address at once: other nodes learn it (and the pod's identity) while
        # the containers start.
        self._publish_pending(pod, lp)
        self.hooks.ready(pod, sb)
        self._write_pod_files(pod, sb, argvs)
        self._start_shim(lp)
        log.info("pod %s/%s: created at %s in %.0f ms", meta["namespace"], meta["name"], ip,
                 (time.monotonic() - t0) * 1000)

    def _publish_pending(self, pod: dict, lp: LocalPod) -> None:
        meta = pod["metadata"]
        status = self.pod_status(pod, lp)
        for attempt in self.store.retrying():
            with attempt as t:
                cur = t.get("Pod", meta["namespace"], meta["name"])
                if cur is not None and cur["metadata"]["uid"] == lp.uid:
                    t.put_status("Pod", meta["namespace"], meta["name"], status)
                self._reported[lp.uid] = status

    def _write_pod_files(self, pod: dict, sb: sandbox.Sandbox, argvs: list[list[str]]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        pod_dir = self.cfg.pod_dir(meta["uid"])
        ns = meta["namespace"]
        with open(os.path.join(pod_dir, "resolv.conf"), "w") as f:
            f.write(f"search {ns}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n"
                    f"nameserver {NODE_DNS_IP}\noptions ndots:5\n")
        with open(os.path.join(pod_dir, "hosts"), "w") as f:
            f.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                    f"{sb.ip}\t{meta['name']}\n")
        with open(os.path.join(pod_dir, "hostname"), "w") as f:
            f.write(meta["name"][:63] + "\n")
        containers = []
        for c, argv in zip(spec["containers"], argvs, strict=True):
            containers.append({
                "name": c["name"], "image": c.get("image", ""), "argv": argv,
                "env": container_env(pod, c, self.node.ip, sb.ip, pod_dir), "cwd": c.get("workingDir"),
                "ports": c.get("ports") or [], "readinessProbe": c.get("readinessProbe"),
                "livenessProbe": c.get("livenessProbe"),
            })
        write_json_atomic(os.path.join(pod_dir, "spec.json"), {
            "pod": f"{ns}/{meta['name']}", "uid": meta["uid"], "ip": sb.ip,
            "netns": f"/run/netns/{sb.netns}", "cgroup": sb.cgroup,
            "hostname": meta["name"][:63],
            "restartPolicy": spec.get("restartPolicy", "Always"),
            "terminationGracePeriodSeconds": spec.get("terminationGracePeriodSeconds", 30),
            "containers": containers,
        })

    def _start_shim(self, lp: LocalPod) -> None:
        pod_dir = self.cfg.pod_dir(lp.uid)
        lp.shim = procs.spawn_detached([sys.executable, "-m", "nodemesh.cluster.shim", pod_dir],
                                       log_path=os.path.join(pod_dir, "shim.log"))
        write_json_atomic(os.path.join(pod_dir, "runtime.json"), lp.to_json(self.node.name))

    def _restart_shim(self, pod: dict, lp: LocalPod) -> None:
        """The shim is gone (killed, or the machine crashed): clear the pod's processes, rerun."""
        log.warning("pod %s/%s: shim is gone; restarting its containers", lp.namespace, lp.name)
        cgroup.kill_all(lp.sandbox.cgroup)
        deadline = time.monotonic() + 5
        while cgroup.procs(lp.sandbox.cgroup) and time.monotonic() < deadline:
            time.sleep(0.02)
        sandbox.create(lp.sandbox, POD_GATEWAY)  # idempotent: completes whatever is missing
        self.hooks.ready(pod, lp.sandbox)
        argvs = [images.resolve(obj_ref(pod), c) for c in pod["spec"]["containers"]]
        self._write_pod_files(pod, lp.sandbox, argvs)
        self._start_shim(lp)

    def _teardown(self, lp: LocalPod, pod: dict | None) -> None:
        grace = 30.0
        if pod is not None:
            grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        procs.stop(self.shim_ref(lp.uid), grace=grace + 2)
        self.hooks.removed(lp.sandbox)
        sandbox.remove(lp.sandbox)
        shutil.rmtree(self.cfg.pod_dir(lp.uid), ignore_errors=True)
        self.local.pop(lp.uid, None)
        self._reported.pop(lp.uid, None)
        log.info("pod %s/%s: removed", lp.namespace, lp.name)
        if pod is not None:
            self._finish_delete(pod)

    def _finish_delete(self, pod: dict) -> None:
        meta = pod["metadata"]
        with self.store.transaction() as t:
            cur = t.get("Pod", meta["namespace"], meta["name"])
            if cur is not None and cur["metadata"]["uid"] == meta["uid"]:
                t.delete("Pod", meta["namespace"], meta["name"])

    # ---- status ------------------------------------------------------------------------------
    def report_status(self) -> None:
        """Publish each local pod's status (from its shim's state.json) when it changed."""
        for uid, lp in list(self.local.items()):
            pod = self.informer.get("Pod", lp.namespace, lp.name)
            if pod is None or pod["metadata"]["uid"] != uid or is_deleting(pod):
                continue
            status = self.pod_status(pod, lp)
            if status == pod.get("status") or status == self._reported.get(uid):
                continue
            with self.store.transaction() as t:
                cur = t.get("Pod", lp.namespace, lp.name)
                if cur is not None and cur["metadata"]["uid"] == uid:
                    t.put_status("Pod", lp.namespace, lp.name, status)
                    self._reported[uid] = status

    def pod_status(self, pod: dict, lp: LocalPod) -> dict:
        state = read_json(os.path.join(self.cfg.pod_dir(lp.uid), "state.json")) or {}
        shim = lp.shim
        containers = state.get("containers") or []
        statuses = []
        for c in containers:
            st = {k: c[k] for k in ("name", "state", "ready", "restartCount", "image")}
            if c.get("lastState"):
                st["lastState"] = c["lastState"]
            if c.get("pid"):
                st["containerID"] = f"process://{c['pid']}"
            statuses.append(st)
        phase = state.get("phase", "Pending") if shim and shim.alive() else "Pending"
        all_ready = bool(statuses) and all(c["ready"] for c in statuses) and phase == "Running"
        tf = {True: "True", False: "False"}
        return {
            "phase": phase,
            "hostIP": self.node.ip,
            "podIP": lp.sandbox.ip,
            "podIPs": [{"ip": lp.sandbox.ip}],
            "startTime": lp.created,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": tf[all_ready]},
                {"type": "Ready", "status": tf[all_ready]},
            ],
            "containerStatuses": statuses,
            "sandbox": {"netns": lp.sandbox.netns, "hostInterface": lp.sandbox.host_ifname,
                        "cgroup": lp.sandbox.cgroup,
                        "shimPID": shim.pid if shim else None},
        }

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
