"""Sequential change detection on bucket aggregates: fast on small, persistent mean shifts.

A window test at a strict false-alarm budget needs thousands of events to see a shift of a
few tenths of a standard deviation; a CUSUM accumulates the evidence and needs hundreds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp

#: Siegmund's correction for the overshoot of a Gaussian random walk over the threshold
_OVERSHOOT = 1.166
#: bucket sizes (events) at which :class:`CusumThresholds` solves for the threshold
_BUCKET_GRID = 2.0 ** np.arange(0, 17)
#: Gauss-Hermite nodes over the reference's sampling error
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(24)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def cusum_arl0(h: float, k: float, bucket_events: float = 1.0) -> float:
    r"""Siegmund's approximation of a one-sided CUSUM's average run length in events without
    change, for standardized increments, reference value ``k``, checked after every bucket of
    ``n`` events. The bucket sums are steps of drift :math:`-kn` and variance :math:`n`:

    .. math::
        ARL_0 \approx n \frac{e^{2\kappa b} - 2\kappa b - 1}{2\kappa^2}, \quad
        \kappa = k\sqrt{n}, \quad b = \frac{h}{\sqrt{n}} + 1.166

    Checking only at bucket ends misses crossings inside a bucket, which the corrected
    boundary accounts for (checked against simulation: within 15 % for buckets of up to 75
    events, conservative beyond).

    >>> round(cusum_arl0(5.0, 0.5))
    938
    >>> cusum_arl0(40.0, 0.15, bucket_events=75) > 10 * cusum_arl0(40.0, 0.15)
    True
    """
    return float(np.exp(_log_arl0(h, np.asarray(k, dtype=float), bucket_events)))


def _log_arl0(h: float, k: np.ndarray, n: float) -> np.ndarray:
    kappa = np.maximum(k, 1e-6) * math.sqrt(n)
    x = 2 * kappa * (h / math.sqrt(n) + _OVERSHOOT)
    # log(expm1(x) - x) without overflow: x itself once exp(x) dwarfs x
    body = np.where(x > 30, x, np.log(np.maximum(np.expm1(np.minimum(x, 30)) - x, 1e-300)))
    return body + math.log(n) - np.log(2 * kappa * kappa)


def log_false_alarm_rate(
    h: float, k: float, bucket_events: float = 1.0, reference_events: float | None = None
) -> float:
    r"""Log of the false alarms per event of a two-sided CUSUM (:func:`cusum_arl0` per side),
    averaged over the reference's sampling error: the reference mean is off the truth by
    :math:`\varepsilon \sim N(0, 1/m)` standard deviations for ``m`` reference events, which
    shifts one side's reference value to :math:`k - \varepsilon` and the other's to
    :math:`k + \varepsilon` (Gauss-Hermite quadrature). Ignoring it would let a reference mean
    two standard errors off page many times as often as asked (16 times at ``k`` = 0.15 and
    the usual thresholds).

    >>> round(math.exp(log_false_alarm_rate(5.0, 0.5)) * cusum_arl0(5.0, 0.5), 3)   # two sides
    2.0
    """
    eps = _NODES / math.sqrt(reference_events) if reference_events else np.zeros(1)
    log_w = np.log(_WEIGHTS) if reference_events else np.zeros(1)
    sides = np.concatenate(
        [log_w - _log_arl0(h, k - eps, bucket_events), log_w - _log_arl0(h, k + eps, bucket_events)]
    )
    return float(logsumexp(sides))


def cusum_threshold(
    arl0: float, k: float, bucket_events: float = 1.0, reference_events: float | None = None
) -> float:
    """The threshold ``h`` at which a two-sided CUSUM, checked after buckets of
    ``bucket_events``, runs ``arl0`` events between false alarms (:func:`log_false_alarm_rate`).

    >>> round(cusum_threshold(469, 0.5), 2)
    5.0
    >>> round(cusum_threshold(1e8, 0.15), 1), round(cusum_threshold(1e8, 0.15, 75, 5000), 1)
    (52.2, 46.5)
    """

    def excess(h: float) -> float:
        return log_false_alarm_rate(h, k, bucket_events, reference_events) + math.log(arl0)

    return 0.0 if excess(0.0) <= 0 else brentq(excess, 0.0, 1e4)


class ThresholdTable:
    """A threshold as a function of the bucket size, solved on a grid of sizes and
    interpolated in log size: the events per bucket follow the traffic. Each grid level is
    solved when a bucket size first needs it (a model's traffic keeps to a few sizes); the
    first at once, so that settings that admit no threshold fail at start-up, not in stage 2
    (whether a level exists does not depend on the bucket size)."""

    def __init__(self, level_at: Callable[[float], float]):
        self.level_at = level_at
        self.levels: list[float | None] = [None] * len(_BUCKET_GRID)
        self._level(0)

    def __call__(self, bucket_events: float) -> float:
        x = math.log2(min(max(bucket_events, 1.0), _BUCKET_GRID[-1]))
        j = min(int(x), len(_BUCKET_GRID) - 2)
        lo, hi = self._level(j), self._level(j + 1)
        return lo + (hi - lo) * (x - j)

    def _level(self, j: int) -> float:
        if (level := self.levels[j]) is None:
            level = self.levels[j] = self.level_at(float(_BUCKET_GRID[j]))
        return level


class CusumThresholds(ThresholdTable):
    """:func:`cusum_threshold` by bucket size.

    >>> h = CusumThresholds(1e8, 0.15, reference_events=5000)
    >>> round(h(1), 1), round(h(75), 1), round(h(300), 1)
    (55.4, 46.4, 36.2)
    """

    def __init__(self, arl0: float, k: float, reference_events: float | None = None):
        super().__init__(lambda n: cusum_threshold(arl0, k, n, reference_events))


@functools.cache
def shared_cusum_thresholds(
    arl0: float, k: float, reference_events: float | None = None
) -> CusumThresholds:
    """One :class:`CusumThresholds` per settings, shared: many models with the same
    false-alarm budget, shift to detect and reference size solve their table once.

    >>> shared_cusum_thresholds(1e8, 0.15, 5000) is shared_cusum_thresholds(1e8, 0.15, 5000)
    True
    """
    return CusumThresholds(arl0, k, reference_events)


def joint_cusum_threshold(
    arl0: float,
    columns: int,
    shift_sd: float,
    bucket_events: float,
    reference_events: float | None = None,
) -> float:
    r"""Threshold of a :class:`JointCUSUM` over ``columns`` columns, checked after buckets of
    ``n`` events, for ``arl0`` events between false alarms. Its increments are
    :math:`X = Q - p - c` with :math:`Q \sim \chi^2_p(\lambda)`; Wald's exponential bound
    gives :math:`ARL_0 \ge e^{\theta h}` buckets for the root :math:`\theta > 0` of
    :math:`E[e^{\theta X}] = 1`:

    .. math::
        -\tfrac{p}{2}\ln(1 - 2\theta) + \frac{\lambda\theta}{1 - 2\theta} - \theta(p + c) = 0,
        \qquad h = \ln(ARL_0 / n) / \theta

    with allowance :math:`c = n\delta^2/2` for a shift of :math:`\delta` standard deviations
    and :math:`\lambda = 2np/m`, twice the noncentrality that a reference of ``m`` events
    gives on average through its own sampling error.
    The bound is conservative (in simulation the run lasts 6 to 50 times longer than asked,
    which costs about a tenth of the threshold at ten columns); it needs no simulation at
    start-up.

    >>> round(joint_cusum_threshold(5.5e8, 10, 0.3, 75, 5000), 1)
    77.2
    """
    p, n = columns, bucket_events
    c, lam = n * shift_sd**2 / 2, 2 * n * p / reference_events if reference_events else 0.0

    def log_mgf(t: float) -> float:
        return -p / 2 * math.log1p(-2 * t) + lam * t / (1 - 2 * t) - t * (p + c)

    theta = brentq(log_mgf, 1e-12, 0.5 - 1e-12)
    return max(math.log(arl0 / n), 0.0) / theta


class JointCUSUM:
    r"""CUSUM on the Hotelling statistic of many columns' bucket means (Crosier 1988; Healy
    1987): fast on a shift spread over several columns, or on one column that stops moving
    with the others as it does in the reference, which no single column's CUSUM sees as soon.

    Each bucket gives every column its count :math:`n_j` and sum; with the reference means
    :math:`\mu`, standard deviations :math:`\sigma` and correlation matrix :math:`R`,

    .. math::
        z_j = \frac{\sum x_j - n_j\mu_j}{\sigma_j\sqrt{n_j}}, \qquad
        Q = z^\top R^{-1} z \sim \chi^2_p, \qquad
        S \leftarrow \min(2h, \max(0, S + Q - p - n\delta^2/2))

    A bucket with fewer than ``min_events`` events in a column (``z`` would be far from
    normal) is carried into the next: the CUSUM steps once every column has ``min_events``, so
    a low-traffic model is judged too, in steps of about ``min_events``.

    Examples
    --------
    >>> j = JointCUSUM(mean=[0, 0], sd=[1, 1], corr=[[1, 0.9], [0.9, 1]], shift_sd=0.3)
    >>> j.threshold = 30.0
    >>> _ = j.update(n=[100, 100], total=[5.0, 5.0])         # both move together: expected
    >>> float(j.statistic)
    0.0
    >>> _ = j.update(n=[100, 100], total=[30.0, -30.0])      # they part ways
    >>> round(float(j.statistic), 1), bool(j.drift_detected)
    (60.0, True)

    References
    ----------
    Healy, J. D. (1987). A note on multivariate CUSUM procedures. Technometrics 29(4).
    Crosier, R. B. (1988). Multivariate generalizations of cumulative sum quality-control
    schemes. Technometrics 30(3).
    """

    def __init__(self, mean, sd, corr, shift_sd: float, min_events: int = 30):
        self.mean, self.sd = np.asarray(mean, dtype=float), np.asarray(sd, dtype=float)
        self.precision = np.linalg.pinv(np.asarray(corr, dtype=float))
        self.allowance, self.min_events = shift_sd**2 / 2, min_events
        self.threshold = math.inf
        self.statistic = 0.0

    #: events and sums of buckets too small to step on, carried into the next
    carried: tuple[np.ndarray, np.ndarray] | None = None

    def update(self, n, total) -> JointCUSUM:
        n, total = np.asarray(n, dtype=float), np.asarray(total, dtype=float)
        if self.carried is not None:
            n, total = n + self.carried[0], total + self.carried[1]
        if n.min() < self.min_events:
            self.carried = n, total
            return self
        self.carried = None
        z = (total - n * self.mean) / (self.sd * np.sqrt(n))
        q = float(z @ self.precision @ z)
        step = q - len(z) - self.allowance * float(n.sum()) / len(n)  # n.mean(), 6 us less
        self.statistic = min(2 * self.threshold, max(0.0, self.statistic + step))
        return self

    @property
    def drift_detected(self) -> bool:
        return self.statistic > self.threshold


class CUSUM:
    r"""Two-sided CUSUM (Page 1954) on standardized values, fed by bucket aggregates; one
    instance can run many columns at once (``mean``, ``sd``, ``n`` and ``total`` as arrays).

    Each bucket contributes its event count :math:`n` and the sum of its values; with the
    reference mean :math:`\mu` and standard deviation :math:`\sigma`,

    .. math::
        z = \frac{\sum x - n\mu}{\sigma}, \qquad
        S^+ \leftarrow \max(0, S^+ + z - kn), \qquad S^- \leftarrow \max(0, S^- - z - kn)

    and the statistic is :math:`\max(S^+, S^-)`. ``k`` is half the shift to detect, in
    standard deviations. The statistic is capped at twice the threshold so that, once a
    shift ends, the alert resolves in bounded time.

    Parameters
    ----------
    mean, sd
        Reference mean and standard deviation of the monitored value (arrays: one per column).
    k
        Reference value: half the smallest shift worth detecting, in standard deviations.
    threshold
        Alarm level ``h``, e.g. from :func:`cusum_threshold` for a target run length.

    Examples
    --------
    >>> cusum = CUSUM(mean=0.0, sd=1.0, k=0.15, threshold=40.0)
    >>> for _ in range(5):
    ...     _ = cusum.update(n=100, total=0.0)
    >>> float(cusum.statistic)
    0.0
    >>> for _ in range(3):
    ...     _ = cusum.update(n=100, total=50.0)   # mean shift of 0.5 sd; capped at 2h
    >>> float(cusum.statistic), bool(cusum.drift_detected)
    (80.0, True)

    References
    ----------
    Page, E. S. (1954). Continuous inspection schemes. Biometrika 41(1/2).
    Siegmund, D. (1985). Sequential Analysis. Springer.
    """

    def __init__(self, mean, sd, k: float, threshold: float):
        self.mean = np.asarray(mean, dtype=float)
        self.sd = np.where(np.asarray(sd, dtype=float) > 0, sd, 1.0)
        self.k, self.threshold = k, threshold
        self.upper = self.lower = np.zeros_like(self.mean)

    def update(self, n, total) -> CUSUM:
        z = (total - n * self.mean) / self.sd
        cap, slack = 2 * self.threshold, self.k * np.asarray(n)
        # np.minimum(np.maximum()) is np.clip without its per-call dispatch overhead
        self.upper = np.minimum(np.maximum(self.upper + z - slack, 0.0), cap)
        self.lower = np.minimum(np.maximum(self.lower - z - slack, 0.0), cap)
        return self

    @property
    def statistic(self) -> np.ndarray:
        return np.maximum(self.upper, self.lower)

    @property
    def drift_detected(self) -> np.ndarray:
        return self.statistic > self.threshold
