"""Fuzz the flow-event decoder: arbitrary bytes give a flow dict or a ValueError (short input)."""

from __future__ import annotations

import ctypes

from hypothesis import event, given
from hypothesis import strategies as st

from nodemesh.observe.flow import _EV, StaticContext, decode_event, flow_from_event

SIZE = ctypes.sizeof(_EV)


@given(st.one_of(st.binary(min_size=SIZE, max_size=SIZE), st.binary(max_size=SIZE * 2)))
def test_decode_event_any_bytes(raw: bytes) -> None:
    try:
        fields = decode_event(raw)
    except ValueError:
        assert len(raw) < SIZE  # the only refusal: fewer bytes than a struct flow_event
        event("short")
        return
    flow = flow_from_event(fields, StaticContext(node_name="n1"))
    assert isinstance(flow, dict) and flow
    event("decoded")
