"""Labels and label selectors: syntax checks and matching, as Kubernetes defines them.

Two kinds of selector exist in the API and they behave differently when empty:

- a `LabelSelector` (Deployment ``spec.selector``, NetworkPolicy ``podSelector``, Cilium's
  ``endpointSelector``) has ``matchLabels`` and ``matchExpressions``; ``{}`` selects everything
  and an absent selector (None) selects nothing;
- a Service's ``spec.selector`` is a plain map; empty or absent selects nothing.
"""

from __future__ import annotations

import re

from nodemesh.model.names import check_dns1123_subdomain

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


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """Does a LabelSelector select an object with these labels? None selects nothing, {} all.

    Keys may carry Cilium's ``k8s:``/``any:`` source prefixes; they match the plain label.
    """
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(_bare(k)) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op = _bare(expr["key"]), expr["operator"]
        values = expr.get("values") or []
        present = key in labels
        if op == "In":
            ok = present and labels[key] in values
        elif op == "NotIn":
            ok = not present or labels[key] not in values
        elif op == "Exists":
            ok = present
        elif op == "DoesNotExist":
            ok = not present
        else:  # validation refuses other operators; never select on an unknown one
            ok = False
        if not ok:
            return False
    return True


def service_selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """Does a Service's map selector pick a pod with these labels? Empty or None picks none."""
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())
