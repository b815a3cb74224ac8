"""A small declarative schema language for manifests: types, ranges, enums, patterns, defaults.

Every kind's schema is written with the pieces below (`Obj`, `Str`, `Int`, `ListOf`, `MapOf`,
`IntOrStr`, ...). Validating a value against a schema returns a *copy* with defaults filled in and
records every problem in a `Ctx` as ``(path, message)`` — it never stops at the first problem and
never raises. Because objects are closed (every field has to be declared), unknown fields are
found at any depth without per-kind code; per-kind semantic rules hang off objects as `Hook`s.

Fields that exist in the Kubernetes API but that nodemesh cannot honour are declared too, as
`Unsupported`, so that the user reads "not supported by nodemesh (why)" and not "unknown field".
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# -- paths and errors -------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A path segment that is a map key chosen by the user (a label name, an annotation ...)."""

    name: str


Segment = str | int | Key
Path = tuple[Segment, ...]

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: Path) -> str:
    """``("spec", "ports", 0, "port")`` → ``spec.ports[0].port``; map keys go in brackets,
    quoted only when they hold more than letters, digits, '-' and '_' (``labels["app/x"]``)."""
    out = ""
    for seg in path:
        if isinstance(seg, bool):  # bool is an int: never a list index here
            seg = str(seg)
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif isinstance(seg, Key):
            name = seg.name
            plain = _PLAIN_KEY.fullmatch(name)
            out += f"[{name}]" if plain else f"[{json.dumps(name, ensure_ascii=False)}]"
        else:
            out += f".{seg}" if out else seg
    return out


class Ctx:
    """Collects errors during one validation and carries read-only facts hooks may need."""

    def __init__(self, **facts: Any) -> None:
        self.errors: list[tuple[Path, str]] = []
        self.facts: dict[str, Any] = facts

    def error(self, path: Path, message: str) -> None:
        self.errors.append((path, message))

    def mark(self) -> int:
        return len(self.errors)

    def clean_since(self, mark: int, prefix: Path) -> bool:
        """True when no error recorded after `mark` lies at, below or above `prefix` (an error
        on a parent, such as "required", means the value at `prefix` is missing)."""
        n = len(prefix)
        return not any(p[:n] == prefix or prefix[: len(p)] == p for p, _ in self.errors[mark:])

    def lines(self) -> list[str]:
        return [f"{format_path(p)}: {m}" if p else m for p, m in self.errors]


# -- describing values in messages -----------------------------------------------------------


def quote(value: Any) -> str:
    """A value as it would appear in YAML written by a careful user, for messages."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def one_of(values: Iterable[Any]) -> str:
    """``["A"]`` → ``"A"``; ``["A", "B"]`` → ``"A" or "B"``; more → ``one of "A", "B", "C"``."""
    vals = [quote(v) for v in values]
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2:
        return f"{vals[0]} or {vals[1]}"
    return "one of " + ", ".join(vals)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _must_be_string(value: Any) -> str:
    # Unquoted YAML scalars such as 8080, true or 1.0 are the usual cause: say how to fix it.
    if isinstance(value, bool | int | float):
        return f'must be a string (got {type_name(value)}; write it in quotes: "{quote(value)}")'
    return f"must be a string (got {type_name(value)})"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- schemas ---------------------------------------------------------------------------------


class Schema:
    """Base of all schemas: `check` returns the cleaned value and records problems in `ctx`."""

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        raise NotImplementedError


class AnyValue(Schema):
    """Anything at all; used only where the Kubernetes API itself takes free-form data."""

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        return copy.deepcopy(value)


@dataclass
class Str(Schema):
    """A string, optionally limited by length, an enum, a regex or a custom check.

    `unsupported` maps enum values that exist in the Kubernetes API but that nodemesh refuses
    to the reason shown to the user.
    """

    enum: Sequence[str] | None = None
    unsupported: Mapping[str, str] = field(default_factory=dict)
    pattern: str | None = None
    pattern_msg: str = ""
    min_len: int = 0
    max_len: int | None = None
    validator: Callable[[str], str | None] | None = None

    def __post_init__(self) -> None:
        self._re = re.compile(self.pattern) if self.pattern else None

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if not isinstance(value, str):
            ctx.error(path, _must_be_string(value))
            return value
        if value in self.unsupported:
            ctx.error(path, f"{value} is not supported ({self.unsupported[value]})")
            return value
        if self.enum is not None and value not in self.enum:
            ctx.error(path, f"must be {one_of(self.enum)} (got {quote(value)})")
            return value
        if len(value) < self.min_len:
            ctx.error(path, "must not be empty" if self.min_len == 1
                      else f"must be at least {self.min_len} characters long")
            return value
        if self.max_len is not None and len(value) > self.max_len:
            ctx.error(path, f"must be at most {self.max_len} characters long (is {len(value)})")
            return value
        if self._re is not None and not self._re.fullmatch(value):
            ctx.error(path, self.pattern_msg or f"must match the pattern {self.pattern}")
            return value
        if self.validator is not None:
            problem = self.validator(value)
            if problem:
                ctx.error(path, problem)
        return value


@dataclass
class Int(Schema):
    """An integer (never a boolean or a float), optionally within [minimum, maximum] or an enum."""

    minimum: int | None = None
    maximum: int | None = None
    enum: Sequence[int] | None = None

    def range_msg(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f"must be {self.minimum}-{self.maximum}"
        if self.minimum is not None:
            return f"must be >= {self.minimum}"
        return f"must be <= {self.maximum}"

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one number type: 80.0 is 80
        if not is_int(value):
            ctx.error(path, f"must be an integer (got {type_name(value)})")
            return value
        if self.enum is not None and value not in self.enum:
            ctx.error(path, f"must be {one_of(self.enum)} (got {value})")
        elif (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            ctx.error(path, self.range_msg())
        return value


class Bool(Schema):
    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if not isinstance(value, bool):
            ctx.error(path, f"must be true or false (got {type_name(value)})")
        return value


@dataclass
class IntOrStr(Schema):
    """Kubernetes' IntOrString: a number checked by `int_`, or a string checked by `str_`."""

    int_: Int
    str_: Str

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if isinstance(value, str):
            return self.str_.check(value, path, ctx)
        if is_int(value) or (isinstance(value, float) and value.is_integer()):
            return self.int_.check(value, path, ctx)
        ctx.error(path, f"must be an integer or a string (got {type_name(value)})")
        return value


@dataclass
class ListOf(Schema):
    """A list whose items all follow `item`; `unique` names a key that must not repeat."""

    item: Schema
    min_items: int = 0
    max_items: int | None = None
    unique: Callable[[Any], Any] | None = None
    unique_msg: str = "duplicate value"
    unique_at: str | None = None  # the item's field to report a duplicate on

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if not isinstance(value, list):
            ctx.error(path, f"must be a list (got {type_name(value)})")
            return value
        if len(value) < self.min_items:
            ctx.error(path, "must not be empty" if self.min_items == 1
                      else f"must have at least {self.min_items} items")
        if self.max_items is not None and len(value) > self.max_items:
            ctx.error(path, f"must have at most {self.max_items} items (has {len(value)})")
        out = []
        seen: dict[Any, int] = {}
        for i, v in enumerate(value):
            mark = ctx.mark()
            cleaned = self.item.check(v, (*path, i), ctx)
            out.append(cleaned)
            if self.unique is not None and ctx.clean_since(mark, (*path, i)):
                k = self.unique(cleaned)
                if k is not None:
                    if k in seen:
                        at: Path = (self.unique_at,) if self.unique_at else ()
                        first = format_path((*path, seen[k], *at))
                        ctx.error((*path, i, *at), f"{self.unique_msg} (same as {first})")
                    else:
                        seen[k] = i
        return out


@dataclass
class MapOf(Schema):
    """A map with string keys (checked by `key`, which returns a problem or None) and values
    that all follow `value`."""

    value: Schema
    key: Callable[[str], str | None] | None = None
    key_what: str = "key"

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if not isinstance(value, dict):
            ctx.error(path, f"must be a map (got {type_name(value)})")
            return value
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                ctx.error((*path, Key(str(k))), f"{self.key_what} must be a string "
                          f"(got {type_name(k)}; write it in quotes)")
                continue
            if self.key is not None:
                problem = self.key(k)
                if problem:
                    ctx.error((*path, Key(k)), f"invalid {self.key_what}: {problem}")
            out[k] = self.value.check(v, (*path, Key(k)), ctx)
        return out


@dataclass
class Unsupported(Schema):
    """A field of the Kubernetes API that nodemesh refuses. Empty values (`allowed`) pass,
    because generated manifests often carry ``volumes: []`` or ``hostNetwork: false``."""

    why: str
    allowed: tuple[Any, ...] = (False, "", 0)

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if value == [] or value == {} or any(
            type(value) is type(a) and value == a for a in self.allowed
        ):
            return value
        ctx.error(path, f"not supported by nodemesh ({self.why})")
        return value


@dataclass
class Forbidden(Schema):
    """A field that is never valid in this position (e.g. L7 rules in a deny section)."""

    why: str

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        ctx.error(path, self.why)
        return value


class Drop(Schema):
    """Accepted and removed from the result: status and metadata the store owns."""

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        return _DROP


_DROP = object()


@dataclass
class Field:
    """One field of an `Obj`: its schema, whether it is required, and its default.

    `default` is a value (deep-copied) or a zero-argument callable. A null value counts as
    absent, as it does for the Kubernetes API.
    """

    schema: Schema
    required: bool = False
    default: Any = None


def req(schema: Schema) -> Field:
    return Field(schema, required=True)


def opt(schema: Schema, default: Any = None) -> Field:
    return Field(schema, default=default)


HookFn = Callable[[dict, Path, Ctx], None]


@dataclass
class Hook:
    """A semantic rule (or a defaulting step) run on an object after its fields are checked.

    It runs only when the fields named in `needs` (dotted paths below the object; all fields
    when None) were found without error, so it can trust their types. It may change the object
    (to fill defaults that depend on other fields) and may record errors.
    """

    fn: HookFn
    needs: tuple[str, ...] | None = None


@dataclass
class Obj(Schema):
    """An object with a closed set of fields: any other field is an error."""

    fields: Mapping[str, Field | Schema]
    hooks: Sequence[Hook | HookFn] = ()
    what: str = ""  # how to name this object in messages, e.g. "a port"

    def field(self, name: str) -> Field:
        f = self.fields[name]
        return f if isinstance(f, Field) else Field(f)

    def check(self, value: Any, path: Path, ctx: Ctx) -> Any:
        if not isinstance(value, dict):
            ctx.error(path, f"must be an object (got {type_name(value)})")
            return value
        mark = ctx.mark()
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str) or k not in self.fields:
                ctx.error((*path, str(k)), self._unknown(str(k)))
                continue
            if v is None:
                continue  # null means unset; required fields are reported below
            cleaned = self.field(k).schema.check(v, (*path, k), ctx)
            if cleaned is not _DROP:
                out[k] = cleaned
        for name in self.fields:
            f = self.field(name)
            if name in out or (name in value and value[name] is not None):
                continue
            if f.required:
                ctx.error((*path, name), "required")
            elif f.default is not None:
                # Defaults go through their schema too, so that their own defaults are filled.
                default = f.default() if callable(f.default) else copy.deepcopy(f.default)
                out[name] = f.schema.check(default, (*path, name), ctx)
        for h in self.hooks:
            hook = h if isinstance(h, Hook) else Hook(h)
            needs = [()] if hook.needs is None else [tuple(n.split(".")) for n in hook.needs]
            if all(ctx.clean_since(mark, (*path, *n)) for n in needs):
                hook.fn(out, path, ctx)
        return out

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.fields), n=1, cutoff=0.75)
        return f'unknown field (did you mean "{close[0]}"?)' if close else "unknown field"


def extend(base: Obj, fields: Mapping[str, Field | Schema] | None = None,
           hooks: Sequence[Hook | HookFn] = (), drop: Iterable[str] = ()) -> Obj:
    """A copy of `base` with more (or replaced) fields and hooks, and some fields removed."""
    merged = {k: v for k, v in base.fields.items() if k not in set(drop)}
    merged.update(fields or {})
    return Obj(merged, [*base.hooks, *hooks], base.what)
