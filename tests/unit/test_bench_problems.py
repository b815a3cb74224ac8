"""What makes a benchmark run unusable (report.problems): errors at an open-loop rate a mode
cannot carry are its saturation, a result; errors where it could are a broken run."""

from __future__ import annotations

from typing import Any

from nodemesh.bench import report


def _summary(rps: float, errors: int, requests: int = 1000) -> dict[str, Any]:
    return {"failed_runs": 0, "requests": requests, "errors": errors,
            "error_fraction": errors / (errors + requests), "rps": {"median": rps}}


def _res(sidecar_max: float, sidecar_open_errors: int) -> dict[str, Any]:
    by_key = {"wrk": {m: _summary(3000, 0) for m in report.MODES},
              "open@2000": {m: _summary(2000, 0) for m in report.MODES}}
    by_key["wrk"]["sidecar"] = _summary(sidecar_max, 0)
    by_key["open@2000"]["sidecar"] = _summary(1700, sidecar_open_errors)
    return {"modes": list(report.MODES), "l7": {"available": True},
            "summary": {"traffic": {"echo/close/16k": by_key}}}


def test_errors_beyond_what_the_mode_carries_closed_loop_are_saturation() -> None:
    assert report.problems(_res(sidecar_max=842, sidecar_open_errors=295)) == []


def test_errors_at_a_rate_the_mode_carries_are_a_problem() -> None:
    assert report.problems(_res(sidecar_max=2300, sidecar_open_errors=295)) == [
        "echo/close/16k open@2000 sidecar: 22.8% errors"]


def test_errors_in_the_closed_loop_phase_are_always_a_problem() -> None:
    res = _res(sidecar_max=842, sidecar_open_errors=0)
    res["summary"]["traffic"]["echo/close/16k"]["wrk"]["sidecar"] = _summary(842, 50)
    assert report.problems(res) == ["echo/close/16k wrk sidecar: 4.8% errors"]


def test_beyond_capacity_only_judges_open_loop_rates() -> None:
    t = _res(842, 0)["summary"]["traffic"]
    assert report.beyond_capacity(t, "echo/close/16k", "open@2000", "sidecar")
    assert not report.beyond_capacity(t, "echo/close/16k", "open@500", "sidecar")
    assert not report.beyond_capacity(t, "echo/close/16k", "wrk", "sidecar")
    assert not report.beyond_capacity(t, "other", "open@2000", "sidecar")
