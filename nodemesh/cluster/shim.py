"""The per-pod shim: runs a pod's containers as processes and restarts them.

One small process per pod, like containerd's shim or conmon. The agent writes ``spec.json`` in the
pod's directory and starts ``python -m nodemesh.cluster.shim POD_DIR`` detached; the shim joins the
pod's cgroup and network namespace, makes a mount and UTS namespace of its own (so the pod sees its
own ``/etc/resolv.conf``, ``/etc/hosts`` and hostname), then runs every container with its
``restartPolicy`` and exponential backoff, runs readiness and liveness probes, and keeps
``state.json`` current. Because it is not the agent's child, killing or restarting the agent leaves
pods untouched: the next agent reads ``state.json`` and carries on.

This module is imported by one process per pod, so it uses the standard library only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime

from nodemesh.host import cgroup, netns
from nodemesh.host.files import write_json_atomic
from nodemesh.host.procs import ProcRef

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
BACKOFF_RESET_AFTER = 60.0  # a container that ran this long starts its backoff afresh


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


def _unblock_signals() -> None:
    # The shim blocks these to wait for them; a container must start with them deliverable.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


class Probe:
    """A readiness or liveness probe (exec, httpGet or tcpSocket) as Kubernetes defines it."""

    def __init__(self, spec: dict, pod_ip: str, ports: dict[str, int]) -> None:
        self.spec = spec
        self.pod_ip = pod_ip
        self.ports = ports
        self.period = float(spec.get("periodSeconds", 10))
        self.timeout = float(spec.get("timeoutSeconds", 1))
        self.initial_delay = float(spec.get("initialDelaySeconds", 0))
        self.success_threshold = int(spec.get("successThreshold", 1))
        self.failure_threshold = int(spec.get("failureThreshold", 3))
        self.next_at = 0.0
        self.successes = 0
        self.failures = 0

    def _port(self, port: int | str) -> int:
        return self.ports[port] if isinstance(port, str) else int(port)

    def check(self) -> bool:
        s = self.spec
        try:
            if "tcpSocket" in s:
                with socket.create_connection(
                    (s["tcpSocket"].get("host") or self.pod_ip, self._port(s["tcpSocket"]["port"])),
                    timeout=self.timeout,
                ):
                    return True
            if "httpGet" in s:
                g = s["httpGet"]
                cls = (http.client.HTTPSConnection if g.get("scheme") == "HTTPS"
                       else http.client.HTTPConnection)
                conn = cls(g.get("host") or self.pod_ip, self._port(g["port"]),
                           timeout=self.timeout)
                headers = {h["name"]: h["value"] for h in g.get("httpHeaders", [])}
                conn.request("GET", g.get("path", "/"), headers=headers)
                status = conn.getresponse().status
                conn.close()
                return 200 <= status < 400
            if "exec" in s:
                return subprocess.run(s["exec"]["command"], capture_output=True,
                                      timeout=self.timeout).returncode == 0
        except (OSError, subprocess.TimeoutExpired, http.client.HTTPException, KeyError):
            return False
        return False

    def run_if_due(self, started: float, t: float) -> bool | None:
        """Probe when due; returns the new verdict (True ok / False failed) or None if unchanged."""
        if t < started + self.initial_delay or t < self.next_at:
            return None
        self.next_at = t + self.period
        if self.check():
            self.successes += 1
            self.failures = 0
            return True if self.successes >= self.success_threshold else None
        self.failures += 1
        self.successes = 0
        return False if self.failures >= self.failure_threshold else None


class Container:
    def __init__(self, spec: dict, pod: Shim) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.pod = pod
        self.proc: subprocess.Popen | None = None
        self.ref: ProcRef | None = None
        self.restart_count = 0
        self.started_mono = 0.0
        self.started_at = ""
        self.backoff = 0.0
        self.next_start = 0.0  # monotonic time of the next (re)start; 0 = now
        self.finished = False  # exited and will not be restarted
        self.last_exit: dict | None = None
        self.waiting_reason = "ContainerCreating"
        ports = {p["name"]: p["containerPort"] for p in spec.get("ports", []) if p.get("name")}
        self.readiness = (Probe(spec["readinessProbe"], pod.ip, ports)
                          if spec.get("readinessProbe") else None)
        self.liveness = (Probe(spec["livenessProbe"], pod.ip, ports)
                         if spec.get("livenessProbe") else None)
        self.ready = False

    @property
    def log_path(self) -> str:
        return os.path.join(self.pod.dir, "logs", f"{self.name}.log")

    def start(self) -> None:
        if self.restart_count and os.path.exists(self.log_path):
            os.replace(self.log_path, self.log_path + ".previous")
        log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self.spec["argv"], env=self.spec["env"], cwd=self.spec.get("cwd") or "/",
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=_unblock_signals,
            )
        except OSError as e:
            log.write(f"nodemesh: cannot start {self.spec['argv'][0]!r}: {e.strerror}\n".encode())
            log.close()
            self.proc = None
            self.exited(127, "StartError")
            return
        log.close()
        self.ref = ProcRef.of(self.proc.pid)
        self.started_mono = time.monotonic()
        self.started_at = now()
        self.waiting_reason = ""
        self.ready = self.readiness is None
        if self.readiness:
            self.readiness.next_at = 0.0
            self.readiness.successes = self.readiness.failures = 0
        if self.liveness:
            self.liveness.next_at = 0.0
            self.liveness.successes = self.liveness.failures = 0

    def exited(self, code: int, reason: str | None = None) -> None:
        ran = time.monotonic() - self.started_mono if self.started_mono else 0.0
        self.proc, self.ref, self.ready = None, None, False
        self.last_exit = {
            "exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": self.started_at, "finishedAt": now(),
        }
        policy = self.pod.restart_policy
        if policy == "Never" or (policy == "OnFailure" and code == 0) or self.pod.stopping:
            self.finished = True
            return
        if ran >= BACKOFF_RESET_AFTER:
            self.backoff = 0.0
        self.backoff = BACKOFF_INITIAL if self.backoff == 0 else min(self.backoff * 2, BACKOFF_MAX)
        self.next_start = time.monotonic() + self.backoff
        self.restart_count += 1
        self.waiting_reason = "CrashLoopBackOff" if self.backoff > BACKOFF_INITIAL else ""

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def state(self) -> dict:
        if self.proc is not None:
            st = {"running": {"startedAt": self.started_at}}
        elif self.finished and self.last_exit:
            st = {"terminated": self.last_exit}
        else:
            st = {"waiting": {"reason": self.waiting_reason or "ContainerCreating"}}
        out = {
            "name": self.name, "state": st, "ready": self.ready,
            "restartCount": self.restart_count, "image": self.spec.get("image", ""),
            "pid": self.proc.pid if self.proc else None,
        }
        if self.last_exit and not self.finished:
            out["lastState"] = {"terminated": self.last_exit}
        return out


class Shim:
    def __init__(self, pod_dir: str) -> None:
        self.dir = pod_dir
        with open(os.path.join(pod_dir, "spec.json")) as f:
            self.spec = json.load(f)
        self.ip: str = self.spec["ip"]
        self.restart_policy: str = self.spec.get("restartPolicy", "Always")
        self.grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        self.stopping = False
        os.makedirs(os.path.join(pod_dir, "logs"), exist_ok=True)
        self.containers = [Container(c, self) for c in self.spec["containers"]]
        self._last_state: dict | None = None

    # ---- sandbox entry -----------------------------------------------------------------------
    def enter_sandbox(self) -> None:
        cgroup.add_process(self.spec["cgroup"], os.getpid())
        netns.setns_path(self.spec["netns"], netns.CLONE_NEWNET)
        netns.unshare(netns.CLONE_NEWNS | netns.CLONE_NEWUTS)
        netns.make_mounts_private()
        for name in ("resolv.conf", "hosts", "hostname"):
            netns.bind_mount(os.path.join(self.dir, name), f"/etc/{name}")
        netns.sethostname(self.spec["hostname"][:64])
        for key, value in (("net/ipv6/conf/all/disable_ipv6", "1"),
                           ("net/ipv4/ping_group_range", "0 2147483647"),
                           ("net/ipv4/ip_local_port_range",
                            "{} {}".format(*netns.POD_PORT_RANGE))):
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)

    # ---- main loop --------------------------------------------------------------------------
    def write_state(self) -> None:
        state = {
            "containers": [c.state() for c in self.containers],
            "phase": self.phase(),
        }
        if state != self._last_state:
            self._last_state = state
            write_json_atomic(os.path.join(self.dir, "state.json"),
                              {**state, "shim": ProcRef.of(os.getpid()).to_json(),  # type: ignore[union-attr]
                               "updated": now()})

    def phase(self) -> str:
        if all(c.finished for c in self.containers):
            return "Succeeded" if all(
                (c.last_exit or {}).get("exitCode") == 0 for c in self.containers) else "Failed"
        if any(c.proc is not None for c in self.containers) or any(
                c.restart_count for c in self.containers):
            return "Running"
        return "Pending"

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for c in self.containers:
                if c.proc is not None and c.proc.pid == pid:
                    c.proc.returncode = os.waitstatus_to_exitcode(status)
                    code = c.proc.returncode
                    c.exited(128 - code if code < 0 else code)

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        while True:
            t = time.monotonic()
            if not self.stopping:
                for c in self.containers:
                    if c.proc is None and not c.finished and t >= c.next_start:
                        c.start()
                self.probe(t)
            self.reap()
            self.write_state()
            if self.stopping and all(c.proc is None for c in self.containers):
                return 0
            if self.stopping and t >= self.kill_at:
                for c in self.containers:
                    c.signal(signal.SIGKILL)
            timeout = self.next_wakeup(t)
            info = signal.sigtimedwait(_SIGNALS, timeout)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop()

    def begin_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.kill_at = time.monotonic() + self.grace
        for c in self.containers:
            c.finished = c.proc is None or c.finished
            c.signal(signal.SIGTERM)

    def probe(self, t: float) -> None:
        for c in self.containers:
            if c.proc is None:
                continue
            if c.readiness:
                verdict = c.readiness.run_if_due(c.started_mono, t)
                if verdict is not None:
                    c.ready = verdict
            if c.liveness and c.liveness.run_if_due(c.started_mono, t) is False:
                c.signal(signal.SIGKILL)

    def next_wakeup(self, t: float) -> float:
        candidates = [1.0]
        for c in self.containers:
            if c.proc is None and not c.finished:
                candidates.append(c.next_start - t)
            for p in (c.readiness, c.liveness):
                if p is not None and c.proc is not None:
                    candidates.append(max(p.next_at, c.started_mono + p.initial_delay) - t)
        if self.stopping:
            candidates.append(self.kill_at - t)
        return max(0.01, min(candidates))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m nodemesh.cluster.shim POD_DIR", file=sys.stderr)
        return 2
    shim = Shim(argv[1])
    shim.enter_sandbox()
    return shim.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
