"""The arithmetic of a serving benchmark: percentiles, latency summaries and arrival schedules.

Pure functions over plain numbers (no HTTP, no clocks), so each is tested against a hand computation.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

PERCENTILES = (("median", 50.0), ("p90", 90.0), ("p99", 99.0))


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) of `values`, linearly interpolated between the two nearest ranks
    (numpy's default: rank (n - 1) * q / 100 counted from 0); None for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q={q!r}: expected a percentile between 0 and 100")
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(values_s: Sequence[float]) -> dict:
    """mean / median / p90 / p99 of durations given in seconds, in milliseconds (None when empty)."""
    if len(values_s) == 0:
        return {"mean": None, **{name: None for name, _ in PERCENTILES}}
    ms = [1000.0 * v for v in values_s]
    return {"mean": float(np.mean(ms)), **{name: percentile(ms, q) for name, q in PERCENTILES}}


def arrival_offsets(n: int, request_rate: float, arrival: str, seed: int) -> list[float]:
    """When each of `n` requests arrives, in seconds after the first (which arrives at 0).

    burst, or an infinite rate: all at 0 (the concurrency limit alone paces them). poisson: a Poisson
    process at `request_rate` requests/s, i.e. independent exponential gaps of mean 1 / rate, drawn
    from numpy's generator seeded with `seed` (the same seed, the same schedule)."""
    if n < 0:
        raise ValueError(f"n={n!r}: expected a count >= 0")
    if arrival not in ("poisson", "burst"):
        raise ValueError(f"arrival={arrival!r}: expected 'poisson' or 'burst'")
    if not request_rate > 0:
        raise ValueError(f"request_rate={request_rate!r}: expected a rate > 0 (inf: all at once)")
    if n == 0:
        return []
    if arrival == "burst" or math.isinf(request_rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=n - 1)
    return [0.0] + np.cumsum(gaps).tolist()
