"""Reading metric streams: numbers out of JSON values, finite series, and small statistics
(mean, std, correlation, least-squares trend, moving mean) in plain Python."""

from __future__ import annotations

import math
from typing import Any, Sequence


def as_float(value: Any) -> float | None:
    """A metric value as a float: numbers, and the strings JSON writers use for nan/inf; else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(value)
    return None


def series(history: Sequence[dict], key: str, last: int | None = None, first: int | None = None) -> list[float]:
    """Finite values of ``key`` over the history: all, the ``last`` n or the ``first`` n that have it
    (scanning only as far as needed, so a check stays cheap on long runs)."""
    out: list[float] = []
    rows = reversed(history) if last else history
    for h in rows:
        v = as_float(h.get(key))
        if v is not None and math.isfinite(v):
            out.append(v)
            if len(out) == (last or first):
                break
    return out[::-1] if last else out


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean (nan for an empty sequence)."""
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation of the last common n values; 0 when undefined (n < 3 or a constant series)."""
    n = min(len(xs), len(ys))
    xs, ys = xs[-n:], ys[-n:]
    sx, sy = std(xs), std(ys)
    if n < 3 or sx == 0 or sy == 0:
        return 0.0
    mx, my = mean(xs), mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / ((n - 1) * sx * sy)


def trend(ys: Sequence[float], with_se: bool = False):
    """Least-squares slope per step (and its standard error)."""
    n = len(ys)
    mx, my = (n - 1) / 2, mean(ys)
    den = sum((i - mx) ** 2 for i in range(n))
    b = sum((i - mx) * (y - my) for i, y in enumerate(ys)) / den if den else 0.0
    if not with_se:
        return b
    resid = sum((y - my - b * (i - mx)) ** 2 for i, y in enumerate(ys))
    return b, math.sqrt(resid / max(1, n - 2) / den) if den else 0.0


def moving_mean(xs: Sequence[float], k: int) -> list[float]:
    """Trailing mean over k values (fewer at the start), in one pass."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out
