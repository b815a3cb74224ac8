"""Route status helpers: NACKs and lastTransitionTime."""

from __future__ import annotations

from nodemesh.route import stamp_transition_times, with_nack
from nodemesh.route.status import TRANSITION_PLACEHOLDER, find_condition, parent_status

REF = {"group": "", "kind": "Service", "name": "web", "port": 80}
OTHER = {"group": "", "kind": "Service", "name": "api"}


def status(ok: bool = True) -> dict:
    accepted = (True, "Accepted", "ok") if ok else (False, "NoMatchingParent", "gone")
    return {"parents": [parent_status(REF, accepted, (True, "ResolvedRefs", "ok"), 3),
                        parent_status(OTHER, accepted, (True, "ResolvedRefs", "ok"), 3)]}


def test_with_nack_marks_accepted_false_and_keeps_the_input() -> None:
    s = status()
    nacked = with_nack(s, "missing ]: [\n")
    for i in (0, 1):
        c = find_condition(nacked, i, "Accepted")
        assert c["status"] == "False" and c["reason"] == "UnsupportedValue"
        assert "missing ]: [" in c["message"] and "last accepted configuration" in c["message"]
        assert find_condition(nacked, i, "ResolvedRefs")["status"] == "True"
    assert find_condition(s, 0, "Accepted")["status"] == "True"  # a copy


def test_with_nack_on_some_parents() -> None:
    nacked = with_nack(status(), "bad", parents=(1,))
    assert find_condition(nacked, 0, "Accepted")["status"] == "True"
    assert find_condition(nacked, 1, "Accepted")["status"] == "False"


def test_stamp_transition_times() -> None:
    first = stamp_transition_times(status(), None, "2025-01-01T00:00:00Z")
    c = find_condition(first, 0, "Accepted")
    assert c["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    # Unchanged status: the old time stays.
    again = stamp_transition_times(status(), first, "2025-02-01T00:00:00Z")
    assert find_condition(again, 0, "Accepted")["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    # Changed status: now.
    changed = stamp_transition_times(status(ok=False), first, "2025-03-01T00:00:00Z")
    assert find_condition(changed, 0, "Accepted")["lastTransitionTime"] == "2025-03-01T00:00:00Z"
    assert find_condition(changed, 0, "ResolvedRefs")["lastTransitionTime"] == \
        "2025-01-01T00:00:00Z"
    assert find_condition(status(), 0, "Accepted")["lastTransitionTime"] == TRANSITION_PLACEHOLDER
