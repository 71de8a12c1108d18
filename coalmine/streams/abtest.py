"""A/B analysis on outcomes (or labelled correctness, as 0/1) per variant.

The pipeline keeps :class:`Moments` (count, sum, sum of squares) per (model, variant,
event-time bucket); they add exactly, so an experiment's moments are the sum of its buckets'.
:class:`WelchTest` describes the difference, :class:`SampleRatioMismatch` checks that the
split of traffic matches the weight in force, and :class:`AlwaysValidPValue` (mSPRT) gives
p-values and confidence intervals that stay valid however often they are read:
:func:`ab_decision` reports a winner only from it, and only without a sample ratio mismatch.

:class:`WelchTest` and :class:`SampleRatioMismatch` describe their latest ``update``;
:class:`AlwaysValidPValue` accumulates, one increment (a closed bucket's moments) per update.
The first and the last broadcast: :class:`Moments` of arrays run many experiments at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import special

HIGHER, LOWER, UNDECIDED = "treatment_higher", "treatment_lower", "undecided"
SAMPLE_RATIO_MISMATCH = "sample_ratio_mismatch"


def _plain(x):
    """Python scalars for scalar results (orjson serialises neither numpy scalars nor NaN)."""
    return np.asarray(x).item() if np.ndim(x) == 0 else x


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of an outcome; ``+`` merges. Fields may be arrays (one
    experiment per element). The variance comes from the raw sums, so centre outcomes whose
    mean is far larger than their spread (about 1e6 standard deviations loses all precision).

    >>> m = Moments.from_values(np.array([1.0, 2.0, 3.0])) + Moments.from_values(np.array([4.0]))
    >>> m.n, float(m.mean), round(float(m.var), 4)
    (4, 2.5, 1.6667)
    """

    n: int | np.ndarray
    total: float | np.ndarray
    total_sq: float | np.ndarray

    @classmethod
    def from_values(cls, values: np.ndarray, axis: int = -1) -> "Moments":
        values = np.asarray(values, dtype=float)
        return cls(values.shape[axis], values.sum(axis), (values * values).sum(axis))

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.divide(self.total, self.n)

    @property
    def var(self):
        """Sample variance (denominator n - 1)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.maximum(0.0, (self.total_sq - self.total * self.mean) / np.subtract(self.n, 1))


@dataclass(frozen=True)
class WelchResult:
    diff: float
    t: float
    df: float
    p_value: float
    ci_low: float
    ci_high: float
    cohens_d: float


class WelchTest:
    r"""Welch's t-test of treatment minus control, with its confidence interval and Cohen's d.

    With means :math:`\bar x_i`, sample variances :math:`s_i^2` and counts :math:`n_i`
    (control 1, treatment 2), :math:`v_i = s_i^2/n_i`:

    .. math::
        t = \frac{\bar x_2 - \bar x_1}{\sqrt{v_1 + v_2}}, \quad
        \nu = \frac{(v_1 + v_2)^2}{v_1^2/(n_1 - 1) + v_2^2/(n_2 - 1)}, \quad
        d = \frac{\bar x_2 - \bar x_1}{\sqrt{\frac{(n_1 - 1)s_1^2 + (n_2 - 1)s_2^2}{n_1 + n_2 - 2}}}

    the two-sided p-value from Student's t with :math:`\nu` degrees of freedom, and the
    interval :math:`\bar x_2 - \bar x_1 \pm t_{\nu, 1 - (1-c)/2} \sqrt{v_1 + v_2}`. These are
    fixed-sample results: read on every bucket, their false-positive rate grows (use
    :class:`AlwaysValidPValue` to decide). NaN with fewer than two outcomes per arm.

    Examples
    --------
    >>> test = WelchTest()
    >>> test.update(Moments(n=100, total=1000.0, total_sq=10396.0),
    ...             Moments(n=80, total=840.0, total_sq=8919.0))
    >>> r = test.result
    >>> round(r.diff, 3), round(r.t, 3), round(r.p_value, 4), round(r.cohens_d, 3)
    (0.5, 2.119, 0.0356, 0.3)

    References
    ----------
    Welch, B. L. (1947). The generalization of 'Student's' problem when several different
    population variances are involved. Biometrika 34(1/2).
    Cohen, J. (1988). Statistical Power Analysis for the Behavioral Sciences, 2nd ed.
    """

    def __init__(self, confidence: float = 0.95):
        self.confidence = confidence
        nan = float("nan")
        self.result = WelchResult(nan, nan, nan, nan, nan, nan, nan)

    def update(self, control: Moments, treatment: Moments) -> None:
        """Test one pair of samples: each arm's merged moments."""
        n1, n2, s1, s2 = control.n, treatment.n, control.var, treatment.var
        with np.errstate(divide="ignore", invalid="ignore"):
            v1, v2 = s1 / n1, s2 / n2
            se = np.sqrt(v1 + v2)
            diff = treatment.mean - control.mean
            t = diff / se
            df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
            half = special.stdtrit(df, 1 - (1 - self.confidence) / 2) * se
            pooled = np.sqrt(((n1 - 1) * s1 + (n2 - 1) * s2) / (n1 + n2 - 2))
            self.result = WelchResult(*map(_plain, (
                diff, t, df, 2 * special.stdtr(df, -np.abs(t)), diff - half, diff + half,
                diff / pooled)))


@dataclass(frozen=True)
class SRMResult:
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    chi2: float
    p_value: float
    mismatch: bool


class SampleRatioMismatch:
    r"""Does the observed split of traffic match the weights in force? Pearson's chi-square
    goodness of fit, :math:`\chi^2 = \sum_i (o_i - e_i)^2 / e_i` with
    :math:`e_i = N w_i / \sum w` on :math:`k - 1` degrees of freedom; a variant seen despite
    a zero weight is a mismatch outright. A mismatch (:math:`p <` ``alpha``) means the
    assignment or the logging is broken and no A/B result can be trusted. ``alpha`` is strict
    because the check is repeated on every bucket.

    Feed counts from a period when ``weights`` were in force (restart after a weight change):
    under mixed weights the expected split is not :math:`w`.

    Examples
    --------
    >>> srm = SampleRatioMismatch(alpha=1e-3)
    >>> srm.update(observed=[9480, 520], weights=[95, 5])
    >>> srm.result.mismatch, round(srm.result.p_value, 3)
    (False, 0.359)
    >>> srm.update(observed=[9400, 600], weights=[95, 5])
    >>> srm.result.mismatch, round(srm.result.chi2, 1)
    (True, 21.1)

    References
    ----------
    Fabijan, A. et al. (2019). Diagnosing sample ratio mismatch in online controlled
    experiments. KDD '19.
    """

    def __init__(self, alpha: float = 1e-3):
        self.alpha = alpha
        self.result = SRMResult((), (), 0.0, 1.0, False)

    def update(self, observed: Sequence[int], weights: Sequence[float]) -> None:
        """Check one split: events per variant and the variants' weights, in the same order."""
        o, w = np.asarray(observed, dtype=float), np.asarray(weights, dtype=float)
        e = o.sum() * w / w.sum()
        live = e > 0
        if (o[~live] > 0).any():
            chi2, p = math.inf, 0.0
        else:
            chi2 = float(((o[live] - e[live]) ** 2 / e[live]).sum())
            df = int(live.sum()) - 1
            p = float(special.chdtrc(df, chi2)) if df > 0 else 1.0
        self.result = SRMResult(tuple(int(x) for x in observed), tuple(e.tolist()), chi2, p,
                                p < self.alpha)


def msprt_log_likelihood_ratio(diff, var, tau2):
    r"""Log of the mixture likelihood ratio of an estimate :math:`D \sim N(\theta, V)` for
    :math:`\theta \sim N(0, \tau^2)` against :math:`\theta = 0`:

    .. math:: \log\Lambda = \frac12\log\frac{V}{V + \tau^2} + \frac{\tau^2 D^2}{2V(V + \tau^2)}

    >>> round(float(msprt_log_likelihood_ratio(0.3, 0.01, 0.04)), 3)
    2.795
    """
    return 0.5 * np.log(var / (var + tau2)) + tau2 * diff * diff / (2 * var * (var + tau2))


@dataclass(frozen=True)
class AlwaysValidResult:
    n_control: int
    n_treatment: int
    diff: float
    p_value: float
    ci_low: float
    ci_high: float
    decision: str


class AlwaysValidPValue:
    r"""Always-valid p-value and confidence sequence for a difference of means: the mixture
    sequential probability ratio test (mSPRT) of Johari et al.

    After any number of increments, with :math:`D = \bar x_T - \bar x_C - \theta_0` and
    :math:`V = s_C^2/n_C + s_T^2/n_T`, the statistic :math:`D/V` is a Brownian motion in the
    information :math:`1/V` (for any allocation between the arms), so the likelihood ratio
    mixed over :math:`\theta \sim N(0, \tau^2)`
    (:func:`msprt_log_likelihood_ratio`) is a martingale under :math:`\theta = \theta_0`.
    By Ville's inequality :math:`P(\sup_t \Lambda_t \ge 1/\alpha) \le \alpha`, so

    .. math:: p_t = \min(p_{t-1}, 1/\Lambda_t)

    can be read after every bucket and stopped on at will without inflating false positives.
    The matching confidence sequence is the running intersection of
    :math:`D \pm \sqrt{\frac{2V(V + \tau^2)}{\tau^2}\left(\log\frac1\alpha + \frac12\log\frac{V + \tau^2}{V}\right)}`.
    Variances are plug-in estimates (as in Johari et al.), so nothing is read before each arm
    has ``min_n`` outcomes. :math:`\tau` = ``tau_sd`` times the pooled standard deviation: the
    spread of effects worth detecting, in Cohen's d. ``decision`` is ``treatment_higher`` or
    ``treatment_lower`` once the interval excludes :math:`\theta_0` (equivalently
    :math:`p \le \alpha`), else ``undecided``.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> test = AlwaysValidPValue(alpha=0.05)
    >>> for _ in range(20):
    ...     test.update(Moments.from_values(rng.normal(0.0, 1, 500)),
    ...                 Moments.from_values(rng.normal(0.2, 1, 500)))
    >>> r = test.result
    >>> r.decision, r.p_value < 0.05, r.ci_low > 0
    ('treatment_higher', True, True)

    References
    ----------
    Johari, R., Koomen, P., Pekelis, L. and Walsh, D. (2017). Peeking at A/B tests: why it
    matters, and what to do about it. KDD '17.
    Johari, R., Pekelis, L. and Walsh, D. (2022). Always valid inference: continuous
    monitoring of A/B tests. Operations Research 70(3).
    """

    def __init__(self, alpha: float = 0.05, tau_sd: float = 0.1, min_n: int = 100,
                 theta0: float = 0.0):
        self.alpha, self.tau_sd, self.min_n, self.theta0 = alpha, tau_sd, min_n, theta0
        self.control = self.treatment = Moments(0, 0.0, 0.0)
        self.p_value, self.ci_low, self.ci_high = 1.0, -math.inf, math.inf

    def update(self, control: Moments, treatment: Moments) -> None:
        """Add one increment of each arm's outcomes (e.g. a closed bucket's moments)."""
        self.control, self.treatment = self.control + control, self.treatment + treatment
        c, t = self.control, self.treatment
        with np.errstate(divide="ignore", invalid="ignore"):
            var = c.var / c.n + t.var / t.n
            pooled = ((c.n - 1) * c.var + (t.n - 1) * t.var) / (c.n + t.n - 2)
            tau2 = self.tau_sd ** 2 * pooled
            diff = t.mean - c.mean
            log_lr = msprt_log_likelihood_ratio(diff - self.theta0, var, tau2)
            half = np.sqrt(2 * var * (var + tau2) / tau2
                           * (math.log(1 / self.alpha) + 0.5 * np.log((var + tau2) / var)))
        ready = (c.n >= self.min_n) & (t.n >= self.min_n) & (var > 0)
        self.p_value = np.where(ready, np.minimum(self.p_value, np.exp(-np.maximum(log_lr, 0))),
                                self.p_value)
        self.ci_low = np.where(ready, np.maximum(self.ci_low, diff - half), self.ci_low)
        self.ci_high = np.where(ready, np.minimum(self.ci_high, diff + half), self.ci_high)

    @property
    def result(self) -> AlwaysValidResult:
        c, t = self.control, self.treatment
        decision = np.where(self.ci_low > self.theta0, HIGHER,
                            np.where(self.ci_high < self.theta0, LOWER, UNDECIDED))
        return AlwaysValidResult(*map(_plain, (c.n, t.n, t.mean - c.mean, self.p_value,
                                               self.ci_low, self.ci_high, decision)))


def ab_decision(sequential: AlwaysValidResult, srm: SRMResult | None = None) -> str:
    """The A/B decision to report: the always-valid one, unless the traffic split is broken.

    >>> ab_decision(AlwaysValidResult(900, 100, 0.3, 0.001, 0.1, 0.5, HIGHER),
    ...             SRMResult((900, 100), (950.0, 50.0), 52.6, 1e-12, True))
    'sample_ratio_mismatch'
    """
    return SAMPLE_RATIO_MISMATCH if srm is not None and srm.mismatch else sequential.decision
