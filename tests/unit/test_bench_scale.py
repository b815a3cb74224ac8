"""The scale section's pure parts: the objects it applies are valid and distinct, and its report
judges the issue's targets at 1,000 services."""

from __future__ import annotations

from nodemesh.bench import scale
from nodemesh.model.validate import validate_objects


def test_the_objects_validate_and_every_endpoint_is_distinct():
    objs = [o for i in range(50) for o in (scale.service(i), scale.endpoint_slice(i, ["a", "b"]))]
    valid = validate_objects(objs, "scale")
    assert len(valid) == 100
    addrs = [e["addresses"][0] for o in valid if o["kind"] == "EndpointSlice"
             for e in o["endpoints"]]
    assert len(addrs) == len(set(addrs)) == 50 * scale.ENDPOINTS
    assert all(a.startswith("10.2") for a in addrs)


def test_a_change_moves_one_endpoint_only():
    a, b = scale.endpoint_slice(7, ["a"]), scale.endpoint_slice(7, ["a"], moved=3)
    diff = [i for i, (x, y) in enumerate(zip(a["endpoints"], b["endpoints"], strict=True))
            if x != y]
    assert diff == [0]


def _point(n: int, p99: float, relist: float, rss: float, missed: int = 0) -> dict:
    return {"services": n, "endpoints": n * 10, "apply_s": 1.0, "converge_s": 2.0,
            "agent_rss_mb": {"node1": rss, "node2": rss - 1}, "last_sync_s": {"node1": 0.1},
            "change": {"p50_ms": p99 / 2, "p99_ms": p99, "missed": missed},
            "relist": {"seconds_max": relist}}


def test_targets_are_judged_at_1000_services():
    sec = {"points": [_point(100, 20, 0.1, 80), _point(1000, 90, 1.5, 149),
                      _point(5000, 900, 6, 300)]}
    t = scale.targets(sec)
    assert t["services"] == 1000 and t["change_met"] and t["relist_met"] and t["rss_met"]
    sec["points"][1] = _point(1000, 120, 2.5, 151)
    t = scale.targets(sec)
    assert not (t["change_met"] or t["relist_met"] or t["rss_met"])
    sec["points"][1] = _point(1000, 50, 1, 100, missed=1)
    assert not scale.targets(sec)["change_met"]  # a change that never took effect fails it
    md = "\n".join(scale.markdown(sec))
    assert "| 5,000 | 50,000 |" in md and "MISSED" in md
