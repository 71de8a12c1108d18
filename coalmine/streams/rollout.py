"""Shadow, canary and A/B statistics on merged window counts, and the rollout state machine.

Everything here works from sums the pipeline keeps per (model, variant, bucket): counts,
sums and sums of squares, a latency histogram. Pure and deterministic: event time comes in
as an argument, never from a clock.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import special

from coalmine.streams.records import Command


def wilson_interval(successes: int, n: int, alpha: float) -> tuple[float, float]:
    r"""Wilson score interval for a proportion at two-sided level ``alpha``:

    .. math:: \frac{\hat p + z^2/2n \pm z\sqrt{\hat p(1-\hat p)/n + z^2/4n^2}}{1 + z^2/n}

    >>> [round(x, 3) for x in wilson_interval(90, 100, 0.05)]
    [0.826, 0.945]

    References: Wilson, E. B. (1927). JASA 22(158).
    """
    if n == 0:
        return 0.0, 1.0
    z = float(-special.ndtri(alpha / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value on the discordant pairs: b (champion right, shadow
    wrong) and c (champion wrong, shadow right); under no difference b ~ Binomial(b + c, 1/2).

    >>> round(mcnemar_exact(10, 25), 4)
    0.0167

    References: McNemar, Q. (1947). Psychometrika 12(2).
    """
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    return float(min(1.0, 2 * special.bdtr(k, n, 0.5)))


#: a p-value under this is weak evidence: a shadow is "not worse" only when its McNemar
#: p-value for being worse is no longer under it, and an alert on a p-value resolves only then
WEAK_EVIDENCE = 0.05


def mcnemar_worse_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that the shadow is worse: P(B >= b) for
    B ~ Binomial(b + c, 1/2), with b the pairs only the champion got right.

    >>> round(mcnemar_worse_p(15, 5), 4), mcnemar_worse_p(5, 15) > 0.99
    (0.0207, True)
    """
    return float(special.bdtrc(b - 1, b + c, 0.5)) if b else 1.0


@dataclass(frozen=True)
class Welch:
    """Welch's t-test of mean(b) - mean(a) from sufficient statistics, with Cohen's d and the
    confidence interval of the difference.

    >>> w = welch(100, 10.0 * 100, (10.0**2 + 4.0) * 100, 100, 11.0 * 100, (11.0**2 + 4.0) * 100)
    >>> round(w.diff, 2), round(w.cohen_d, 2), round(w.p_value, 4)
    (1.0, 0.5, 0.0005)
    """

    diff: float
    t: float
    dof: float
    p_value: float
    cohen_d: float
    ci: tuple[float, float]


def _mean_var(n: int, s: float, ss: float) -> tuple[float, float]:
    mean = s / n
    return mean, max(ss - n * mean * mean, 0.0) / (n - 1)


def welch(
    n_a: int,
    sum_a: float,
    sumsq_a: float,
    n_b: int,
    sum_b: float,
    sumsq_b: float,
    alpha: float = 0.05,
) -> Welch | None:
    """None until both groups have two observations."""
    if n_a < 2 or n_b < 2:
        return None
    (ma, va), (mb, vb) = _mean_var(n_a, sum_a, sumsq_a), _mean_var(n_b, sum_b, sumsq_b)
    se2 = va / n_a + vb / n_b
    diff = mb - ma
    if se2 == 0:
        return Welch(
            diff, math.inf if diff else 0.0, n_a + n_b - 2, 0.0 if diff else 1.0, 0.0, (diff, diff)
        )
    t = diff / math.sqrt(se2)
    dof = se2**2 / ((va / n_a) ** 2 / (n_a - 1) + (vb / n_b) ** 2 / (n_b - 1))
    p = float(2 * special.stdtr(dof, -abs(t)))
    pooled = math.sqrt(((n_a - 1) * va + (n_b - 1) * vb) / (n_a + n_b - 2))
    half = float(-special.stdtrit(dof, alpha / 2)) * math.sqrt(se2)  # t's isf, no scipy.stats
    return Welch(diff, t, dof, p, diff / pooled if pooled else 0.0, (diff - half, diff + half))


def msprt_p_value(diff: float, se2: float, tau2: float) -> float:
    r"""Always-valid p-value of the mixture SPRT for a difference of means (Johari et al.,
    2017) with a normal mixing distribution of variance ``tau2``:

    .. math:: \Lambda = \sqrt{\frac{V}{V + \tau^2}}
              \exp\left(\frac{\tau^2 \hat\Delta^2}{2V(V + \tau^2)}\right), \quad p = \min(1, 1/\Lambda)

    with :math:`V` the variance of the estimate. Reading it after every bucket does not
    inflate false positives; the running minimum is the p-value to report.

    >>> round(msprt_p_value(0.0, 0.01, 1.0), 3)
    1.0
    >>> msprt_p_value(1.0, 0.01, 1.0) < 1e-15
    True

    References: Johari, R., Koomen, P., Pekelis, L., Walsh, D. (2017). Peeking at A/B tests. KDD.
    """
    if se2 <= 0:
        return 1.0
    log_lambda = 0.5 * math.log(se2 / (se2 + tau2)) + tau2 * diff * diff / (2 * se2 * (se2 + tau2))
    return float(min(1.0, math.exp(-log_lambda)))


def srm_p_value(observed: dict[str, int], weights: dict[str, float]) -> float:
    """Sample-ratio mismatch: chi-square goodness of fit of the observed split to the weights.

    >>> srm_p_value({"champion": 9000, "canary": 1000}, {"champion": 90, "canary": 10})
    1.0
    >>> srm_p_value({"champion": 8500, "canary": 1500}, {"champion": 90, "canary": 10}) < 1e-10
    True
    """
    names = [v for v in weights if weights[v] > 0]
    n = sum(observed.get(v, 0) for v in names)
    if n == 0 or len(names) < 2:
        return 1.0
    total = sum(weights[v] for v in names)
    obs = np.array([observed.get(v, 0) for v in names], dtype=float)
    exp = np.array([n * weights[v] / total for v in names])
    return float(special.chdtrc(len(names) - 1, ((obs - exp) ** 2 / exp).sum()))


class BernoulliCUSUM:
    r"""Page's CUSUM of the log-likelihood ratio of a failure rate :math:`p_1` against
    :math:`p_0`, fed by counts: after a bucket of :math:`n` trials with :math:`x` failures

    .. math::
        S \leftarrow \min\left(2h, \max\left(0, S + x\ln\frac{p_1}{p_0}
        + (n - x)\ln\frac{1 - p_1}{1 - p_0}\right)\right)

    and it alarms when :math:`S > h`. Without change (rate :math:`p_0`) the likelihood ratio
    is a martingale, so Wald's bound gives at least :math:`e^h` trials between false alarms;
    at a rate :math:`p` the statistic climbs :math:`p\ln\frac{p_1}{p_0} + (1-p)
    \ln\frac{1-p_1}{1-p_0}` per trial, which at :math:`p = p_1` is
    :math:`KL(p_1 \| p_0)`: the delay approaches Lorden's bound :math:`h / KL`, the least any
    test with that false-alarm rate can achieve. :math:`p_0` and :math:`p_1` may change
    between buckets (a champion's rate is re-estimated as its window slides). Capped at
    :math:`2h` so that, once the rate is back, an alert resolves in bounded time.

    Examples
    --------
    >>> cusum = BernoulliCUSUM(threshold=math.log(1e6))
    >>> _ = cusum.update(n=100, failures=1, p0=0.005, p1=0.055)   # as the champion fails
    >>> cusum.statistic, cusum.drift_detected
    (0.0, False)
    >>> for _ in range(2):
    ...     _ = cusum.update(n=50, failures=4, p0=0.005, p1=0.055)  # 8%: 100 trials
    >>> round(cusum.statistic, 1), cusum.drift_detected
    (14.4, True)

    References
    ----------
    Page, E. S. (1954). Continuous inspection schemes. Biometrika 41(1/2).
    Lorden, G. (1971). Procedures for reacting to a change in distribution. Ann. Math.
    Statist. 42(6).
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.statistic = 0.0

    def update(self, n: int, failures: int, p0: float, p1: float) -> BernoulliCUSUM:
        if not 0 < p0 < p1 < 1:
            return self  # a champion failing always (p0 = 1) leaves no worse rate to test for
        step = failures * math.log(p1 / p0) + (n - failures) * math.log((1 - p1) / (1 - p0))
        self.statistic = min(2 * self.threshold, max(0.0, self.statistic + step))
        return self

    @property
    def drift_detected(self) -> bool:
        return self.statistic > self.threshold


def bernoulli_kl(p: float, q: float) -> float:
    """Kullback-Leibler divergence KL(Bernoulli(p) || Bernoulli(q)) in nats.

    >>> round(bernoulli_kl(0.06, 0.005), 4)
    0.0956
    """
    return float(special.rel_entr(p, q) + special.rel_entr(1 - p, 1 - q))


@dataclass(frozen=True)
class RolloutPolicy:
    """Settings of ``[models.canary]`` and ``[models.shadow]``."""

    steps: tuple[float, ...] = (5, 25, 50, 100)
    min_events: int = 1000
    min_duration_ms: int = 10_000
    max_error_rate: float = 0.05
    max_p99_latency_ms: float = 1000.0
    shadow_min_agreement: float = 0.9
    shadow_min_events: int = 2000
    shadow_min_duration_ms: int = 10_000
    shadow_tolerance: float = 0.0
    #: labelled pairs a shadow needs before it may pass, when the model's checks include
    #: performance (labels are expected): agreement alone cannot say which model is right
    shadow_min_labelled_pairs: int = 500
    #: a shadow answer later than this (event time) after the champion's counts as a failure
    shadow_timeout_ms: int = 5000
    ab_alpha: float = 0.05
    ab_mde_sd: float = 0.1
    ab_canary_weight: float = 50.0
    srm_alpha: float = 1e-3
    #: buckets this long after a weight change are left out of the SRM test: the router learns
    #: of a command only after the bucket closed (allowed lateness) and it was evaluated
    srm_grace_ms: int = 5000


@dataclass
class RolloutController:
    """Progressive delivery of one model's new version, driven by the evaluator's verdicts.

    Stages: ``shadow`` (judged on agreement and McNemar; passes into the first canary step,
    or is rolled back; found worse on labelled pairs that come late, it is rolled back from
    any canary step too), ``canary`` (each weight step held until ``min_events`` canary events
    and ``min_duration_ms`` of event time were healthy, then ``set_weight`` to the next;
    ``rollback`` as soon as the canary is unhealthy; ``promote`` after the last step),
    ``production``, ``rolled_back``. One command per decision, with a deterministic id.

    >>> c = RolloutController("m", RolloutPolicy(steps=(10, 100), min_events=10, min_duration_ms=0))
    >>> c.on_canary(1000, "v2", healthy=True, events=20).action
    'set_weight'
    >>> c.on_canary(2000, "v2", healthy=True, events=20).action
    'promote'
    """

    model: str
    policy: RolloutPolicy = field(default_factory=RolloutPolicy)
    stages: dict[str, str] = field(default_factory=dict)  # version -> stage
    step: dict[str, int] = field(default_factory=dict)  # version -> index of the weight in force
    step_started: dict[str, int] = field(default_factory=dict)
    step_events: dict[str, int] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)

    def weight(self, version: str) -> float:
        i = self.step.get(version, -1)
        return self.policy.steps[i] if i >= 0 else 0.0

    def _command(
        self,
        ts: int,
        version: str,
        action: str,
        reason: str,
        evidence: dict,
        alert_ids: list[str],
        weight: float | None = None,
    ) -> Command:
        command_id = hashlib.sha256(
            f"{self.model}|{version}|{action}|{weight}|{ts}".encode()
        ).hexdigest()[:32]
        return Command(
            command_id, ts, self.model, version, action, reason, alert_ids, evidence, weight
        )

    def on_shadow(
        self,
        ts: int,
        version: str,
        verdict: str | None,
        evidence: dict,
        alert_ids: Sequence[str] = (),
    ) -> Command | None:
        """``verdict``: "pass", "fail" (e.g. it disagrees with the champion too often),
        "worse" (McNemar: wrong more often than the champion on labelled pairs) or None (not
        enough evidence yet). A shadow found worse is rolled back whatever its stage, since
        its labels may come after it passed into the canary; a failed agreement is not held
        against a canary (it no longer answers as a shadow)."""
        stage = self.stages.get(version, "shadow")
        if verdict == "worse" and stage == "canary":
            self.stages[version], self.step[version] = "rolled_back", -1
            return self._command(
                ts,
                version,
                "rollback",
                "judged worse than the champion on the labelled pairs of its shadow",
                evidence,
                list(alert_ids),
            )
        if stage != "shadow" or verdict is None:
            return None
        if verdict in ("fail", "worse"):
            self.stages[version] = "rolled_back"
            return self._command(
                ts,
                version,
                "rollback",
                "shadow judged worse than the champion",
                evidence,
                list(alert_ids),
            )
        self.stages[version] = "canary"
        self._enter_step(version, 0, ts)
        return self._command(
            ts,
            version,
            "set_weight",
            "shadow passed: start the canary",
            evidence,
            list(alert_ids),
            self.policy.steps[0],
        )

    def _enter_step(self, version: str, i: int, ts: int) -> None:
        self.step[version], self.step_started[version], self.step_events[version] = i, ts, 0

    def on_srm(
        self, ts: int, version: str, evidence: dict, alert_ids: Sequence[str] = ()
    ) -> Command | None:
        """The observed split departs from the weight in force: the comparison is not valid,
        so hold the rollout (once) until people look; a rollback stays possible."""
        if self.stages.get(version) != "canary" or version in self.paused:
            return None
        self.paused.add(version)
        return self._command(
            ts,
            version,
            "pause",
            "sample ratio mismatch: traffic split differs from the weight in force",
            evidence,
            list(alert_ids),
        )

    def on_canary(
        self,
        ts: int,
        version: str,
        healthy: bool,
        events: int,
        evidence: dict | None = None,
        alert_ids: Sequence[str] = (),
        confident: bool = True,
    ) -> Command | None:
        """Feed one evaluation of the canary: ``events`` canary events in the new bucket;
        ``healthy`` is False when the canary is confidently bad, ``confident`` True when its
        health is established (a step is only taken then)."""
        stage = self.stages.setdefault(version, "canary")
        if stage != "canary":
            return None
        if version not in self.step:
            self._enter_step(version, 0, ts)
        evidence = evidence or {}
        if not healthy:
            self.stages[version] = "rolled_back"
            self.step[version] = -1
            return self._command(
                ts, version, "rollback", "canary unhealthy", evidence, list(alert_ids)
            )
        self.step_events[version] += events
        p = self.policy
        if (
            version in self.paused
            or not confident
            or self.step_events[version] < p.min_events
            or ts - self.step_started[version] < p.min_duration_ms
        ):
            return None
        nxt = self.step[version] + 1
        if nxt < len(p.steps):
            self._enter_step(version, nxt, ts)
            return self._command(
                ts,
                version,
                "set_weight",
                f"healthy at {p.steps[nxt - 1]}%",
                evidence,
                list(alert_ids),
                p.steps[nxt],
            )
        self.stages[version] = "production"
        return self._command(
            ts, version, "promote", "healthy through every step", evidence, list(alert_ids)
        )
