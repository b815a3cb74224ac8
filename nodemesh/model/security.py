"""Schemas of ServiceAccount and of Istio's PeerAuthentication (security.istio.io).

A pod's ServiceAccount names its workload identity (``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``),
which its certificate proves; the ServiceAccount object itself carries nothing nodemesh uses
(there are no tokens and no registries), so its fields are accepted with no effect.

A PeerAuthentication sets which connections a workload accepts: mutual TLS only (STRICT), both
(PERMISSIVE) or plaintext (DISABLE), for the workloads its selector picks, a namespace, or the
whole mesh (no selector, in the root namespace). nodemesh/mtls/peerauth.py resolves the
effective mode of each pod; this module refuses what Istio would refuse or silently ignore.
"""

from __future__ import annotations

from typing import Any

from nodemesh.model.common import LABELS
from nodemesh.model.schema import (
    Bool,
    Ctx,
    Hook,
    Key,
    ListOf,
    Obj,
    Path,
    Schema,
    Str,
    is_int,
    opt,
    quote,
    type_name,
)

# The namespace whose selector-less PeerAuthentication applies mesh-wide (Istio's istio-system);
# `nodemesh.mtls.peerauth` resolves modes with it.
ROOT_NAMESPACE = "nodemesh-system"

# -- ServiceAccount --------------------------------------------------------------------------

# An ObjectReference (ServiceAccount.secrets): kubectl output of older clusters lists token
# Secrets here. Accepted, no effect.
OBJECT_REFERENCE = Obj({
    "apiVersion": Str(),
    "kind": Str(),
    "name": Str(),
    "namespace": Str(),
    "uid": Str(),
    "resourceVersion": Str(),
    "fieldPath": Str(),
})

# The fields of a ServiceAccount beside metadata (it has no spec). Accepted, no effect.
SERVICE_ACCOUNT_FIELDS: dict[str, Schema] = {
    "automountServiceAccountToken": Bool(),
    "secrets": ListOf(OBJECT_REFERENCE),
    "imagePullSecrets": ListOf(Obj({"name": Str()})),
}

# -- PeerAuthentication ----------------------------------------------------------------------

MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
MTLS = Obj({"mode": opt(Str(enum=MTLS_MODES), "UNSET")})


def port_key(key: object) -> int | None:
    """A portLevelMtls key as a port number, or None when it is not one (1-65535)."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        port = int(key)
    elif is_int(key):
        port = key  # type: ignore[assignment]
    else:
        return None
    return port if 1 <= port <= 65535 else None


class PortLevelMtls(Schema):
    """``portLevelMtls``: container port number → ``{mode}``.

    YAML reads an unquoted key (``8080:``) as a number, and JSON (the API server, the store)
    has string keys only: both are accepted and the result has string keys, as Kubernetes
    stores them.
    """

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if not isinstance(value, dict):
            ctx.error(path, f"must be a map (got {type_name(value)})")
            return value
        out: dict[str, Any] = {}
        for k, v in value.items():
            here = (*path, Key(str(k)))
            port = port_key(k)
            if port is None:
                ctx.error(here, f"invalid port: must be a port number 1-65535 (got {quote(k)})")
                MTLS.check(v, here, ctx)  # its value's problems are reported too
                continue
            if str(port) in out:
                ctx.error(here, f"port {port} is given twice")
                continue
            out[str(port)] = MTLS.check(v, here, ctx)
        return out


def _selector_labels(spec: dict) -> dict:
    # Istio: a selector without matchLabels selects like no selector at all.
    return (spec.get("selector") or {}).get("matchLabels") or {}


def _port_level_needs_selector(spec: dict, path: Path, ctx: Ctx) -> None:
    if spec.get("portLevelMtls") and not _selector_labels(spec):
        # Istio's CRD refuses it too ("portLevelMtls requires selector").
        ctx.error((*path, "portLevelMtls"), "requires a selector with matchLabels: port-level "
                  "modes apply only to the pods that a workload-specific policy selects")


def _no_selector_in_root_namespace(spec: dict, path: Path, ctx: Ctx) -> None:
    if _selector_labels(spec) and ctx.facts.get("namespace") == ROOT_NAMESPACE:
        # Istio ignores such a policy; refused so that the user knows.
        ctx.error((*path, "selector"), f'not supported in the root namespace "{ROOT_NAMESPACE}" '
                  "(Istio ignores a selector there): put a workload-specific policy in the "
                  "namespace of its pods, or remove the selector for a mesh-wide policy")


PEER_AUTHENTICATION_SPEC = Obj(
    {
        # Istio's WorkloadSelector: matchLabels only, selecting pods of the policy's namespace.
        "selector": Obj({"matchLabels": LABELS}),
        "mtls": opt(MTLS, {}),
        "portLevelMtls": PortLevelMtls(),
    },
    hooks=[Hook(_port_level_needs_selector, needs=("selector", "portLevelMtls")),
           Hook(_no_selector_in_root_namespace, needs=("selector",))],
)
