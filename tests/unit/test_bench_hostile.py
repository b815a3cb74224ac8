"""The bench's hostile section summary (pure): medians per flood condition, ratios to no flood,
and its table in the report."""

from __future__ import annotations

from nodemesh.bench.report import _hostile_tables, summarize_hostile


def cell(flood: str, run: int, dns_p99: float, tcp_p99: float, synced: float,
         lost: int = 0) -> dict:
    return {"run": run, "flood": flood, "agent_cpu_share": 0.05,
            "victim": {"dns": {"n": 50, "lost": lost, "p50_ms": 0.3, "p99_ms": dns_p99},
                       "tcp": {"p50_us": 200.0, "p99_us": tcp_p99, "errors": 0},
                       "apply_synced_ms": synced}}


def test_medians_per_condition_and_ratios_to_no_flood() -> None:
    cells = [cell("none", 0, 2.0, 400, 30), cell("none", 1, 4.0, 600, 50),
             cell("dns", 0, 8.0, 500, 40, lost=1), cell("dns", 1, 12.0, 700, 60, lost=3),
             cell("connections", 0, 3.0, 2000, 300)]
    s = summarize_hostile(cells)
    assert list(s) == ["none", "dns", "connections"]
    assert s["none"]["dns_p99_ms"] == {"median": 3.0, "min": 2.0, "max": 4.0, "n": 2}
    assert s["dns"]["dns_lost"]["median"] == 2.0
    assert s["dns"]["ratios"]["dns_p99_ms"] == 10.0 / 3.0
    assert s["connections"]["ratios"]["tcp_p99_us"] == 4.0
    assert s["connections"]["ratios"]["apply_synced_ms"] == 7.5
    assert s["none"]["ratios"]["dns_p99_ms"] == 1.0


def test_a_failed_measurement_leaves_its_figure_empty() -> None:
    bad = {"run": 0, "flood": "dns", "agent_cpu_share": None,
           "victim": {"dns": {"error": "boom"}, "tcp": {"error": "boom"}, "apply_synced_ms": None}}
    s = summarize_hostile([cell("none", 0, 2.0, 400, 30), bad])
    assert s["dns"]["dns_p99_ms"]["median"] is None and s["dns"]["ratios"]["dns_p99_ms"] is None


def test_the_report_has_a_row_per_condition() -> None:
    s = {"hostile": summarize_hostile([cell("none", 0, 2.0, 400, 30),
                                       cell("dns", 0, 8.0, 500, 40)])}
    text = "\n".join(_hostile_tables(s))
    assert "## Hostile neighbours" in text
    assert "| none | 0.30 | 2.00 | 0 | 200 | 400 | 30.0 |" in text
    assert "| dns |" in text and "4.00" in text
    assert _hostile_tables({}) == []
