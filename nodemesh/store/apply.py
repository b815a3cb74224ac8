"""Desired state in: manifests → validated, admitted objects → the store, all or nothing.

What `nodemesh apply` does, below the CLI so the demo and the benchmark apply the same way:

- `load_and_validate(paths, namespace)`: read files (or ``-``), parse, validate and default every
  object, and check that each container's image is one the local cluster can run; all errors of
  all files at once, as one `InvalidManifest` (exit 2) whose lines name the resource and field;
- `apply_objects(store, objs)`: admit and store validated objects in one transaction, returning
  kubectl-style result lines (``pod/web created``);
- `apply_text(store, text, source)`: both, for manifests held in memory.
"""

from __future__ import annotations

from collections.abc import Callable

from nodemesh.errors import InvalidManifest, NodemeshError
from nodemesh.model import images
from nodemesh.model.kinds import obj_ref
from nodemesh.store.base import Store, Txn


def apply_text(store: Store, text: str, source: str, namespace: str | None = None) -> list[str]:
    """Validate the manifests in `text` (named `source` in errors) and apply them to `store`."""
    return apply_objects(store, validate_sources([(source, text)], namespace, source))


def load_and_validate(paths: list[str], namespace: str | None) -> list[dict]:
    """Every object of every file, validated and defaulted; all errors of all files at once."""
    from nodemesh.model.manifest import read_manifest_paths

    return validate_sources(read_manifest_paths(paths), namespace, ", ".join(paths))


def validate_sources(sources: list[tuple[str, str]], namespace: str | None,
                     what: str) -> list[dict]:
    """Every object of every (source, text), validated and defaulted; all errors at once.
    `what` names the input in the error when there are no objects at all."""
    from nodemesh.model.manifest import load_manifests
    from nodemesh.model.validate import validate_objects

    errors: list[str] = []
    objs: list[dict] = []
    seen: dict[tuple[str, str, str], str] = {}
    for source, text in sources:
        try:
            docs = load_manifests(text, source)
            valid = validate_objects(docs, source, default_namespace=namespace or "default",
                                     enforce_namespace=namespace is not None)
        except InvalidManifest as e:
            errors.extend(e.errors)
            continue
        for o in valid:
            key = (o["kind"], o["metadata"].get("namespace") or "", o["metadata"]["name"])
            if key in seen:
                errors.append(f"{obj_ref(o)}: metadata.name: defined twice ({seen[key]} and "
                              f"{source})")
            seen[key] = source
            errors.extend(_check_images(o))
            objs.append(o)
    if errors:
        raise InvalidManifest(errors)
    if not objs:
        raise NodemeshError(f"no objects in {what}", 2)
    return objs


def _check_images(obj: dict) -> list[str]:
    if obj["kind"] == "Pod":
        spec, path = obj["spec"], "spec"
    elif obj["kind"] == "Deployment":
        spec, path = obj["spec"]["template"]["spec"], "spec.template.spec"
    else:
        return []
    errors = []
    for i, c in enumerate(spec.get("containers") or []):
        try:
            images.resolve(obj_ref(obj), c)
        except NodemeshError:
            errors.append(f"{obj_ref(obj)}: {path}.containers[{i}].image: {c.get('image')!r} is "
                          f"not in nodemesh's image table and the container has no command "
                          f"(known images: {', '.join(sorted(images.IMAGE_TABLE))})")
    return errors


def apply_objects(store: Store, objs: list[dict]) -> list[str]:
    """Admit and store validated objects in one transaction; kubectl-style result lines."""
    from nodemesh.model.admission import admit

    # On etcd a write races the agents' own (statuses, heartbeats) and loses with Conflict where
    # SQLite made it wait: the body runs again on what is there then.
    for attempt in store.retrying():
        with attempt as t:
            results = _apply_in(t, objs, admit)
    return results


def _apply_in(t: Txn, objs: list[dict], admit: Callable) -> list[str]:
    results = []
    for o in admit(objs, lambda kind, ns: t.list(kind, ns)):
        meta = o["metadata"]
        before = t.get(o["kind"], meta.get("namespace") or "", meta["name"])
        after = t.put(o)
        verb = "created" if before is None else (
            "unchanged" if before["metadata"]["resourceVersion"] ==
            after["metadata"]["resourceVersion"] else "configured")
        results.append(f"{o['kind'].lower()}/{meta['name']} {verb}")
    return results
