"""The figures every benchmark here reports, computed one way."""

from __future__ import annotations

import math
import statistics


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile: the smallest value with at least
    ``p`` percent of the values at or below it (p99 of 200 values: the 198th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float:
    return statistics.median(values)
