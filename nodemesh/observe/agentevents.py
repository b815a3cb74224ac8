"""Agent events: what the node agent itself did or saw, in the same stream as the flows.

Hubble's observer carries such events beside flows (`hubble observe --type agent`): an endpoint
regenerated, a policy imported, the agent started. nodemesh's agent puts one in its flow ring when
something a user should know about happens to the node's mesh parts — the node Envoy exited and
was restarted, a planned hot restart finished, a BPF map had no room for an object — so
`nodemesh observe` shows it where the user is already looking, and `--type agent` selects them.

An agent event is a flow-shaped dict with ``Type: "AGENT"`` and an ``agent_event`` member
(``type`` in upper snake case, a one-line ``message`` and type-specific fields).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from nodemesh.observe.flow import _uuid, rfc3339


class AgentEventType(StrEnum):
    AGENT_STARTED = "AGENT_STARTED"
    ENVOY_EXITED = "ENVOY_EXITED"  # the node Envoy ended on its own (crash, kill)
    ENVOY_STARTED = "ENVOY_STARTED"  # a new node Envoy serves the node's configuration
    ENVOY_HOT_RESTARTED = "ENVOY_HOT_RESTARTED"  # `nodemesh proxy restart` finished
    MAP_FULL = "MAP_FULL"  # a BPF map had no room for an object
    MAP_ROOM = "MAP_ROOM"  # every object fits again


AGENT_TYPE = "AGENT"


def agent_event(node: str, kind: AgentEventType, message: str,
                when: datetime | None = None, **fields: Any) -> dict:
    """A flow-shaped agent event for the flow ring."""
    return {
        "time": rfc3339(when or datetime.now(UTC)),
        "uuid": _uuid(),
        "Type": AGENT_TYPE,
        "node_name": node,
        "agent_event": {"type": str(kind), "message": message, **fields},
        "Summary": message,
    }


def is_agent_event(flow: Mapping) -> bool:
    return flow.get("Type") == AGENT_TYPE
