"""`nodemesh ui` end to end: a real 2-node cluster with traffic and a policy drop, the real server
(`python -m nodemesh.ui`), and a real browser (headless Chromium through Selenium).

The page must show the demo workloads, draw the denied intruder → backend edge red (class
`drop`), update without a reload, and list a workload's recent flows on a click. With
NODEMESH_UPDATE_DOCS=1 the test also saves its screenshot as docs/service-map.png. A few pure
checks of the graph's numbers come first (no cluster needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from nodemesh.ui.graph import FlowRecord, Inventory, SockCorrelator, build_graph, inventory_from
from tests.integration.clusterharness import REPO, Cluster

ECHO = "registry.k8s.io/gateway-api/conformance/echo-basic"
SCREENSHOT = os.path.join(REPO, "docs", "service-map.png")


# ---- the graph's numbers, from hand-made flows ---------------------------------------------------
def _ep(pod: str = "", workload: str = "", identity: int = 300, labels: tuple = ()) -> dict:
    d: dict = {"identity": identity}
    if pod:
        d.update(namespace="default", pod_name=pod)
    if workload:
        d["workloads"] = [{"name": workload, "kind": "Deployment"}]
    if labels:
        d["labels"] = list(labels)
    return d


def _flow(t: float, src: dict, dst: dict, *, verdict: str = "FORWARDED", sport: int = 40000,
          dport: int = 8080, sip: str = "10.244.1.2", dip: str = "10.244.2.3", node: str = "node1",
          direction: str = "EGRESS", **extra: object) -> dict:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"
    f = {"time": stamp, "uuid": f"u-{t}-{sport}-{direction}-{verdict}-{extra.get('Type', '')}",
         "verdict": verdict, "IP": {"source": sip, "destination": dip},
         "l4": {"TCP": {"source_port": sport, "destination_port": dport}},
         "source": src, "destination": dst, "Type": "L3_L4", "node_name": node,
         "traffic_direction": direction}
    f.update(extra)
    return f


def _records(flows: list[dict], inv: Inventory, now: float) -> list[FlowRecord]:
    corr = SockCorrelator()
    out = []
    for f in flows:
        r = FlowRecord.parse(f, inv, now)
        corr.feed(r)
        out.append(r)
    return out


def test_graph_numbers_l3_l4() -> None:
    now = time.time()
    inv = Inventory()
    client, backend = _ep("client", identity=256), _ep("backend-abc-x", "backend", 257)
    intruder = _ep("intruder", identity=259)
    svc = {"namespace": "default", "name": "backend"}
    flows = []
    for i in range(6):  # 6 connections: socket LB (no source yet), egress, ingress
        t = now - 30 + i
        flows.append(_flow(t, {"identity": 0}, backend, verdict="TRANSLATED", sport=0,
                           sip="0.0.0.0", destination_service=svc,
                           socket_translation={"original_destination": "10.96.0.2:80"}))
        flows.append(_flow(t + 1e-4, client, backend, sport=41000 + i))
        flows.append(_flow(t + 2e-4, client, backend, sport=41000 + i, direction="INGRESS",
                           node="node1"))
    for i in range(2):  # 2 denied connections, the second with a retransmitted SYN
        t = now - 20 + i
        flows.append(_flow(t, intruder, backend, sport=50000 + i, sip="10.244.2.4"))
        for k in range(1 + i):
            flows.append(_flow(t + 0.1 + k, intruder, backend, sport=50000 + i, sip="10.244.2.4",
                               verdict="DROPPED", direction="INGRESS",
                               drop_reason_desc="POLICY_DENIED"))
    flows.append(_flow(now - 120, client, backend, sport=1))  # outside the window
    g = build_graph(_records(flows, inv, now), inv, 60.0, now)
    edges = {(e["from"], e["to"]): e for e in g["edges"]}
    ok = edges[("default/client", "default/backend")]
    assert (ok["requests"], ok["unit"], ok["errorRate"], ok["drops"], ok["p99"]) == (6, "conn/s", 0, 0, "n/a")
    assert ok["rate"] == pytest.approx(6 / 60)
    via_svc = edges[("default/client", "service:default/backend")]  # the socket LB events, correlated
    assert via_svc["requests"] == 6 and via_svc["drops"] == 0
    bad = edges[("default/intruder", "default/backend")]
    assert (bad["requests"], bad["errors"], bad["drops"], bad["dropReason"]) == (2, 2, 3, "POLICY_DENIED")
    assert bad["errorRate"] == 1.0
    assert g["unattributed"] == 0
    assert {n["id"] for n in g["nodes"]} == {"default/client", "default/backend", "default/intruder",
                                              "service:default/backend"}


def test_graph_numbers_through_the_mtls_tunnel() -> None:
    """A tunnelled connection is seen where it enters the tunnel (the pod's port) and where the
    destination's Envoy opens it to the pod (another port, or none when refused at connect):
    one connection, dropped when its exit was."""
    now = time.time()
    inv = Inventory()
    client, backend = _ep("client", identity=256), _ep("backend-abc-x", "backend", 257)
    intruder = _ep("intruder", identity=259)
    mtls = {"auth_type": "MUTUAL_TLS"}
    flows = []
    for i in range(4):
        t = now - 30 + i
        flows.append(_flow(t, client, backend, sport=41000 + i,
                           trace_observation_point="FROM_ENDPOINT", **mtls))
        flows.append(_flow(t + 0.01, client, backend, sport=52000 + i, direction="INGRESS", node="node2",
                           trace_observation_point="TO_ENDPOINT", **mtls))
    for i in range(3):  # refused at the destination when its Envoy connects: no source port
        t = now - 20 + i
        flows.append(_flow(t, intruder, backend, sport=50000 + i, sip="10.244.1.9",
                           trace_observation_point="FROM_ENDPOINT", **mtls))
        flows.append(_flow(t + 0.01, intruder, backend, sport=0, sip="10.244.1.9", verdict="DROPPED",
                           direction="INGRESS", node="node2", trace_observation_point="TO_ENDPOINT",
                           drop_reason_desc="POLICY_DENIED"))
    g = build_graph(_records(flows, inv, now), inv, 60.0, now)
    edges = {(e["from"], e["to"]): e for e in g["edges"]}
    ok = edges[("default/client", "default/backend")]
    assert (ok["requests"], ok["errorRate"]) == (4, 0)
    bad = edges[("default/intruder", "default/backend")]
    assert (bad["requests"], bad["errors"], bad["drops"], bad["errorRate"]) == (3, 3, 3, 1.0)


def test_graph_numbers_l7() -> None:
    now = time.time()
    inv = inventory_from([
        {"kind": "Deployment", "metadata": {"name": "web", "namespace": "default", "uid": "d"},
         "spec": {"replicas": 1, "template": {"metadata": {"labels": {"app": "web"}}}}},
        {"kind": "Pod", "metadata": {"name": "web-1-a", "namespace": "default", "labels": {"app": "web"},
                                     "ownerReferences": [{"kind": "Deployment", "name": "web",
                                                          "controller": True}]},
         "spec": {"nodeName": "node2"}, "status": {"podIP": "10.244.2.3", "conditions": [
             {"type": "Ready", "status": "True"}]}},
        {"kind": "Service", "metadata": {"name": "web", "namespace": "default"},
         "spec": {"clusterIP": "10.96.0.9", "selector": {"app": "web"}, "ports": [{"port": 80}]}},
    ])
    client = _ep("client", identity=256)
    web = {"identity": 257, "namespace": "default", "labels": ["k8s:app=web"]}  # no pod name: by IP
    flows = []
    for i in range(100):
        code = 503 if i < 5 else 404 if i < 8 else 200
        flows.append(_flow(now - 50 + i * 0.1, client, web, sport=42000 + i, Type="L7",
                           destination_service={"namespace": "default", "name": "web"},
                           l7={"type": "RESPONSE", "latency_ns": str((i + 1) * 1_000_000),
                               "http": {"code": code, "method": "GET", "url": "http://web/"}}))
    g = build_graph(_records(flows, inv, now), inv, 60.0, now)
    edges = {(e["from"], e["to"]): e for e in g["edges"]}
    e = edges[("default/client", "default/web")]
    assert (e["unit"], e["requests"], e["errors"]) == ("req/s", 100, 8)
    assert e["errorRate"] == pytest.approx(0.08)
    assert e["p99Ms"] == pytest.approx(99.0) and e["p99"] == "99 ms"
    assert e["l7"] == {"requests": 100, "status4xx": 3, "status5xx": 5, "denied": 0}
    assert edges[("default/client", "service:default/web")]["requests"] == 100
    web_node = next(n for n in g["nodes"] if n["id"] == "default/web")
    assert (web_node["type"], web_node["ready"], web_node["nodes"]) == ("Deployment", 1, ["node2"])
    assert g["links"] == [{"from": "service:default/web", "to": "default/web"}]


# ---- end to end ------------------------------------------------------------------------------
def _deployment(name: str, replicas: int) -> dict:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                         "name": "echo", "image": ECHO, "args": ["--port=8080"],
                         "ports": [{"containerPort": 8080}]}]}}}}


def _service(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}}


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"containers": [{"name": "c", "image": "debian", "command": ["sleep", "infinity"]}]}}


APP = [_deployment("frontend", 2), _deployment("backend", 2), _service("frontend"),
       _service("backend"), _pod("client"), _pod("intruder")]
# backend takes traffic from the client and the frontend only: the intruder's SYNs are dropped.
POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "backend-ingress"},
          "spec": {"podSelector": {"matchLabels": {"app": "backend"}}, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}},
                                         {"podSelector": {"matchLabels": {"app": "frontend"}}}]}]}}


def _curl_loop(url: str, n: int) -> list[str]:
    return ["sh", "-c", f"for i in $(seq {n}); do curl -s -o /dev/null -m 2 {url} || exit 1; done"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def _wait(what: str, pred, timeout: float = 20.0, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except Exception as e:  # not up yet
            v, last = None, e
        else:
            last = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def demo(cluster: Cluster) -> Cluster:
    cluster.apply(APP)
    cluster.wait_pods(count=6, timeout=90)
    cluster.apply([POLICY])
    cluster.wait_synced()
    frontend = cluster.pods(selector="app=frontend")[0]["metadata"]["name"]
    cluster.exec("client", *_curl_loop("http://backend/", 12))
    cluster.exec("client", *_curl_loop("http://frontend/", 6))
    cluster.exec(frontend, *_curl_loop("http://backend/api", 6))
    for _ in range(3):
        r = cluster.exec("intruder", "curl", "-s", "-m", "1", "http://backend/", check=False)
        # 28: timed out (the SYN was dropped); 52/56: the intruder's node Envoy took the
        # connection into the mutual-TLS tunnel and closed it when the backend's node refused it
        assert r.code in (28, 52, 56), \
            f"the intruder got through (curl exit {r.code}): {r.out} {r.err}"
    return cluster


@pytest.fixture
def ui(demo: Cluster) -> Iterator[str]:
    """`python -m nodemesh.ui` on a free loopback port; stopped by its PID."""
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="nodemesh-ui-test-")
    log_path = os.path.join(workdir, "ui.log")
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nodemesh.ui", "--state-dir", demo.state_dir,
                                 "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait("the ui server", lambda: proc.poll() is None and _get_json(base + "/healthz")["ok"])
        yield base
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with open(log_path) as f:
            output = f.read()
        shutil.rmtree(workdir, ignore_errors=True)
        assert proc.returncode == 0, f"nodemesh ui exited {proc.returncode}:\n{output}"


def _reap_browser_orphans(timeout: float = 10.0) -> None:
    """Chromium's helpers (crashpad) outlive the driver's quit and, since the cluster harness
    makes this process a subreaper, end up as our children: wait for them, reap them (and kill
    any that linger, by PID)."""
    me = os.getpid()
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    comm, rest = f.read().rsplit(")", 1)
            except OSError:
                continue
            state, ppid = rest.split()[:2]
            if int(ppid) != me or "chrom" not in comm:
                continue
            if state == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(pid), 0)
            else:
                alive.append(int(pid))
        if not alive:
            return
        if time.monotonic() > deadline:
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.1)


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_AVOID_STATS", "true")
    profile = tempfile.mkdtemp(prefix="nodemesh-ui-chromium-")
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-default-browser-check",
                "--window-size=1400,900", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.binary_location = "/usr/bin/chromium"
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        driver = webdriver.Chrome(options=opts, service=Service(executable_path="/usr/bin/chromedriver"))
        # exactly 1400x900 CSS pixels of page, whatever the window decorations
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        _reap_browser_orphans()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.root
def test_service_map(demo: Cluster, ui: str, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The server has the numbers (its window began with the flows the agents' rings hold).
    def drop_edge() -> dict | None:
        for e in _get_json(ui + "/api/graph")["edges"]:
            if (e["from"], e["to"]) == ("default/intruder", "default/backend") and e["drops"]:
                return e
        return None

    edge = _wait("the intruder -> backend drops in /api/graph", drop_edge)
    assert edge["dropReason"] == "POLICY_DENIED" and edge["errorRate"] == 1.0
    graph = _get_json(ui + "/api/graph")
    assert graph["cluster"]["name"] == demo.name
    assert all(n["connected"] for n in graph["cluster"]["nodes"]), graph["cluster"]
    flows = _get_json(ui + "/api/flows?workload=default/intruder&limit=5")["flows"]
    assert 0 < len(flows) <= 5 and flows == sorted(flows, key=lambda f: f["time"], reverse=True)
    with pytest.raises(urllib.error.HTTPError) as err:
        _get_json(ui + "/api/flows")
    assert err.value.code == 400

    d = browser
    from selenium.common.exceptions import StaleElementReferenceException

    wait = WebDriverWait(d, 20, poll_frequency=0.2,
                         ignored_exceptions=[StaleElementReferenceException])
    d.get(ui + "/")
    css = d.find_elements
    for wid in ("default/frontend", "default/backend", "default/client", "default/intruder",
                "service:default/backend", "service:default/frontend"):
        wait.until(lambda _, w=wid: css(By.CSS_SELECTOR, f'g.node[data-id="{w}"]'))
    red = wait.until(lambda _: css(By.CSS_SELECTOR, 'path.edge.drop[data-from="default/intruder"]'
                                                    '[data-to="default/backend"]'))
    assert red[0].value_of_css_property("stroke") == "rgb(220, 38, 38)"
    ok = css(By.CSS_SELECTOR, 'path.edge[data-from="default/client"][data-to="default/backend"]')
    assert ok and "drop" not in ok[0].get_attribute("class").split()
    assert d.find_element(By.ID, "stat-cluster").text == demo.name
    assert d.find_element(By.ID, "stat-nodes").text == "2"

    # Live: a new edge appears without a reload.
    d.execute_script("window.__sameDocument = true")
    assert not css(By.CSS_SELECTOR, 'path.edge[data-from="default/intruder"][data-to="default/frontend"]')
    demo.exec("intruder", *_curl_loop("http://frontend/", 3))
    wait.until(lambda _: css(By.CSS_SELECTOR, 'path.edge.ok[data-from="default/intruder"]'
                                              '[data-to="default/frontend"]'))
    assert d.execute_script("return window.__sameDocument === true")
    demo.exec("intruder", "curl", "-s", "-m", "1", "http://backend/", check=False)  # newest: a drop

    # A click on a workload lists its recent flows, the drop among them.
    def click_intruder(_: object) -> bool:
        d.find_element(By.CSS_SELECTOR, 'g.node[data-id="default/intruder"]').click()
        return True

    wait.until(click_intruder)  # (the map redraws as flows arrive: retried on a stale element)
    wait.until(lambda _: d.find_element(By.ID, "panel-title").text == "intruder")

    def flow_texts(_: object) -> list[str]:
        return [li.text for li in css(By.CSS_SELECTOR, "#flow-list li.flow")]

    texts = wait.until(flow_texts)
    items = texts
    assert any("DROPPED" in t and "POLICY_DENIED" in t and "backend" in t for t in texts), texts
    assert all("intruder" in t for t in texts), texts
    assert len(items) <= 50

    time.sleep(1.0)  # let the layout animation settle
    errors = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors
    shots = tempfile.mkdtemp(prefix="nodemesh-ui-shot-")
    try:
        shot = os.path.join(shots, "service-map.png")
        assert d.save_screenshot(shot)
        assert _png_size(shot) == (1400, 900)
        if os.environ.get("NODEMESH_UPDATE_DOCS"):
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        shutil.rmtree(shots, ignore_errors=True)


# In a pod: one HTTP/1.1 request with a raw request target (curl would encode it).
RAW_GET = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=5)
s.sendall(f"GET {sys.argv[2]} HTTP/1.1\r\nHost: {sys.argv[1]}\r\nConnection: close\r\n\r\n".encode())
print(s.recv(100).split(b"\r\n")[0].decode())
"""
HOSTILE_PATH = "/x<svg/onload=window.__pwned=1>"  # no space: Envoy would refuse the line


@pytest.mark.root
def test_user_strings_are_shown_as_text(demo: Cluster, ui: str, browser) -> None:
    """An HTTP path with markup (from an L7 flow) shows literally in the flow list and runs
    nothing, in the real browser."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    svc = _service("frontend")
    svc["metadata"]["annotations"] = {"nodemesh.io/l7-visibility": "true",
                                      "note": "<script>window.__pwned=2</script>"}
    demo.apply([svc])
    demo.wait_synced()

    def hostile_flow() -> bool:
        r = demo.exec("client", sys.executable, "-c", RAW_GET, "frontend", HOSTILE_PATH,
                      check=False)
        flows = _get_json(ui + "/api/flows?workload=default/client&limit=20")["flows"]
        assert r.out.startswith("HTTP/1.1 "), r
        return any(HOSTILE_PATH in (f.get("summary") or "") for f in flows)

    _wait("an L7 flow with the hostile path", hostile_flow, timeout=30, interval=1.0)
    from selenium.common.exceptions import StaleElementReferenceException

    d = browser
    # The page redraws the map and the flow list as data arrives: an element found a moment ago
    # may be gone, so each look is retried until it holds.
    wait = WebDriverWait(d, 20, poll_frequency=0.2,
                         ignored_exceptions=[StaleElementReferenceException])
    d.get(ui + "/")

    def click_client(_: object) -> bool:
        nodes = d.find_elements(By.CSS_SELECTOR, 'g.node[data-id="default/client"]')
        if nodes:
            nodes[0].click()
        return bool(nodes)

    wait.until(click_client)
    # The demo's own traffic keeps coming and the list shows the newest 50 flows: the hostile
    # request is sent again while waiting, so one of its flows stays among them.
    sent = [time.monotonic()]

    def hostile_items(_: object) -> list:
        if time.monotonic() - sent[0] > 3:
            demo.exec("client", sys.executable, "-c", RAW_GET, "frontend", HOSTILE_PATH,
                      check=False)
            sent[0] = time.monotonic()
        return [li for li in d.find_elements(By.CSS_SELECTOR, "#flow-list li.flow")
                if HOSTILE_PATH in li.text]

    items = wait.until(hostile_items)
    assert items, "the hostile path is not in the flow list as text"
    assert not d.find_elements(By.CSS_SELECTOR, "#flow-list svg, #flow-list img, #panel img")
    assert d.execute_script("return window.__pwned === undefined")
