"""Shadow analysis: does the shadow agree with the champion, is it slower, is it better?

The pipeline pairs each shadow prediction with the champion's for the same request_id and
keeps, per (model, event-time bucket), the number of pairs and of agreements (see
:func:`agreement`), and, for pairs whose label has arrived, the two discordant cells of the
paired correct/incorrect table. Latency comes from the two variants'
:class:`~coalmine.streams.canary.LatencyHistogram`. Both classes here judge a window: their
result describes the statistics of their latest ``update``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from coalmine.streams.canary import LatencyHistogram


def wilson_interval(k: int, n: int, z: float) -> tuple[float, float]:
    r"""Wilson score interval for a proportion :math:`k/n` (Wilson 1927):

    .. math:: \frac{k + z^2/2}{n + z^2} \pm \frac{z}{n + z^2}\sqrt{\frac{k(n-k)}{n} + \frac{z^2}{4}}

    ``z`` is the normal quantile: ``ndtri(1 - (1 - confidence) / 2)`` for a two-sided interval,
    ``ndtri(confidence)`` for one-sided bounds. With no events the interval is ``(0, 1)``.

    Wilson, E. B. (1927). Probable inference, the law of succession, and statistical
    inference. Journal of the American Statistical Association 22(158).

    >>> low, high = wilson_interval(90, 100, 1.959964)
    >>> round(low, 4), round(high, 4)
    (0.8256, 0.9448)
    """
    if n == 0:
        return 0.0, 1.0
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return max(0.0, centre - half), min(1.0, centre + half)


def agreement(champion: np.ndarray, shadow: np.ndarray, atol: float = 0.0,
              rtol: float = 0.0) -> np.ndarray:
    r"""Per pair: do the two predictions agree? Classes agree when equal; numbers when
    :math:`|s - c| \le atol + rtol \cdot |c|` (regression tolerance; exact equality by default).

    >>> agreement(np.array([1.0, 2.0, 3.0]), np.array([1.05, 2.5, 3.0]), atol=0.1).tolist()
    [True, False, True]
    >>> agreement(np.array(["a", "b"], dtype=object), np.array(["a", "c"], dtype=object)).tolist()
    [True, False]
    """
    champion, shadow = np.asarray(champion), np.asarray(shadow)
    if champion.dtype.kind in "iuf" and shadow.dtype.kind in "iuf":
        return np.isclose(shadow, champion, rtol=rtol, atol=atol)
    return np.asarray(champion == shadow, dtype=bool)


@dataclass(frozen=True)
class AgreementResult:
    n: int
    agree: int
    rate: float
    low: float
    high: float
    target: float
    below_target: bool


class ShadowAgreement:
    r"""Agreement rate of shadow and champion with a Wilson score interval.

    With :math:`k` agreements in :math:`n` pairs, the interval is the Wilson interval at level
    ``confidence`` (:func:`wilson_interval`). ``below_target`` only when the whole interval
    lies below ``target``: a low rate on few pairs is not an alert.

    Examples
    --------
    >>> check = ShadowAgreement(target=0.95)
    >>> check.update(n=50, agree=46)           # 92%, but on 50 pairs: could be 95%
    >>> check.result.below_target
    False
    >>> check.update(n=5000, agree=4600)       # 92% on 5000 pairs: clearly below
    >>> r = check.result
    >>> r.below_target, round(r.low, 4), round(r.high, 4)
    (True, 0.9096, 0.9293)

    References
    ----------
    Wilson, E. B. (1927), see :func:`wilson_interval`.
    """

    def __init__(self, target: float = 0.95, confidence: float = 0.99):
        self.target = target
        self.z = float(special.ndtri(1 - (1 - confidence) / 2))
        self.result = AgreementResult(0, 0, float("nan"), 0.0, 1.0, target, False)

    def update(self, n: int, agree: int) -> None:
        """Judge one window: its number of pairs and of agreements."""
        low, high = wilson_interval(agree, n, self.z)
        rate = agree / n if n else float("nan")
        self.result = AgreementResult(n, agree, rate, low, high, self.target, high < self.target)


def mcnemar_exact_p(b: int, c: int) -> float:
    r"""Two-sided exact McNemar p-value: under no difference the discordant pairs split
    :math:`b \sim \mathrm{Binomial}(b + c, 1/2)`, so
    :math:`p = \min(1, 2 P(X \le \min(b, c)))`.

    >>> round(mcnemar_exact_p(10, 25), 4)
    0.0167
    """
    if b + c == 0:
        return 1.0
    return min(1.0, 2 * float(special.bdtr(min(b, c), b + c, 0.5)))


@dataclass(frozen=True)
class McNemarResult:
    n: int
    b: int
    c: int
    accuracy_delta: float
    p_value: float
    verdict: str


SHADOW_BETTER, SHADOW_WORSE, UNDECIDED = "shadow_better", "shadow_worse", "undecided"


class McNemar:
    r"""McNemar's exact test on paired correctness: is the shadow better, worse, or not
    distinguishable yet?

    Of :math:`n` labelled pairs, :math:`b` have the champion right and the shadow wrong, and
    :math:`c` the reverse; pairs where both agree on correctness carry no information about
    the difference. The shadow's accuracy minus the champion's is :math:`(c - b)/n`;
    :func:`mcnemar_exact_p` tests it against zero. The verdict is ``shadow_better`` or
    ``shadow_worse`` when :math:`p <` ``alpha``, else ``undecided``. Run on every bucket, the
    test is repeated: ``alpha`` bounds the error of one reading, so keep it strict.

    Examples
    --------
    >>> test = McNemar(alpha=0.01)
    >>> test.update(n=400, b=10, c=25)
    >>> test.result.verdict, round(test.result.p_value, 4)
    ('undecided', 0.0167)
    >>> test.update(n=800, b=20, c=50)
    >>> test.result.verdict, test.result.accuracy_delta
    ('shadow_better', 0.0375)

    References
    ----------
    McNemar, Q. (1947). Note on the sampling error of the difference between correlated
    proportions or percentages. Psychometrika 12(2).
    """

    def __init__(self, alpha: float = 0.01):
        self.alpha = alpha
        self.result = McNemarResult(0, 0, 0, float("nan"), 1.0, UNDECIDED)

    def update(self, n: int, b: int, c: int) -> None:
        """Judge one window: labelled pairs ``n``, discordant cells ``b`` (champion right,
        shadow wrong) and ``c`` (champion wrong, shadow right)."""
        p = mcnemar_exact_p(b, c)
        verdict = UNDECIDED if p >= self.alpha else SHADOW_BETTER if c > b else SHADOW_WORSE
        self.result = McNemarResult(n, b, c, (c - b) / n if n else float("nan"), p, verdict)


def latency_overhead(champion: LatencyHistogram, shadow: LatencyHistogram,
                     quantiles: tuple[float, ...] = (0.5, 0.99)) -> dict[str, dict[str, float]]:
    """The shadow's latency against the champion's at each quantile, in ms, from their
    histograms over the same window. ``error_ms`` bounds the error of ``overhead_ms`` from
    binning (each quantile is within its histogram's relative error).

    >>> champion, shadow = LatencyHistogram(), LatencyHistogram()
    >>> champion.add(np.full(100, 20.0)); shadow.add(np.full(100, 30.0))
    >>> o = latency_overhead(champion, shadow, (0.5,))["p50"]
    >>> round(o["overhead_ms"], 1), round(o["error_ms"], 1)
    (8.7, 3.0)
    """
    out = {}
    for q in quantiles:
        c, s = champion.quantile(q), shadow.quantile(q)
        out[f"p{q * 100:g}"] = {"champion_ms": c, "shadow_ms": s, "overhead_ms": s - c,
                                "error_ms": champion.relative_error * c + shadow.relative_error * s}
    return out
