"""Reading manifests: YAML quirks, documents, Lists, files, directories and stdin."""

from __future__ import annotations

import io
import os
import pathlib
import sys

import pytest

from nodemesh.errors import InvalidManifest
from nodemesh.model.manifest import load_manifests, read_manifest_paths

NS = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n"


def load_errors(text: str, source: str = "web.yaml") -> list[str]:
    with pytest.raises(InvalidManifest) as e:
        load_manifests(text, source)
    return e.value.errors


def test_empty_documents_are_skipped() -> None:
    text = "---\n" + NS.format("a") + "---\n---\n# only a comment\n---\n" + NS.format("b") + "---\n"
    assert [d["metadata"]["name"] for d in load_manifests(text, "x")] == ["a", "b"]
    assert load_manifests("", "x") == []


def test_json_is_accepted() -> None:
    text = '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}'
    assert load_manifests(text, "a.json")[0]["metadata"]["name"] == "a"


def test_list_is_expanded() -> None:
    text = ("apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: ''\nitems:\n"
            "- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n"
            "- {apiVersion: v1, kind: List, items: [{apiVersion: v1, kind: Namespace, "
            "metadata: {name: b}}]}\n---\n" + NS.format("c"))
    assert [d["metadata"]["name"] for d in load_manifests(text, "x")] == ["a", "b", "c"]


def test_list_problems_name_the_item() -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, metadata: {name: a}}\n- 3\n"
    assert load_errors(text) == [
        "web.yaml: document 1: items[0]: kind: required",
        "web.yaml: document 1: items[1]: must be an object with apiVersion, kind and metadata "
        "(got an integer)",
    ]
    assert load_errors("apiVersion: v2\nkind: List\nitems: []\nfoo: 1\n") == [
        'web.yaml: document 1: apiVersion: must be "v1" for kind List (got "v2")',
        "web.yaml: document 1: foo: unknown field",
    ]


def test_syntax_error_names_the_line() -> None:
    text = NS.format("a") + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [web\n"
    [line] = load_errors(text)
    assert line.startswith("web.yaml: line 10: ")


def test_tab_indentation_is_a_syntax_error() -> None:
    [line] = load_errors("apiVersion: v1\nkind: Namespace\nmetadata:\n\tname: a\n")
    assert line == "web.yaml: line 4: found character '\\t' that cannot start any token"


def test_duplicate_keys_are_refused() -> None:
    text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  name: b\n"
    assert load_errors(text) == ["web.yaml: line 5: duplicate key 'name' in a mapping"]


def test_timestamps_stay_strings() -> None:
    text = NS.format("a") + "  annotations:\n    released: 2024-05-01\n"
    doc = load_manifests(text, "x")[0]
    assert doc["metadata"]["annotations"]["released"] == "2024-05-01"


def test_scalar_document_and_document_numbers() -> None:
    text = NS.format("a") + "---\njust a string\n---\n" + NS.format("b") + "---\n[1, 2]\n"
    assert load_errors(text) == [
        "web.yaml: document 2: must be an object with apiVersion, kind and metadata "
        "(got a string)",
        "web.yaml: document 4: must be an object with apiVersion, kind and metadata (got a list)",
    ]


def test_read_file_directory_and_stdin(tmp_path: pathlib.Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path
    (d / "b.yaml").write_text(NS.format("b"))
    (d / "a.yml").write_text(NS.format("a"))
    (d / "c.json").write_text("{}")
    (d / "notes.txt").write_text("ignored")
    (d / "sub").mkdir()
    (d / "sub" / "x.yaml").write_text("not read: not recursive")
    out = read_manifest_paths([str(d)])
    assert [os.path.basename(s) for s, _ in out] == ["a.yml", "b.yaml", "c.json"]
    single = read_manifest_paths([str(d / "b.yaml")])
    assert single == [(str(d / "b.yaml"), NS.format("b"))]
    monkeypatch.setattr(sys, "stdin", io.StringIO(NS.format("s")))
    assert read_manifest_paths(["-"]) == [("stdin", NS.format("s"))]


def test_read_reports_every_bad_path(tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvalidManifest) as e:
        read_manifest_paths([str(tmp_path / "missing.yaml"), str(empty), str(binary)])
    assert e.value.errors == [
        f"{tmp_path / 'missing.yaml'}: no such file or directory",
        f"{empty}: no *.yaml, *.yml, *.json files in this directory",
        f"{binary}: not a UTF-8 text file",
    ]


def test_byte_order_mark_is_ignored(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "bom.yaml"
    f.write_bytes(b"\xef\xbb\xbf" + NS.format("a").encode())
    [(source, text)] = read_manifest_paths([str(f)])
    assert load_manifests(text, source)[0]["metadata"]["name"] == "a"
