"""Reading manifests: files, directories and stdin → YAML documents → raw objects.

The YAML reader behaves like the one Kubernetes uses (YAML → JSON) where PyYAML differs:
timestamps stay strings (an annotation ``date: 2024-01-01`` is the string "2024-01-01"), and a
key given twice in one mapping is an error instead of silently keeping the last value.
Syntax errors name the file and line; documents that are not objects name the file and the
document's number.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import yaml

from nodemesh.errors import InvalidManifest
from nodemesh.model.validate import LIST_KIND, check_list, doc_problem, expand_lists

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
STDIN = "-"

# The pure-Python loader: its messages are the clearer ones ("... not allowed here").
_BaseLoader: type = yaml.SafeLoader


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """A safe loader without timestamps and without duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise _DuplicateKey(None, None, f"duplicate key {key!r} in a mapping",
                                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


# Kubernetes reads YAML timestamps as strings: drop PyYAML's timestamp resolver.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}


def _yaml_error(source: str, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is not None:
        return f"{source}: line {mark.line + 1}: {problem}"
    return f"{source}: {problem}"


def load_manifests(text: str, source: str) -> list[dict]:
    """Parse multi-document YAML (or JSON) into objects: empty documents are skipped and
    ``kind: List`` is replaced by its items. Raises InvalidManifest for syntax errors and for
    documents that are not objects with a kind."""
    try:
        raw = list(yaml.load_all(text, Loader=_Loader))  # _Loader derives from a safe loader
    except yaml.YAMLError as e:
        raise InvalidManifest([_yaml_error(source, e)]) from None
    docs: list[Any] = []
    where: list[str] = []
    for i, doc in enumerate(raw):
        if doc is None:
            continue  # an empty document, such as a trailing "---"
        docs.append(doc)
        where.append(f"{source}: document {i + 1}")
    errors: list[str] = []
    out: list[dict] = []
    for label, doc in zip(where, docs, strict=True):
        if isinstance(doc, dict) and doc.get("kind") == LIST_KIND:
            errors.extend(check_list(doc, label))
    for label, doc in expand_lists(docs, where):
        problem = doc_problem(doc) if not isinstance(doc, dict) or "kind" not in doc else None
        if problem:
            errors.append(f"{label}: {problem}")
        else:
            out.append(doc)  # type: ignore[arg-type]
    if errors:
        raise InvalidManifest(errors)
    return out


def read_manifest_paths(paths: list[str]) -> list[tuple[str, str]]:
    """Read manifests from files, directories (their *.yaml, *.yml and *.json files, sorted, not
    recursive) and ``-`` (standard input). Returns (source, text) pairs; raises InvalidManifest
    naming every path that cannot be read."""
    out: list[tuple[str, str]] = []
    errors: list[str] = []
    for path in paths:
        if path == STDIN:
            out.append(("stdin", sys.stdin.read()))
            continue
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith(MANIFEST_SUFFIXES)
                           and os.path.isfile(os.path.join(path, n)))
            if not names:
                errors.append(f"{path}: no {', '.join('*' + s for s in MANIFEST_SUFFIXES)} "
                              "files in this directory")
            files = [os.path.join(path, n) for n in names]
        elif os.path.exists(path):
            files = [path]
        else:
            errors.append(f"{path}: no such file or directory")
            continue
        for f in files:
            try:
                with open(f, encoding="utf-8-sig") as fh:
                    out.append((f, fh.read()))
            except UnicodeDecodeError:
                errors.append(f"{f}: not a UTF-8 text file")
            except OSError as e:
                errors.append(f"{f}: {e.strerror or e}")
    if errors:
        raise InvalidManifest(errors)
    return out
