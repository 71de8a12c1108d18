"""Serving latency as a mergeable histogram: log-spaced bins, so a window's quantiles come from
summed counts, whatever the partitions and buckets the latencies were folded in."""

from __future__ import annotations

import numpy as np

#: latency histogram: log-spaced bins from 0.1 ms to 100 s, about 12% wide each
LATENCY_EDGES_MS = np.geomspace(0.1, 100_000, 121)


def latency_bins(latency_ms: np.ndarray) -> np.ndarray:
    """Bin index of each latency (NaN, i.e. not reported, goes to no bin: -1)."""
    idx = np.searchsorted(LATENCY_EDGES_MS, latency_ms, side="right")
    return np.where(np.isnan(latency_ms), -1, idx)


def latency_quantile(hist: np.ndarray, q: float) -> float:
    """Upper edge of the bin holding the q-quantile: never under the true quantile, at most
    one bin width (about 12%) over it.

    >>> h = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=int)
    >>> h[latency_bins(np.array([5.0] * 99 + [900.0]))] += 1
    >>> 900 <= latency_quantile(h, 0.999) < 900 * 1.13
    True
    """
    total = hist.sum()
    if total == 0:
        return float("nan")
    k = int(np.searchsorted(np.cumsum(hist), q * total))
    return float(LATENCY_EDGES_MS[min(k, len(LATENCY_EDGES_MS) - 1)])
