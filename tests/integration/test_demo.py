"""`nodemesh demo` (what `make demo` runs) in a private state dir: it finishes, and its report
shows forwarded, dropped and L7 flows and a canary split within 5 points of 90/10."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.integration.clusterharness import Cluster, become_subreaper

pytestmark = pytest.mark.root  # real clusters: namespaces, cgroups, BPF


def test_demo_report() -> None:
    become_subreaper()
    state = tempfile.mkdtemp(prefix="nodemesh-demo-")
    c = Cluster(name="nodemesh", state_dir=state, nodes=2)
    if any(n.startswith("nodemesh-node") for n in os.listdir("/run/netns")
           if os.path.isdir("/run/netns")):
        import pytest

        pytest.skip("a cluster named 'nodemesh' (the demo's) is already up on this machine")
    try:
        p = subprocess.run([sys.executable, "-m", "nodemesh", "--state-dir", state, "demo",
                            "-o", "json"], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        text, _, js = p.stdout.partition("\n{")
        report = json.loads("{" + js)
        assert "== canary" in text and "nodemesh ui" in text
        assert report["verdicts"].get("FORWARDED", 0) > 0
        assert report["verdicts"].get("DROPPED", 0) > 0
        assert report["l7_flows"] > 0
        assert "POLICY_DENIED" in report["drops"]
        split = report["canary"]["split_percent"]
        assert abs(split["v1"] - 90) <= 5 and abs(split["v2"] - 10) <= 5, split
        assert report["intruder"]["l7"] == {"403": 20}
        assert report["intruder"]["l4"] == {"blocked": 3}
    finally:
        c.down()
        assert not c.leftovers()
