"""Schemas shared by several kinds: object metadata, label maps, label selectors, ports.

Metadata the store owns (uid, resourceVersion, generation, creationTimestamp, managedFields ...)
is accepted and dropped, so that the output of ``kubectl get -o yaml`` can be applied again.
"""

from __future__ import annotations

from collections.abc import Callable

from nodemesh.model.labels import (
    validate_cilium_label_key,
    validate_label_key,
    validate_label_value,
)
from nodemesh.model.names import check_dns1123_label
from nodemesh.model.schema import (
    Bool,
    Ctx,
    Drop,
    Hook,
    Int,
    ListOf,
    MapOf,
    Obj,
    Path,
    Str,
    Unsupported,
    req,
)

PORT = Int(1, 65535)
ANNOTATIONS_MAX_BYTES = 256 * 1024  # Kubernetes' limit on all annotations of one object

LABEL_VALUE = Str(validator=validate_label_value)
LABELS = MapOf(LABEL_VALUE, key=validate_label_key, key_what="label key")


def _annotations_size(obj: dict, path: Path, ctx: Ctx) -> None:
    size = sum(len(k) + len(v) for k, v in obj.items())
    if size > ANNOTATIONS_MAX_BYTES:
        ctx.error(path, f"must be at most {ANNOTATIONS_MAX_BYTES} bytes in total (is {size})")


class _Annotations(MapOf):
    def check(self, value: object, path: Path, ctx: Ctx) -> object:
        mark = ctx.mark()
        out = super().check(value, path, ctx)
        if isinstance(out, dict) and ctx.clean_since(mark, path):
            _annotations_size(out, path, ctx)
        return out


ANNOTATIONS = _Annotations(Str(), key=validate_label_key, key_what="annotation key")

OWNER_REFERENCE = Obj({
    "apiVersion": req(Str()),
    "kind": req(Str()),
    "name": req(Str()),
    "uid": req(Str()),
    "controller": Bool(),
    "blockOwnerDeletion": Bool(),
})

# Written by the API server or the store, never by the user: accepted and dropped.
STORE_OWNED_METADATA = ("uid", "resourceVersion", "generation", "creationTimestamp",
                        "managedFields", "selfLink", "deletionTimestamp",
                        "deletionGracePeriodSeconds")


def metadata(name_check: Callable[[str], str | None]) -> Obj:
    """ObjectMeta of a top-level object whose name must pass `name_check`."""
    return Obj({
        "name": req(Str(validator=name_check)),
        "generateName": Unsupported("apply needs a fixed name: set metadata.name"),
        "namespace": Str(validator=lambda v: None if v == "" else check_dns1123_label(v)),
        "labels": LABELS,
        "annotations": ANNOTATIONS,
        "ownerReferences": ListOf(OWNER_REFERENCE),
        "finalizers": ListOf(Str()),
        **{k: Drop() for k in STORE_OWNED_METADATA},
    })


# The metadata of a Deployment's pod template: only labels and annotations matter.
TEMPLATE_METADATA = Obj({
    "name": Str(),
    "namespace": Str(),
    "labels": LABELS,
    "annotations": ANNOTATIONS,
    "creationTimestamp": Drop(),  # `kubectl create --dry-run -o yaml` writes null here
})


def _requirement_values(expr: dict, path: Path, ctx: Ctx) -> None:
    op, values = expr["operator"], expr.get("values") or []
    if op in ("In", "NotIn") and not values:
        ctx.error((*path, "values"), f"required when operator is {op} (at least one value)")
    if op in ("Exists", "DoesNotExist") and values:
        ctx.error((*path, "values"), f"must be empty when operator is {op}")


def label_selector(key_check: Callable[[str], str | None] = validate_label_key) -> Obj:
    """A LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    return Obj({
        "matchLabels": MapOf(LABEL_VALUE, key=key_check, key_what="label key"),
        "matchExpressions": ListOf(Obj(
            {
                "key": req(Str(validator=lambda k: None if key_check(k) is None
                               else f"invalid label key: {key_check(k)}")),
                "operator": req(Str(enum=("In", "NotIn", "Exists", "DoesNotExist"))),
                "values": ListOf(LABEL_VALUE),
            },
            hooks=[Hook(_requirement_values)],
        )),
    })


LABEL_SELECTOR = label_selector()
CILIUM_SELECTOR = label_selector(validate_cilium_label_key)
