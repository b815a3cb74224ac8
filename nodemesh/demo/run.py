"""`nodemesh demo`: bring up a 2-node cluster, deploy the demo app with policies and a canary,
drive traffic, and print what the mesh saw.

Each step prints a line when it is done (with a spinner on a terminal while it runs). The cluster
stays up afterwards for exploring; the report ends with what to try next.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from nodemesh.cluster import lifecycle
from nodemesh.cluster.agentclient import AgentClient
from nodemesh.cluster.config import ClusterConfig
from nodemesh.demo import manifests
from nodemesh.errors import NodemeshError
from nodemesh.host.files import read_json
from nodemesh.store import Store, open_store
from nodemesh.store.apply import apply_text
from nodemesh.text import table

NS = manifests.NAMESPACE
REQUESTS = 400

# Runs in the client pod: N requests through the frontend; prints the API versions that answered.
DRIVE = r"""
import http.client, json, sys
n = int(sys.argv[1]); versions = {}; codes = {}
conn = None
for i in range(n):
    try:
        conn = http.client.HTTPConnection("frontend", 80, timeout=5)
        conn.request("GET", f"/items/{i}")
        r = conn.getresponse(); body = r.read(); conn.close()
        codes[r.status] = codes.get(r.status, 0) + 1
        v = json.loads(body).get("upstream", {}).get("version", "?")
        versions[v] = versions.get(v, 0) + 1
    except Exception as e:
        codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
print(json.dumps({"versions": versions, "codes": codes}))
"""

# Runs in the intruder pod: what the policies forbid.
INTRUDE = r"""
import http.client, json, socket
out = {"l7": {}, "l4": {}}
for i in range(20):
    c = http.client.HTTPConnection("api", 80, timeout=3)
    c.request("POST", "/admin", body=b"{}"); r = c.getresponse(); r.read(); c.close()
    out["l7"][r.status] = out["l7"].get(r.status, 0) + 1
for i in range(3):
    # Reaching the store means getting an answer: with mutual TLS between nodes the intruder's
    # own node Envoy accepts the connection, and closes it when the store's node refuses it.
    try:
        s = socket.create_connection(("store", 8080), timeout=0.5)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n"); k = "connected" if s.recv(64) else "blocked"
        s.close()
    except OSError:
        k = "blocked"
    out["l4"][k] = out["l4"].get(k, 0) + 1
print(json.dumps(out))
"""


class Progress:
    """One line per step; a spinner while it runs when stdout is a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        t0 = time.monotonic()
        stop = threading.Event()
        spinner = None
        if self.tty:
            def spin() -> None:
                for c in itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"):
                    if stop.wait(0.1):
                        return
                    sys.stdout.write(f"\r  {c} {text} ({time.monotonic() - t0:.0f}s)")
                    sys.stdout.flush()
            spinner = threading.Thread(target=spin, daemon=True)
            spinner.start()
        try:
            yield
        except BaseException:
            stop.set()
            if spinner:
                spinner.join()
            sys.stdout.write(f"\r  ✗ {text}\n" if self.tty else f"  ✗ {text}\n")
            raise
        stop.set()
        if spinner:
            spinner.join()
        line = f"  ✓ {text} ({time.monotonic() - t0:.1f}s)"
        sys.stdout.write(f"\r{line}\033[K\n" if self.tty else line + "\n")
        sys.stdout.flush()


def _apply(store: Store, text: str) -> None:
    apply_text(store, text, "demo")


def _wait(what: str, ok: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise NodemeshError(f"demo: {what} did not happen within {timeout:.0f}s; "
                                "`nodemesh status` and `nodemesh get pods -A` show why")
        time.sleep(0.2)


def _ready(p: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (p.get("status") or {}).get("conditions") or [])


def _exec(cfg: ClusterConfig, pod: str, code: str, *args: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", cfg.state_dir, "exec",
                        "-n", NS, pod, "--", sys.executable, "-c", code, *args],
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise NodemeshError(f"demo: running traffic in {NS}/{pod} failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def _synced(cfg: ClusterConfig, store: Store) -> bool:
    target = store.revision()
    for n in cfg.nodes:
        st = AgentClient(cfg.agent_socket(n.name), n.name).get("/status")
        if st["datapath"].get("syncedRevision", 0) < target:
            return False
        if st.get("proxy") and st["proxy"].get("syncedRevision", 0) < target:
            return False
    return True


def _route_accepted(store: Store) -> bool:
    r = store.get("HTTPRoute", NS, "api-canary")
    for p in ((r or {}).get("status") or {}).get("parents") or []:
        for c in p.get("conditions") or []:
            if c["type"] == "Accepted" and c["status"] == "True":
                return True
    return False


def run_demo(state_dir: str, requests: int = REQUESTS) -> dict[str, Any]:
    progress = Progress()
    print("nodemesh demo: a frontend, an API in two versions, a store, a client and an intruder\n")
    with progress.step("cluster up (2 nodes)"):
        cfg = lifecycle.up(state_dir, 2, "nodemesh", progress=lambda _: None)
    store = open_store(cfg.state_dir)
    with progress.step("app deployed (frontend, api-v1 x2, api-v2, store, client, intruder)"):
        _apply(store, manifests.APP)
        _wait("the demo pods becoming Ready",
              lambda: (len(pods := store.list("Pod", NS)) == 7 and all(_ready(p) for p in pods)))
    with progress.step("policies applied (L3/L4 on the store, L7 on the API) and a 90/10 canary"):
        _apply(store, manifests.POLICIES + "---" + manifests.CANARY_ROUTE)
        _wait("the canary route being accepted", lambda: _route_accepted(store), 30)
        _wait("the agents catching up", lambda: _synced(cfg, store), 30)
    with progress.step(f"traffic: {requests} requests client → frontend → api (canary) → store"):
        driven = _exec(cfg, "client", DRIVE, str(requests))
    with progress.step("traffic: the intruder tries POST /api/admin and the store directly"):
        intruded = _exec(cfg, "intruder", INTRUDE)
    with progress.step("flows collected from every node"):
        time.sleep(1.5)  # Envoy flushes access logs every second
        flows = []
        for n in cfg.nodes:
            flows += AgentClient(cfg.agent_socket(n.name), n.name).get(
                "/flows", {"namespace": [NS], "last": ["0"]})
    report = _report(cfg, store, driven, intruded, flows)
    _print_report(cfg, store, report)
    return report


def _report(cfg: ClusterConfig, store: Store, driven: dict, intruded: dict,
            flows: list[dict]) -> dict[str, Any]:
    verdicts = collections.Counter(f["verdict"] for f in flows)
    drops = collections.Counter(f.get("drop_reason_desc", "?") for f in flows
                                if f["verdict"] == "DROPPED")
    l7 = [f for f in flows if f.get("Type") == "L7"]
    per_route: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for f in l7:
        route = f["l7"].get("route") or "(no route: L7 policy only)"
        per_route[route][str(f["l7"]["http"].get("code"))] += 1
    versions = driven.get("versions", {})
    total = sum(versions.get(v, 0) for v in ("v1", "v2"))
    split = {v: round(100 * versions.get(v, 0) / total, 1) if total else 0.0 for v in ("v1", "v2")}
    return {"flows": len(flows), "verdicts": dict(verdicts), "drops": dict(drops),
            "l7_flows": len(l7), "http_codes_per_route": {k: dict(v) for k, v in per_route.items()},
            "canary": {"requests": total, "split_percent": split,
                       "expected_percent": dict(zip(("v1", "v2"), manifests.CANARY, strict=True))},
            "client_codes": driven.get("codes", {}), "intruder": intruded}


def _print_report(cfg: ClusterConfig, store: Store, r: dict[str, Any]) -> None:
    print("\n== cluster")
    pods = store.list("Pod")
    rows = []
    for n in cfg.nodes:
        here = [p for p in pods if p["spec"].get("nodeName") == n.name]
        m = read_json(os.path.join(cfg.node_dir(n.name), "metrics.json")) or {}
        rows.append([n.name, n.ip, str(len(here)), f"http://127.0.0.1:{m.get('port', '?')}/metrics"])
    print(table(["NODE", "IP", "PODS", "METRICS"], rows))
    print(f"\n== flows in namespace {NS}: {r['flows']}")
    print("   " + ", ".join(f"{k} {v}" for k, v in sorted(r["verdicts"].items())))
    if r["drops"]:
        print("   dropped because: " + ", ".join(f"{k} {v}" for k, v in sorted(r["drops"].items())))
    print(f"   L7 (HTTP) flows: {r['l7_flows']}")
    print("\n== HTTP codes per route")
    for route, codes in sorted(r["http_codes_per_route"].items()):
        print(f"   {route}: " + ", ".join(f"{c} x {n}" for c, n in sorted(codes.items())))
    c = r["canary"]
    print(f"\n== canary (api-canary, weights {c['expected_percent']['v1']}/"
          f"{c['expected_percent']['v2']}): measured v1 {c['split_percent']['v1']}% / "
          f"v2 {c['split_percent']['v2']}% over {c['requests']} requests")
    i = r["intruder"]
    print(f"\n== intruder: POST /admin → {i['l7']} (403 = denied by the L7 policy); "
          f"store:8080 → {i['l4']}")
    print("""
== explore (the cluster stays up)
   nodemesh get pods -n demo -o wide
   nodemesh observe -n demo --verdict DROPPED          # what the policies stopped, and why
   nodemesh observe -n demo --type l7 --http-status 4+ # L7 denials with method and path
   nodemesh observe -f --to-pod demo/store             # follow flows live
   nodemesh ui                                          # service map: http://127.0.0.1:9970/
   nodemesh exec -n demo client -- curl -s http://frontend/items/1
   change the split:  nodemesh get httproute -n demo api-canary -o yaml > r.yaml, edit, apply -f r.yaml
   break a policy:    nodemesh delete cnp -n demo api-read-only   (then the intruder's POST works)
   nodemesh down                                        # remove everything
""")
