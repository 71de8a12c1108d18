"""Canary analysis: error rates and latency with confidence bounds, and progressive rollout.

Everything here works on mergeable sufficient statistics: per (model, variant, event-time
bucket) the pipeline keeps a :class:`VariantStats` (event, error and label counts plus a
:class:`LatencyHistogram` on fixed log-spaced bins) and sums the buckets of a window with ``+``.
:class:`CanaryHealth` judges a window; :class:`RolloutController` turns the judgements into
rollout commands (``set_weight``, ``rollback``, ``promote``) with deterministic ids and an
optional HMAC-SHA256 signature.

Window checks (:class:`CanaryHealth`) describe the statistics of their latest ``update``;
the controller accumulates, since it follows the rollout through time.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

import numpy as np
import orjson
from scipy import special


def clopper_pearson_lower(k: int, n: int, confidence: float) -> float:
    r"""Exact one-sided lower confidence bound on a binomial proportion (Clopper and Pearson
    1934): the :math:`1 - c` quantile of :math:`\mathrm{Beta}(k, n - k + 1)`, 0 when
    :math:`k = 0`. The true rate is below it with probability at most :math:`1 - c`.

    >>> round(clopper_pearson_lower(5, 100, 0.95), 4)
    0.0199
    """
    return 0.0 if k == 0 else float(special.betaincinv(k, n - k + 1, 1 - confidence))


def rate_ratio_lower_bound(k1: int, n1: int, k2: int, n2: int, confidence: float) -> float:
    r"""One-sided lower confidence bound on the ratio of two event rates, :math:`r = p_1/p_2`,
    by the conditional test of two Poisson counts (Lehmann and Romano, 4.6): given the total
    :math:`T = k_1 + k_2`, :math:`k_1 \sim \mathrm{Binomial}(T, \pi)` with
    :math:`\pi = n_1 r / (n_1 r + n_2)`, so the Clopper-Pearson bound :math:`\pi_L` gives

    .. math:: r_L = \frac{\pi_L \, n_2}{(1 - \pi_L) \, n_1}

    Exact for Poisson counts and conservative for binomial ones (their exact conditional law,
    hypergeometric, is less dispersed), so it stays honest on a handful of errors, where
    normal-approximation intervals are not. 0 without any event.

    >>> round(rate_ratio_lower_bound(30, 1000, 10, 1000, 0.99), 3)
    1.267
    """
    pi_low = clopper_pearson_lower(k1, k1 + k2, confidence)
    return pi_low * n2 / ((1 - pi_low) * n1)


class LatencyHistogram:
    r"""Latency counts on fixed log-spaced bins: mergeable, bounded memory, bounded error.

    Bin edges are :math:`e_i = lo \cdot g^i` with growth :math:`g = 10^{1/b}` for ``b`` bins
    per decade, from ``lo_ms`` to at least ``hi_ms``, plus an underflow bin :math:`[0, lo)` and
    an overflow bin :math:`[e_K, \infty)`. Histograms with the same bins add exactly.

    :meth:`quantile` returns the geometric mid-point of the bin holding the sample quantile
    (the inverted-CDF one, as ``np.quantile(..., method="inverted_cdf")``). For a quantile in
    :math:`[lo, e_K)` its relative error is at most :attr:`relative_error`
    :math:`= \sqrt g - 1`, at most half the relative bin width :math:`g - 1` (12.2% at 20 bins per
    decade, so at most 5.9%). Below ``lo_ms`` it returns ``lo_ms``; at or above :math:`e_K`,
    :math:`e_K` (a lower bound).

    Examples
    --------
    >>> h = LatencyHistogram()
    >>> h.add(np.array([10.0, 20.0, 30.0, 40.0]))
    >>> g = LatencyHistogram()
    >>> g.add(np.array([1000.0]))
    >>> merged = h + g
    >>> merged.n, round(merged.quantile(0.5), 1), round(merged.quantile(1.0))
    (5, 29.9, 1059)
    >>> round(merged.relative_error, 4), merged.count_above(100.0)
    (0.0593, 1)
    """

    def __init__(self, lo_ms: float = 0.1, hi_ms: float = 600_000.0, bins_per_decade: int = 20,
                 counts: np.ndarray | None = None):
        self.lo_ms, self.hi_ms, self.bins_per_decade = lo_ms, hi_ms, bins_per_decade
        k = math.ceil(bins_per_decade * math.log10(hi_ms / lo_ms))
        self.edges = lo_ms * 10 ** (np.arange(k + 1) / bins_per_decade)
        self.counts = np.zeros(k + 2, dtype=np.int64) if counts is None else np.asarray(counts, np.int64)

    @property
    def layout(self) -> tuple[float, float, int]:
        return self.lo_ms, self.hi_ms, self.bins_per_decade

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def relative_error(self) -> float:
        return 10 ** (0.5 / self.bins_per_decade) - 1

    def add(self, values: np.ndarray) -> None:
        """Count a batch of latencies (ms); NaN is ignored."""
        values = np.asarray(values, dtype=float)
        idx = np.searchsorted(self.edges, values[~np.isnan(values)], side="right")
        self.counts += np.bincount(idx, minlength=len(self.counts))

    def merge(self, other: "LatencyHistogram") -> "LatencyHistogram":
        """The histogram of both sets of events."""
        if other.layout != self.layout:
            raise ValueError(f"cannot merge histograms with bins {self.layout} and {other.layout}")
        return LatencyHistogram(*self.layout, counts=self.counts + other.counts)

    __add__ = merge

    def quantile(self, q: float) -> float:
        """Estimate of the ``q`` sample quantile (see the class notes for its error); NaN when
        empty."""
        n = self.n
        if n == 0:
            return math.nan
        rank = max(1, math.ceil(q * n))
        b = int(np.searchsorted(np.cumsum(self.counts), rank))
        if b == 0:
            return self.lo_ms
        if b == len(self.counts) - 1:
            return float(self.edges[-1])
        return float(math.sqrt(self.edges[b - 1] * self.edges[b]))

    def count_above(self, limit_ms: float) -> int:
        """Events in bins that lie wholly at or above ``limit_ms``: a lower bound on the events
        over the limit (exact when the limit is a bin edge), so checks built on it err towards
        not alarming by at most one bin."""
        lower_edges = np.concatenate(([0.0], self.edges))
        return int(self.counts[np.searchsorted(lower_edges, limit_ms, side="left"):].sum())

    def to_dict(self) -> dict:
        return {"lo_ms": self.lo_ms, "hi_ms": self.hi_ms, "bins_per_decade": self.bins_per_decade,
                "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyHistogram":
        return cls(d["lo_ms"], d["hi_ms"], d["bins_per_decade"], counts=d["counts"])


@dataclass(frozen=True)
class VariantStats:
    """One variant's counts over a bucket or window; ``+`` merges buckets.

    ``n`` predictions, ``errors`` of them with status ``error``, ``labelled`` of them joined to
    a label, ``label_errors`` of those wrong, and the latency histogram."""

    n: int = 0
    errors: int = 0
    labelled: int = 0
    label_errors: int = 0
    latency: LatencyHistogram | None = None

    def __add__(self, other: "VariantStats") -> "VariantStats":
        latency = (other.latency if self.latency is None else
                   self.latency if other.latency is None else self.latency + other.latency)
        return VariantStats(self.n + other.n, self.errors + other.errors,
                            self.labelled + other.labelled, self.label_errors + other.label_errors,
                            latency)


@dataclass(frozen=True)
class CanaryHealthResult:
    """``checks`` maps each check run to ``{"estimate", "bound", "limit", "failed"}``: the
    check fails when its one-sided confidence bound is beyond its limit. Plain Python numbers,
    ready to be a command's evidence."""

    healthy: bool
    failed: tuple[str, ...]
    checks: dict[str, dict]
    n: int


class CanaryHealth:
    r"""Is the canary unhealthy, with stated confidence, on this window?

    Each check compares a one-sided confidence bound at level :math:`c` (``confidence``) with a
    limit, so a healthy canary fails a given check with probability at most :math:`1 - c` per
    evaluation. Checks run when their data exist:

    - ``error_rate``: Clopper-Pearson lower bound of the serving-error rate > ``max_error_rate``.
    - ``latency``: with :math:`k` of :math:`n` latencies above ``max_latency_ms``, the
      canary's ``latency_quantile`` :math:`q` exceeds the limit when the Clopper-Pearson lower
      bound of :math:`k/n` is above :math:`1 - q`.
    - ``label_error_rate``: the same bound on the labelled error rate > ``max_label_error_rate``.
    - against the champion on the same window: ``error_rate_vs_champion`` and
      ``label_error_rate_vs_champion`` fail when the lower bound on the ratio canary rate /
      champion rate (:func:`rate_ratio_lower_bound`) exceeds :math:`1 +` ``ratio_margin``;
      ``latency_vs_champion`` fails when the canary's :math:`q`-quantile exceeds
      :math:`(1 +` ``latency_margin`` :math:`)` times the champion's estimate (the champion's
      own noise is neglected: it usually has most of the traffic).

    The confidence holds per evaluation and per check; a rollout evaluated on every bucket
    makes many (correlated) evaluations, which is why ``confidence`` defaults to 0.999 and
    the margins tolerate a canary slightly worse than the champion.

    Examples
    --------
    >>> health = CanaryHealth(max_error_rate=0.01)
    >>> health.update(VariantStats(n=2000, errors=10), champion=VariantStats(n=38000, errors=190))
    >>> health.result.healthy
    True
    >>> health.update(VariantStats(n=2000, errors=60), champion=VariantStats(n=38000, errors=190))
    >>> health.result.failed
    ('error_rate', 'error_rate_vs_champion')

    References
    ----------
    Clopper, C. J. and Pearson, E. S. (1934). The use of confidence or fiducial limits
    illustrated in the case of the binomial. Biometrika 26(4).
    Lehmann, E. L. and Romano, J. P. (2005). Testing Statistical Hypotheses, 3rd ed.,
    section 4.6 (comparing two Poisson distributions). Springer.
    """

    def __init__(self, max_error_rate: float = 0.01, max_latency_ms: float | None = None,
                 max_label_error_rate: float | None = None, latency_quantile: float = 0.99,
                 ratio_margin: float = 0.2, latency_margin: float = 0.2,
                 confidence: float = 0.999):
        self.max_error_rate, self.max_latency_ms = max_error_rate, max_latency_ms
        self.max_label_error_rate, self.latency_quantile = max_label_error_rate, latency_quantile
        self.ratio_margin, self.latency_margin = ratio_margin, latency_margin
        self.confidence = confidence
        self.result = CanaryHealthResult(True, (), {}, 0)

    def update(self, canary: VariantStats, champion: VariantStats | None = None) -> None:
        """Judge one window: the canary's and the champion's merged statistics over it."""
        checks: dict[str, dict] = {}
        if canary.n:
            checks["error_rate"] = self._rate(canary.errors, canary.n, self.max_error_rate)
        if canary.labelled and self.max_label_error_rate is not None:
            checks["label_error_rate"] = self._rate(canary.label_errors, canary.labelled,
                                                    self.max_label_error_rate)
        latency = canary.latency if canary.latency is not None and canary.latency.n else None
        if latency and self.max_latency_ms is not None:
            checks["latency"] = self._latency(latency, self.max_latency_ms)
        if champion is not None:
            if canary.n and champion.n:
                checks["error_rate_vs_champion"] = self._versus(
                    canary.errors, canary.n, champion.errors, champion.n)
            if canary.labelled and champion.labelled:
                checks["label_error_rate_vs_champion"] = self._versus(
                    canary.label_errors, canary.labelled, champion.label_errors, champion.labelled)
            if latency and champion.latency is not None and champion.latency.n:
                limit = (1 + self.latency_margin) * champion.latency.quantile(self.latency_quantile)
                checks["latency_vs_champion"] = self._latency(latency, limit)
        failed = tuple(name for name, c in checks.items() if c["failed"])
        self.result = CanaryHealthResult(not failed, failed, checks, canary.n)

    def _rate(self, k: int, n: int, limit: float) -> dict:
        bound = clopper_pearson_lower(k, n, self.confidence)
        return {"estimate": k / n, "bound": bound, "limit": limit, "failed": bound > limit}

    def _versus(self, k1: int, n1: int, k2: int, n2: int) -> dict:
        bound = rate_ratio_lower_bound(k1, n1, k2, n2, self.confidence)
        limit = 1 + self.ratio_margin
        estimate = (k1 / n1) / (k2 / n2) if k2 else None  # JSON has no infinity
        return {"estimate": estimate, "bound": bound, "limit": limit, "failed": bound > limit}

    def _latency(self, hist: LatencyHistogram, limit_ms: float) -> dict:
        check = self._rate(hist.count_above(limit_ms), hist.n, 1 - self.latency_quantile)
        return check | {"quantile_ms": hist.quantile(self.latency_quantile), "limit_ms": limit_ms}


def canonical_json(cmd: dict) -> bytes:
    """The bytes a command's signature covers: orjson with sorted keys (at every level), no
    spaces, over every field except ``signature``."""
    return orjson.dumps({k: v for k, v in cmd.items() if k != "signature"},
                        option=orjson.OPT_SORT_KEYS)


def sign_command(cmd: dict, key: bytes) -> dict:
    """A copy of ``cmd`` with ``signature`` = HMAC-SHA256 (hex) of its canonical JSON."""
    return cmd | {"signature": hmac.new(key, canonical_json(cmd), hashlib.sha256).hexdigest()}


def verify_command(cmd: dict, key: bytes) -> bool:
    """True when ``cmd`` carries a signature that ``key`` made over exactly these fields."""
    expected = sign_command(cmd, key)["signature"]
    return hmac.compare_digest(str(cmd.get("signature", "")), expected)


RUNNING, ROLLED_BACK, PROMOTED = "running", "rolled_back", "promoted"


class RolloutController:
    """Progressive rollout of one canary version: hold each weight until enough healthy
    evidence, roll back as soon as the canary is unhealthy, promote after the last step.

    The canary starts at ``steps[0]`` percent of traffic (the weight in force when the
    controller is created). Each :meth:`update` is one evaluation, in event-time order: the
    canary's events in the bucket just closed and the health of the window ending there. A
    step is complete once it has seen at least ``min_events`` canary events and
    ``min_duration_ms`` of event time, all healthy; then the controller moves to the next
    weight, or promotes after the last. One unhealthy evaluation rolls back. ``rolled_back``
    and ``promoted`` are final: later updates return nothing.

    Commands follow ``schemas/command.json``. ``command_id`` is the SHA-256 (hex) of the
    command's canonical JSON (every field but ``command_id`` and ``signature``), so a replay
    of the same events issues the same ids; with a ``key`` each command is signed
    (:func:`sign_command`).

    Examples
    --------
    >>> ctl = RolloutController("m", "v2", steps=(10, 100), min_events=100, min_duration_ms=2000)
    >>> ok, bad = CanaryHealthResult(True, (), {}, 0), CanaryHealthResult(False, ("error_rate",), {}, 0)
    >>> [ctl.update(ts, 60, ok) for ts in (1000, 2000)]
    [None, None]
    >>> cmd = ctl.update(3000, 60, ok)
    >>> cmd["action"], cmd["weight"], ctl.weight
    ('set_weight', 100, 100)
    >>> cmd = ctl.update(4000, 600, bad, alert_ids=["a1"])
    >>> cmd["action"], cmd["reason"], ctl.state
    ('rollback', 'canary unhealthy at weight 100: error_rate', 'rolled_back')
    >>> ctl.update(5000, 600, ok) is None
    True
    """

    def __init__(self, model: str, version: str, steps: tuple[float, ...] = (5, 25, 50, 100),
                 min_events: int = 1000, min_duration_ms: int = 600_000, key: bytes | None = None):
        if not steps or list(steps) != sorted(steps) or not 0 < steps[0] <= steps[-1] <= 100:
            raise ValueError(f"steps must be increasing percentages in (0, 100], got {steps}")
        self.model, self.version, self.steps = model, version, tuple(steps)
        self.min_events, self.min_duration_ms, self.key = min_events, min_duration_ms, key
        self.state, self.step = RUNNING, 0
        self.step_start_ts: int | None = None
        self.step_events = 0

    @property
    def weight(self) -> float:
        """Canary traffic percentage in force (0 after a rollback)."""
        return 0 if self.state == ROLLED_BACK else self.steps[self.step]

    def update(self, ts: int, n: int, health: CanaryHealthResult,
               alert_ids: list[str] | tuple[str, ...] = ()) -> dict | None:
        """One evaluation at event time ``ts``: returns the command decided, if any."""
        if self.state != RUNNING:
            return None
        if self.step_start_ts is None:
            self.step_start_ts = ts
        self.step_events += n
        evidence = {"step": self.step, "weight": self.weight, "step_events": self.step_events,
                    "step_duration_ms": ts - self.step_start_ts, "checks": health.checks}
        if not health.healthy:
            reason = f"canary unhealthy at weight {self.weight:g}: {', '.join(health.failed)}"
            self.state = ROLLED_BACK
            return self._command(ts, "rollback", None, reason, alert_ids, evidence)
        if self.step_events < self.min_events or ts - self.step_start_ts < self.min_duration_ms:
            return None
        reason = (f"healthy for {self.step_events} canary events over "
                  f"{ts - self.step_start_ts} ms at weight {self.weight:g}")
        if self.step == len(self.steps) - 1:
            self.state = PROMOTED
            return self._command(ts, "promote", None, reason, alert_ids, evidence)
        self.step, self.step_start_ts, self.step_events = self.step + 1, ts, 0
        return self._command(ts, "set_weight", self.weight, reason, alert_ids, evidence)

    def _command(self, ts: int, action: str, weight: float | None, reason: str,
                 alert_ids, evidence: dict) -> dict:
        cmd = {"ts": ts, "model": self.model, "version": self.version, "action": action,
               "reason": reason, "alert_ids": list(alert_ids), "evidence": evidence}
        if weight is not None:
            cmd["weight"] = weight
        cmd = {"command_id": hashlib.sha256(canonical_json(cmd)).hexdigest()} | cmd
        return sign_command(cmd, self.key) if self.key is not None else cmd
