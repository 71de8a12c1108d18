"""Two-sample drift statistics on binned data: a reference histogram against a window's.

Every function takes histograms on the same bins (a :class:`~coalmine.streams.sketch.Layout`
slice) and works along the last axis, so calibration can evaluate thousands of simulated
windows in one call. The classes wrap them River-style: build with the reference,
``update()`` with a window, read ``statistic`` (and ``p_value`` where one is defined).

How close to the exact statistic on the raw samples (tested in ``tests/test_drift_exact.py``):

* Kolmogorov-Smirnov: the binned statistic is the exact sup of ``|F_ref - F_win|`` taken over
  the bin edges only. Inside a bin both ECDFs rise by at most that bin's mass, so
  ``0 <= D_exact - D_binned <= max_k max(p_k, q_k)``, the largest bin mass of either sample:
  about ``1/bins`` on reference-quantile bins.
* Wasserstein-1 is taken between the samples winsorized at the outer bin edges (the
  reference's 1/bins and 1 - 1/bins quantiles): a single outlier then moves it by at most
  the outer bin's mass times nothing, instead of by its distance, which on heavy-tailed
  features (Shuttle's f4 spans -674..575 around a standard deviation of 15) otherwise pages
  people for nothing; shifts beyond the reference's range still show in the masses, and in
  KS. Each inner bin's mass sits at the mean of the values in it (the summary keeps per-bin
  sums); moving mass within a bin costs at most its width, so against scipy's
  ``wasserstein_distance`` on the winsorized samples,
  ``|W_exact - W_binned| <= sum_k p_k w_k^ref + sum_k q_k w_k^win`` with ``w_k`` the range of
  each sample's values in bin k: a small fraction of the spread on reference-quantile bins.
* PSI, Jensen-Shannon, chi-square are defined on the bins, so they are exact for those bins.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

#: floor for empty-bin proportions in PSI and JS (the usual smoothing)
EPS = 1e-4


def _cdf(counts: np.ndarray) -> np.ndarray:
    c = np.cumsum(counts, axis=-1, dtype=float)
    total = c[..., -1:]
    return np.divide(c, total, out=np.zeros_like(c), where=total > 0)


def _proportions(counts: np.ndarray, eps: float = 0.0) -> np.ndarray:
    p = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    return np.maximum(p, eps) if eps else p


def ks_statistic(ref_counts: np.ndarray, win_counts: np.ndarray) -> np.ndarray:
    r"""Kolmogorov-Smirnov distance between two histograms on the same bins,
    :math:`D = \max_k |F_{ref}(e_k) - F_{win}(e_k)|`."""
    return _ks_from_cdf(_cdf(ref_counts), win_counts)


def _ks_from_cdf(ref_cdf: np.ndarray, win_counts: np.ndarray) -> np.ndarray:
    return np.abs(ref_cdf - _cdf(win_counts)).max(axis=-1)


def bin_positions(
    counts: np.ndarray,
    sums: np.ndarray,
    edges: np.ndarray | None = None,
    empty: np.ndarray | None = None,
) -> np.ndarray:
    """Mean of the values in each bin; with the layout's inner ``edges``, the two outer bins
    sit at the outermost edges instead (winsorized). Empty bins get 0, or their ``empty``
    position (one inside the bin keeps :func:`paired_wasserstein` from sorting): their weight
    is 0, and a point of weight 0 changes no Wasserstein integral. Stacks of columns (one per
    row, ``edges`` stacked alike) work along the last axis."""
    out = np.zeros_like(sums, dtype=float) if empty is None else np.array(empty, dtype=float)
    pos = np.divide(sums, counts, out=out, where=counts > 0)
    if edges is not None:
        pos[..., 0], pos[..., -1] = edges[..., 0], edges[..., -1]
    return pos


def smoothed_rank_coefficients(
    ref_counts: np.ndarray, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    r"""Per-bin intercept and slope of the smoothed reference rank, the reference CDF drawn
    linearly across each inner bin:

    .. math:: u(x) = F(l_b) + p_b \frac{x - l_b}{h_b - l_b} \quad (l_b \le x < h_b)

    with :math:`p_b` the reference's share of bin :math:`b` and :math:`F(l_b)` its share below.
    The two open outer bins score their mid-rank :math:`F(l_b) + p_b / 2` whatever the value,
    so :math:`0 \le u \le 1` and an outlier moves a sum of scores by one unit at most. Being
    linear within a bin, a bucket's sum of scores follows exactly from its bin counts and bin
    sums: :math:`\sum_b (a_b n_b + s_b S_b)`, mergeable like them.

    >>> a, s = smoothed_rank_coefficients(np.array([1, 2, 1]), np.array([0.0, 2.0]))
    >>> [float(v) for v in a + s * np.array([-5.0, 1.0, 9.0])]   # one value in each bin
    [0.125, 0.5, 0.875]
    """
    p = _proportions(ref_counts)
    below = np.cumsum(p) - p
    width = np.diff(edges)
    slopes = np.zeros_like(p)
    slopes[1:-1] = p[1:-1] / width
    intercepts = below + p / 2
    intercepts[1:-1] = below[1:-1] - slopes[1:-1] * edges[:-1]
    return intercepts, slopes


def smoothed_ranks(
    values: np.ndarray, edges: np.ndarray, intercepts: np.ndarray, slopes: np.ndarray
) -> np.ndarray:
    """Each value's smoothed reference rank (:func:`smoothed_rank_coefficients`)."""
    b = np.searchsorted(edges, values, side="right")
    return intercepts[b] + slopes[b] * values


def wasserstein_statistic(
    ref_pos: np.ndarray, ref_counts: np.ndarray, win_pos: np.ndarray, win_counts: np.ndarray
) -> np.ndarray:
    r"""Wasserstein-1 distance :math:`\int |F_{ref}(x) - F_{win}(x)|\,dx` between two
    discrete distributions: masses ``counts`` at ``positions`` (the bins' means)."""
    return _wasserstein(ref_pos, _proportions(ref_counts), win_pos, win_counts)


def _wasserstein(
    ref_pos: np.ndarray, ref_p: np.ndarray, win_pos: np.ndarray, win_counts: np.ndarray
) -> np.ndarray:
    """:func:`wasserstein_statistic` with the reference's proportions ``ref_p`` given."""
    return paired_wasserstein(ref_pos, ref_p, win_pos, _proportions(win_counts))[0]


def paired_wasserstein(
    ref_pos: np.ndarray, ref_p: np.ndarray, win_pos: np.ndarray, win_p: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    r"""Wasserstein-1 between a reference and windows binned alike (masses ``p`` at positions
    ``pos``, bin by bin), and :math:`D_k = \sum_{i \le k} (p^{ref}_i - p^{win}_i)`, the
    difference of the CDFs after each bin (the binned KS statistic is its largest
    :math:`|D_k|`).

    Each bin's two masses are a pair. When no pair reaches into the next (a window's mean of
    the values in a bin lies inside the bin, as the reference's does), the masses are in order
    without sorting them: across bin k's pair, :math:`|x^{win}_k - x^{ref}_k|` long, the CDFs
    differ by :math:`D_{k-1}` plus the pair's first mass; from pair k to pair k+1 by
    :math:`D_k`. Rows whose pairs cross are sorted, so any positions give the integral.

    Examples
    --------
    >>> ref_pos, ref_p = np.array([0.0, 1.0, 2.0]), np.array([0.2, 0.5, 0.3])
    >>> w1, after = paired_wasserstein(ref_pos, ref_p, np.array([0.5, 1.0, 1.5]),
    ...                                np.array([0.4, 0.4, 0.2]))
    >>> round(float(w1), 6), round(float(np.abs(after).max()), 6)  # W1 and the binned KS
    (0.4, 0.2)
    >>> crossed = paired_wasserstein(ref_pos, ref_p, np.array([1.5, 1.0, 2.0]), ref_p)[0]
    >>> round(float(crossed), 6)  # the first mass moved past the second: sorted
    0.3
    """
    after = np.cumsum(ref_p - win_p, axis=-1)
    gap = win_pos - ref_pos
    across = np.where(gap < 0, after - ref_p, after + win_p)  # after the pair's first mass
    between = np.minimum(win_pos, ref_pos)[..., 1:] - np.maximum(win_pos, ref_pos)[..., :-1]
    w1 = np.abs(gap * across).sum(axis=-1) + np.abs(between * after[..., :-1]).sum(axis=-1)
    crossed = (between < 0).any(axis=-1)
    if w1.ndim == 0:
        return (_sorted_wasserstein(ref_pos, ref_p, win_pos, win_p) if crossed else w1), after
    if crossed.any():
        rows = np.flatnonzero(crossed)
        ref_rows = (ref_pos, ref_p) if ref_pos.ndim == 1 else (ref_pos[rows], ref_p[rows])
        w1[rows] = _sorted_wasserstein(*ref_rows, win_pos[rows], win_p[rows])
    return w1, after


def _sorted_wasserstein(
    ref_pos: np.ndarray, ref_p: np.ndarray, win_pos: np.ndarray, win_p: np.ndarray
) -> np.ndarray:
    """:func:`paired_wasserstein`'s W1 with every mass sorted by position."""
    pairs: list[tuple[np.ndarray, ...]] = [(ref_pos, win_pos), (ref_p, -win_p)]
    if ref_pos.shape != win_pos.shape:  # one reference against a stack of windows
        pairs = [np.broadcast_arrays(*pair) for pair in pairs]
    x, w = (np.concatenate(pair, axis=-1) for pair in pairs)
    order = np.argsort(x, axis=-1, kind="stable")
    at = (
        (np.arange(len(x))[:, None], order) if x.ndim == 2 else order
    )  # faster than take_along_axis
    x, w = x[at], w[at]
    return (np.abs(np.cumsum(w, axis=-1)[..., :-1]) * np.diff(x, axis=-1)).sum(axis=-1)


def psi_statistic(ref_counts: np.ndarray, win_counts: np.ndarray, eps: float = EPS) -> np.ndarray:
    r"""Population stability index :math:`\sum_k (q_k - p_k) \ln(q_k / p_k)`."""
    return psi_of_proportions(_proportions(ref_counts, eps), _proportions(win_counts, eps))


def psi_of_proportions(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """:func:`psi_statistic` of the reference's and the window's bin proportions, each
    floored at its ``eps`` already (a reference's, once for every window)."""
    return ((q - p) * np.log(q / p)).sum(axis=-1)


def js_statistic(ref_counts: np.ndarray, win_counts: np.ndarray) -> np.ndarray:
    r"""Jensen-Shannon divergence in bits, :math:`\tfrac12 KL(p\|m) + \tfrac12 KL(q\|m)`,
    :math:`m = (p+q)/2`; 0 for identical histograms, 1 for disjoint ones."""
    p, q = _proportions(ref_counts), _proportions(win_counts)
    m = (p + q) / 2

    def kl(a):
        return np.where(
            a > 0, a * np.log2(np.divide(a, m, out=np.ones_like(a), where=m > 0)), 0
        ).sum(-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def chi2_statistic(ref_counts: np.ndarray, win_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Pearson's chi-square test of homogeneity on the 2 x K table (reference, window), bins
    empty in both samples dropped: :math:`\chi^2 = \sum (O - E)^2 / E`, K-1 degrees of freedom.
    Returns (statistic, degrees of freedom)."""
    table = np.stack(np.broadcast_arrays(ref_counts, win_counts), axis=-2).astype(float)
    col = table.sum(axis=-2, keepdims=True)
    row = table.sum(axis=-1, keepdims=True)
    expected = row * col / np.maximum(table.sum(axis=(-2, -1), keepdims=True), 1)
    terms = np.divide(
        (table - expected) ** 2, expected, out=np.zeros_like(table), where=expected > 0
    )
    dof = np.maximum((col[..., 0, :] > 0).sum(axis=-1) - 1, 1)
    return terms.sum(axis=(-2, -1)), dof


def effective_n(m: np.ndarray | int, n: np.ndarray | int) -> np.ndarray:
    """Effective sample size of a two-sample comparison, ``m n / (m + n)``."""
    return np.asarray(m) * n / np.maximum(np.asarray(m) + n, 1)


def rate_increase_surprise(x: int, n: int, x_ref: int, n_ref: int) -> float:
    r"""-log10 of the exact one-sided p-value that a window's rate (x of n) exceeds the
    reference's (x_ref of n_ref). Conditioning on the total count :math:`T = x + x_{ref}`,
    under no change :math:`x \sim \mathrm{Binomial}(T, n / (n + n_{ref}))` (the conditional
    test of two Poisson rates), which accounts for the reference's own noise and stays exact
    for the rare events (errors, missing values) where a normal approximation pages people.

    >>> round(rate_increase_surprise(12, 1000, 12, 5000), 2)
    3.77
    >>> rate_increase_surprise(0, 1000, 12, 5000)
    0.0
    """
    total = x + x_ref
    if x == 0 or total == 0:
        return 0.0
    return _surprise(x, total, float(special.bdtrc(x - 1, total, n / (n + n_ref))))


def rate_increase_surprises(x: np.ndarray, n: int, x_ref: np.ndarray, n_ref: int) -> list[float]:
    """:func:`rate_increase_surprise` of many columns' counts ``x`` (and ``x_ref``) in one
    scipy call, not one a column.

    >>> rate_increase_surprises(np.array([12, 0]), 1000, np.array([12, 12]), 5000) == [
    ...     rate_increase_surprise(12, 1000, 12, 5000), 0.0]
    True
    """
    total = x + x_ref
    p = special.bdtrc(x - 1, total, n / (n + n_ref))
    return list(map(_surprise, x.tolist(), total.tolist(), p.tolist()))


def _surprise(x: int, total: int, p: float) -> float:
    """-log10 of the p-value ``p`` of ``x`` of ``total`` (0 when there is nothing to test)."""
    return 0.0 if x == 0 or total == 0 else float(-math.log10(max(p, 1e-300)))


def _result(values: np.ndarray) -> np.ndarray | float:
    """A float for one column, the array for a stack of columns."""
    return values if np.ndim(values) else float(values)


class KolmogorovSmirnov:
    r"""Binned two-sample Kolmogorov-Smirnov drift statistic.

    .. math:: D = \max_k |F_{ref}(e_k) - F_{win}(e_k)|

    over the bin edges :math:`e_k`. ``standardized`` is :math:`\sqrt{n_{eff}}\,D`, whose
    distribution under no drift hardly depends on the window size: that is what coalmine's
    calibrated thresholds apply to.

    Parameters
    ----------
    ref_counts
        The reference histogram, or a stack of them (one row per column, equally many bins):
        then every result is an array with one value per column, from one numpy pass.

    Examples
    --------
    >>> ks = KolmogorovSmirnov(np.array([25, 25, 25, 25]))
    >>> round(ks.update(np.array([10, 20, 30, 40])).statistic, 3)
    0.2
    >>> KolmogorovSmirnov(np.array([[25, 25], [10, 40]])).update(np.array([[25, 25], [40, 10]])).statistic
    array([0. , 0.6])

    References
    ----------
    Kolmogorov, A. (1933). Sulla determinazione empirica di una legge di distribuzione.
    """

    def __init__(self, ref_counts: np.ndarray):
        self.ref_counts = ref_counts
        self._ref_cdf, self._ref_n = _cdf(ref_counts), ref_counts.sum(axis=-1)
        self.statistic: np.ndarray | float = 0.0
        self.standardized: np.ndarray | float = 0.0

    def update(self, win_counts: np.ndarray) -> KolmogorovSmirnov:
        d = _ks_from_cdf(self._ref_cdf, win_counts)
        self.statistic = _result(d)
        self.standardized = _result(d * np.sqrt(effective_n(self._ref_n, win_counts.sum(axis=-1))))
        return self

    @property
    def p_value(self) -> np.ndarray | float:
        """Asymptotic (Kolmogorov distribution) p-value, for people; thresholds are calibrated."""
        return _result(special.kolmogorov(self.standardized))


class Wasserstein:
    r"""Wasserstein-1 (earth mover's) distance between the reference and a window,

    .. math:: W_1 = \int |F_{ref}(x) - F_{win}(x)|\,dx,

    with each bin's mass at the mean of its values. ``normalized`` divides by the
    reference's standard deviation, so one threshold serves features of any unit;
    ``standardized`` is :math:`\sqrt{n_{eff}}\,W_1/\sigma_{ref}`. Stacks of columns (one
    row each, ``sd`` an array) give arrays, as in :class:`KolmogorovSmirnov`.

    Examples
    --------
    >>> w = Wasserstein(np.array([1.0, 2.0]), np.array([50, 50]), sd=0.5)
    >>> w.update(np.array([2.0, 3.0]), np.array([50, 50])).statistic
    1.0
    >>> w.normalized
    2.0

    References
    ----------
    Ramdas, A., Garcia, N., Cuturi, M. (2017). On Wasserstein two-sample testing and related
    families of nonparametric tests. Entropy 19(2).
    """

    def __init__(self, ref_pos: np.ndarray, ref_counts: np.ndarray, sd: float | np.ndarray):
        self.ref_pos, self.ref_counts = ref_pos, ref_counts
        self._ref_p, self._ref_n = _proportions(ref_counts), ref_counts.sum(axis=-1)
        self.sd = np.where(np.asarray(sd) > 0, sd, 1.0)
        self.statistic: np.ndarray | float = 0.0
        self.normalized: np.ndarray | float = 0.0
        self.standardized: np.ndarray | float = 0.0

    def update(self, win_pos: np.ndarray, win_counts: np.ndarray) -> Wasserstein:
        w = _wasserstein(self.ref_pos, self._ref_p, win_pos, win_counts)
        n_eff = effective_n(self._ref_n, win_counts.sum(axis=-1))
        self.statistic, self.normalized = _result(w), _result(w / self.sd)
        self.standardized = _result(w / self.sd * np.sqrt(n_eff))
        return self


class ChiSquare:
    r"""Chi-square test of homogeneity for a categorical column (unseen categories share the
    layout's last bin), with its asymptotic p-value.

    Examples
    --------
    >>> chi = ChiSquare(np.array([50, 50, 0])).update(np.array([30, 60, 10]))
    >>> round(chi.statistic, 2), chi.dof
    (15.91, 2)

    References
    ----------
    Pearson, K. (1900). On the criterion that a given system of deviations ... Phil. Mag. 50.
    """

    def __init__(self, ref_counts: np.ndarray):
        self.ref_counts = ref_counts
        self.statistic, self.dof = 0.0, 1

    def update(self, win_counts: np.ndarray) -> ChiSquare:
        stat, dof = chi2_statistic(self.ref_counts, win_counts)
        self.statistic, self.dof = float(stat), int(dof)
        return self

    @property
    def p_value(self) -> float:
        return float(special.chdtrc(self.dof, self.statistic))
