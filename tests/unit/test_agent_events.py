"""Agent events in the flow stream: printed, filtered by `--type agent`, counted, not edges."""

from __future__ import annotations

from nodemesh.cli.printer import as_table, compact
from nodemesh.observe.agentevents import AgentEventType, agent_event, is_agent_event
from nodemesh.observe.filters import FlowFilter, matches
from nodemesh.observe.metrics import AgentMetrics


def _ev() -> dict:
    return agent_event("node1", AgentEventType.ENVOY_EXITED,
                       "the node Envoy (pid 42) was killed by SIGKILL; starting another", pid=42)


def test_shape() -> None:
    ev = _ev()
    assert is_agent_event(ev)
    assert ev["agent_event"] == {"type": "ENVOY_EXITED", "pid": 42,
                                 "message": "the node Envoy (pid 42) was killed by SIGKILL; "
                                            "starting another"}
    assert ev["time"].endswith("Z") and ev["node_name"] == "node1"


def test_compact_and_table() -> None:
    line = compact(_ev())
    assert "[node1] agent ENVOY_EXITED: the node Envoy (pid 42) was killed by SIGKILL" in line
    assert "agent-event" in as_table([_ev()])


def test_type_filter() -> None:
    assert matches(FlowFilter(type=["agent"]), _ev())
    assert not matches(FlowFilter(type=["trace"]), _ev())
    assert not matches(FlowFilter(type=["drop"]), _ev())
    assert not matches(FlowFilter(type=["l7"]), _ev())
    assert not matches(FlowFilter(verdict=["DROPPED"]), _ev())
    assert not matches(FlowFilter(pod=["default/x"]), _ev())
    assert matches(FlowFilter(), _ev())
    assert not matches(FlowFilter(type=["agent"]), {"Type": "L3_L4", "verdict": "FORWARDED"})


def test_counted_apart_from_flows() -> None:
    m = AgentMetrics("node1")
    m.observe(_ev())
    m.observe(_ev())
    assert m.agent_events == {"ENVOY_EXITED": 2}
    assert not m.flow_counts


def test_flow_ring_counts_what_it_overwrites() -> None:
    from nodemesh.observe.ring import FlowRing

    ring = FlowRing(capacity=3)
    for i in range(5):
        ring.add({"n": i})
    assert len(ring) == 3 and ring.total == 5 and ring.overwritten == 2
    assert [f["n"] for f in ring.snapshot()] == [2, 3, 4]
