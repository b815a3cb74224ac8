"""The Gateway API mesh conformance suite, end to end: ``python -m nodemesh.conformance``.

The runner brings up its own 2-node cluster, runs every upstream mesh test from inside the echo
pods, tears the cluster down and writes a ConformanceReport plus a JSON file with every check.
It runs once for this module (as a subprocess, so that it reaps the cluster's processes itself);
each conformance test is one pytest test here, so a failure carries the test's name, the first
failing request and why. Requests that never converge give up after 10 s (upstream allows 30 s;
``docs/conformance/README.md`` has the full-length run) to keep the module within a few minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from nodemesh.conformance import TESTS_DIR
from nodemesh.conformance.cases import (
    CLIENTS,
    TESTS,
    Expect,
    ExpectedRequest,
    Redirect,
    Request,
)
from nodemesh.conformance.expect import backend_of_pod, client_args, compare, parse_response
from nodemesh.conformance.report import Outcome, build_report, profiles_of
from tests.integration.clusterharness import REPO, Cluster

ROOT = [pytest.mark.root, pytest.mark.timeout(1800),
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a local cluster)")]

MAX_TIME_TO_CONSISTENCY = "10"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    out = tmp_path_factory.mktemp("conformance")
    report, results = out / "report.yaml", out / "results.json"
    p = subprocess.run([sys.executable, "-m", "nodemesh.conformance", "--report", str(report),
                        "--results", str(results),
                        "--max-time-to-consistency", MAX_TIME_TO_CONSISTENCY],
                       capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert results.exists(), f"the runner wrote no results (exit {p.returncode}):\n{p.stderr}"
    data = json.loads(results.read_text())
    data["exitCode"], data["stderr"] = p.returncode, p.stderr
    data["reportDoc"] = yaml.safe_load(report.read_text())
    yield data


def _describe(result: dict[str, Any]) -> str:
    lines = [f"{result['name']}: {result['reason']}",
             "  (known failures and their causes: docs/conformance/README.md)"]
    for c in result["checks"]:
        if not c["ok"]:
            last = (c.get("details") or {}).get("last") or {}
            lines.append(f"  [{c['client']}] {c['name']}: {c['error']}"
                         + (f"\n      last answer: {json.dumps(last)}" if last else ""))
    return "\n".join(lines)


def _root(fn: Callable[..., None]) -> Callable[..., None]:
    for mark in ROOT:
        fn = mark(fn)
    return fn


@_root
@pytest.mark.parametrize("name", [t.short_name for t in TESTS])
def test_conformance(run: dict[str, Any], name: str) -> None:
    assert not run["setupError"], run["setupError"]
    (result,) = [t for t in run["tests"] if t["name"] == name]
    assert result["status"] == "passed", _describe(result)


@_root
def test_report_and_exit_code(run: dict[str, Any]) -> None:
    doc = run["reportDoc"]
    assert (doc["apiVersion"], doc["kind"], doc["mode"]) == (
        "gateway.networking.k8s.io/v1", "ConformanceReport", "mesh")
    assert [p["name"] for p in doc["profiles"]] == ["MESH-HTTP", "MESH-GRPC"]
    failed = sorted(t["name"] for t in run["tests"] if t["status"] == "failed")
    reported = sorted(n for p in doc["profiles"] for level in ("core", "extended")
                      for n in p[level].get("failedTests") or [])
    assert sorted(set(reported)) == failed
    assert run["exitCode"] == (1 if failed or run["leftovers"] else 0), run["stderr"]


@_root
def test_nothing_left_behind(run: dict[str, Any]) -> None:
    assert run["leftovers"] == []
    c = run["cluster"]
    assert Cluster(name=c["name"], state_dir=c["stateDir"], nodes=c["nodes"]).leftovers() == []


# ---- the runner's pure parts (no cluster) ---------------------------------------------------------


def test_every_data_file_has_a_test() -> None:
    used = {m for t in TESTS for m in t.manifests}
    assert used == set(os.listdir(TESTS_DIR))
    assert len({t.short_name for t in TESTS}) == len(TESTS)
    for t in TESTS:
        assert t.checks and set(t.clients()) <= set(CLIENTS), t.short_name
        assert profiles_of(t.features), f"{t.short_name} is in no profile"


HTTP_OUT = """[0] Url=http://echo/x
[0] StatusCode=302
[0] ResponseHeader=Location:http://example.org:8083/port
[0] ResponseHeader=X-Header-Set:v1
[1 body] Host=echo
[0 body] URL=/one/two?a=b
[0 body] RequestHeader=X-Header-Add:some-other-value
[0 body] RequestHeader=X-Header-Add:add-appends-values
[0 body] Namespace=gateway-conformance-mesh
[0 body] Hostname=echo-v1-kq9k4gg4t6-9d7b8
"""


def test_parse_and_compare() -> None:
    r = parse_response(HTTP_OUT)
    assert (r.code, r.hostname, r.url, r.host) == ("302", "echo-v1-kq9k4gg4t6-9d7b8", "/one/two?a=b",
                                                  "echo")
    assert r.request_headers["x-header-add"] == ["some-other-value", "add-appends-values"]
    assert backend_of_pod(r.hostname) == "echo-v1"
    ok = Expect(Request("/port", "echo"), status=(302,), redirect=Redirect(port="8083",
                                                                         host="example.org"))
    assert compare(ok, r) is None
    bad = Expect(Request("/port", "echo"), status=(302,), redirect=Redirect(port="8083"),
                 response_headers={"X-Header-Set": "v2"})
    assert compare(bad, r) == "expected header X-Header-Set=v2, got v1"
    r.code = "200"
    seen = Expect(Request("/x"), backend="echo-v1", namespace="gateway-conformance-mesh",
                  expected_request=ExpectedRequest(
                      path="/one/two?a=b",
                      headers={"x-header-add": "some-other-value,add-appends-values"},
                      absent_headers=["X-Header-Remove"]))
    assert compare(seen, r) is None
    seen.backend = "echo-v2"
    assert compare(seen, r) == "expected pod name to start with echo-v2, got echo-v1-kq9k4gg4t6-9d7b8"
    assert client_args(Request(host="{v2_ip}:8080", headers={"Host": "a"}), {"v2_ip": "10.0.0.2"}) == [
        "http://10.0.0.2:8080", "--method=GET", "-H", "Host:a"]
    assert client_args(Request("/p", "echo:80"))[0] == "http://echo/p"
    assert client_args(Request(host="echo:7070", protocol="grpc")) == ["grpc://echo:7070"]


def test_report_counts_like_upstream() -> None:
    outcomes = [Outcome("MeshBasic", ("Mesh",), "passed"),
                Outcome("MeshPorts", ("Mesh", "HTTPRoute", "HTTPRouteParentRefPort"), "failed"),
                Outcome("MeshGRPCRouteWeight", ("Mesh", "GRPCRoute"), "skipped"),
                Outcome("MeshHTTPRoute303Redirect",
                        ("Mesh", "HTTPRoute", "HTTPRoute303RedirectStatusCode"), "passed", True)]
    doc = build_report(outcomes, version="v0", date="d", gateway_api_version="g", url="u",
                       contact=["c"])
    http, grpc = doc["profiles"]
    assert http["core"]["statistics"] == {"Passed": 1, "Skipped": 0, "Failed": 0}
    assert http["extended"]["statistics"] == {"Passed": 1, "Skipped": 0, "Failed": 1}
    assert http["extended"]["failedTests"] == ["MeshPorts"]
    assert (http["core"]["result"], http["extended"]["result"]) == ("success", "failure")
    assert grpc["core"]["statistics"] == {"Passed": 1, "Skipped": 1, "Failed": 0}
    assert grpc["core"]["result"] == "partial" and grpc["core"]["skippedTests"] == [
        "MeshGRPCRouteWeight"]
    assert "HTTPRouteCORS" in http["extended"]["unsupportedFeatures"]
    assert doc["succeededProvisionalTests"] == ["MeshHTTPRoute303Redirect"]
