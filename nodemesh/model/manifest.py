"""Reading manifests: files, directories and stdin → YAML documents → raw objects.

The YAML reader behaves like the one Kubernetes uses (YAML → JSON) where PyYAML differs:
timestamps stay strings (an annotation ``date: 2024-01-01`` is the string "2024-01-01"), and a
key given twice in one mapping is an error instead of silently keeping the last value.
Syntax errors name the file and line; documents that are not objects name the file and the
document's number.

Hostile input is refused while it is read, before anything walks it: a document nested more than
`MAX_DEPTH` levels deep (counting what aliases bring in), an alias inside the node it names (a
structure that contains itself), and aliases that expand a document past `MAX_ALIAS_NODES` nodes
("billion laughs"). Python's own recursion limit is never the guard.
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

# Levels of nesting a document may have (a mapping or sequence inside another is one level more).
# Every kind nodemesh accepts is under 20 levels deep; 100 leaves room and stays far below what
# Python's recursion limit (1000 frames) allows the loader and the validators.
MAX_DEPTH = 100
# Nodes that aliases may add to one document when expanded (each alias counts the whole subtree
# it names). Plain YAML without aliases is bounded by its size instead.
MAX_ALIAS_NODES = 100_000


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _Hostile(yaml.MarkedYAMLError):
    """Input refused before it is built: too deep, self-containing, or alias-expanded too far."""


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """A safe loader without timestamps, without duplicate keys, and with the limits above
    checked while composing (PyYAML's composer recurses once per level of nesting)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._reset_limits()

    def _reset_limits(self) -> None:
        self._depth = 0  # levels open right now
        self._deepest = 0  # the deepest level reached inside the node being composed
        self._expanded = 0  # nodes so far in this document, aliases expanded
        self._alias_nodes = 0  # of which aliases brought in
        self._open: set[str] = set()  # anchors whose node is being composed
        self._anchored: dict[str, tuple[int, int]] = {}  # anchor -> (height, expanded nodes)

    def _reach(self, depth: int, mark: Any) -> None:
        if depth > MAX_DEPTH:
            raise _Hostile(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
        self._deepest = max(self._deepest, depth)

    def compose_document(self) -> Any:
        self._reset_limits()
        try:
            return super().compose_document()
        finally:
            self._reset_limits()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Hostile(None, None, f"alias *{event.anchor} is inside the node it refers "
                               "to (a structure that contains itself)", event.start_mark)
            height, nodes = self._anchored.get(event.anchor, (1, 1))  # unknown: PyYAML reports it
            self._reach(self._depth + height, event.start_mark)
            self._expanded += nodes
            self._alias_nodes += nodes
            if self._alias_nodes > MAX_ALIAS_NODES:
                raise _Hostile(None, None, f"aliases expand this document past {MAX_ALIAS_NODES} "
                               "nodes", event.start_mark)
            return super().compose_node(parent, index)
        self._reach(self._depth + 1, event.start_mark)
        anchor = event.anchor
        outer_deepest, self._deepest = self._deepest, self._depth + 1
        expanded_before = self._expanded
        self._expanded += 1
        self._depth += 1
        if anchor is not None:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)
        if anchor is not None:
            self._anchored[anchor] = (self._deepest - self._depth, self._expanded - expanded_before)
        self._deepest = max(outer_deepest, self._deepest)
        return node

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
    except RecursionError:  # a backstop: the limits above stop nesting long before this
        raise InvalidManifest([f"{source}: nested too deeply"]) from None
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
