"""Envoy's verdict on a ``safe_regex``, without Envoy: RE2 compiled here as Envoy compiles it.

Pure and in the model, because validation needs it (CiliumNetworkPolicy HTTP rules reach Envoy
as written) as much as the route compiler does; `nodemesh.route.validate.check_regex` adds the
slow path through ``envoy --mode validate``.
"""

from __future__ import annotations

from typing import Any

# Envoy compiles `safe_regex` with RE2 (google_re2, its only engine), errors not logged, and then
# refuses programs larger than the runtime key re2.max_program_size.error_level: 100 when unset,
# and nodemesh sets no runtime keys. The PyPI package google-re2 is the same engine, so its
# verdict and its words are Envoy's. Envoy 1.40 hands RE2 the pattern's UTF-8 bytes as Latin-1
# text, as measured with its binary: `[é-a]` fails on "©-a", `\x{100}` is an invalid escape,
# `\pL` is an 11-instruction program (1200 in UTF-8) and `.{49}` is one of 102, over the limit;
# tests/unit/test_route_regex.py holds RE2's answers against Envoy's.
ENVOY_MAX_PROGRAM_SIZE = 100


def _envoy_re2_options() -> Any:
    import re2

    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1
    options.log_errors = False  # as Envoy's; the reason comes back as the error
    return options


def re2_problem(pattern: str) -> str | None:
    """Why Envoy would reject `pattern` as a ``safe_regex``, or None when it accepts it: RE2's
    own message (``missing ): /items/(unclosed``) or Envoy's program-size message, word for word
    what an Envoy NACK carries (microseconds)."""
    if not pattern:
        return "value length must be at least 1 characters"  # Envoy's proto rule, before RE2
    import re2

    try:
        rx = re2.compile(pattern.encode("utf-8"), _envoy_re2_options())
    except UnicodeEncodeError:
        return "not valid UTF-8 (a lone surrogate)"
    except re2.error as e:
        why = e.args[0] if e.args else b""
        why = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        return why or "invalid regular expression"
    size = rx.programsize
    if size > ENVOY_MAX_PROGRAM_SIZE:
        return (f"regex '{pattern}' RE2 program size of {size} > max program size of "
                f"{ENVOY_MAX_PROGRAM_SIZE} set for the error level threshold. Increase "
                "configured max program size if necessary.")
    return None
