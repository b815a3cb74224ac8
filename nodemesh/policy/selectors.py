"""Label selector matching for policies: Kubernetes LabelSelectors, with Cilium's source prefixes.

Kubernetes selectors (NetworkPolicy ``podSelector``/``namespaceSelector``) match plain labels.
Cilium selectors (``endpointSelector``, ``fromEndpoints``) may prefix a key with its source:
``k8s:app``, ``any:app`` or ``app`` (= any), ``reserved:host``. Matching goes through
`nodemesh.identity.labels.label_value`, which knows how security labels are stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodemesh.identity.labels import (
    NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX,
    label_value,
    split_source,
)
from nodemesh.model.labels import Lookup, plain_label, selector_matches


def matches(
    selector: Mapping[str, Any] | None, labels: Mapping[str, str], lookup: Lookup = plain_label
) -> bool:
    """Does a LabelSelector select these labels? None selects nothing, ``{}`` everything.

    Kubernetes selectors match the plain label names; the matching itself is
    `nodemesh.model.labels.selector_matches`, the one implementation.
    """
    return selector_matches(selector, labels, lookup)


def cilium_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Match a Cilium selector (source-prefixed keys) against a stored security label set."""
    return matches(selector, labels, label_value)


def _keys(selector: Mapping[str, Any]) -> list[str]:
    keys = list((selector.get("matchLabels") or {}).keys())
    keys += [e.get("key", "") for e in selector.get("matchExpressions") or []]
    return keys


def _is_namespace_key(key: str) -> bool:
    source, name = split_source(key)
    return source in ("k8s", "any") and name == NAMESPACE_LABEL


def names_namespace(selector: Mapping[str, Any]) -> bool:
    """Does a Cilium peer selector say which namespaces it means (so the policy's own namespace is
    not implied)? True when it has a key for the pod namespace label, for a namespace label
    (``io.cilium.k8s.namespace.labels.*``) or for a reserved label, as Cilium decides it."""
    for key in _keys(selector):
        source, name = split_source(key)
        if source == "reserved":
            return True
        if source in ("k8s", "any") and (
            name == NAMESPACE_LABEL or name.startswith(NAMESPACE_LABELS_PREFIX)
        ):
            return True
    return False


def scope_peer_selector(selector: Mapping[str, Any] | None, namespace: str) -> dict[str, Any]:
    """A CiliumNetworkPolicy peer selector as Cilium applies it: without a namespace (or
    namespace-label, or reserved) key, it only selects endpoints in the policy's namespace.

    So ``fromEndpoints: [{}]`` means every pod in the policy's namespace, not the cluster
    (https://github.com/cilium/cilium/pull/14580).
    """
    sel = dict(selector or {})
    if names_namespace(sel):
        return sel
    labels = dict(sel.get("matchLabels") or {})
    labels[f"k8s:{NAMESPACE_LABEL}"] = namespace
    sel["matchLabels"] = labels
    return sel


def scope_subject_selector(selector: Mapping[str, Any] | None, namespace: str) -> dict[str, Any]:
    """A CiliumNetworkPolicy ``endpointSelector`` as Cilium applies it: it always selects in the
    policy's own namespace; a namespace match in ``matchLabels`` is replaced by it (Cilium logs a
    warning and does the same)."""
    sel = dict(selector or {})
    labels = {k: v for k, v in (sel.get("matchLabels") or {}).items() if not _is_namespace_key(k)}
    labels[f"k8s:{NAMESPACE_LABEL}"] = namespace
    sel["matchLabels"] = labels
    return sel
