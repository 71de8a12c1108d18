"""Estimated performance before the labels come (check ``estimated_performance``).

Confidence-based performance estimation (CBPE) with histogram binning on the layout's bins, so
that a window's estimate follows from its summary's bin counts and value sums and merges across
partitions like any other statistic:

* accuracy, for any classifier with class scores: on the bins of its uncertainty column
  (:class:`~coalmine.streams.derived.ScoreMargin` or
  :class:`~coalmine.streams.derived.ScoreEntropy`), the share of the reference's labelled rows
  the model got right (:class:`AccuracyCalibration`, :class:`EstimatedAccuracy`);
* F1 and ROC AUC, for a binary model: on the bins of its positive class's score, the share of
  positive labels and of positive predictions, whence the expected confusion matrix and the
  expected ROC curve (:class:`BinaryCalibration`, :class:`EstimatedBinary`).

The calibrated columns are binned on the reference's quantiles plus the fixed edges of
:data:`SCORE_GRID`, so production scores where the reference had none (a model sure of every
reference row, unsure after a covariate shift) get bins of their own; a bin's rate is shrunk
towards what the window's own scores in it imply (:class:`BinnedRate`), and follows the score
where the reference has too few labelled rows. What no estimate from scores can see is a
change of the labels given the scores (concept drift): that is the label-based
``performance`` check's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Self

import numpy as np
from scipy import special

if TYPE_CHECKING:
    from coalmine.streams.baseline import Baseline
    from coalmine.streams.sketch import Summary

#: the two-sided level of the intervals reported with the estimates
INTERVAL = 0.95
#: fixed inner edges added to a calibrated column's quantile edges (scores, margins and
#: entropies all lie in [0, 1]); 0.5 among them keeps a binary model's answer the same
#: throughout a bin of its positive score. Coarse is enough: where a bin follows the score, it
#: does so from the window's own mean score in it, and every bin widens every numeric
#: column's row in the statistics' block
SCORE_GRID = np.round(np.linspace(0, 1, 11)[1:-1], 2)
#: pseudo-rows of a bin's score-implied rate: a bin's own reference rate outweighs its
#: score's once it has more labelled rows than this
PRIOR_ROWS = 10
#: expected positives and negatives a window needs for its ROC AUC to be reported
MIN_EXPECTED = 5


def _normal_interval(estimate: float, sd: float) -> tuple[float, float]:
    """The :data:`INTERVAL` normal interval, clipped to [0, 1]."""
    half = float(special.ndtri(0.5 + INTERVAL / 2)) * sd
    return max(estimate - half, 0.0), min(estimate + half, 1.0)


class BinnedRate:
    r"""How often a yes/no outcome (the model right, the label positive, the answer positive)
    happens in each bin of a score column: histogram binning on the reference's labelled rows,
    shrunk towards the rate the score itself implies,

    .. math:: \hat r_b = \frac{h_b + k\, s(\bar x_b)}{m_b + k} ,

    with :math:`h_b` hits of :math:`m_b` labelled rows in bin :math:`b`, :math:`k` =
    :data:`PRIOR_ROWS`, :math:`\bar x_b` the mean score of the bin's events (the window's own
    when it has some there, else the reference's, else the bin's middle) and :math:`s` the
    rate it implies (``implied``: the top class score for accuracy, the score itself for a
    positive label). A bin the reference barely reached follows the score.

    Parameters
    ----------
    hits, labelled
        Per bin, the reference's labelled rows with the outcome, and all its labelled rows.
    ref_counts, ref_sums
        Per bin, every reference row with a value (labelled or not) and their values' sum.
    edges
        The column's inner bin edges.
    implied
        The outcome's rate implied by a mean score (vectorised).

    Examples
    --------
    A bin with 100 labelled rows keeps its own rate; one without any takes its score's:

    >>> rate = BinnedRate(np.array([0, 90]), np.array([0, 100]), np.array([0, 100]),
    ...                   np.array([0.0, 95.0]), np.array([0.5]), lambda x: x)
    >>> rate.rates().round(3).tolist()
    [0.25, 0.905]
    >>> rate.rates(np.array([10, 0]), np.array([1.0, 0.0])).round(3).tolist()
    [0.1, 0.905]
    """

    def __init__(
        self,
        hits: np.ndarray,
        labelled: np.ndarray,
        ref_counts: np.ndarray,
        ref_sums: np.ndarray,
        edges: np.ndarray,
        implied: Callable[[np.ndarray], np.ndarray],
    ):
        self.hits, self.labelled, self.ref_counts = hits, labelled, ref_counts
        self.implied = implied
        low = np.concatenate([[min(0.0, edges[0])], edges])
        high = np.concatenate([edges, [max(1.0, edges[-1])]])
        self.ref_means = self._means(ref_counts, ref_sums, (low + high) / 2)

    @staticmethod
    def _means(counts: np.ndarray, sums: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        return np.divide(sums, counts, out=fallback.astype(float), where=counts > 0)

    @classmethod
    def fit(
        cls,
        values: np.ndarray,
        outcome: np.ndarray,
        labelled: np.ndarray,
        edges: np.ndarray,
        implied: Callable[[np.ndarray], np.ndarray],
    ) -> Self:
        """From the reference's score ``values`` (NaN: none), which rows are ``labelled`` and
        which of those had the ``outcome``, on the column's inner bin ``edges``."""
        present = ~np.isnan(values)
        bins = np.searchsorted(edges, values[present], side="right")
        width = len(edges) + 1
        has = labelled[present]
        return cls(
            np.bincount(bins[has], weights=outcome[present][has], minlength=width),
            np.bincount(bins[has], minlength=width),
            np.bincount(bins, minlength=width),
            np.bincount(bins, weights=values[present], minlength=width),
            edges,
            implied,
        )

    def rates(self, counts: np.ndarray | None = None, sums: np.ndarray | None = None) -> np.ndarray:
        """Each bin's rate, for a window's bin ``counts`` and value ``sums`` (default: the
        reference's)."""
        if counts is None or sums is None:
            return self._rates(self.ref_means)
        return self._rates(self._means(counts, sums, self.ref_means))

    def _rates(self, means: np.ndarray) -> np.ndarray:
        return (self.hits + PRIOR_ROWS * self.implied(means)) / (self.labelled + PRIOR_ROWS)

    def variances(self, rates: np.ndarray) -> np.ndarray:
        """The sampling variance of each bin's rate, estimated from its labelled rows and
        pseudo-rows."""
        return rates * (1 - rates) / (self.labelled + PRIOR_ROWS)


class AccuracyCalibration(BinnedRate):
    r"""The model's accuracy per bin of its uncertainty column (a :class:`BinnedRate` of being
    right, implied by the top class score), and the reference's level
    :math:`L = \sum_b p_b \hat r_b` with :math:`p_b` the reference rows' shares, and spread
    :math:`\sigma_a`: the standard deviation of a reference row's calibrated accuracy.

    Examples
    --------
    >>> cal = AccuracyCalibration.fit(np.array([0.1, 0.2, 0.9, 0.95]),
    ...     np.array([0.0, 1, 1, 1]), np.ones(4, bool), np.array([0.5]), lambda m: (1 + m) / 2)
    >>> cal.rates().round(3).tolist(), round(cal.level, 3)
    ([0.562, 0.969], 0.766)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        accuracy = self.rates()
        p = self.ref_counts / max(self.ref_counts.sum(), 1)
        self.level = float(p @ accuracy)
        self.spread = float(np.sqrt(p @ (accuracy - self.level) ** 2))


class EstimatedAccuracy:
    r"""A window's accuracy estimated from its uncertainty-bin counts :math:`n_b` and value
    sums, and a one-sided test of it against the reference's level.

    The estimate is :math:`\hat A = \sum_b w_b \hat r_b` with :math:`w_b = n_b / n`. Its
    interval is for the accuracy the labels will show on the same events: each event is right
    with probability :math:`r_b`, and each :math:`\hat r_b` is itself estimated from
    :math:`m_b` labelled rows and :math:`k` pseudo-rows, so

    .. math:: \operatorname{Var} = \sum_b \frac{w_b \hat r_b (1 - \hat r_b)}{n}
        + \sum_b \frac{w_b^2 \hat r_b (1 - \hat r_b)}{m_b + k} .

    The test asks whether the window's traffic is confidently worse for the model than the
    reference's by more than ``tolerance``. With no change, the window's estimate differs from
    the reference level :math:`L` only by which bins its events fell in, a mean of :math:`n`
    draws of :math:`\hat r_B` (standard deviation :math:`\sigma_a` over the reference), and
    the level itself is such a mean over the reference's :math:`M` rows:

    .. math:: z = \frac{L - \text{tolerance} - \hat A}{\sigma_a \sqrt{1/n + 1/M}} ,

    alarming above :math:`\Phi^{-1}(1 - q)` for the model's tail share :math:`q`.

    Examples
    --------
    >>> cal = AccuracyCalibration(np.array([20, 90]), np.array([40, 100]), np.array([400, 1000]),
    ...                           np.array([100.0, 900.0]), np.array([0.5]), lambda m: (1 + m) / 2)
    >>> same = EstimatedAccuracy(cal, 0.02).update(np.array([40, 100]), np.array([10.0, 90.0]))
    >>> round(same.estimate, 3), round(same.statistic, 1)
    (0.796, -1.3)
    >>> worse = EstimatedAccuracy(cal, 0.02).update(np.array([100, 40]), np.array([25.0, 36.0]))
    >>> round(worse.estimate, 3), [round(x, 3) for x in worse.interval], round(worse.statistic, 1)
    (0.633, [0.509, 0.758], 9.4)

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

    def update(self, counts: np.ndarray, sums: np.ndarray) -> EstimatedAccuracy:
        """Take a window's counts and value sums in the uncertainty column's bins."""
        cal = self.calibration
        self.n = n = int(counts.sum())
        if not n:
            return self
        w = counts / n
        a = cal.rates(counts, sums)
        self.estimate = float(w @ a)
        self.sd = math.sqrt(w @ (a * (1 - a)) / n + (w**2) @ cal.variances(a))
        se = cal.spread * math.sqrt(1 / n + 1 / max(cal.ref_counts.sum(), 1)) or 1e-12
        self.statistic = (cal.level - self.tolerance - self.estimate) / se
        return self

    @property
    def interval(self) -> tuple[float, float]:
        """The :data:`INTERVAL` interval of the window's accuracy, clipped to [0, 1]."""
        return _normal_interval(self.estimate, self.sd)

    @property
    def p_value(self) -> float:
        return float(special.ndtr(-self.statistic))


class BinaryCalibration:
    """A binary model's calibration on the bins of its positive class's score: the rate of
    positive labels (implied by the score itself) and of positive answers (implied by the
    score reaching 0.5, where the reference shows no other threshold).

    Parameters
    ----------
    positive, answered
        The two :class:`BinnedRate`.
    """

    def __init__(self, positive: BinnedRate, answered: BinnedRate):
        self.positive, self.answered = positive, answered

    @classmethod
    def fit(
        cls,
        scores: np.ndarray,
        label_positive: np.ndarray,
        answer_positive: np.ndarray,
        labelled: np.ndarray,
        edges: np.ndarray,
    ) -> BinaryCalibration:
        """From the reference's positive scores (NaN: none), which rows are ``labelled``, and
        per row whether its label and the model's answer are the positive class."""
        return cls(
            BinnedRate.fit(scores, label_positive, labelled, edges, lambda p: p),
            BinnedRate.fit(
                scores, answer_positive, labelled, edges, lambda p: (p >= 0.5).astype(float)
            ),
        )


class EstimatedBinary:
    r"""A binary model's F1 and ROC AUC on a window, expected from its positive-score bins.

    With :math:`\pi_b` a bin's calibrated rate of positive labels and :math:`\rho_b` of
    positive answers, an event of bin :math:`b` is a true positive with probability
    :math:`\rho_b \pi_b`, a false positive with :math:`\rho_b (1 - \pi_b)`, a false negative
    with :math:`(1 - \rho_b) \pi_b`; summed over the window's :math:`n_b`, the expected
    confusion matrix gives :math:`F_1 = 2\,TP / (2\,TP + FP + FN)`, its variance by the delta
    method over the events' independent outcomes. The expected ROC curve ranks the bins by
    score, with :math:`n_b \pi_b` positives and :math:`n_b (1 - \pi_b)` negatives each (ties
    within a bin count half), and its AUC's variance is Hanley and McNeil's. Both intervals are
    for the value the labels will show on the same events, and both add the calibration's own
    sampling error, :math:`\sum_b (\partial M / \partial r_b)^2 \operatorname{Var} \hat r_b`
    over the rates :math:`r_b` the metric :math:`M` is computed from. F1 is reported when the expected
    :math:`2\,TP + FP + FN` is positive, the AUC when the window expects :data:`MIN_EXPECTED`
    positives and negatives; else NaN.

    Examples
    --------
    >>> edges = np.array([0.5])
    >>> rate = lambda hits: BinnedRate(np.array(hits), np.array([100, 100]), np.array([100, 100]),
    ...                                np.array([20.0, 80.0]), edges, lambda p: p)
    >>> cal = BinaryCalibration(rate([10, 90]), rate([0, 100]))
    >>> est = EstimatedBinary(cal).update(np.array([500, 500]), np.array([100.0, 400.0]))
    >>> round(est.f1, 3), round(est.roc_auc, 3)
    (0.877, 0.891)
    >>> [round(x, 3) for x in est.f1_interval + est.roc_auc_interval]
    [0.83, 0.924, 0.845, 0.937]

    References
    ----------
    NannyML, Confidence-based Performance Estimation (CBPE: expected confusion matrix and ROC
    curve from calibrated probabilities); Hanley, McNeil (1982), The meaning and use of the
    area under a receiver operating characteristic (ROC) curve.
    """

    def __init__(self, calibration: BinaryCalibration):
        self.calibration = calibration
        self.f1 = self.f1_sd = self.roc_auc = self.roc_auc_sd = math.nan

    def update(self, counts: np.ndarray, sums: np.ndarray) -> EstimatedBinary:
        """Take a window's counts and value sums in the positive score's bins."""
        cal = self.calibration
        pi, rho = cal.positive.rates(counts, sums), cal.answered.rates(counts, sums)
        var_pi, var_rho = cal.positive.variances(pi), cal.answered.variances(rho)
        self._f1(counts, pi, rho, var_pi, var_rho)
        self._roc_auc(counts, pi, var_pi)
        return self

    def _f1(
        self,
        counts: np.ndarray,
        pi: np.ndarray,
        rho: np.ndarray,
        var_pi: np.ndarray,
        var_rho: np.ndarray,
    ) -> None:
        """F1 from each bin's rates of positive labels and answers."""
        p_tp, p_miss = pi * rho, (1 - pi) * rho + pi * (1 - rho)
        tp, miss = float(counts @ p_tp), float(counts @ p_miss)
        d = 2 * tp + miss
        if d <= 0:
            return
        self.f1 = 2 * tp / d
        # an event moves F1 by g_tp as a true positive, g_miss as a false positive or negative
        g_tp, g_miss = 2 * miss / d**2, -2 * tp / d**2
        mean = g_tp * p_tp + g_miss * p_miss
        second = g_tp**2 * p_tp + g_miss**2 * p_miss
        outcomes = float(counts @ (second - mean**2))
        d_pi = counts * (g_tp * rho + g_miss * (1 - 2 * rho))
        d_rho = counts * (g_tp * pi + g_miss * (1 - 2 * pi))
        calibration = float(d_pi**2 @ var_pi + d_rho**2 @ var_rho)
        self.f1_sd = math.sqrt(max(outcomes, 0.0) + calibration)

    def _roc_auc(self, counts: np.ndarray, pi: np.ndarray, var_pi: np.ndarray) -> None:
        """AUC of bins ranked by score, each with its expected positives and negatives."""
        positives, negatives = counts * pi, counts * (1 - pi)
        n_pos, n_neg = float(positives.sum()), float(negatives.sum())
        if min(n_pos, n_neg) < MIN_EXPECTED:
            return
        above = n_pos - np.cumsum(positives)  # positives in higher bins
        below = np.cumsum(negatives) - negatives  # negatives in lower bins
        a = self.roc_auc = binned_roc_auc(positives, negatives)
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        outcomes = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (
            n_pos * n_neg
        )
        # a bin's rate moves its positives up and negatives down by its count, each pair's
        # share of the area and the number of pairs with them
        d_area = counts * (below + negatives / 2 - above - positives / 2)
        d_pi = (d_area - a * counts * (n_neg - n_pos)) / (n_pos * n_neg)
        self.roc_auc_sd = math.sqrt(max(outcomes, 0.0) + float(d_pi**2 @ var_pi))

    @property
    def f1_interval(self) -> tuple[float, float]:
        return _normal_interval(self.f1, self.f1_sd)

    @property
    def roc_auc_interval(self) -> tuple[float, float]:
        return _normal_interval(self.roc_auc, self.roc_auc_sd)


def binned_roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """The ROC AUC of positives and negatives counted in bins ranked by score, ties within a
    bin counting one half: the Mann-Whitney statistic :math:`U / (n_+ n_-)` on the bins.

    >>> binned_roc_auc(np.array([0, 1, 3]), np.array([2, 1, 0]))
    0.9583333333333334
    """
    below = np.cumsum(negatives) - negatives  # negatives in lower bins
    return float(positives @ (below + negatives / 2) / (positives.sum() * negatives.sum()))


def estimated_binary(baseline: Baseline, window: Summary) -> dict:
    """A binary model's estimated F1 and ROC AUC on ``window``, with their intervals, and the
    F1 and ROC AUC (on the positive score's bins) of the labels joined in it (None until
    some come, or where a value is not defined): evidence beside the estimated accuracy.
    Empty for other models."""
    if baseline.binary is None or baseline.positive_score is None:
        return {}
    bins = baseline.layout.bins_of(baseline.positive_score)
    est = EstimatedBinary(baseline.binary).update(window.counts[bins], window.sums[bins])
    answered = window.answer_positives + window.label_positives
    return {
        "estimated_f1": None if math.isnan(est.f1) else est.f1,
        "f1_interval": None if math.isnan(est.f1) else list(est.f1_interval),
        "realised_f1": 2 * window.true_positives / answered if answered else None,
        "estimated_roc_auc": None if math.isnan(est.roc_auc) else est.roc_auc,
        "roc_auc_interval": None if math.isnan(est.roc_auc) else list(est.roc_auc_interval),
        "realised_roc_auc": _realised_roc_auc(window),
    }


def _realised_roc_auc(window: Summary) -> float | None:
    """The ROC AUC of the window's labelled events on their positive score's bins (None
    without a positive and a negative label)."""
    positives, negatives = window.score_positives, window.score_negatives
    if not (positives.sum() and negatives.sum()):
        return None
    return binned_roc_auc(positives, negatives)
