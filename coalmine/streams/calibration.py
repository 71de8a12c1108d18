"""Calibrated thresholds: a false-alarm budget in events, not a p-value per test.

Checks run after every bucket, on overlapping windows, over many columns. At a fixed
p < 0.05 such a monitor fires on a stationary stream within minutes. coalmine instead sets a
target expected number of events between false alarms for the whole model,
``false_alarm_every_events`` (E), and shares it out:

* an evaluation follows every bucket, i.e. every ``n / W`` events for a window of ``n``
  events over ``W`` buckets, so the chance of any false alarm per evaluation may be
  ``(n / W) / E``;
* that chance is split evenly (Bonferroni) over the K alarming tests of the model, so each
  window test gets the tail probability ``q(n) = n / (W E K)``. Overlapping windows make
  successive evaluations positively correlated, which only lengthens the run between false
  alarms: the split is conservative.
* sequential detectors (CUSUM) get their share as a run length, ``E K`` events per side.

Each window statistic's null distribution is simulated from the reference itself: the true
column distribution is drawn from a Dirichlet posterior of the reference's bin counts (so
that the reference's own sampling noise is accounted for), the window from a multinomial on
it. The statistics are standardized (``sqrt(n_eff) x statistic``) so their law hardly moves
with the window size; the far tail needed for ``q`` (often 1e-7) is extrapolated from the
simulated upper tail with ``log P(T > t) = a - b t^r`` (r = 2: sub-Gaussian, as the
Kolmogorov distribution's ``2 exp(-2 t^2)``; r = 1 for chi-square). Calibration is seeded,
takes well under a second per model, and is cached by :func:`Calibration.for_layout` callers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coalmine.streams import drift

#: window sizes (events) at which thresholds are simulated; others are interpolated in log n
GRID_N = np.array([100, 300, 1000, 3000, 10_000, 30_000, 100_000, 1_000_000])
SIMULATIONS = 4000
#: the simulated upper tail used for the fit: survival probabilities in this range
TAIL = (10 / SIMULATIONS, 0.1)


@dataclass(frozen=True)
class TailFit:
    """``log P(T > t) = a - b t^power`` at each grid window size, and the simulated
    ``1 - 1/SIMULATIONS`` quantile as a floor (the fit never goes below what was seen)."""

    a: np.ndarray
    b: np.ndarray
    floor: np.ndarray
    power: float

    def threshold(self, n: float, q: float) -> float:
        """Level that the standardized statistic exceeds with probability ``q`` in a window
        of ``n`` events."""
        x = np.log(np.clip(n, GRID_N[0], GRID_N[-1]))
        a, b, floor = (float(np.interp(x, np.log(GRID_N), v)) for v in (self.a, self.b, self.floor))
        if not b > 0:
            return floor
        t = max(a - np.log(q), 0.0) / b
        return max(floor, t ** (1 / self.power))


def fit_tail(samples: np.ndarray, power: float) -> tuple[float, float, float]:
    """Least-squares fit of the log survival function on the upper tail of ``samples``.

    >>> rng = np.random.default_rng(0)
    >>> a, b, floor = fit_tail(np.abs(rng.standard_normal(20000)), power=2)
    >>> round(b, 1)      # |N(0,1)|: log P(T > t) -> -t^2 / 2 far out; steeper near 2
    0.6
    """
    t = np.sort(samples)
    sf = 1.0 - np.arange(1, len(t) + 1) / (len(t) + 1)
    sel = (sf >= TAIL[0]) & (sf <= TAIL[1])
    floor = float(t[-max(1, len(t) // SIMULATIONS)])
    x, y = t[sel] ** power, np.log(sf[sel])
    if len(x) < 3 or np.ptp(x) == 0:
        return 0.0, 0.0, floor
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(-slope), floor


def simulate_windows(ref_counts: np.ndarray, n: int, sims: int, rng: np.random.Generator) -> np.ndarray:
    """Window histograms under no drift: p ~ Dirichlet(reference counts + 1/2), window ~
    Multinomial(n, p). Only bins the reference occupies are drawn."""
    p = rng.dirichlet(ref_counts + 0.5, size=sims)
    return rng.multinomial(n, p)


def calibrate_numeric(ref_counts: np.ndarray, positions: np.ndarray, sd: float,
                      rng: np.random.Generator) -> dict[str, TailFit]:
    """Tail fits of the standardized KS and normalized Wasserstein statistics of a column."""
    occupied = ref_counts > 0
    ref, pos = ref_counts[occupied], positions[occupied]
    m = ref.sum()
    fits: dict[str, list] = {"ks": [], "wasserstein": []}
    for n in GRID_N:
        win = simulate_windows(ref, int(n), SIMULATIONS, rng)
        scale = np.sqrt(drift.effective_n(m, n))
        fits["ks"].append(fit_tail(scale * drift.ks_statistic(ref, win), 2))
        w = drift.wasserstein_same_positions(pos, ref, win) / (sd if sd > 0 else 1.0)
        fits["wasserstein"].append(fit_tail(scale * w, 2))
    return {k: _stack(v, 2) for k, v in fits.items()}


def calibrate_categorical(ref_counts: np.ndarray, rng: np.random.Generator) -> dict[str, TailFit]:
    """Tail fit of the chi-square homogeneity statistic of a column."""
    ref = ref_counts[ref_counts > 0]
    out = []
    for n in GRID_N:
        win = simulate_windows(ref, int(n), SIMULATIONS, rng)
        out.append(fit_tail(drift.chi2_statistic(ref, win)[0], 1))
    return {"chi2": _stack(out, 1)}


def _stack(rows: list[tuple[float, float, float]], power: float) -> TailFit:
    a, b, floor = (np.array(c) for c in zip(*rows))
    return TailFit(a, b, floor, power)


def tail_share(window_events: float, window_buckets: int, every_events: int, tests: int) -> float:
    """Tail probability allowed to one window test at one evaluation (module docstring).

    >>> tail_share(6000, 60, 1_000_000, 50)
    2e-06
    """
    return min(0.5, window_events / (window_buckets * every_events * tests))
