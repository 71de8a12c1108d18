"""Plain settings of one model's monitor, with coalmine's defaults.

:mod:`coalmine.config` builds them from a TOML file (and checks every value); a notebook
builds them from keyword arguments. Nothing here reads files or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coalmine.streams.rollout import RolloutPolicy

#: the variants a model serves: the live one, the one being rolled out, the mirrored one
VARIANTS = ("champion", "canary", "shadow")
#: the checks a model runs unless told otherwise
DEFAULT_CHECKS = ("drift", "prediction_drift", "missing_rate", "performance")
#: checks on derived columns and the estimated accuracy, off unless configured: they need a
#: reference with several numeric features, or class scores and labels
ESTIMATION_CHECKS = ("multivariate_drift", "uncertainty_drift", "estimated_performance")
#: checks on the window's distributions and labelled errors (the window tests and CUSUMs)
DRIFT_CHECKS = DEFAULT_CHECKS + ESTIMATION_CHECKS
ROLLOUT_CHECKS = ("shadow", "canary", "ab")
ALL_CHECKS = DRIFT_CHECKS + ROLLOUT_CHECKS
#: the model uncertainty measures a derived column may hold (coalmine.streams.derived)
UNCERTAINTY_MEASURES = ("margin", "entropy")

#: the largest event time (year ~2255 in ms): event times stay exact in float64 and int64
MAX_TS = 2**53

#: the window tests run at most once per this much event time (see ModelSettings.window_step_ms)
WINDOW_STEP_MS = 1000


@dataclass(frozen=True)
class ModelSettings:
    """Everything one model's statistics depend on but its reference."""

    name: str
    features: tuple[str, ...] | None = None
    checks: tuple[str, ...] = DEFAULT_CHECKS
    bucket_ms: int = 250
    window_ms: int = 60_000
    allowed_lateness_ms: int = 2000
    false_alarm_every_events: int = 10_000_000
    bins: int = 32
    min_window_events: int = 200
    #: a bucket holding fewer events (all variants) is carried into the next, for at most
    #: :attr:`max_carry_ms`: a low-traffic model is judged in steps of about this many events,
    #: not every bucket (stage 2's cost is per step); 0 judges every bucket
    min_bucket_events: int = 30
    label_ttl_ms: int = 3_600_000
    #: live only (a worker, not a replay): an event dated more than this ahead of the wall
    #: clock is dead-lettered, so that it cannot move the watermark
    max_future_ms: int = 300_000
    #: an event more than this ahead of the rest of its partition's stream (or, first on a
    #: partition, behind it) is dead-lettered; a model whose own events lag its partition's by
    #: more than this has its buckets closed by the others' (see Sketcher)
    max_ahead_ms: int = 3_600_000
    #: duplicates (same event_id) are dropped within the last 1 to 2 times this many events of
    #: the model on a partition (plus the batch they come in)
    dedup_events: int = 100_000
    #: predictions waiting for their label (and labels for their prediction) on a partition,
    #: at most; the oldest are dropped, and counted, beyond
    label_join_max: int = 1_000_000
    baseline_error_rate: float | None = None
    shift_to_detect_sd: float = 0.3
    #: multivariate_drift: the share of the reference's variance the principal components keep
    pca_variance: float = 0.9
    #: uncertainty_drift and estimated_performance: the score-based uncertainty column
    uncertainty: str = "margin"
    #: estimated_performance: the accuracy drop below the reference's that is tolerated
    estimated_accuracy_tolerance: float = 0.02
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)

    @property
    def window_buckets(self) -> int:
        return self.window_ms // self.bucket_ms

    @property
    def window_step_ms(self) -> int:
        """The window tests run when a bucket ending on a multiple of this closes: every
        bucket, but no more often than once a second of event time (the CUSUMs run every
        bucket: they are the fast detectors; a window test's power is its window's size)."""
        return -(-max(self.bucket_ms, WINDOW_STEP_MS) // self.bucket_ms) * self.bucket_ms

    @property
    def max_carry_ms(self) -> int:
        """The longest step of a low-traffic model (:attr:`min_bucket_events`): a quarter of
        the window, in whole buckets (at least one), so that the window keeps sliding."""
        return max(self.window_ms // 4 // self.bucket_ms, 1) * self.bucket_ms
