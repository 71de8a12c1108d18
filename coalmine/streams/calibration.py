"""Calibrated thresholds: a false-alarm budget in events, not a p-value per test.

Checks run after every bucket, on overlapping windows, over many columns. At a fixed
p < 0.05 such a monitor fires on a stationary stream within minutes. coalmine instead sets a
target expected number of events between false alarms for the whole model,
``false_alarm_every_events`` (E), and shares it out:

* the window tests run once per window step (a second of event time, or the bucket if
  longer: :attr:`coalmine.streams.settings.ModelSettings.window_step_ms`), i.e. every ``n / W`` events
  for a window of ``n`` events and ``W`` steps, so the chance of any false alarm per
  evaluation may be ``(n / W) / E`` (the rollout checks, run every bucket, count buckets);
* that chance is split evenly (Bonferroni) over the K alarming tests of the model, so each
  window test gets the tail probability ``q(n) = n / (W E K)``. Overlapping windows make
  successive evaluations positively correlated, which only lengthens the run between false
  alarms: the split is conservative.
* sequential detectors (CUSUM) get their share as a run length, ``E K`` events (both sides
  together; :mod:`coalmine.streams.sequential`).

Each window statistic's null distribution is simulated from the reference itself: the true
column distribution is drawn from a Dirichlet posterior of the reference's bin counts (so
that the reference's own sampling noise is accounted for), the window from a multinomial on
it. The statistics are standardized (``sqrt(n_eff) x statistic``) so their law hardly moves
with the window size; the far tail needed for ``q`` (often 1e-7) is extrapolated from the
simulated upper tail with ``log P(T > t) = a - b t^r`` (r = 2: sub-Gaussian, as the
Kolmogorov distribution's ``2 exp(-2 t^2)``; r = 1 for chi-square). Calibration is seeded,
takes a second or two per model, and is cached on disk ($COALMINE_CACHE_DIR, default
~/.cache/coalmine) by the reference and settings it depends on.

The simulated windows depend on a column's reference bin counts only, and quantile bins
give most numeric columns of references of one size the same counts: columns (of one model
or of several) with the same counts share one set of windows and KS (or chi-square) samples,
drawn once from random numbers seeded by the counts themselves (:func:`null_draws`), so that
a column's fits do not depend on the columns calibrated before it. Columns sharing draws
share their Monte Carlo error too: their KS thresholds are the same, too high or too low
together (their Wasserstein thresholds partly so). The expected false-alarm rate stays the
budget's (the split over tests assumes nothing of their dependence); its spread from one
seed to another grows.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from coalmine.streams import drift

#: bump when the simulation changes: cached thresholds of older versions are then ignored
VERSION = 5
#: window sizes (events) at which thresholds are simulated; others are interpolated in log n
GRID_N = np.array([100, 300, 1000, 3000, 10_000, 30_000, 100_000, 1_000_000])
SIMULATIONS = 4000
#: the simulated upper tail used for the fit: survival probabilities in this range
TAIL = (10 / SIMULATIONS, 0.1)
#: references whose null draws are kept for the next column with the same bin counts: each
#: holds ``len(GRID_N) x SIMULATIONS x bins`` int32 window counts, 4 MB at 32 bins (16 MB
#: for the 4; 0.5 MB a bin), for the life of the process. 4 suffice: in 8 models of 12
#: columns with references of their own, 21 distinct counts of 96 columns, 24 draws made
SHARED_DRAWS = 4


@dataclass(frozen=True)
class TailFit:
    """``log P(T > t) = a - b t^power`` at each grid window size, and the simulated
    ``1 - 1/SIMULATIONS`` quantile as a floor (the fit never goes below what was seen).
    :meth:`stack` puts several columns' fits in one, to threshold them in one numpy pass."""

    a: np.ndarray
    b: np.ndarray
    floor: np.ndarray
    power: float | np.ndarray

    @classmethod
    def stack(cls, fits: list[TailFit]) -> TailFit:
        a, b, floor = (np.stack([getattr(f, name) for f in fits]) for name in ("a", "b", "floor"))
        return cls(a, b, floor, np.array([f.power for f in fits], dtype=float))

    def threshold(self, n, q: float):
        """Level that the standardized statistic exceeds with probability ``q`` in a window
        of ``n`` events; a stacked fit takes an array of ``n``, one per column."""
        # np.minimum(np.maximum()): np.clip without its dispatch overhead (a window test's hot path)
        x = np.log(np.minimum(np.maximum(n, GRID_N[0]), GRID_N[-1]))
        if np.ndim(x) == 0 or np.minimum.reduce(x) == np.maximum.reduce(x):
            # one grid position (one column, or every column of the window has as many
            # events, the usual case): found in Python, and slices of every row
            x = float(x.flat[0])
            j = min(max(bisect.bisect_right(_LOG_GRID_POINTS, x), 1), len(GRID_N) - 1) - 1
            at: tuple = (..., j)
        else:
            j = np.minimum(
                np.maximum(np.searchsorted(_LOG_GRID, x, side="right"), 1), len(GRID_N) - 1
            )
            j -= 1
            at = (slice(None), np.arange(len(j)), j)
        w = (x - _LOG_GRID[j]) / (_LOG_GRID[j + 1] - _LOG_GRID[j])
        after = (*at[:-1], j + 1)
        a, b, floor = self._stacked[at] * (1 - w) + self._stacked[after] * w
        t = np.maximum(a - math.log(q), 0.0) / np.where(b > 0, b, 1.0)
        level = np.where(b > 0, np.maximum(floor, t**self._root), floor)
        return float(level) if level.ndim == 0 else level

    @cached_property
    def _root(self) -> float | np.ndarray:
        return 1 / self.power

    @cached_property
    def _stacked(self) -> np.ndarray:
        """``a``, ``b`` and ``floor`` in one array: one gather interpolates all three."""
        return np.stack([self.a, self.b, self.floor])


_LOG_GRID = np.log(GRID_N)
_LOG_GRID_POINTS = _LOG_GRID.tolist()


def fit_tail(samples: np.ndarray, power: float) -> tuple[float, float, float, float]:
    """Least-squares fit of the log survival function on the upper tail of ``samples``:
    (a, b, floor, sum of squared residuals).

    >>> rng = np.random.default_rng(0)
    >>> a, b, floor, _ = fit_tail(np.abs(rng.standard_normal(20000)), power=2)
    >>> round(b, 1)      # |N(0,1)|: log P(T > t) -> -t^2 / 2 far out; steeper near 2
    0.6
    """
    t = np.sort(samples)
    sf = 1.0 - np.arange(1, len(t) + 1) / (len(t) + 1)
    sel = (sf >= TAIL[0]) & (sf <= TAIL[1])
    floor = float(t[-max(1, len(t) // SIMULATIONS)])
    x, y = t[sel] ** power, np.log(sf[sel])
    if len(x) < 3 or np.ptp(x) == 0:
        return 0.0, 0.0, floor, 0.0
    (slope, intercept), sse, *_ = np.polyfit(x, y, 1, full=True)
    return float(intercept), float(-slope), floor, float(sse.sum()) if len(sse) else 0.0


def fit_grid(samples: list[np.ndarray], powers: tuple[float, ...]) -> TailFit:
    """A :class:`TailFit` over the window-size grid, with the tail shape (power) that fits the
    simulated tails best: 2 (sub-Gaussian) for well-behaved statistics, 1 (exponential) where
    heavy-tailed data make the statistic heavy-tailed too, which extrapolates more cautiously."""
    best = None
    for power in powers:
        rows = [fit_tail(s, power) for s in samples]
        sse = sum(r[3] for r in rows)
        if best is None or sse < best[0]:
            best = (sse, power, rows)
    assert best is not None, "fit_grid needs at least one power"
    _, power, rows = best
    a, b, floor = (np.array(c) for c in list(zip(*rows))[:3])
    return TailFit(a, b, floor, power)


def seeded_rng(seed: int, purpose: str, *arrays: np.ndarray) -> np.random.Generator:
    """Random numbers that depend on ``seed``, ``purpose`` and the arrays' contents only (not
    on what was drawn before): the same column gets the same draws in any order, in any
    process."""
    digest = hashlib.sha256(purpose.encode())
    for arr in arrays:
        digest.update(np.ascontiguousarray(arr, dtype=float).tobytes())
    return np.random.default_rng([seed, int.from_bytes(digest.digest()[:16], "little")])


def simulate_windows(
    ref_counts: np.ndarray, n: int, sims: int, rng: np.random.Generator
) -> np.ndarray:
    """Window histograms under no drift: p ~ Dirichlet(reference counts + 1/2), window ~
    Multinomial(n, p). Only bins the reference occupies are drawn."""
    p = rng.dirichlet(ref_counts + 0.5, size=sims)
    return rng.multinomial(n, p)


class NullDraws:
    """Simulated windows (one stack per :data:`GRID_N` size) on the occupied bins ``ref`` of a
    reference, and the statistics that depend on nothing else: shared by every column with
    these bin counts (module docstring). Read-only."""

    def __init__(self, ref: np.ndarray, seed: int):
        self.ref = ref
        self.windows = []
        for n in GRID_N:
            win = simulate_windows(ref, int(n), SIMULATIONS, seeded_rng(seed, f"windows {n}", ref))
            win = win.astype(np.int32)  # half the memory; counts of at most 1e6
            win.flags.writeable = False
            self.windows.append(win)
        #: sqrt(n_eff) of each window size: the standardization of the statistics
        self.scales = np.sqrt(drift.effective_n(ref.sum(), GRID_N))

    @cached_property
    def ks(self) -> TailFit:
        """Tail fit of the standardized KS statistic."""
        samples = [s * drift.ks_statistic(self.ref, w) for s, w in zip(self.scales, self.windows)]
        return fit_grid(samples, (2,))

    @cached_property
    def chi2(self) -> TailFit:
        """Tail fit of the chi-square homogeneity statistic."""
        return fit_grid([drift.chi2_statistic(self.ref, w)[0] for w in self.windows], (1,))


def null_draws(ref: np.ndarray, seed: int) -> NullDraws:
    """The :class:`NullDraws` of the occupied bin counts ``ref``: drawn once, then shared
    while among the last :data:`SHARED_DRAWS` references asked for."""
    return _null_draws(np.ascontiguousarray(ref, dtype=np.int64).tobytes(), seed)


@lru_cache(maxsize=SHARED_DRAWS)
def _null_draws(ref_bytes: bytes, seed: int) -> NullDraws:
    ref = np.frombuffer(ref_bytes, dtype=np.int64)
    return NullDraws(ref, seed)


def forget_draws() -> None:
    """Drop the shared :func:`null_draws` (up to 16 MB): a build of baselines is done."""
    _null_draws.cache_clear()


def simulated_wasserstein(
    pos: np.ndarray, bin_sd: np.ndarray, ref: np.ndarray, win: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Wasserstein-1 of simulated windows against the reference. The live statistic puts each
    inner bin's mass at the window's own mean in that bin; that mean differs from the
    reference's by two sampling errors, the window's and the reference's own (as the
    Dirichlet draw does for the bin masses), both simulated as normal: the bin's spread over
    sqrt(count). The outer bins sit at fixed edges (``bin_sd`` 0 there).

    The distance is :func:`coalmine.streams.drift.paired_wasserstein`'s: a window whose
    every bin's mean stays between its neighbours' reference means (most of them) needs no
    sort."""
    noise = (
        rng.standard_normal(win.shape)
        * bin_sd
        * np.sqrt(1 / np.maximum(win, 1) + 1 / np.maximum(ref, 1))
    )
    win_p = win / np.maximum(win.sum(axis=-1, keepdims=True), 1)
    return drift.paired_wasserstein(pos, ref / ref.sum(), pos + noise, win_p)[0]


def calibrate_numeric(
    ref_counts: np.ndarray, positions: np.ndarray, bin_sd: np.ndarray, sd: float, seed: int
) -> dict[str, TailFit]:
    """Tail fits of the standardized KS and normalized Wasserstein statistics of a column
    (``positions`` and ``bin_sd`` per bin; ``sd`` of the winsorized reference). The windows
    and the KS fit are the :func:`null_draws` of the column's bin counts; the noise of the
    bins' means is the column's own, seeded by everything the column's fits depend on."""
    occupied = ref_counts > 0
    ref, pos, spread = ref_counts[occupied], positions[occupied], bin_sd[occupied]
    draws = null_draws(ref, seed)
    rng = seeded_rng(seed, "bin means", ref, pos, spread, np.array([sd]))
    ws = [
        scale * simulated_wasserstein(pos, spread, ref, win, rng) / (sd if sd > 0 else 1.0)
        for scale, win in zip(draws.scales, draws.windows)
    ]
    return {"ks": draws.ks, "wasserstein": fit_grid(ws, (1, 2))}


def calibrate_categorical(ref_counts: np.ndarray, seed: int) -> dict[str, TailFit]:
    """Tail fit of the chi-square homogeneity statistic of a column."""
    return {"chi2": null_draws(ref_counts[ref_counts > 0], seed).chi2}


def tail_share(
    window_events: float, window_evaluations: float, every_events: int, tests: int
) -> float:
    """Tail probability allowed to one window test at one evaluation (module docstring).

    >>> tail_share(6000, 60, 1_000_000, 50)
    2e-06
    """
    return min(0.5, window_events / (window_evaluations * every_events * tests))
