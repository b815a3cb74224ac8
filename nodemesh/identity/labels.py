"""Security labels: the label set that defines a pod's identity, Cilium style.

A pod's identity is derived from the labels that say *who* it is, not *which copy* it is: its own
labels minus the volatile ones a controller stamps on each replica (``pod-template-hash`` ...),
plus the namespace it lives in, the namespace's labels and its service account. Two pods with the
same security labels share one numeric identity, cluster-wide.

Stored form (what ``Identity.spec.labels`` and `security_labels` hold):

- labels that come from Kubernetes (the pod's, the namespace's, the service account) are stored
  **without** a source prefix: ``app=web``, ``io.kubernetes.pod.namespace=prod``,
  ``io.cilium.k8s.namespace.labels.team=a``. Every one of them has Cilium's source ``k8s``, so the
  prefix carries no information; leaving it out keeps ``nodemesh get identities`` readable and makes
  a NetworkPolicy ``podSelector`` match the stored labels as written.
- the labels of reserved identities (see `nodemesh.identity.reserved`) keep their source:
  ``reserved:host``, ``reserved:world`` ... (value ``""``). Kubernetes label keys can not contain
  ``:``, so the two forms never collide.

Selectors may name a source the Cilium way (``k8s:app``, ``any:app``, ``reserved:host``, or no
source, which means ``any``); `label_value` resolves such a key against the stored form.
"""

from __future__ import annotations

from collections.abc import Mapping

# Labels nodemesh itself adds; the names are Cilium's, so CiliumNetworkPolicies written for Cilium
# (``k8s:io.kubernetes.pod.namespace: prod``) select the same pods here.
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.kubernetes.pod.serviceaccount"
# Cilium's own name for the service account label; policies written for Cilium use this one.
CILIUM_SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
# The API server puts this label on every namespace (Kubernetes >= 1.21); we add it when a
# namespace object lacks it so `namespaceSelector: {kubernetes.io/metadata.name: x}` always works.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

RESERVED_SOURCE = "reserved"

# Labels a controller sets per replica or per revision: keeping them would give every replica (or
# every rollout) its own identity and defeat the point of identities. The list follows Cilium's
# default label filter (pkg/labelsfilter).
VOLATILE_LABELS = frozenset(
    {
        "pod-template-hash",
        "pod-template-generation",
        "controller-revision-hash",
        "controller-uid",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/job-completion-index",
        "batch.kubernetes.io/controller-uid",
        "etcd_node",
    }
)
# Pod labels under these prefixes are dropped: ``io.kubernetes.*`` and ``io.cilium.*`` are the
# names nodemesh adds itself (a pod labelled ``io.kubernetes.pod.namespace: kube-system`` must not
# pass for a kube-system pod); ``annotation.*`` and ``*beta.kubernetes.io*`` as Cilium does.
_DROPPED_PREFIXES = ("io.kubernetes.", "io.cilium.", "annotation.")


def is_volatile(key: str) -> bool:
    """True for a pod label that is not part of the pod's identity."""
    return (
        key in VOLATILE_LABELS
        or key.startswith(_DROPPED_PREFIXES)
        or "beta.kubernetes.io" in key
    )


def namespace_labels(namespace: Mapping | None, name: str) -> dict[str, str]:
    """The labels of a namespace object (a dict as stored), plus ``kubernetes.io/metadata.name``."""
    labels: dict[str, str] = {}
    if namespace is not None:
        labels.update((namespace.get("metadata") or {}).get("labels") or {})
    labels.setdefault(NAMESPACE_NAME_LABEL, name)
    return labels


def security_labels_from(
    pod_labels: Mapping[str, str],
    namespace: str,
    ns_labels: Mapping[str, str] | None = None,
    service_account: str | None = None,
) -> dict[str, str]:
    """The security labels of a pod given as plain parts (see the module docstring for the form)."""
    out = {k: str(v) for k, v in pod_labels.items() if not is_volatile(k)}
    out[NAMESPACE_LABEL] = namespace
    ns = dict(ns_labels or {})
    ns.setdefault(NAMESPACE_NAME_LABEL, namespace)
    for k, v in ns.items():
        out[NAMESPACE_LABELS_PREFIX + k] = str(v)
    if service_account:
        out[SERVICE_ACCOUNT_LABEL] = service_account
        out[CILIUM_SERVICE_ACCOUNT_LABEL] = service_account
    return dict(sorted(out.items()))


def security_labels(pod: Mapping, namespace: Mapping | None) -> dict[str, str]:
    """The labels that define a pod's identity (a Pod and its Namespace, as stored dicts).

    The pod's labels minus volatile ones, plus ``io.kubernetes.pod.namespace``, the namespace's
    labels as ``io.cilium.k8s.namespace.labels.<key>`` and, when the pod names one, its service
    account (``spec.serviceAccountName``, or the deprecated ``spec.serviceAccount``).
    """
    meta = pod.get("metadata") or {}
    ns_name = meta.get("namespace") or "default"
    spec = pod.get("spec") or {}
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount")
    ns_labels = namespace_labels(namespace, ns_name)
    return security_labels_from(meta.get("labels") or {}, ns_name, ns_labels, sa)


def split_source(key: str) -> tuple[str, str]:
    """``k8s:app`` → ("k8s", "app"); ``reserved:host`` → ("reserved", "host"); ``app`` → ("any", ...)."""
    source, sep, name = key.partition(":")
    if not sep:
        return "any", key
    return source, name


def label_value(labels: Mapping[str, str], key: str) -> str | None:
    """The value a selector key (``k8s:app``, ``any:app``, ``app``, ``reserved:host``) finds in a
    stored label set, or None when the key is absent.

    ``k8s:`` finds only Kubernetes labels (stored without prefix), ``reserved:`` only reserved
    ones, ``any:`` (or no source) either. Other sources (``cidr:``, ``container:`` ...) name labels
    nodemesh never creates and find nothing.
    """
    source, name = split_source(key)
    if source == "k8s":
        return labels.get(name) if ":" not in name else None
    if source == RESERVED_SOURCE:
        return labels.get(f"{RESERVED_SOURCE}:{name}")
    if source == "any":
        value = labels.get(name)
        if value is None:
            value = labels.get(f"{RESERVED_SOURCE}:{name}")
        return value
    return None


def namespace_of(labels: Mapping[str, str]) -> str | None:
    """The namespace a security label set belongs to (None for reserved identities)."""
    return labels.get(NAMESPACE_LABEL)


def namespace_labels_of(labels: Mapping[str, str]) -> dict[str, str]:
    """The namespace labels recorded in a security label set."""
    n = len(NAMESPACE_LABELS_PREFIX)
    return {k[n:]: v for k, v in labels.items() if k.startswith(NAMESPACE_LABELS_PREFIX)}


def pod_labels_of(labels: Mapping[str, str]) -> dict[str, str]:
    """The pod's own labels in a security label set: what a NetworkPolicy ``podSelector`` sees."""
    return {
        k: v
        for k, v in labels.items()
        if ":" not in k
        and not k.startswith(NAMESPACE_LABELS_PREFIX)
        and k not in (NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL, CILIUM_SERVICE_ACCOUNT_LABEL)
    }
