"""Labels and label selectors: syntax checks and matching, as Kubernetes defines them.

Two kinds of selector exist in the API and they behave differently when empty:

- a `LabelSelector` (Deployment ``spec.selector``, NetworkPolicy ``podSelector``, Cilium's
  ``endpointSelector``) has ``matchLabels`` and ``matchExpressions``; ``{}`` selects everything
  and an absent selector (None) selects nothing;
- a Service's ``spec.selector`` is a plain map; empty or absent selects nothing.

`selector_matches` is the one LabelSelector matcher: the model, the policy compiler
(`nodemesh.policy.selectors`, with the security-label lookup), the CLI's ``-l`` and the flow
filters all call it. `parse_selector` reads kubectl's ``-l`` syntax into a LabelSelector.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from nodemesh.errors import NodemeshError
from nodemesh.model.names import check_dns1123_subdomain

# How a selector key finds its value in a label set (None: the label is not there).
Lookup = Callable[[Mapping[str, str], str], str | None]

_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")

# Cilium lets selector keys name the source of a label (``k8s:app``, ``any:app``). Kubernetes
# label keys never contain ':', so stripping these prefixes cannot change a plain selector.
CILIUM_SOURCES = ("k8s", "any")

LABEL_NAME_MSG = ("a name of at most 63 characters of letters, digits, '-', '_' and '.', "
                  "starting and ending with a letter or digit")


def validate_label_key(key: str) -> str | None:
    """The problem with a label key (``[prefix/]name``), or None when it is valid."""
    if not isinstance(key, str):
        return "must be a string"
    if key.count("/") > 1:
        return f'"{key}" has more than one "/": a label key is [prefix/]name'
    prefix, _, name = key.rpartition("/")
    if "/" in key:
        if not prefix:
            return f'"{key}" has an empty prefix before "/"'
        problem = check_dns1123_subdomain(prefix)
        if problem:
            return f'prefix "{prefix}" {problem}'
    if not name:
        return f'"{key}" has an empty name' if key else "must not be empty"
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return f'"{name}" must be {LABEL_NAME_MSG}'
    return None


def validate_label_value(value: str) -> str | None:
    """The problem with a label value, or None when it is valid (empty is valid)."""
    if not isinstance(value, str):
        return "must be a string"
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        return f"must be empty or {LABEL_NAME_MSG}"
    return None


def split_cilium_source(key: str) -> tuple[str | None, str]:
    """``k8s:app`` → ("k8s", "app"); ``app`` → (None, "app"); ``foo:app`` → ("foo", "app")."""
    if ":" in key:
        source, _, rest = key.partition(":")
        return source, rest
    return None, key


def validate_cilium_label_key(key: str) -> str | None:
    """A Cilium selector key: an optional ``k8s:`` or ``any:`` source, then a label key."""
    source, rest = split_cilium_source(key)
    if source is not None and source not in CILIUM_SOURCES:
        return (f'label source "{source}:" is not supported by nodemesh '
                f"(use {' or '.join(s + ':' for s in CILIUM_SOURCES)} or no source)")
    return validate_label_key(rest)


def _bare(key: str) -> str:
    source, rest = split_cilium_source(key)
    return rest if source in CILIUM_SOURCES else key


def plain_label(labels: Mapping[str, str], key: str) -> str | None:
    """The label named exactly `key` (Kubernetes selectors)."""
    return labels.get(key)


def bare_label(labels: Mapping[str, str], key: str) -> str | None:
    """The label named `key` without a Cilium ``k8s:``/``any:`` source prefix."""
    return labels.get(_bare(key))


def selector_matches(
    selector: Mapping[str, Any] | None, labels: Mapping[str, str], lookup: Lookup = bare_label
) -> bool:
    """Does a LabelSelector select an object with these labels? None selects nothing, {} all.

    `lookup` finds a key's value; by default keys may carry Cilium's ``k8s:``/``any:`` source
    prefixes and match the plain label. Operators: In, NotIn, Exists, DoesNotExist (validation
    refuses others; an unknown one selects nothing: never grant on something not understood).
    """
    if selector is None:
        return False
    for key, want in (selector.get("matchLabels") or {}).items():
        if lookup(labels, key) != str(want):
            return False
    for expr in selector.get("matchExpressions") or []:
        value = lookup(labels, expr.get("key", ""))
        values = [str(v) for v in expr.get("values") or []]
        op = expr.get("operator")
        if op == "In":
            ok = value is not None and value in values
        elif op == "NotIn":
            ok = value is None or value not in values
        elif op == "Exists":
            ok = value is not None
        elif op == "DoesNotExist":
            ok = value is None
        else:
            ok = False
        if not ok:
            return False
    return True


def service_selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Does a Service's map selector pick a pod with these labels? Empty or None picks none."""
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


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
