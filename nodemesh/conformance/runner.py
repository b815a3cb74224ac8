"""Run the Gateway API mesh conformance tests against a fresh local nodemesh cluster.

``python -m nodemesh.conformance [--state-dir DIR] [--report FILE] [--results FILE] [--keep]
[--test NAME]...``:

1. ``nodemesh up --nodes 2`` in a private state dir with a unique name;
2. apply ``data/manifests.yaml`` and wait until every pod is Ready (upstream's
   NamespacesMustBeReady);
3. for each test of :data:`nodemesh.conformance.cases.TESTS`: apply its YAML; wait until every
   parent of its routes has the expected conditions for the route's current generation
   (``Accepted=True``; upstream's HTTPRouteMustHaveCondition) and every node's agent has synced
   the store (datapath and proxy ``syncedRevision`` ≥ the store's revision); exec one probe
   (:mod:`nodemesh.conformance.probe`) in each client pod the test uses, all at once; record
   passed/failed with the reason; delete the routes and wait for the agents again;
4. write the ConformanceReport (:mod:`.report`) and, with ``--results``, every check's details as
   JSON; ``nodemesh down`` (unless ``--keep``) and check that nothing of the cluster is left.

Exit code: 0 when every test passed (and nothing was left behind), 1 otherwise, 2 when the
cluster could not be set up. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from nodemesh import __version__
from nodemesh.cluster.inventory import leftovers as inventory_leftovers
from nodemesh.conformance import DATA_COMMIT, MANIFESTS, TESTS_DIR
from nodemesh.conformance.cases import CLIENTS, TESTS, ConformanceTest, TimeoutConfig
from nodemesh.conformance.report import Outcome, build_report, profiles_of
from nodemesh.host.procs import set_child_subreaper

if TYPE_CHECKING:
    from nodemesh.store import Store

__all__ = ["Runner", "TestResult", "main"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_REPORT = os.path.join(REPO, "docs", "conformance", "report.yaml")
DEFAULT_URL = "https://nodemesh.io"
DEFAULT_CONTACT = ("nodemesh maintainers",)


class SetupError(Exception):
    """The cluster or the conformance workloads could not be brought up."""


@dataclass
class TestResult:
    name: str
    status: str  # passed | failed | skipped
    reason: str = ""
    seconds: float = 0.0
    features: list[str] = field(default_factory=list)
    provisional: bool = False
    profiles: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step


def _ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _labels_match(pod: dict, selector: str) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, _, v in (p.partition("=") for p in selector.split(",")))


def route_keys(paths: Iterable[str]) -> list[tuple[str, str, str, int]]:
    """(kind, namespace, name, number of parentRefs) of every route in these YAML files."""
    out = []
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc.get("kind") in ("HTTPRoute", "GRPCRoute"):
                    meta = doc["metadata"]
                    out.append((doc["kind"], meta.get("namespace", "default"), meta["name"],
                                len(doc["spec"].get("parentRefs") or [])))
    return out


def conditions_met(obj: dict | None, parents: int, want: dict[str, str]) -> tuple[bool, str]:
    """Do all ``parents`` parent statuses of ``obj`` have ``want`` for its current generation?"""
    if obj is None:
        return False, "route not found"
    gen = obj["metadata"].get("generation", 1)
    got = (obj.get("status") or {}).get("parents") or []
    if len(got) < parents:
        return False, f"{len(got)}/{parents} parents have a status"
    for p in got:
        conds = {c["type"]: c for c in p.get("conditions") or []}
        for ctype, status in want.items():
            c = conds.get(ctype)
            if c is None:
                return False, f"no {ctype} condition"
            if c.get("observedGeneration", gen) != gen:
                return False, f"{ctype} is for generation {c.get('observedGeneration')}, not {gen}"
            if c.get("status") != status:
                return False, (f"{ctype}={c.get('status')} ({c.get('reason')}: "
                               f"{c.get('message', '')}), want {status}")
    return True, ""


class Runner:
    """One conformance run on one fresh cluster."""

    def __init__(self, state_dir: str, name: str, nodes: int = 2,
                 timeouts: TimeoutConfig | None = None, log: TextIO | None = None,
                 outside_clients: bool = False) -> None:
        self.state_dir = state_dir
        self.outside_clients = outside_clients
        self.name = name
        self.nodes = nodes
        self.timeouts = timeouts or TimeoutConfig()
        self.log_stream = sys.stderr if log is None else log
        self.clients: dict[str, dict[str, str]] = {}
        self._echo_v2_ip = ""
        self.daemon_pid: int | None = None
        self._store: Store | None = None

    # ---- plumbing -------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        print(text, file=self.log_stream, flush=True)

    def nm(self, *args: str, input: str | None = None, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the nodemesh CLI on this cluster."""
        p = subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", self.state_dir, *args],
                           input=input, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"nodemesh {' '.join(args)} exited {p.returncode}: "
                               f"{(p.stderr or p.stdout).strip()}")
        return p

    @property
    def store(self) -> Store:
        if self._store is None:
            from nodemesh.store import open_store

            self._store = open_store(self.state_dir)
        return self._store

    def wait(self, what: str, ok: Callable[[], tuple[bool, str]], timeout: float,
             interval: float = 0.05) -> float:
        """Poll ``ok`` until it says yes; raise TimeoutError with its last word. Returns seconds."""
        t0 = time.monotonic()
        while True:
            done, why = ok()
            if done:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{what} did not happen within {timeout:.0f}s: {why}")
            time.sleep(interval)

    def synced(self) -> tuple[bool, str]:
        """Has every node's agent (datapath and proxy) caught up with the store?"""
        from nodemesh.cluster.agentclient import AgentClient

        target = self.store.revision()
        for i in range(1, self.nodes + 1):
            node = f"node{i}"
            st = AgentClient(os.path.join(self.state_dir, "nodes", node, "agent.sock"), node).get(
                "/status")
            for part in ("datapath", "proxy"):
                got = (st.get(part) or {}).get("syncedRevision", 0)
                if got < target:
                    return False, f"{node} {part} at revision {got} < {target}"
        return True, ""

    # ---- lifecycle --------------------------------------------------------------------------------
    def up(self) -> None:
        if os.path.exists(os.path.join(self.state_dir, "cluster.json")):
            raise SetupError(f"{self.state_dir} already holds a cluster; the conformance run "
                             "needs a fresh one (give another --state-dir)")
        t0 = time.monotonic()
        p = self.nm("up", "--nodes", str(self.nodes), "--name", self.name, timeout=300, check=False)
        if p.returncode != 0:
            raise SetupError(f"nodemesh up failed: {(p.stderr or p.stdout).strip()}")
        with contextlib.suppress(OSError, ValueError, KeyError), open(
                os.path.join(self.state_dir, "daemon.json")) as f:
            self.daemon_pid = int(json.load(f)["pid"])
        self.log(f"cluster {self.name} up in {time.monotonic() - t0:.1f}s ({self.state_dir})")

    def setup(self) -> None:
        """Apply the conformance manifests, wait for their pods, find the client pods."""
        t0 = time.monotonic()
        with open(MANIFESTS) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        p = self.nm("apply", "-f", MANIFESTS, check=False)
        if p.returncode != 0:
            raise SetupError(f"applying manifests.yaml failed: {(p.stderr or p.stdout).strip()}")
        expected = {ns: 0 for ns in {d["metadata"].get("namespace", "default") for d in docs
                                     if d["kind"] == "Deployment"}}
        for d in docs:
            if d["kind"] == "Deployment":
                expected[d["metadata"].get("namespace", "default")] += d["spec"].get("replicas", 1)

        def pods_ready() -> tuple[bool, str]:
            waiting = []
            for ns, count in expected.items():
                pods = [q for q in self.store.list("Pod", ns)
                        if not q["metadata"].get("deletionTimestamp")]
                ready = [q for q in pods if _ready(q)]
                if len(ready) != count or len(pods) != count:
                    waiting.append(f"{ns}: {len(ready)}/{count} ready (" + ", ".join(
                        f"{q['metadata']['name']}={(q.get('status') or {}).get('phase')}"
                        for q in pods) + ")")
            return not waiting, "; ".join(waiting)

        try:
            self.wait("the conformance pods becoming Ready", pods_ready,
                      self.timeouts.namespaces_must_be_ready, interval=0.2)
            self.wait("the agents syncing", self.synced, 60)
        except TimeoutError as e:
            raise SetupError(str(e)) from None
        for role, (ns, selector) in CLIENTS.items():
            pods = sorted((q for q in self.store.list("Pod", ns)
                           if _labels_match(q, selector) and _ready(q)),
                          key=lambda q: q["metadata"]["name"])
            if not pods:
                raise SetupError(f"no Ready pod {selector} in {ns} for the {role} client")
            q = pods[0]
            self.clients[role] = {"namespace": ns, "pod": q["metadata"]["name"],
                                  "ip": (q.get("status") or {}).get("podIP", ""),
                                  "node": q["spec"].get("nodeName", "")}
        self._echo_v2_ip = self.clients["v2"]["ip"]
        if self.outside_clients:
            self.replace_clients()
        self.log(f"conformance workloads ready in {time.monotonic() - t0:.1f}s: " + ", ".join(
            f"{r}={c['namespace']}/{c['pod']} ({c['ip']} on {c['node']})"
            for r, c in self.clients.items()))

    def replace_clients(self) -> None:
        """Diagnostic mode (not conformance): send every request from a pod that is no backend
        of any echo Service, on the node of the upstream client it stands in for."""
        pods = []
        for role, c in self.clients.items():
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": f"conformance-client-{role}",
                                      "namespace": c["namespace"],
                                      "labels": {"app": "conformance-client"}},
                         "spec": {"nodeName": c["node"], "containers": [{
                             "name": "client", "image": "debian",
                             "command": ["sleep", "infinity"]}]}})
        p = self.nm("apply", "-f", "-", input=yaml.safe_dump_all(pods), check=False)
        if p.returncode != 0:
            raise SetupError(f"applying the outside clients failed: {(p.stderr or p.stdout).strip()}")

        def ready() -> tuple[bool, str]:
            waiting = [f"{q['metadata']['namespace']}/{q['metadata']['name']}" for q in pods
                       if not _ready(self.store.get("Pod", q["metadata"]["namespace"],
                                                    q["metadata"]["name"]) or {})]
            return not waiting, ", ".join(waiting)

        try:
            self.wait("the outside client pods becoming Ready", ready, 120, interval=0.2)
            self.wait("the agents syncing", self.synced, 60)
        except TimeoutError as e:
            raise SetupError(str(e)) from None
        for role, c in self.clients.items():
            q = self.store.get("Pod", c["namespace"], f"conformance-client-{role}") or {}
            self.clients[role] = {**c, "pod": q["metadata"]["name"],
                                  "ip": (q.get("status") or {}).get("podIP", "")}

    def down(self) -> list[str]:
        """``nodemesh down``, reap what was ours, and list what of the cluster is left."""
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None
        p = self.nm("down", timeout=300, check=False)
        if p.returncode != 0:
            self.log(f"nodemesh down exited {p.returncode}: {(p.stderr or p.stdout).strip()}")
        reap_children()
        return leftovers(self.name, self.state_dir)

    # ---- one test --------------------------------------------------------------------------------
    def variables(self) -> dict[str, str]:
        """Template values of the cases: ``{v2_ip}`` is the echo-v2 pod's IP."""
        return {"v2_ip": self._echo_v2_ip}

    def probe(self, test: ConformanceTest, role: str) -> dict[str, Any]:
        c = self.clients[role]
        job = {"test": test.short_name, "client": role, "vars": self.variables(),
               "timeouts": asdict(self.timeouts)}
        try:
            p = self.nm("exec", "-n", c["namespace"], c["pod"], "--", sys.executable, "-m",
                        "nodemesh.conformance.probe", input=json.dumps(job), timeout=900,
                        check=False)
        except subprocess.TimeoutExpired as e:
            why = f"probe timed out after {e.timeout:.0f}s"
        else:
            try:
                return json.loads(p.stdout)
            except ValueError:
                why = f"probe exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}"
        return {"client": role, "results": [{
            "name": f"probe in {c['namespace']}/{c['pod']}", "client": role, "ok": False,
            "error": why, "attempts": 0, "seconds": 0, "details": {}}]}

    def route_status(self, keys: list[tuple[str, str, str, int]]) -> list[dict[str, Any]]:
        out = []
        for kind, ns, name, _ in keys:
            obj = self.store.get(kind, ns, name) or {}
            out.append({"kind": kind, "namespace": ns, "name": name,
                        "parents": [{"parentRef": p.get("parentRef"),
                                     "conditions": [{k: c.get(k) for k in
                                                     ("type", "status", "reason", "message")}
                                                    for c in p.get("conditions") or []]}
                                    for p in (obj.get("status") or {}).get("parents") or []]})
        return out

    def run_test(self, test: ConformanceTest) -> TestResult:
        t0 = time.monotonic()
        files = [os.path.join(TESTS_DIR, m) for m in test.manifests]
        result = TestResult(test.short_name, "failed", features=list(test.features),
                            provisional=test.provisional,
                            profiles=[f"{n}{' (extended)' if e else ''}"
                                      for n, e in profiles_of(test.features)],
                            manifests=list(test.manifests), notes=test.notes)
        keys = route_keys(files)
        applied = False
        mark = time.monotonic()

        def phase(step: str) -> None:
            nonlocal mark
            now = time.monotonic()
            result.phases[step] = round(now - mark, 3)
            mark = now

        try:
            for path in files:
                p = self.nm("apply", "-f", path, check=False)
                if p.returncode != 0:
                    result.reason = f"apply {os.path.basename(path)}: {(p.stderr or p.stdout).strip()}"
                    return result
                applied = True
            phase("apply")
            for kind, ns, name, parents in keys:
                try:
                    self.wait(f"{kind} {ns}/{name} getting {test.conditions}",
                              lambda k=kind, n=ns, m=name, c=parents: conditions_met(
                                  self.store.get(k, n, m), c, test.conditions),
                              self.timeouts.route_must_have_condition)
                except TimeoutError as e:
                    result.reason = str(e)
                    return result
            phase("conditions")
            try:
                self.wait("the agents syncing the routes", self.synced, 30)
            except TimeoutError as e:
                result.reason = str(e)
                return result
            phase("sync")
            result.routes = self.route_status(keys)
            roles = test.clients()
            with ThreadPoolExecutor(max_workers=len(roles)) as pool:
                outs = list(pool.map(lambda r: self.probe(test, r), roles))
            phase("traffic")
            result.checks = [r for out in outs for r in out.get("results") or []]
            expected = len(test.checks)
            failed = [r for r in result.checks if not r.get("ok")]
            if failed:
                first = failed[0]
                result.reason = (f"{len(failed)}/{expected} checks failed; first: "
                                 f"[{first['client']}] {first['name']}: {first['error']}")
            elif len(result.checks) != expected:
                result.reason = f"{len(result.checks)}/{expected} checks reported"
            else:
                result.status = "passed"
            return result
        finally:
            mark = time.monotonic()
            if applied:
                for path in files:
                    self.nm("delete", "-f", path, check=False)
                phase("delete")

                def gone() -> tuple[bool, str]:
                    left = [f"{k} {n}/{m}" for k, n, m, _ in keys if self.store.get(k, n, m)]
                    return (False, ", ".join(left)) if left else self.synced()

                try:
                    self.wait("the routes being removed", gone, 30)
                except TimeoutError as e:
                    if result.status == "passed":
                        result.status, result.reason = "failed", f"cleanup: {e}"
                phase("cleanup")
            result.seconds = round(time.monotonic() - t0, 2)


# ---- process hygiene ------------------------------------------------------------------------------


def reap_children(timeout: float = 5.0) -> None:
    """Collect every exited child (only call when no subprocess of ours is running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def leftovers(name: str, state_dir: str) -> list[str]:
    """Everything of the cluster still on the machine (nodemesh.cluster.inventory)."""
    return inventory_leftovers(name, state_dir)


# ---- the command ----------------------------------------------------------------------------------


def implementation_version() -> str:
    """nodemesh's version and, when run from a git checkout, its commit (read-only git)."""
    version = f"v{__version__}"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        p = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty", "--abbrev=12"],
                           capture_output=True, text=True, timeout=10)
        if p.returncode == 0 and p.stdout.strip():
            version += f"+{p.stdout.strip()}"
    return version


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [t.short_name for t in TESTS]
    ap = argparse.ArgumentParser(
        prog="python -m nodemesh.conformance",
        description="Run the Gateway API mesh (GAMMA) conformance tests on a fresh local "
                    "2-node nodemesh cluster and write a ConformanceReport.")
    ap.add_argument("--state-dir", help="the cluster's state dir (default: a new temporary dir)")
    ap.add_argument("--name", help="the cluster's name (default: nmc + 6 random hex digits)")
    ap.add_argument("--report", default=DEFAULT_REPORT,
                    help="where to write the ConformanceReport YAML (default: %(default)s)")
    ap.add_argument("--results", help="also write every check's details to this JSON file")
    ap.add_argument("--keep", action="store_true",
                    help="leave the cluster up afterwards (remove it with nodemesh down)")
    ap.add_argument("--test", action="append", choices=names, metavar="NAME",
                    help="run only this test (repeatable); the others are reported as skipped")
    ap.add_argument("--max-time-to-consistency", type=float, metavar="SECONDS",
                    default=TimeoutConfig.max_time_to_consistency,
                    help="how long one request may take to answer as expected 3 times in a row "
                         "(default: upstream's %(default)g; lower is stricter and fails faster)")
    ap.add_argument("--outside-clients", action="store_true",
                    help="diagnostic, not conformance: send from pods that are no echo backend "
                         "(on the same nodes) instead of the echo pods upstream uses")
    ap.add_argument("--url", default=DEFAULT_URL, help="implementation.url of the report")
    ap.add_argument("--contact", action="append", help="implementation.contact (repeatable)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("python -m nodemesh.conformance: needs root (it brings up a local cluster)",
              file=sys.stderr)
        return 2
    if args.outside_clients and os.path.abspath(args.report) == DEFAULT_REPORT:
        print("python -m nodemesh.conformance: --outside-clients is a diagnostic run; give "
              "--report elsewhere (it must not replace the conformance report)", file=sys.stderr)
        return 2
    set_child_subreaper()
    name = args.name or "nmc" + uuid.uuid4().hex[:6]
    state_dir = args.state_dir or tempfile.mkdtemp(prefix=f"nodemesh-{name}-")
    if args.state_dir is None:
        os.rmdir(state_dir)  # `up` creates it (mode 0700); we only wanted a unique name
    runner = Runner(state_dir, name, timeouts=TimeoutConfig(
        max_time_to_consistency=args.max_time_to_consistency),
        outside_clients=args.outside_clients)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    results: list[TestResult] = []
    setup_error = ""
    left: list[str] = []
    setup_seconds = 0.0
    selected = set(args.test or [t.short_name for t in TESTS])
    try:
        try:
            runner.up()
            runner.setup()
        except (SetupError, RuntimeError, subprocess.TimeoutExpired) as e:
            setup_error = str(e)
            runner.log(f"setup failed: {setup_error}")
        setup_seconds = time.monotonic() - t0
        for i, test in enumerate(TESTS, 1):
            head = f"[{i:2d}/{len(TESTS)}] {test.short_name}"
            if test.short_name not in selected:
                results.append(TestResult(test.short_name, "skipped", "not selected (--test)",
                                          features=list(test.features),
                                          provisional=test.provisional))
                runner.log(f"{head}: SKIPPED")
                continue
            if setup_error:
                results.append(TestResult(test.short_name, "failed", f"setup: {setup_error}",
                                          features=list(test.features),
                                          provisional=test.provisional))
                continue
            try:
                r = runner.run_test(test)
            except Exception as e:  # an agent gone, a CLI hung: this test failed, go on
                r = TestResult(test.short_name, "failed", f"runner error: {type(e).__name__}: {e}",
                               features=list(test.features), provisional=test.provisional)
            results.append(r)
            runner.log(f"{head}: {r.status.upper()} ({r.seconds:.1f}s)"
                       + (f"\n        {r.reason}" if r.reason else ""))
    finally:
        if args.keep and not setup_error:
            runner.log(f"cluster kept: python -m nodemesh --state-dir {state_dir} down")
        else:
            left = runner.down()
            if left:
                runner.log("left behind: " + "; ".join(left))
    seconds = time.monotonic() - t0
    outcomes = [Outcome(r.name, tuple(r.features), r.status, r.provisional) for r in results]
    report = build_report(outcomes, version=implementation_version(),
                          date=started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                          gateway_api_version=DATA_COMMIT, url=args.url,
                          contact=args.contact or list(DEFAULT_CONTACT))
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w") as f:
        f.write("# Generated by `python -m nodemesh.conformance` (docs/conformance/README.md).\n")
        if args.outside_clients:
            f.write("# DIAGNOSTIC RUN (--outside-clients): requests came from pods that are no echo "
                    "backend.\n# This is not a conformance result.\n")
        yaml.safe_dump(report, f, sort_keys=False, width=100)
    if args.results:
        with open(args.results, "w") as f:
            json.dump({
                "cluster": {"name": name, "stateDir": state_dir, "nodes": runner.nodes,
                            "daemonPid": runner.daemon_pid, "clients": runner.clients,
                            "kept": bool(args.keep and not setup_error),
                            "outsideClients": args.outside_clients},
                "dataCommit": DATA_COMMIT, "version": report["implementation"]["version"],
                "date": report["date"], "seconds": round(seconds, 1),
                "setupSeconds": round(setup_seconds, 1),
                "setupError": setup_error, "leftovers": left, "report": args.report,
                "tests": [asdict(r) for r in results],
            }, f, indent=1)
    passed = sum(r.status == "passed" for r in results)
    failed = [r.name for r in results if r.status == "failed"]
    runner.log(f"{passed} passed, {len(failed)} failed, "
               f"{sum(r.status == 'skipped' for r in results)} skipped in {seconds:.0f}s; "
               f"report: {args.report}" + (f"\nfailed: {', '.join(failed)}" if failed else ""))
    if setup_error:
        return 2
    return 1 if failed or left else 0
