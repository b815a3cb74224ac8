"""`nodemesh bench --quick` end to end: every mode carries traffic, every section produces
numbers (not the targets: those are for the full run), the mTLS section's traffic really goes in
mutual TLS, and nothing is left behind.

The bench itself reports L7 as unavailable (with its reason) and goes on without it; this smoke
test does not: here L7 (the node Envoy) must work, so an unavailable L7 fails it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# real clusters; serial: its figures (rates, recovery times, load it must carry) need the CPUs
# to itself, so `make test` runs it after the parallel part, alone
pytestmark = [pytest.mark.root, pytest.mark.serial]

MAX_ERROR_FRACTION = 0.01


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = str(tmp_path_factory.mktemp("bench"))
    p = subprocess.run([sys.executable, "-m", "nodemesh.bench", "--quick", "--out", out],
                       capture_output=True, text=True, timeout=540)
    path = os.path.join(out, "results.json")
    assert os.path.exists(path), f"no results.json; exit {p.returncode}:\n{p.stderr[-3000:]}"
    with open(path) as f:
        return p, json.load(f), out


def test_exits_zero_without_failure(quick: tuple) -> None:
    p, res, _ = quick
    assert res["failed"] is None, res["failed"]
    assert p.returncode == 0, p.stderr[-3000:]


def check_cells(cells: list[dict], modes: set[str]) -> None:
    """Every mode has cells, and every phase of them carried traffic with few errors."""
    seen: dict[str, list[dict]] = {m: [] for m in modes}
    for cell in cells:
        assert "error" not in cell, cell.get("error")
        seen[cell["mode"]].append(cell)
    for mode, cells in seen.items():
        assert cells, f"mode {mode}: no cell"
        for cell in cells:
            kinds = [ph["phase"]["kind"] for ph in cell["phases"]]
            assert kinds.count("wrk") == 1 and kinds.count("open") >= 2, (mode, kinds)
            wrk = next(ph for ph in cell["phases"] if ph["phase"]["kind"] == "wrk")
            for ph in cell["phases"]:
                assert "error" not in ph, (mode, cell["workload"], ph["error"])
                assert ph["requests"] > 0, (mode, cell["workload"], ph["phase"])
                # an open-loop rate above what the mode carried closed-loop may time out: it
                # saturated (a slower machine saturates sooner); below it, errors are a defect
                if ph["phase"].get("rate", 0) > wrk["achieved_rps"]:
                    continue
                assert ph["errors"] <= MAX_ERROR_FRACTION * (ph["requests"] + ph["errors"]), (
                    mode, cell["workload"], ph["phase"]["kind"], ph.get("error_kinds"))
                assert ph["latency_us"]["p50"] > 0 and ph["latency_us"]["p99"] > 0
            if mode in ("l7", "l7-mtls"):
                assert cell["node_envoy_requests"], "no request crossed the node Envoy"


def with_l7(modes: set[str], l7: dict, l7_mode: str) -> set[str]:
    """The modes and the L7 one, which must be available: the smoke test fails without it."""
    assert l7["available"], f"nodemesh L7 unavailable: {l7.get('reason')} {l7.get('evidence', '')}"
    return modes | {l7_mode}


def test_every_mode_carried_traffic(quick: tuple) -> None:
    _, res, _ = quick
    cells = res["traffic"]["cells"]
    check_cells(cells, with_l7({"nomesh", "sidecar", "l4"}, res["l7"], "l7"))


def test_mtls_section_went_across_nodes_in_mutual_tls(quick: tuple) -> None:
    _, res, _ = quick
    sec = res["mtls"]
    cells = sec["cells"]
    check_cells(cells, with_l7({"nomesh", "sidecar-mtls", "l4-mtls"}, sec["l7"], "l7-mtls"))
    for cell in cells:
        if cell["mode"] in ("l4-mtls", "l7-mtls"):  # through the server node's tunnel, never clear
            assert cell["tunnel"]["bytes"] > 0 and cell["tunnel"]["connections"] > 0, cell["tunnel"]
            assert cell["tunnel"]["plaintext_connections"] == 0, cell["tunnel"]
        if cell["mode"] == "sidecar-mtls":  # on the client sidecar's TLS-only clusters
            st = cell["sidecar_stats"]
            assert "error" not in st, st
            assert sum(v for k, v in st.items() if k.endswith(".upstream_rq_total")) > 0, st
            assert sum(v for k, v in st.items() if k.endswith(".ssl.handshake")) > 0, st
            assert not sum(v for k, v in st.items() if k.endswith(".ssl.connection_error")), st
    assert set(sec["sidecar_identities"]) == {"client", "default"}
    [point] = sec["memory"]["points"]
    assert point["pods"] == 10 and point["node"] == "node2"
    assert point["sidecar"]["processes"] == 10 and point["sidecar"]["pss"] > 0
    assert point["nodemesh"]["pods"] == 10 and point["nodemesh"]["certificates"]
    assert point["nodemesh"]["envoy"]["pss"] > 0 and point["nodemesh"]["bpf_maps"]["bytes"] > 0
    targets = res["summary"]["targets"]["mtls"]
    assert targets["max_rate"]["count"] >= 1 and targets["memory"]["pods"] == 10


def test_datapath_change_and_memory_produced_numbers(quick: tuple) -> None:
    _, res, _ = quick
    combos = {(c["datapath"], c["target"]) for c in res["datapath"]["cells"]}
    assert combos == {("none", "pod"), ("bpf", "pod"), ("bpf", "service")}
    for c in res["datapath"]["cells"]:
        for m in ("rr", "crr", "cps"):
            assert c[m]["count"] > 0 and c[m]["p50_us"] > 0 and not c[m]["errors"], (c, m)
    policy = res["change"]["policy"]
    assert policy["n"] > 0 and policy["p50_ms"] is not None and policy["p50_ms"] > 0
    assert res["l7"]["available"], f"nodemesh L7 unavailable: {res['l7'].get('reason')}"
    assert res["change"]["route"].get("p50_ms") is not None, res["change"]["route"]
    [point] = res["memory"]["points"]
    assert point["pods"] == 10
    assert point["sidecar"]["processes"] >= 8 and point["sidecar"]["pss"] > 0
    assert point["nodemesh"]["agent"]["pss"] > 0 and point["nodemesh"]["bpf_maps"]["bytes"] > 0


def test_report_and_plots_written(quick: tuple) -> None:
    _, _, out = quick
    with open(os.path.join(out, "summary.md")) as f:
        text = f.read()
    assert "## Targets" in text and "## Traffic" in text and "## Memory" in text
    assert "## mTLS across nodes" in text and "mTLS: nodemesh's max rate" in text
    pngs = {name for name in os.listdir(out) if name.endswith(".png")}
    assert {"max-rate.png", "memory.png", "datapath.png", "mtls-max-rate.png",
            "mtls-memory.png"} <= pngs, pngs
    assert any(n.startswith("mtls-latency-") for n in pngs), pngs
    assert any(n.startswith("latency-") for n in pngs), pngs


def test_nothing_left_behind(quick: tuple) -> None:
    _, res, _ = quick
    assert res["leftovers"] == []
    assert not os.path.exists(res["work_dir"])
    names = list(res["clusters"].values())
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if any(n.startswith(c + "-") for c in names)]
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        assert not [c for c in names if os.path.isdir(os.path.join(root, c))]
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(f"nodemesh-{c}-" in cmd or f"/{c}/" in cmd for c in names) or res["work_dir"] in cmd:
            procs.append(cmd[:120])
    assert not procs, procs
