"""Small statistics for `nodemesh bench` (pure): medians and spreads over runs, percentiles of
pooled histograms, ratios."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from nodemesh.bench.loadgen import bucket_value


def median(xs: Iterable[float]) -> float | None:
    v = sorted(x for x in xs if x is not None)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def spread(xs: Iterable[float]) -> dict[str, float | int | None]:
    """Median, min, max and the number of values."""
    v = sorted(x for x in xs if x is not None)
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": median(v), "min": v[0], "max": v[-1], "n": len(v)}


def percentile(sorted_xs: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not sorted_xs:
        return None
    n = len(sorted_xs)
    return sorted_xs[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))]


def merge_histograms(hs: Iterable[Mapping[str, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in hs:
        for k, v in h.items():
            out[int(k)] = out.get(int(k), 0) + int(v)
    return out


def histogram_percentiles(h: Mapping[int, int], ps: Sequence[float] = (50, 90, 99, 99.9)
                          ) -> dict[str, float | None]:
    """Percentiles (µs) of a pooled log-bucketed histogram (2 % precision)."""
    total = sum(h.values())
    out: dict[str, float | None] = {}
    keys = sorted(h)
    for p in ps:
        name = "p" + f"{p:g}".replace(".", "")
        if not total:
            out[name] = None
            continue
        rank = max(1, math.ceil(p / 100 * total))
        acc = 0
        for k in keys:
            acc += h[k]
            if acc >= rank:
                out[name] = round(bucket_value(k) / 1000, 1)
                break
    out["count"] = total
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x: float | None, digits: int = 0, unit: str = "") -> str:
    if x is None:
        return "-"
    if digits == 0:
        return f"{x:,.0f}{unit}"
    return f"{x:,.{digits}f}{unit}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"
