"""Plain-text tables for a terminal: the CLI's `get`, the demo, the benchmark's summaries."""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(str(c)))
    lines = ["   ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)).rstrip()
             for r in [list(headers), *rows]]
    return "\n".join(lines)
