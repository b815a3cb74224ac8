"""kubectl's label-selector syntax (`-l app=web,tier!=db,!canary,env in (a,b)`)."""

from __future__ import annotations

import re

from nodemesh.errors import NodemeshError

_SEL_RE = re.compile(r"^\s*(!?)([A-Za-z0-9./_-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|"
                     r"\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def parse_selector(text: str) -> dict:
    """kubectl's -l syntax (`a=b,c!=d,e,!f,g in (x,y)`) → a LabelSelector."""
    parts = re.split(r",(?![^()]*\))", text)
    match_labels: dict[str, str] = {}
    exprs: list[dict] = []
    for part in parts:
        m = _SEL_RE.match(part)
        if not m:
            raise NodemeshError(f"-l {text!r}: cannot parse {part.strip()!r}", 2)
        neg, key, op, val, setop, setvals = m.groups()
        if op in ("=", "=="):
            match_labels[key] = val
        elif op == "!=":
            exprs.append({"key": key, "operator": "NotIn", "values": [val]})
        elif setop:
            exprs.append({"key": key, "operator": "In" if setop == "in" else "NotIn",
                          "values": [v.strip() for v in setvals.split(",") if v.strip()]})
        else:
            exprs.append({"key": key, "operator": "DoesNotExist" if neg else "Exists"})
    return {"matchLabels": match_labels, "matchExpressions": exprs}
