"""The datapath syncer tells a full map once per change of what it refused (MAP_FULL), and once
when everything fits again (MAP_ROOM); the metric counts the objects left out."""

from __future__ import annotations

from types import SimpleNamespace

from nodemesh.agent.datapath import DatapathSync
from nodemesh.node.fit import Refusal
from nodemesh.observe.metrics import AgentCollector


def syncer() -> tuple[DatapathSync, list[dict], list[list]]:
    events: list[dict] = []
    told: list[list] = []
    dp = DatapathSync.__new__(DatapathSync)
    dp.node = SimpleNamespace(name="node1")
    dp.flows = SimpleNamespace(add=events.append)
    dp.refusals = {}
    dp._capacities = {"nm_lb4_svc": 8, "nm_ipcache": 65536}
    dp.on_refusals = told.append
    return dp, events, told


def test_map_full_once_per_change_and_map_room_when_it_fits():
    dp, events, told = syncer()
    r = Refusal("nm_lb4_svc", 8, 9, "Service", ("default/c",))
    dp._report_refusals([r])
    dp._report_refusals([r])  # the same: nothing new to tell
    assert [e["agent_event"]["type"] for e in events] == ["MAP_FULL"]
    ev = events[0]["agent_event"]
    assert (ev["map"], ev["size"], ev["needed"], ev["objects"]) == ("nm_lb4_svc", 8, 9,
                                                                     ["default/c"])
    assert ev["raise_with"] == "nodemesh up --map-size nm_lb4_svc=N"
    assert dp.refused() == {"nm_lb4_svc": 1, "nm_ipcache": 0}
    dp._report_refusals([Refusal("nm_lb4_svc", 8, 12, "Service", ("default/c", "default/d"))])
    assert [e["agent_event"]["type"] for e in events] == ["MAP_FULL", "MAP_FULL"]
    dp._report_refusals([])
    assert events[-1]["agent_event"]["type"] == "MAP_ROOM"
    assert events[-1]["agent_event"]["map"] == "nm_lb4_svc"
    assert dp.refused() == {"nm_lb4_svc": 0, "nm_ipcache": 0}
    assert [len(t) for t in told] == [1, 1, 0]


def test_refused_metric():
    c = AgentCollector("node1", refused=lambda: {"nm_lb4_svc": 2})
    fams = {f.name: f for f in c.collect()}
    (sample,) = fams["nodemesh_map_refused"].samples
    assert sample.labels == {"map": "nm_lb4_svc"} and sample.value == 2
