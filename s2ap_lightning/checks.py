"""Option checks shared by every layer: one wording for "this value is out of range"."""

from __future__ import annotations

import math


def check_range(
    name: str,
    value: float,
    low: float | None,
    high: float | None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming the option and its valid range when ``value`` is outside it."""
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        rng = f"{left}{lo}, {hi}{right}"
        raise ValueError(f"{name}={value!r} is out of range: valid range is {rng}")
