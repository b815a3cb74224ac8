"""Hostile manifests: nesting that would exhaust Python's stack, structures that contain
themselves, alias bombs. Each is an ``error: FILE: ...`` line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from nodemesh.errors import InvalidManifest
from nodemesh.model import manifest
from nodemesh.model.manifest import MAX_ALIAS_NODES, MAX_DEPTH, load_manifests

NS = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n"


def flow_seqs(n: int) -> str:
    return "[" * n


def flow_maps(n: int) -> str:
    return "{" * n


def json_deep(n: int) -> str:
    return '{"a": ' * n + "1" + "}" * n


def json_deep_lists(n: int) -> str:
    return "[" * n + "]" * n


def block_maps(n: int) -> str:
    """Valid YAML, block style: a: / b: / ... n levels deep."""
    return "".join(" " * i + f"k{i}:\n" for i in range(n)) + " " * n + "leaf: 1\n"


def block_seqs(n: int) -> str:
    """Valid YAML, block style: a sequence in a sequence, n levels deep."""
    return "".join(" " * (2 * i) + "-\n" for i in range(n)) + " " * (2 * n) + "- 1\n"


def recursive_alias() -> str:
    return NS.format("x").replace("  name: x\n", "  name: x\n  labels: &a {b: *a}\n")


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """The "billion laughs": each anchor is a list of `width` aliases of the one before."""
    lines = [NS.format("x") + "  labels:\n", "    l0: &l0 [" + ",".join(["x"] * width) + "]\n"]
    lines += [f"    l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * width) + "]\n"
              for i in range(1, levels + 1)]
    return "".join(lines)


HOSTILE = {
    "flow-sequences-100000.yaml": (flow_seqs(100_000), "nested more than"),
    "flow-mappings-100000.yaml": (flow_maps(100_000), "nested more than"),
    "json-objects-10000.json": (json_deep(10_000), "nested more than"),
    "json-arrays-10000.json": (json_deep_lists(10_000), "nested more than"),
    "block-mappings-10000.yaml": (block_maps(10_000), "nested more than"),
    "block-sequences-10000.yaml": (block_seqs(10_000), "nested more than"),
    "recursive-alias.yaml": (recursive_alias(), "contains itself"),
    "alias-bomb.yaml": (alias_bomb(), "aliases expand"),
}


def load_error(text: str, source: str) -> str:
    with pytest.raises(InvalidManifest) as e:
        load_manifests(text, source)
    [line] = e.value.errors
    return line


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_loader_refuses_hostile_input(name: str) -> None:
    text, problem = HOSTILE[name]
    line = load_error(text, name)
    assert line.startswith(f"{name}: line "), line
    assert problem in line


def test_the_depth_limit_is_exact() -> None:
    # The root mapping is level 1 and every [ one more: k lists reach level k + 1.
    def doc(k: int) -> str:
        return '{"kind": "X", "a": ' + "[" * k + "]" * k + "}"

    [obj] = load_manifests(doc(MAX_DEPTH - 1), "ok.json")
    assert obj["kind"] == "X"
    assert "nested more than" in load_error(doc(MAX_DEPTH), "deep.json")
    assert "nested more than" in load_error(block_maps(MAX_DEPTH), "deep.yaml")
    assert load_manifests(block_maps(MAX_DEPTH - 2) + "kind: X\n", "ok.yaml")[0]["kind"] == "X"


def test_aliases_count_the_depth_they_bring_in() -> None:
    half = MAX_DEPTH // 2 + 5
    text = "kind: X\nanchor: &deep " + "[" * half + "]" * half + "\nuse: " + "[" * half + \
        "*deep" + "]" * half + "\n"
    assert "nested more than" in load_error(text, "alias.yaml")


def test_ordinary_anchors_still_work() -> None:
    text = ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: &labels {app: web}\n"
            "  annotations: *labels\nspec:\n  containers:\n"
            "  - &c {name: a, image: debian, command: [sleep, '1']}\n  - *c\n")
    [pod] = load_manifests(text, "pod.yaml")
    assert pod["metadata"]["annotations"] == {"app": "web"}
    assert pod["spec"]["containers"][1] == {"name": "a", "image": "debian", "command": ["sleep", "1"]}
    # A moderate fan-out stays under the alias budget.
    small = alias_bomb(levels=3, width=10)
    assert MAX_ALIAS_NODES > 13_000  # about 12,300 nodes come in through aliases here
    assert load_manifests(small, "small.yaml")[0]["metadata"]["labels"]["l3"][0][0][0] == [
        "x"] * 10


def test_limits_apply_per_document() -> None:
    # Each document may use the whole depth on its own.
    one = '{"kind": "X", "a": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}\n"
    assert len(load_manifests(one + "---\n" + one, "two.yaml")) == 2


def test_recursion_error_is_a_backstop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the depth limit, the loader's own recursion fails; that too is an InvalidManifest.
    monkeypatch.setattr(manifest, "MAX_DEPTH", 10 ** 9)
    line = load_error(flow_seqs(5_000), "deep.yaml")
    assert line == "deep.yaml: nested too deeply"


# `apply` reads and validates every file before it opens the cluster's store, so a state
# directory without a cluster shows the loading error (and a missing cluster would say
# "no cluster in ..." with exit code 1 instead).
def run_apply(tmp_path: pathlib.Path, *args: str, stdin: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NODEMESH_STATE_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "nodemesh", "--state-dir", str(tmp_path / "no-cluster"), "apply",
         *args], input=stdin, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("name", ["flow-sequences-100000.yaml", "flow-mappings-100000.yaml",
                                  "json-objects-10000.json", "block-mappings-10000.yaml",
                                  "recursive-alias.yaml"])
def test_apply_reports_hostile_file(tmp_path: pathlib.Path, name: str) -> None:
    text, problem = HOSTILE[name]
    path = tmp_path / name
    path.write_text(text)
    p = run_apply(tmp_path, "-f", str(path))
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert "RecursionError" not in p.stderr
    assert p.stderr.startswith(f"error: {path}: line "), p.stderr
    assert problem in p.stderr
    assert p.stdout == ""
    assert not (tmp_path / "no-cluster").exists()


def test_apply_reports_hostile_stdin_with_other_files(tmp_path: pathlib.Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(NS.format("a"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "X"})[:-1] + ', "a": ' + json_deep_lists(50_000) + "}")
    p = run_apply(tmp_path, "-f", str(good), "-f", str(bad), "-f", "-", stdin=flow_maps(100_000))
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert [line.split(": line ")[0] for line in lines] == [f"error: {bad}", "error: stdin"], lines
    assert all("nested more than" in line for line in lines)
