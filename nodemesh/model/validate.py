"""Validation of whole objects: kind and apiVersion, the per-kind schema, namespaces, duplicates.

`validate_objects` is what ``nodemesh apply`` calls on parsed manifests. It checks every object
against its kind's schema (schema.py and the per-kind modules), fills in the defaults Kubernetes
would fill, sets ``metadata.namespace`` on namespaced objects, drops what the store owns
(status, uid, resourceVersion ...), writes the kind's preferred apiVersion on objects written
with an older one (PeerAuthentication v1beta1), and refuses duplicates within one call. Every problem in
every object is reported at once in one `InvalidManifest`; nothing is returned half-checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from nodemesh.errors import InvalidManifest
from nodemesh.model.cnp import RULE, check_cnp_specs
from nodemesh.model.common import metadata
from nodemesh.model.endpointslice import ENDPOINTSLICE_FIELDS, ENDPOINTSLICE_HOOKS
from nodemesh.model.kinds import KINDS, KindInfo, ref
from nodemesh.model.names import (
    check_dns1035_label,
    check_dns1123_label,
    check_dns1123_subdomain,
)
from nodemesh.model.netpol import NP_SPEC
from nodemesh.model.routes import GRPCROUTE_SPEC, HTTPROUTE_SPEC
from nodemesh.model.schema import (
    AnyValue,
    Ctx,
    Drop,
    Field,
    Hook,
    ListOf,
    Obj,
    Schema,
    Str,
    one_of,
    opt,
    quote,
    req,
    type_name,
)
from nodemesh.model.security import PEER_AUTHENTICATION_SPEC, SERVICE_ACCOUNT_FIELDS
from nodemesh.model.service import SERVICE_SPEC, check_service_annotations
from nodemesh.model.workloads import DEPLOYMENT_SPEC, POD_SPEC

DEFAULT_NAMESPACE = "default"


def _kind_schema(
    name_check: Callable[[str], str | None],
    spec: Field | Schema | None,
    hooks: Sequence[Hook] = (),
    **extra: Field | Schema,
) -> Obj:
    """The schema of a whole object: its metadata's name rule, its spec (None for a kind that
    has none, such as ServiceAccount), other top-level fields, and object hooks."""
    return Obj(
        {
            # Checked before the schema runs, with messages that say what is expected.
            "apiVersion": AnyValue(),
            "kind": AnyValue(),
            "metadata": req(metadata(name_check)),
            **({"spec": spec} if spec is not None else {}),
            "status": Drop(),
            **extra,
        },
        hooks=hooks,
    )


# kind → the schema of a whole object of that kind
SCHEMAS: dict[str, Obj] = {
    "Namespace": _kind_schema(check_dns1123_label, Obj({"finalizers": ListOf(Str())})),
    "Pod": _kind_schema(check_dns1123_subdomain, req(POD_SPEC)),
    "Service": _kind_schema(check_dns1035_label, req(SERVICE_SPEC),
                            hooks=(Hook(check_service_annotations, needs=("metadata",)),)),
    "Deployment": _kind_schema(check_dns1123_subdomain, req(DEPLOYMENT_SPEC)),
    "ServiceAccount": _kind_schema(check_dns1123_subdomain, None, **SERVICE_ACCOUNT_FIELDS),
    # The API's NetworkPolicy spec is a plain struct: an absent spec is an empty one.
    "NetworkPolicy": _kind_schema(check_dns1123_subdomain, opt(NP_SPEC, {})),
    "CiliumNetworkPolicy": _kind_schema(check_dns1123_subdomain, RULE,
                                        hooks=(Hook(check_cnp_specs, needs=()),),
                                        specs=ListOf(RULE)),
    # Istio's spec is optional: without one, a namespace-wide policy whose mode is UNSET.
    "PeerAuthentication": _kind_schema(check_dns1123_subdomain, opt(PEER_AUTHENTICATION_SPEC, {})),
    "HTTPRoute": _kind_schema(check_dns1123_subdomain, req(HTTPROUTE_SPEC)),
    "GRPCRoute": _kind_schema(check_dns1123_subdomain, req(GRPCROUTE_SPEC)),
    # No spec: addressType, endpoints and ports sit at the top level, as in the API.
    "EndpointSlice": _kind_schema(check_dns1123_subdomain, None, hooks=ENDPOINTSLICE_HOOKS,
                                  **ENDPOINTSLICE_FIELDS),
}

USER_KINDS = tuple(k for k, info in KINDS.items() if info.user_writable)
LIST_KIND = "List"


def expand_lists(docs: list, where: list[str]) -> Iterator[tuple[str, object]]:
    """Yield (where, doc) for every doc, with ``kind: List`` replaced by its items."""
    for label, doc in zip(where, docs, strict=True):
        if isinstance(doc, dict) and doc.get("kind") == LIST_KIND:
            items = doc.get("items") or []
            if not isinstance(items, list):
                yield label, doc  # reported by check_list
                continue
            yield from expand_lists(items, [f"{label}: items[{j}]" for j in range(len(items))])
        else:
            yield label, doc


def check_list(doc: dict, label: str) -> list[str]:
    """Problems with a ``kind: List`` wrapper itself (its items are checked as objects)."""
    errors = []
    if doc.get("apiVersion") != "v1":
        errors.append(f'{label}: apiVersion: must be "v1" for kind List '
                      f"(got {quote(doc.get('apiVersion'))})")
    if not isinstance(doc.get("items") or [], list):
        errors.append(f"{label}: items: must be a list (got {type_name(doc.get('items'))})")
    for k in doc:
        if k not in ("apiVersion", "kind", "items", "metadata"):
            errors.append(f"{label}: {k}: unknown field")
    return errors


def doc_problem(doc: object) -> str | None:
    """Why a document is not an object nodemesh can even name (no mapping, no kind)."""
    if not isinstance(doc, dict):
        return f"must be an object with apiVersion, kind and metadata (got {type_name(doc)})"
    kind = doc.get("kind")
    if kind is None:
        return "kind: required"
    if not isinstance(kind, str):
        return f"kind: must be a string (got {type_name(kind)})"
    info = KINDS.get(kind)
    if info is None:
        return f"kind: unknown kind {quote(kind)} (nodemesh accepts {', '.join(USER_KINDS)})"
    if not info.user_writable:
        return f"kind: {kind} objects are written by nodemesh itself and cannot be applied"
    return None


def validate_objects(
    docs: list[dict],
    source: str,
    default_namespace: str = DEFAULT_NAMESPACE,
    *,
    enforce_namespace: bool | None = None,
) -> list[dict]:
    """Validate and default `docs` (parsed from `source`); raise InvalidManifest listing every
    problem. Namespaced objects without a namespace get `default_namespace`.

    Like ``kubectl -n``, an explicitly requested namespace must agree with the namespace an
    object names: `enforce_namespace` says whether `default_namespace` was requested
    explicitly; when None, any namespace but "default" counts as explicit.
    """
    if enforce_namespace is None:
        enforce_namespace = default_namespace != DEFAULT_NAMESPACE
    errors: list[str] = []
    problem = check_dns1123_label(default_namespace)
    if problem:
        raise InvalidManifest([f"namespace {quote(default_namespace)}: {problem}"])

    out: list[dict] = []
    seen: dict[tuple[str, str, str], str] = {}
    labels = [f"{source}: document {i + 1}" for i in range(len(docs))]
    for i, doc in enumerate(docs):
        if isinstance(doc, dict) and doc.get("kind") == LIST_KIND:
            errors.extend(check_list(doc, labels[i]))
    for where, doc in expand_lists(docs, labels):
        problem = doc_problem(doc)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        assert isinstance(doc, dict)
        obj, obj_errors = _validate_one(doc, KINDS[doc["kind"]], where, default_namespace,
                                        enforce_namespace)
        errors.extend(obj_errors)
        if obj is None:
            continue
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        name = ref(key[0], key[1] or None, key[2])
        if key in seen:
            errors.append(f"{name}: metadata.name: duplicate: {key[0]} {quote(key[2])} is "
                          f"already defined by {seen[key]}")
        else:
            seen[key] = where
        out.append(obj)
    if errors:
        raise InvalidManifest(errors)
    return out


def _validate_one(
    doc: dict, info: KindInfo, where: str, default_ns: str, enforce: bool
) -> tuple[dict | None, list[str]]:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name, doc_ns = meta.get("name"), meta.get("namespace")
    namespace = None
    if info.namespaced:
        namespace = doc_ns if isinstance(doc_ns, str) and doc_ns else default_ns
    label = (ref(info.kind, namespace, name) if isinstance(name, str) and name
             else f"{where} ({info.kind})")

    ctx = Ctx(kind=info.kind, namespace=namespace)
    api_version = doc.get("apiVersion")
    expected = one_of(info.api_versions)
    if api_version is None:
        ctx.error(("apiVersion",), f"required (must be {expected} for kind {info.kind})")
    elif api_version not in info.api_versions:
        ctx.error(("apiVersion",), f"must be {expected} for kind {info.kind} "
                  f"(got {quote(api_version)})")
    schema: Schema = SCHEMAS[info.kind]
    obj = schema.check(doc, (), ctx)
    if info.namespaced and enforce and isinstance(doc_ns, str) and doc_ns and doc_ns != default_ns:
        ctx.error(("metadata", "namespace"), f"{quote(doc_ns)} does not match the namespace "
                  f"{quote(default_ns)} this apply was given")
    errors = [f"{label}: {line}" for line in ctx.lines()]
    if errors:
        return None, errors
    # The same schema under every accepted apiVersion: store the preferred one, so that
    # consumers read one version (the API server, too, serves objects at its preferred version).
    obj["apiVersion"] = info.api_version
    if info.namespaced:
        obj["metadata"]["namespace"] = namespace
    else:
        # The API server clears the namespace of cluster-scoped objects; so do we.
        obj["metadata"].pop("namespace", None)
    return obj, []
