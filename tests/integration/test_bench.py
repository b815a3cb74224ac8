"""`nodemesh bench --quick` end to end: every available mode carries traffic, every section
produces numbers (not the targets: those are for the full run), and nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


def test_every_available_mode_carried_traffic(quick: tuple) -> None:
    _, res, _ = quick
    modes = {"nomesh", "sidecar", "l4"}
    if res["l7"]["available"]:
        modes.add("l7")
    else:  # unavailable is reported with a reason, never faked
        assert res["l7"]["reason"]
        assert not any(c["mode"] == "l7" for c in res["traffic"]["cells"])
    seen: dict[str, list[dict]] = {m: [] for m in modes}
    for cell in res["traffic"]["cells"]:
        assert "error" not in cell, cell.get("error")
        seen[cell["mode"]].append(cell)
    for mode, cells in seen.items():
        assert cells, f"mode {mode}: no cell"
        for cell in cells:
            kinds = [ph["phase"]["kind"] for ph in cell["phases"]]
            assert kinds.count("wrk") == 1 and kinds.count("open") >= 2, (mode, kinds)
            for ph in cell["phases"]:
                assert "error" not in ph, (mode, cell["workload"], ph["error"])
                assert ph["requests"] > 0, (mode, cell["workload"], ph["phase"])
                assert ph["errors"] <= MAX_ERROR_FRACTION * (ph["requests"] + ph["errors"]), (
                    mode, cell["workload"], ph["phase"]["kind"], ph.get("error_kinds"))
                assert ph["latency_us"]["p50"] > 0 and ph["latency_us"]["p99"] > 0
            if mode == "l7":
                assert cell["node_envoy_requests"], "no request crossed the node Envoy"


def test_datapath_change_and_memory_produced_numbers(quick: tuple) -> None:
    _, res, _ = quick
    combos = {(c["datapath"], c["target"]) for c in res["datapath"]["cells"]}
    assert combos == {("none", "pod"), ("bpf", "pod"), ("bpf", "service")}
    for c in res["datapath"]["cells"]:
        for m in ("rr", "crr", "cps"):
            assert c[m]["count"] > 0 and c[m]["p50_us"] > 0 and not c[m]["errors"], (c, m)
    policy = res["change"]["policy"]
    assert policy["n"] > 0 and policy["p50_ms"] is not None and policy["p50_ms"] > 0
    if res["l7"]["available"]:
        assert res["change"]["route"]["p50_ms"] is not None
    [point] = res["memory"]["points"]
    assert point["pods"] == 10
    assert point["sidecar"]["processes"] >= 8 and point["sidecar"]["pss"] > 0
    assert point["nodemesh"]["agent"]["pss"] > 0 and point["nodemesh"]["bpf_maps"]["bytes"] > 0


def test_report_and_plots_written(quick: tuple) -> None:
    _, _, out = quick
    with open(os.path.join(out, "summary.md")) as f:
        text = f.read()
    assert "## Targets" in text and "## Traffic" in text and "## Memory" in text
    pngs = {name for name in os.listdir(out) if name.endswith(".png")}
    assert {"max-rate.png", "memory.png", "datapath.png"} <= pngs, pngs
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
