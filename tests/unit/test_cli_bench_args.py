"""`nodemesh bench ARGS`: every word after `bench` reaches the benchmark's own parser.

No benchmark runs here: the entry point `cmd_bench` calls (`nodemesh.bench.main`) is replaced by
one that only parses its arguments with the benchmark's real parser, and the real runner is
replaced by one that fails the test.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

import nodemesh.bench
import nodemesh.bench.run
from nodemesh.cli.main import build_parser, main

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], argparse.Namespace]]:
    calls: list[tuple[list[str], argparse.Namespace]] = []

    def fake_main(argv: list[str]) -> int:
        # The benchmark's own parser, unchanged: it exits 2 on an unknown option.
        calls.append((list(argv), nodemesh.bench.run.build_parser().parse_args(argv)))
        return 0

    def must_not_run(argv: list[str]) -> int:
        raise AssertionError(f"the real benchmark was started with {argv}")

    monkeypatch.setattr(nodemesh.bench, "main", fake_main)
    monkeypatch.setattr(nodemesh.bench.run, "main", must_not_run)
    monkeypatch.delenv("NODEMESH_STATE_DIR", raising=False)
    return calls


@pytest.mark.parametrize("words", [
    [], ["--quick"], ["--quick", "--out", "/tmp/b"], ["--out=/tmp/b", "--runs", "3", "--quick"],
    ["--modes", "l4,l7", "--no-plots"], ["--render", "r.json"], ["-h"], ["--help"], ["--bogus"],
    ["--state-dir", "x"],
])
def test_parser_hands_every_word_to_the_benchmark(words: list[str]) -> None:
    args, extra = build_parser().parse_known_args(["bench", *words])
    assert extra == []
    assert args.command == "bench"
    assert args.bench_args == words


def test_bench_quick(bench_calls: list) -> None:
    assert main(["bench", "--quick"]) == 0
    [(argv, ns)] = bench_calls
    assert argv == ["--quick"]
    assert ns.quick is True and ns.out is None


def test_bench_quick_out(bench_calls: list, tmp_path: pathlib.Path) -> None:
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    [(argv, ns)] = bench_calls
    assert argv == ["--quick", "--out", str(tmp_path)]
    assert ns.quick is True and ns.out == str(tmp_path)


def test_bench_without_options_and_after_double_dash(bench_calls: list) -> None:
    assert main(["bench"]) == 0
    assert main(["bench", "--", "--quick"]) == 0
    assert [argv for argv, _ in bench_calls] == [[], ["--quick"]]
    assert [ns.quick for _, ns in bench_calls] == [False, True]


def test_unknown_option_is_the_benchmarks_error(bench_calls: list,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: nodemesh bench [-h] [--quick]"), err
    assert err.rstrip().endswith("nodemesh bench: error: unrecognized arguments: --bogus"), err
    assert bench_calls == []


def test_state_dir_is_refused(bench_calls: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--state-dir", "/tmp/nowhere", "bench", "--quick"]) == 2
    assert "--state-dir does not apply" in capsys.readouterr().err
    assert bench_calls == []


def test_make_bench_quick(bench_calls: list) -> None:
    """The Makefile's bench-quick recipe, with the arguments it gives the CLI."""
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^bench-quick:.*\n\t(.+)$", makefile, re.M)
    assert m, "no bench-quick target"
    words = shlex.split(m.group(1))
    assert words[0].endswith("/nodemesh")
    assert main(words[1:]) == 0
    [(argv, ns)] = bench_calls
    assert argv == ["--quick"] and ns.quick is True


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_help_prints_the_benchmarks_options(flag: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NODEMESH_STATE_DIR"}
    p = subprocess.run([sys.executable, "-m", "nodemesh", "bench", flag], capture_output=True,
                       text=True, timeout=60, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: nodemesh bench "), p.stdout
    for option in ("--quick", "--out DIR", "--runs RUNS", "--modes MODES", "--sections",
                   "--no-plots", "--render RESULTS_JSON"):
        assert option in p.stdout, option
