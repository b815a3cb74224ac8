"""Losing the store loses nothing that runs (issue 10 items 4 and 5, docs/store.md "When etcd
fails"): a 2-node cluster on 3 real etcd members, with traffic from a pod on each node to a
service whose route goes through the node Envoys, and a deny policy probed all the while.

- One member SIGSTOPped while traffic runs and applies go on: no request and no apply fails.
- Two SIGSTOPped (no quorum): traffic still balances, the deny policy still denies; `apply`,
  `get` and `delete` fail within 10 s with "store unavailable"; after SIGCONT a write works
  within 10 s and its effect is on both nodes within 1 s.
- One node's underlay path to the members blackholed for 30 s (routes inside that node's
  namespace only) while changes are made and etcd's history is compacted: its pods keep serving,
  and within 2 s of the path's return its datapath and Envoy are at the store's revision and the
  change is in effect there.
- The two agents give every pod label set the same identity number (the ipcache of both nodes).

Times are measured with CLOCK_MONOTONIC, which the pods' network namespaces share with the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from nodemesh.identity import FIRST_POD_IDENTITY
from tests.integration.clusterharness import Cluster, running_cluster
from tests.integration.test_datapath_restart import POLICY as GUARD_POLICY  # only app=friend
from tests.integration.test_datapath_restart import SERVER as GUARDED
from tests.integration.test_routes import CLIENT, deployment, route, service

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF, etcd members

CUT_SECONDS = 30.0

CLIENT2 = {**CLIENT, "metadata": {"name": "client2"},
           "spec": {**CLIENT["spec"], "nodeName": "node2"}}

# In a client pod: a new HTTP connection per request to alpha's ClusterIP (the route sends it
# through the node's Envoy, which adds x-route), and, in a thread, a connection to the guarded
# pod every 0.2 s (the policy admits only app=friend: none may echo). Runs until it has seen
# x-route == argv[4] for 0.5 s, or argv[3] seconds. Prints what it saw: requests by backend pod,
# failures, and each change of x-route with the time the first response carrying it ended.
LOAD = textwrap.dedent(r"""
    import http.client, json, socket, sys, threading, time
    vip, guarded, seconds, final = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    end = time.monotonic() + seconds
    out = {"ok": 0, "pods": {}, "bad": [], "probes": 0, "opened": 0, "changes": []}
    stop = threading.Event()
    def probe():
        while not stop.is_set():
            out["probes"] += 1
            try:
                s = socket.create_connection((guarded, 9090), timeout=0.5)
                s.settimeout(0.5); s.sendall(b"ping")
                if s.recv(16) == b"ping": out["opened"] += 1
                s.close()
            except OSError:
                pass
            time.sleep(0.2)
    threading.Thread(target=probe, daemon=True).start()
    print("running", flush=True)
    header = None; final_since = None
    while time.monotonic() < end:
        t = time.monotonic()
        try:
            c = http.client.HTTPConnection(vip, 80, timeout=3)
            c.request("GET", "/x", headers={"Host": "alpha"}); r = c.getresponse(); body = r.read()
            c.close()
            if r.status != 200:
                out["bad"].append([t, r.status]); continue
            out["ok"] += 1
            pod = json.loads(body).get("pod", "?"); out["pods"][pod] = out["pods"].get(pod, 0) + 1
            h = r.getheader("x-route")
            if h != header:
                header = h; out["changes"].append([time.monotonic(), h])
        except Exception as e:
            out["bad"].append([t, repr(e)])
        if header == final:
            final_since = final_since or time.monotonic()
            if time.monotonic() - final_since > 0.5: break
        time.sleep(0.03)
    stop.set()
    out["bad"] = out["bad"][:10] + [len(out["bad"])]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster(2, "--store", "etcd", "--store-members", "3") as c:
        try:
            c.apply([deployment("alpha"), service("alpha"), CLIENT, CLIENT2, GUARDED,
                     GUARD_POLICY, route("alpha-route", "alpha", "PathPrefix", "/", "gen-0")])
            c.wait_pods(count=5)
            c.wait_synced(timeout=30)
            yield c
        finally:
            for i in (1, 2, 3):  # never leave a member stopped (a failed test's finally did)
                _signal_member(c, f"etcd{i}", signal.SIGCONT)


# ---- helpers ---------------------------------------------------------------------------------

def _store(c: Cluster) -> dict:
    with open(os.path.join(c.state_dir, "cluster.json")) as f:
        return json.load(f)["store"]


def _signal_member(c: Cluster, member: str, sig: signal.Signals) -> None:
    try:
        with open(os.path.join(c.state_dir, "etcd", member, "member.json")) as f:
            pid = int(json.load(f)["pid"])
        os.kill(pid, sig)
    except (OSError, ValueError, KeyError):
        pass


_IPS: dict[str, tuple[str, str]] = {}


def _ips(c: Cluster) -> tuple[str, str]:
    """alpha's ClusterIP and the guarded pod's address (asked once per cluster)."""
    if c.state_dir not in _IPS:
        vip = c.get("service", "alpha")["spec"]["clusterIP"]  # type: ignore[index]
        guarded = c.get("pod", "server")["status"]["podIP"]  # type: ignore[index]
        _IPS[c.state_dir] = (vip, guarded)
    return _IPS[c.state_dir]


def _load(c: Cluster, pod: str, seconds: float, final: str) -> subprocess.Popen:
    """The load in `pod`, once it runs (`exec` reads the store only to start it)."""
    vip, guarded = _ips(c)
    p = subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", c.state_dir, "exec",
                          pod, "--", sys.executable, "-c", LOAD, vip, guarded, str(seconds),
                          final], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "running\n", f"load in {pod} did not start"
    return p


def _result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, f"load exited {p.returncode}: {out}"
    return json.loads(out)


def _assert_served(name: str, r: dict) -> None:
    assert r["bad"] == [0], f"{name}: requests failed: {r['bad']}"
    assert r["opened"] == 0, f"{name}: the deny policy let {r['opened']} connections through"
    assert r["probes"] > 5, r
    assert len(r["pods"]) == 2 and min(r["pods"].values()) > 3, f"{name}: not balanced: {r['pods']}"


def _cli(c: Cluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nodemesh", "--state-dir", c.state_dir, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _route_yaml(header: str) -> str:
    return json.dumps(route("alpha-route", "alpha", "PathPrefix", "/", header))


def _apply_route(c: Cluster, header: str) -> tuple[int, float, str]:
    """Apply the route with a new header: (exit code, seconds, stderr)."""
    t = time.monotonic()
    r = c.run("apply", "-f", "-", input=_route_yaml(header), check=False, timeout=60)
    return r.code, time.monotonic() - t, r.err


def _in_store_netns(c: Cluster, code: str) -> str:
    """Run Python `code` with `store` open, from the underlay's namespace (as the CLI does)."""
    prog = ("import sys\n"
            "from nodemesh.cluster.config import load_cluster\n"
            "from nodemesh.host import netns\n"
            "from nodemesh.store import open_store\n"
            "cfg = load_cluster(sys.argv[1])\n"
            "netns.enter_for_store(cfg.store)\n"
            "store = open_store(cfg.state_dir)\n" + code)
    p = subprocess.run([sys.executable, "-c", prog, c.state_dir], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _synced(c: Cluster, node: str) -> int:
    try:
        st = c.agent(node)
        return min(int(st["datapath"]["syncedRevision"]), int(st["proxy"]["syncedRevision"]))
    except Exception:
        return -1


def _ipcache(c: Cluster, node: str) -> dict[str, int]:
    """The node's ipcache, pod addresses only: key → identity (struct ipcache_entry's first
    field; node addresses have node-relative reserved identities, host or remote-node)."""
    r = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                        os.path.join(c.state_dir, "bpf", node, "nm_ipcache")],
                       capture_output=True, text=True, check=True)
    out = {}
    for e in json.loads(r.stdout):
        identity = int.from_bytes(bytes(int(b, 16) for b in e["value"][:4]), "little")
        if identity >= FIRST_POD_IDENTITY:
            out[json.dumps(e["key"])] = identity
    return out


def _change_seen(r: dict, header: str) -> float:
    for t, h in r["changes"]:
        if h == header:
            return t
    raise AssertionError(f"x-route never became {header!r}: {r['changes']}")


# ---- the tests -------------------------------------------------------------------------------

def test_both_agents_give_each_label_set_the_same_identity(cluster: Cluster) -> None:
    """Identities are allocated cluster-wide: both nodes' ipcache map every pod address to the
    same number, and no two label sets share one."""
    c = cluster
    caches = {n: _ipcache(c, n) for n in ("node1", "node2")}
    assert caches["node1"] == caches["node2"] and len(caches["node1"]) == 5, caches
    ids = json.loads(_in_store_netns(c, (
        "import json\nfrom nodemesh.store.identities import list_identities\n"
        "print(json.dumps(list_identities(store)))\n")))
    label_sets = [json.dumps(v, sort_keys=True) for v in ids.values()]
    assert len(set(label_sets)) == len(label_sets), ids
    # the pods: alpha x2 (one label set), client and client2 (no labels: one set), server
    assert set(caches["node1"].values()) == {int(n) for n in ids} and len(ids) == 3, (caches, ids)


def test_one_member_stopped_loses_no_request_and_no_apply(cluster: Cluster) -> None:
    c = cluster
    loads = {pod: _load(c, pod, 40, "one-final") for pod in ("client", "client2")}
    time.sleep(0.5)
    applies: list[tuple[int, float, str]] = []
    _signal_member(c, "etcd1", signal.SIGSTOP)  # the first endpoint: every client starts there
    try:
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < 5:
            i += 1
            applies.append(_apply_route(c, f"one-{i}"))
    finally:
        _signal_member(c, "etcd1", signal.SIGCONT)
    assert _apply_route(c, "one-final")[0] == 0
    results = {pod: _result(p) for pod, p in loads.items()}
    print(f"one member stopped: applies (code, s): {[(a[0], round(a[1], 2)) for a in applies]}; "
          f"load: {json.dumps(results)}")
    assert [a for a in applies if a[0] != 0] == [], applies
    assert len(applies) >= 2, applies
    for pod, r in results.items():
        _assert_served(pod, r)
        _change_seen(r, "one-final")


def test_two_members_stopped_keep_traffic_and_policy_and_fail_writes_fast(cluster: Cluster) -> None:
    c = cluster
    loads = {pod: _load(c, pod, 60, "quorum-back") for pod in ("client", "client2")}
    time.sleep(0.5)
    stopped = ("etcd1", "etcd2")
    cont_at = None
    try:
        for m in stopped:
            _signal_member(c, m, signal.SIGSTOP)
        time.sleep(1)
        t0 = time.monotonic()
        manifest = os.path.join(c.state_dir, "no-quorum-route.json")
        with open(manifest, "w") as f:
            f.write(_route_yaml("no-quorum"))
        procs = {"apply": _cli(c, "apply", "-f", manifest), "get": _cli(c, "get", "pods"),
                 "delete": _cli(c, "delete", "pod", "client")}
        failed = {}
        for name, p in procs.items():
            _, err = p.communicate(timeout=30)
            failed[name] = (p.returncode, time.monotonic() - t0, err.strip())
        time.sleep(max(0.0, 9 - (time.monotonic() - t0)))  # traffic without quorum a while
    finally:
        for m in stopped:
            _signal_member(c, m, signal.SIGCONT)
        cont_at = time.monotonic()
    # writes work again within 10 s
    while True:
        code, _, err = _apply_route(c, "quorum-back")
        if code == 0:
            break
        assert time.monotonic() - cont_at < 10, f"no write within 10 s of SIGCONT: {err}"
    written_at = time.monotonic()
    results = {pod: _result(p) for pod, p in loads.items()}
    effect = {pod: round(_change_seen(r, "quorum-back") - written_at, 3)
              for pod, r in results.items()}
    print(f"two members stopped: {failed}; write again after {written_at - cont_at:.2f} s; "
          f"in effect after (s): {effect}; load: {json.dumps(results)}")
    for name, (code, seconds, err) in failed.items():
        assert code != 0 and "store unavailable" in err, (name, code, err)
        assert seconds < 10, (name, seconds, err)
    for pod, r in results.items():
        _assert_served(pod, r)
        assert _change_seen(r, "quorum-back") - written_at < 1.0, (pod, r["changes"])
        assert "no-quorum" not in [h for _, h in r["changes"]], r["changes"]
    assert c.get("pod", "client")["metadata"].get("deletionTimestamp") is None  # type: ignore[index]


def test_a_node_cut_off_from_etcd_keeps_serving_and_catches_up_after_compaction(
        cluster: Cluster) -> None:
    c = cluster
    ns = f"{c.name}-node2"
    members = [m["ip"] for m in _store(c)["members"]]
    loads = {pod: _load(c, pod, CUT_SECONDS + 30, "after-cut-5") for pod in ("client", "client2")}
    time.sleep(0.5)
    before = _synced(c, "node2")
    agent_log = os.path.join(c.state_dir, "nodes", "node2", "agent.log")
    log_start = os.path.getsize(agent_log)
    cut_at = time.monotonic()
    try:
        for ip in members:
            subprocess.run(["ip", "netns", "exec", ns, "ip", "route", "add", "blackhole",
                            f"{ip}/32"], check=True)
        time.sleep(6)  # the agent's watch on node2 has given up by now (WATCH_QUIET + ...)
        for i in range(1, 6):  # changes elsewhere while node2 cannot see them
            assert _apply_route(c, f"after-cut-{i}")[0] == 0
        target = int(_in_store_netns(c, "r = store.revision()\nstore.compact(r)\nprint(r)\n"))
        # what node2 missed is gone from etcd's history: it can only list again
        assert _in_store_netns(c, (
            "from nodemesh.store import Compacted\n"
            f"try:\n    store.events_since({before})\n    print('kept')\n"
            "except Compacted:\n    print('compacted')\n")).strip() == "compacted"
        while time.monotonic() - cut_at < CUT_SECONDS:
            time.sleep(0.2)
        assert _synced(c, "node2") < target, "node2 saw the changes through the cut"
    finally:
        for ip in members:
            subprocess.run(["ip", "netns", "exec", ns, "ip", "route", "del", "blackhole",
                            f"{ip}/32"], check=False)
        back_at = time.monotonic()
    while _synced(c, "node2") < target:
        assert time.monotonic() - back_at < 2.0, (
            f"node2 not at revision {target} 2 s after the cut ended "
            f"(at {_synced(c, 'node2')}, before the cut {before})")
        time.sleep(0.02)
    caught_up = time.monotonic() - back_at
    results = {pod: _result(p) for pod, p in loads.items()}
    served = _change_seen(results["client2"], "after-cut-5") - back_at
    print(f"node2 cut off {CUT_SECONDS:.0f} s: synced {caught_up:.2f} s after the link returned, "
          f"the change served there after {served:.2f} s; load: {json.dumps(results)}")
    for pod, r in results.items():
        _assert_served(pod, r)
    assert _change_seen(results["client"], "after-cut-5") < back_at  # node1 had it during the cut
    assert served < 2.0, results["client2"]
    # What node2's agent said: its watch failed; its steps kept going (the route statuses it
    # could not write waited, no step failed on them), and they were written once it was back.
    deadline = time.monotonic() + 10
    while True:
        with open(agent_log, errors="replace") as f:
            f.seek(log_start)
            logged = f.read()
        if "the store answers again" in logged or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "store watch failed (store unavailable: " in logged, logged[-3000:]
    assert "could not write the routes' statuses (store unavailable: " in logged, logged[-3000:]
    assert "reconcile failed" not in logged, logged[-3000:]
    assert "the store answers again; " in logged, logged[-3000:]
    # the identities node2 holds are node1's
    assert _ipcache(c, "node1") == _ipcache(c, "node2")
