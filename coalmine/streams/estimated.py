"""Estimated performance before the labels come (check ``estimated_performance``).

The model's uncertainty column (:class:`~coalmine.streams.derived.ScoreMargin` or
:class:`~coalmine.streams.derived.ScoreEntropy`) is binned on the reference's quantiles like any
column. On the reference's labelled rows, each bin's accuracy is counted once
(:class:`AccuracyCalibration`, histogram binning); a window's expected accuracy is then the
average of its bins' accuracies weighted by the window's counts in them
(:class:`EstimatedAccuracy`). Those counts are the window summary's, so the estimate merges
across partitions and needs no label: a covariate shift that moves traffic to where the model is
unsure lowers it at once. What it cannot see is a change of the labels given the scores
(concept drift): that is the label-based ``performance`` check's.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

#: the two-sided level of the interval reported with the estimate
INTERVAL = 0.95


class AccuracyCalibration:
    r"""Histogram-binning calibration: the accuracy of the reference's labelled rows in each bin
    of the uncertainty column, shrunk towards the overall accuracy by one pseudo-row,

    .. math:: \hat a_b = \frac{c_b + \bar a}{m_b + 1},

    with :math:`c_b` correct of :math:`m_b` labelled rows in bin :math:`b` and :math:`\bar a`
    their overall accuracy (a bin without labelled rows gets :math:`\bar a`).

    Parameters
    ----------
    correct, labelled
        Per bin, the reference's correct and labelled rows.
    ref_counts
        Per bin, every reference row with a value (labelled or not): the reference level is
        :math:`\sum_b p_b \hat a_b` with :math:`p_b` their shares.

    Examples
    --------
    >>> cal = AccuracyCalibration(np.array([1, 9]), np.array([4, 10]), np.array([5, 10]))
    >>> cal.accuracy.round(3).tolist(), round(cal.level, 3)
    ([0.343, 0.883], 0.703)
    """

    def __init__(self, correct: np.ndarray, labelled: np.ndarray, ref_counts: np.ndarray):
        overall = correct.sum() / max(labelled.sum(), 1)
        self.accuracy = (correct + overall) / (labelled + 1)
        self.labelled = labelled
        self.ref_counts = ref_counts
        p = ref_counts / max(ref_counts.sum(), 1)
        self.level = float(p @ self.accuracy)
        #: the standard deviation of a reference event's calibrated accuracy
        self.spread = float(np.sqrt(p @ (self.accuracy - self.level) ** 2))

    @classmethod
    def fit(
        cls, values: np.ndarray, correct: np.ndarray, labelled: np.ndarray, edges: np.ndarray
    ) -> AccuracyCalibration:
        """From the reference's uncertainty ``values`` (NaN: none), which rows are
        ``labelled`` and which of those the model got ``correct``, on the column's inner bin
        ``edges``."""
        present = ~np.isnan(values)
        bins = np.searchsorted(edges, values[present], side="right")
        width = len(edges) + 1
        has = labelled[present]
        return cls(
            np.bincount(bins[has], weights=correct[present][has], minlength=width),
            np.bincount(bins[has], minlength=width),
            np.bincount(bins, minlength=width),
        )


class EstimatedAccuracy:
    r"""A window's accuracy estimated from its uncertainty-bin counts :math:`n_b` (CBPE with
    histogram binning), and a one-sided test of it against the reference's level.

    The estimate is :math:`\hat A = \sum_b w_b \hat a_b` with :math:`w_b = n_b / n`. Its
    interval is for the accuracy the labels will show on the same events: each event is right
    with probability :math:`a_b`, and each :math:`\hat a_b` is itself estimated from
    :math:`m_b` labelled rows, so

    .. math:: \operatorname{Var} = \sum_b \frac{w_b \hat a_b (1 - \hat a_b)}{n}
        + \sum_b \frac{w_b^2 \hat a_b (1 - \hat a_b)}{m_b + 1} .

    The test asks whether the window's traffic is confidently worse for the model than the
    reference's by more than ``tolerance``. With no change, the window's estimate differs from
    the reference level :math:`L` only by which bins its events fell in, a mean of :math:`n`
    draws of :math:`\hat a_B` (standard deviation :math:`\sigma_a` over the reference), and
    the level itself is such a mean over the reference's :math:`M` rows:

    .. math:: z = \frac{L - \text{tolerance} - \hat A}{\sigma_a \sqrt{1/n + 1/M}} ,

    alarming above :math:`\Phi^{-1}(1 - q)` for the model's tail share :math:`q`.

    Examples
    --------
    >>> cal = AccuracyCalibration(np.array([20, 90]), np.array([40, 100]), np.array([400, 1000]))
    >>> same = EstimatedAccuracy(cal, 0.02).update(np.array([40, 100]))
    >>> round(same.estimate, 3), round(same.statistic, 1)
    (0.787, -1.3)
    >>> worse = EstimatedAccuracy(cal, 0.02).update(np.array([100, 40]))
    >>> round(worse.estimate, 3), [round(x, 3) for x in worse.interval], round(worse.statistic, 1)
    (0.619, [0.485, 0.753], 9.4)

    References
    ----------
    NannyML, Confidence-based Performance Estimation (CBPE); Zadrozny, Elkan (2001), Obtaining
    calibrated probability estimates from decision trees and naive Bayesian classifiers
    (histogram binning).
    """

    def __init__(self, calibration: AccuracyCalibration, tolerance: float):
        self.calibration, self.tolerance = calibration, tolerance
        self.n = 0
        self.estimate = math.nan
        self.sd = math.nan
        self.statistic = -math.inf

    def update(self, counts: np.ndarray) -> EstimatedAccuracy:
        """Take a window's counts in the uncertainty column's bins."""
        cal = self.calibration
        self.n = n = int(counts.sum())
        if not n:
            return self
        w = counts / n
        a = cal.accuracy
        self.estimate = float(w @ a)
        self.sd = math.sqrt(w @ (a * (1 - a)) / n + (w**2) @ (a * (1 - a) / (cal.labelled + 1)))
        se = cal.spread * math.sqrt(1 / n + 1 / max(cal.ref_counts.sum(), 1)) or 1e-12
        self.statistic = (cal.level - self.tolerance - self.estimate) / se
        return self

    @property
    def interval(self) -> tuple[float, float]:
        """The :data:`INTERVAL` interval of the window's accuracy, clipped to [0, 1]."""
        half = float(special.ndtri(0.5 + INTERVAL / 2)) * self.sd
        return max(self.estimate - half, 0.0), min(self.estimate + half, 1.0)

    @property
    def p_value(self) -> float:
        return float(special.ndtr(-self.statistic))
