"""Latency percentiles, by the nearest-rank method."""

from __future__ import annotations

import math


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(math.ceil(fraction * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def latency_summary_ms(seconds: list[float]) -> dict:
    """p50, p95, p99 and max of `seconds`, in milliseconds."""
    values = sorted(seconds)
    as_ms = lambda value: None if value is None else round(value * 1000, 1)  # noqa: E731
    return {
        "p50_ms": as_ms(percentile(values, 0.50)),
        "p95_ms": as_ms(percentile(values, 0.95)),
        "p99_ms": as_ms(percentile(values, 0.99)),
        "max_ms": as_ms(values[-1] if values else None),
    }
