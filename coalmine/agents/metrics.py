"""Prometheus metrics of a worker, served on its web port at ``/metrics``."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection

from prometheus_client import REGISTRY, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

from coalmine.streams.records import Alert, Evaluation

EVENTS = PromCounter(
    "coalmine_events_total", "Events folded into summaries", ["model", "variant", "kind"]
)
DEADLETTERS = PromCounter(
    "coalmine_deadletters_total",
    "Events sent to the dead-letter topic, by kind of reason",
    ["topic", "reason"],
)
LATE = PromCounter(
    "coalmine_late_events_total",
    "Events later than the allowed lateness (they go to the dead-letter topic)",
    ["model"],
)
DUPLICATES = PromCounter(
    "coalmine_duplicates_total",
    "Events dropped as duplicates (an event_id seen lately on the partition): counted once",
    ["model"],
)
SEND_FAILURES = PromCounter(
    "coalmine_send_failures_total",
    "Messages the broker refused to stage 1 (sent again; offsets wait for them)",
    ["topic"],
)
LABEL_JOIN_EVICTIONS = PromCounter(
    "coalmine_label_join_evictions_total",
    "Label-join entries dropped, oldest first, to keep the table under label_join_max",
)
LATE_LABELS = PromCounter(
    "coalmine_late_labels_total",
    "Labels read after the bucket of their (and their prediction's) event time had closed: "
    "counted in the first open bucket",
    ["model"],
)
LATE_PARTIALS = PromCounter(
    "coalmine_late_partials_total",
    "Bucket partials stage 2 received after it evaluated the bucket without them (idle source)",
    ["model"],
)
ALERTS = PromCounter(
    "coalmine_alerts_total", "Alert state changes published", ["model", "variant", "check", "state"]
)
COMMANDS = PromCounter("coalmine_commands_total", "Rollout commands published", ["model", "action"])
FIRING = Gauge("coalmine_alerts_firing", "Alerts currently firing", ["model"])
EVALUATIONS = PromCounter(
    "coalmine_evaluations_total",
    "Steps evaluated: a bucket, or several of a low-traffic model carried together",
    ["model"],
)


class SeriesGauge:
    """A gauge family of many series (~120 a model: a statistic of each variant, check,
    feature), written out by hand at a scrape: ``prometheus_client`` takes ~30 us a series
    (3.4 s for 1,000 models' 110,000), this ~1.7 us. Label values are escaped once, when a
    series is first set."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]):
        self.name, self.labelnames = name, labelnames
        self.header = f"# HELP {name} {_escape_help(documentation)}\n# TYPE {name} gauge\n"
        self.values: dict[tuple[str, ...], float] = {}
        self.series: dict[tuple[str, ...], str] = {}  # labels -> the line up to the value

    def set(self, labels: tuple[str, ...], value: float) -> None:
        if labels not in self.series:
            pairs = ",".join(  # by name, as prometheus_client writes them
                f'{k}="{_escape_label(v)}"'
                for k, v in sorted(zip(self.labelnames, labels, strict=True))
            )
            self.series[labels] = f"{self.name}{{{pairs}}} "
        self.values[labels] = value

    def exposition(self) -> str:
        """The family in Prometheus' text format (0.0.4)."""
        series = self.series
        return self.header + "".join([f"{series[k]}{_number(v)}\n" for k, v in self.values.items()])


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """A sample value as Prometheus writes it (``+Inf``, ``-Inf``, ``NaN``)."""
    if math.isfinite(value):
        return repr(float(value))
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


_CHECK_LABELS = ("model", "variant", "check", "feature", "statistic")
STATISTIC = SeriesGauge(
    "coalmine_check_statistic", "Last value of a check's statistic", _CHECK_LABELS
)
THRESHOLD = SeriesGauge(
    "coalmine_check_threshold", "Calibrated threshold of the last evaluation", _CHECK_LABELS
)


def exposition(names: Collection[str] = ()) -> bytes:
    """``/metrics``: ``prometheus_client``'s registry, then the per-check gauges; only the
    series named ``names`` when some are (Prometheus' ``name[]`` parameter, as
    ``prometheus_client``'s own server reads it): a poll of one counter need not write
    1,000 models' 110,000 series."""
    gauges = [g for g in (STATISTIC, THRESHOLD) if not names or g.name in names]
    registry = REGISTRY.restricted_registry(names) if names else REGISTRY
    return generate_latest(registry) + "".join(g.exposition() for g in gauges).encode()


PROCESSING = Histogram(
    "coalmine_batch_processing_seconds",
    "Wall time to process one batch",
    ["stage"],
    buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3),
)
BATCH_EVENTS = Histogram(
    "coalmine_batch_events",
    "Events per processed batch",
    ["stage"],
    buckets=(1, 10, 100, 300, 1000, 3000, 10000),
)
EXPIRED = Gauge(
    "coalmine_expired_unlabelled_predictions",
    "Predictions dropped from the label join after the label TTL, never labelled",
)


def count_events(kind: str, counts: Counter) -> None:
    """``counts``: events folded per (model, variant)."""
    for (model, variant), n in counts.items():
        EVENTS.labels(model, variant, kind).inc(n)


def reason_kind(reason: str) -> str:
    """A short, bounded label for a dead-letter reason (the full reason is in the record):
    the field or kind before the first ``:``, ``.``, ``[`` or space, so per-feature reasons do
    not mint a label each.

    >>> reason_kind("features.f2: NaN is not allowed"), reason_kind("late event: ts 5 is behind")
    ('features', 'late')
    """
    return re.split(r"[:.\[ ]", reason.strip(), maxsplit=1)[0][:40] or "other"


def record_evaluations(
    model: str, evaluations: list[Evaluation], alerts: list[Alert], firing: int
) -> None:
    for e in evaluations:  # a gauge shows the last value set: earlier buckets' go unseen
        labels = (model, e.variant, e.check, e.feature or "", e.statistic)
        STATISTIC.set(labels, e.value)
        if e.threshold is not None:
            THRESHOLD.set(labels, e.threshold)
    for a in alerts:
        ALERTS.labels(model, a.variant, a.check, a.state).inc()
    FIRING.labels(model).set(firing)


UNJOINED = Gauge(
    "coalmine_unjoined_labels",
    "Labels dropped after the label TTL without ever meeting their prediction",
)
CONSUMER_LAG = Gauge(
    "coalmine_consumer_lag_messages",
    "Messages between stage 1's position and the log end, per input partition",
    ["topic", "partition"],
)
LABEL_JOIN = Gauge(
    "coalmine_label_join_entries",
    "Predictions waiting for their label and labels waiting for their prediction",
    ["kind"],
)
LABEL_JOIN_BYTES = Gauge(
    "coalmine_label_join_bytes",
    "Memory of the predictions waiting for their label (columns and index)",
)
CANARY_WEIGHT = Gauge(
    "coalmine_canary_weight_percent",
    "Traffic weight the latest command gave a version (set_weight; 100 once promoted, 0 rolled back)",
    ["model", "version"],
)
#: what each command does to its version's weight
_WEIGHT_OF = {
    "promote": lambda c: 100.0,
    "rollback": lambda c: 0.0,
    "set_weight": lambda c: c.weight,
}


def record_command(model: str, command) -> None:
    """Count a published command and follow the weight it gives its version."""
    COMMANDS.labels(model, command.action).inc()
    if command.action in _WEIGHT_OF:
        CANARY_WEIGHT.labels(model, command.version).set(_WEIGHT_OF[command.action](command))
