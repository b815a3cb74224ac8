"""Route status: ``status.parents[]`` with the Gateway API conditions, and Envoy NACKs.

Each route gets one `RouteParentStatus` per parentRef, in spec order, with two conditions:

- ``Accepted``: True/``Accepted`` when the parent Service (port) exists and the route applies
  to it; False with ``NoMatchingParent`` (no such Service, headless Service, no such port),
  ``Conflicted`` (a GRPCRoute took the port, GEP-1426 "Route types"), ``UnsupportedValue``
  (a filter nodemesh cannot do where it is used, or a NACK from Envoy).
- ``ResolvedRefs``: True/``ResolvedRefs``, or False with ``BackendNotFound``, ``InvalidKind`` or
  ``RefNotPermitted`` (the first problem found; the message lists all of them).

The translation does not know the time; every condition carries `TRANSITION_PLACEHOLDER` as
``lastTransitionTime``, and `stamp_transition_times` turns it into a real time the way the
Kubernetes API conventions want it (kept while the status of a condition does not change).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from nodemesh.route.inputs import CONTROLLER_NAME

TRANSITION_PLACEHOLDER = "1970-01-01T00:00:00Z"

ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"

# reasons
R_ACCEPTED = "Accepted"
R_NO_MATCHING_PARENT = "NoMatchingParent"
R_CONFLICTED = "Conflicted"
R_UNSUPPORTED_VALUE = "UnsupportedValue"
R_RESOLVED_REFS = "ResolvedRefs"
R_BACKEND_NOT_FOUND = "BackendNotFound"
R_INVALID_KIND = "InvalidKind"
R_REF_NOT_PERMITTED = "RefNotPermitted"

NACK_PREFIX = "Envoy rejected the configuration built from this route: "


def condition(ctype: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": TRANSITION_PLACEHOLDER,
    }


def parent_status(parent_ref: Mapping[str, Any], accepted: tuple[bool, str, str],
                  resolved: tuple[bool, str, str], generation: int) -> dict[str, Any]:
    """One ``status.parents[]`` entry; `accepted`/`resolved` are (ok, reason, message)."""
    return {
        "parentRef": dict(parent_ref),
        "controllerName": CONTROLLER_NAME,
        "conditions": [
            condition(ACCEPTED, *accepted, generation),
            condition(RESOLVED_REFS, *resolved, generation),
        ],
    }


def find_condition(status: Mapping[str, Any], parent: int, ctype: str) -> dict[str, Any] | None:
    parents = status.get("parents") or []
    if parent >= len(parents):
        return None
    return next((c for c in parents[parent]["conditions"] if c["type"] == ctype), None)


def with_nack(status: Mapping[str, Any], message: str,
              parents: tuple[int, ...] | None = None) -> dict[str, Any]:
    """A copy of a route status where Envoy's rejection shows: ``Accepted`` becomes False with
    reason ``UnsupportedValue`` and Envoy's message, on every parent (or on the `parents`
    indexes given). Envoy keeps serving its last good configuration meanwhile, so the route
    may still be in effect in an older form; the message says so."""
    out = copy.deepcopy(dict(status))
    for i, p in enumerate(out.get("parents") or []):
        if parents is not None and i not in parents:
            continue
        for c in p["conditions"]:
            if c["type"] == ACCEPTED:
                c["status"] = "False"
                c["reason"] = R_UNSUPPORTED_VALUE
                c["message"] = (NACK_PREFIX + message.strip()
                                + " (the proxy keeps its last accepted configuration)")
    return out


def stamp_transition_times(new: Mapping[str, Any], old: Mapping[str, Any] | None,
                           now: str) -> dict[str, Any]:
    """A copy of `new` whose placeholder transition times are filled: from `old` where the
    same parent's condition kept its status, else `now` (RFC 3339)."""
    out = copy.deepcopy(dict(new))
    old_parents = {_parent_key(p["parentRef"]): p for p in (old or {}).get("parents") or []}
    for p in out.get("parents") or []:
        before = old_parents.get(_parent_key(p["parentRef"]))
        old_conds = {c["type"]: c for c in (before or {}).get("conditions") or []}
        for c in p["conditions"]:
            if c.get("lastTransitionTime") != TRANSITION_PLACEHOLDER:
                continue
            prev = old_conds.get(c["type"])
            keep = prev is not None and prev.get("status") == c["status"] and \
                prev.get("lastTransitionTime") not in (None, TRANSITION_PLACEHOLDER)
            c["lastTransitionTime"] = prev["lastTransitionTime"] if keep and prev else now
    return out


def _parent_key(ref: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in ref.items()))
