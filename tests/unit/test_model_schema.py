"""The schema language: paths, types, ranges, enums, defaults, unknown fields, hooks."""

from __future__ import annotations

from typing import Any

import pytest

from nodemesh.model.schema import (
    Bool,
    Ctx,
    Drop,
    Forbidden,
    Hook,
    Int,
    IntOrStr,
    Key,
    ListOf,
    MapOf,
    Obj,
    Path,
    Str,
    Unsupported,
    format_path,
    opt,
    req,
)


def run(schema: Any, value: Any) -> tuple[Any, list[str]]:
    ctx = Ctx()
    out = schema.check(value, ("x",), ctx)
    return out, ctx.lines()


def test_format_path() -> None:
    assert format_path(("spec", "ports", 0, "port")) == "spec.ports[0].port"
    assert format_path(("metadata", "labels", Key("app"))) == "metadata.labels[app]"
    assert format_path(("metadata", "labels", Key("app/x"))) == 'metadata.labels["app/x"]'
    assert format_path(("a", Key('q"uote'))) == 'a["q\\"uote"]'
    assert format_path(()) == ""


@pytest.mark.parametrize(("schema", "value", "message"), [
    (Int(1, 65535), 0, "must be 1-65535"),
    (Int(0), -1, "must be >= 0"),
    (Int(maximum=5), 6, "must be <= 5"),
    (Int(), "8", "must be an integer (got a string)"),
    (Int(), True, "must be an integer (got a boolean)"),
    (Int(), 1.5, "must be an integer (got a number)"),
    (Int(enum=(301, 302)), 300, "must be 301 or 302 (got 300)"),
    (Str(), 8, 'must be a string (got an integer; write it in quotes: "8")'),
    (Str(), True, 'must be a string (got a boolean; write it in quotes: "true")'),
    (Str(), [], "must be a string (got a list)"),
    (Str(enum=("A",)), "B", 'must be "A" (got "B")'),
    (Str(enum=("A", "B", "C")), "D", 'must be one of "A", "B", "C" (got "D")'),
    (Str(enum=("A",), unsupported={"X": "why"}), "X", "X is not supported (why)"),
    (Str(min_len=1), "", "must not be empty"),
    (Str(max_len=2), "abc", "must be at most 2 characters long (is 3)"),
    (Str(pattern=r"\d+", pattern_msg="digits only"), "a1", "digits only"),
    (Bool(), "yes", "must be true or false (got a string)"),
    (IntOrStr(Int(1, 9), Str(min_len=1)), [], "must be an integer or a string (got a list)"),
    (ListOf(Int()), {}, "must be a list (got an object)"),
    (ListOf(Int(), max_items=1), [1, 2], "must have at most 1 items (has 2)"),
    (ListOf(Int(), min_items=1), [], "must not be empty"),
    (MapOf(Str()), [], "must be a map (got a list)"),
    (Obj({}), "a", "must be an object (got a string)"),
    (Unsupported("why"), True, "not supported by nodemesh (why)"),
    (Forbidden("never here"), 1, "never here"),
])
def test_type_and_range_errors(schema: Any, value: Any, message: str) -> None:
    _, lines = run(schema, value)
    assert lines == [f"x: {message}"]


def test_float_with_integer_value_is_an_integer() -> None:
    assert run(Int(), 80.0) == (80, [])


@pytest.mark.parametrize("value", [False, "", 0, [], {}])
def test_unsupported_accepts_empty_values(value: Any) -> None:
    assert run(Unsupported("why"), value)[1] == []


def test_object_defaults_required_unknown_and_null() -> None:
    schema = Obj({"a": req(Int()), "b": opt(Str(), "dflt"), "c": Int(), "gone": Drop(),
                  "nested": opt(Obj({"d": opt(Int(), 7)}), {})})
    out, lines = run(schema, {"c": None, "gone": 1, "porte": 1})
    assert lines == ["x.porte: unknown field", "x.a: required"]
    assert out == {"b": "dflt", "nested": {"d": 7}}


def test_unknown_field_suggestion() -> None:
    _, lines = run(Obj({"targetPort": Int()}), {"targetPrt": 1})
    assert lines == ['x.targetPrt: unknown field (did you mean "targetPort"?)']


def test_map_keys_and_values() -> None:
    schema = MapOf(Str(), key=lambda k: None if k.islower() else "lowercase only", key_what="key")
    out, lines = run(schema, {"ok": "1", "Bad": "2", 3: "x", "v": 4})
    assert lines == ["x[Bad]: invalid key: lowercase only",
                     "x[3]: key must be a string (got an integer; write it in quotes)",
                     'x[v]: must be a string (got an integer; write it in quotes: "4")']
    assert out == {"ok": "1", "Bad": "2", "v": 4}


def test_list_uniqueness_reports_the_field() -> None:
    schema = ListOf(Obj({"name": Str()}), unique=lambda o: o.get("name"), unique_msg="duplicate",
                    unique_at="name")
    _, lines = run(schema, [{"name": "a"}, {"name": "b"}, {"name": "a"}])
    assert lines == ["x[2].name: duplicate (same as x[0].name)"]


def test_hooks_run_only_on_clean_fields() -> None:
    calls: list[str] = []

    def record(name: str) -> Any:
        def fn(obj: dict, path: Path, ctx: Ctx) -> None:
            calls.append(name)
        return fn

    schema = Obj({"a": Int(), "b": Int()}, hooks=[
        Hook(record("all")),
        Hook(record("needs-a"), needs=("a",)),
        Hook(record("needs-b"), needs=("b",)),
        Hook(record("always"), needs=()),
    ])
    run(schema, {"a": 1, "b": "bad"})
    assert calls == ["needs-a", "always"]


def test_hooks_skip_when_a_needed_parent_is_missing() -> None:
    calls: list[str] = []
    schema = Obj({"t": req(Obj({"s": Int()}))},
                 hooks=[Hook(lambda o, p, c: calls.append("ran"), needs=("t.s",))])
    run(schema, {})
    assert calls == []


def test_hooks_may_fill_defaults() -> None:
    def port_default(obj: dict, path: Path, ctx: Ctx) -> None:
        obj.setdefault("targetPort", obj["port"])

    out, lines = run(Obj({"port": Int(), "targetPort": Int()}, hooks=[port_default]), {"port": 80})
    assert (out, lines) == ({"port": 80, "targetPort": 80}, [])


def _refused_fields(schema: object, seen: set[int] | None = None) -> set[str]:
    """Names of every field declared Unsupported anywhere below `schema`."""
    from nodemesh.model.schema import Field

    seen = set() if seen is None else seen
    if id(schema) in seen:
        return set()
    seen.add(id(schema))
    names: set[str] = set()
    if isinstance(schema, Field):
        return _refused_fields(schema.schema, seen)
    if isinstance(schema, Obj):
        for name, f in schema.fields.items():
            inner = f.schema if isinstance(f, Field) else f
            if isinstance(inner, Unsupported):
                names.add(name)
            names |= _refused_fields(inner, seen)
    elif isinstance(schema, ListOf):
        names |= _refused_fields(schema.item, seen)
    elif isinstance(schema, MapOf):
        names |= _refused_fields(schema.value, seen)
    return names


def test_every_refused_field_is_documented() -> None:
    import os

    from nodemesh.model.validate import SCHEMAS

    docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "resources.md")
    with open(docs) as f:
        text = f.read()
    refused = set().union(*(_refused_fields(s) for s in SCHEMAS.values()))
    assert len(refused) > 40
    assert sorted(n for n in refused if n not in text) == []
