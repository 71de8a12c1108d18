"""Stage 2, one per model: partials from every source partition in, evaluations, alert state
changes and rollout commands out.

An :class:`Evaluator` merges partials, and once every source has closed a bucket, slides the
window (:class:`~coalmine.streams.window.SlidingWindow`) and asks its judges: the drift judge
(:mod:`coalmine.streams.drift_checks`) and the rollout judge
(:mod:`coalmine.streams.rollout_judge`). Alert states follow the worst statistic of each
(variant, check, feature) (:class:`~coalmine.streams.alerts.AlertTracker`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from itertools import chain
from typing import NamedTuple

from coalmine.streams.alerts import AlertTracker
from coalmine.streams.baseline import Baseline
from coalmine.streams.drift_checks import DriftJudge
from coalmine.streams.latency import LATENCY_BINS
from coalmine.streams.records import Alert, Command, Evaluation, Window
from coalmine.streams.rollout_judge import RolloutJudge
from coalmine.streams.settings import DRIFT_CHECKS
from coalmine.streams.sketch import Summary
from coalmine.streams.window import Bucket, SlidingWindow, accumulate


class Evaluator:
    """Stage 2 for one model: partials from ``sources`` partitions in, evaluations and alerts
    out, once every source has closed a bucket (a bucket of fewer than
    :attr:`~coalmine.streams.settings.ModelSettings.min_bucket_events` events is carried into
    the next: see :meth:`poll`)."""

    def __init__(
        self, baseline: Baseline, sources: int = 1, signer: Callable[[dict], dict] | None = None
    ):
        self.baseline, self.settings = baseline, baseline.settings
        self.sources = sources
        self.signer = signer
        self.late_partials = 0  # bucket partials that came after their bucket was evaluated
        self.closed: dict[int, int] = {}
        self.pending: dict[int, dict[str, Summary]] = {}
        self.applied: set[tuple[int, int]] = set()
        self.next_bucket: int | None = None
        settings = baseline.settings
        self.window = SlidingWindow(settings.window_ms)
        self.alerts = AlertTracker(settings.name)
        self.drift = DriftJudge(baseline)
        self.judge = RolloutJudge(
            settings.name, settings.checks, baseline.policy, settings.bucket_ms
        )
        self.versions: dict[
            str, str
        ] = {}  # variant -> version serving it, as of the evaluated bucket
        # pending bucket -> variant -> the version each source saw first in it
        self.bucket_versions: dict[int, dict[str, set[str]]] = {}
        # (variant, check, feature) -> the window tests' evaluations at their last run
        self.held: dict[tuple, list[Evaluation]] = {}
        #: closed buckets of too few events, waiting to be evaluated with the next (merged
        #: then, in one pass: :meth:`_merged`)
        self.carried: list[Bucket] = []

    def __setstate__(self, state: dict) -> None:
        """An evaluator pickled (a state record) before the carry, or while it was kept merged
        (one bucket, or None)."""
        carried = state.get("carried")
        state["carried"] = [carried] if isinstance(carried, Bucket) else list(carried or [])
        self.__dict__.update(state)

    def add(self, partial: dict, idle_sources: AbstractSet[int] = frozenset()) -> Emitted:
        """Merge one stage-1 partial; evaluate every bucket that all (non-idle) sources have
        closed."""
        src = partial["source"]
        # every summary read and checked before any is merged: a forged one changes nothing
        buckets = [
            (int(start), [(v, d.pop("version", None), self._summary(d)) for v, d in vs.items()])
            for start, vs in partial["buckets"].items()
        ]
        for start, variants in buckets:
            if (src, start) in self.applied:
                continue  # a re-sent partial (at-least-once delivery): already merged
            if self.next_bucket is not None and start < self.next_bucket:
                self.late_partials += 1  # evaluated without it (its source was idle)
                continue
            self.applied.add((src, start))
            merged = self.pending.setdefault(start, {})
            for variant, version, summary in variants:
                if version is not None:
                    self._versions_seen(start, variant).add(version)
                accumulate(merged, variant, summary)
        self.closed[src] = max(self.closed.get(src, -1), partial["closed_through"])
        return self.poll(idle_sources)

    def _versions_seen(self, start: int, variant: str) -> set[str]:
        """The versions the sources saw first serving ``variant`` in the pending bucket
        ``start``."""
        return self.bucket_versions.setdefault(start, {}).setdefault(variant, set())

    def _summary(self, d: dict) -> Summary:
        return fitted(Summary.from_dict(d), self.baseline)

    def poll(self, idle: AbstractSet[int] = frozenset()) -> Emitted:
        """Evaluate the buckets that every source not in ``idle`` has closed."""
        out = Emitted([], [], [])
        live = [t for s, t in self.closed.items() if s not in idle]
        if len(self.closed) + len(idle - set(self.closed)) < self.sources or not live:
            return out
        through = min(live)
        if self.next_bucket is None:
            if not self.pending:
                return out
            self.next_bucket = min(self.pending)
        step, first = self.settings.bucket_ms, self.next_bucket
        # an empty bucket waits for the next one with events (none may come within the
        # window): evaluated or skipped alike however the partials were cut and timed
        while self.next_bucket + step <= through and self.pending:
            if min(self.pending) - self.next_bucket > self.settings.window_ms:
                out.extend(self.finish())  # the buckets before the gap
                self.window.clear()  # a gap longer than the window: start afresh
                self.next_bucket = min(self.pending)
                continue
            start = self.next_bucket
            out.extend(self._step(Bucket(start, self.pending.pop(start, {}), start + step)))
            self.next_bucket += step
        if self.next_bucket != first:  # else all they hold is still pending (a partial each)
            self.applied = {a for a in self.applied if a[1] >= self.next_bucket}
            kept = self.carried[0].start if self.carried else self.next_bucket
            self.bucket_versions = {b: v for b, v in self.bucket_versions.items() if b >= kept}
        return out

    def _step(self, bucket: Bucket) -> Emitted:
        """Evaluate ``bucket`` with those carried before it, or carry it on: stage 2 costs a
        fixed amount a step, which a low-traffic model would pay for every few events. The
        steps depend on the events' times only, as the buckets do: live runs, replays and
        restarted workers take the same."""
        carried = self.carried
        carried.append(bucket)
        events = sum(s.n for b in carried for s in b.variants.values())
        settings = self.settings
        if (
            events < settings.min_bucket_events
            and bucket.end - carried[0].start < settings.max_carry_ms
        ):
            return Emitted([], [], [])
        return self.finish()

    def finish(self) -> Emitted:
        """Evaluate the buckets carried, however few their events: a step's end, a gap longer
        than the window, or the end of input (a replay's)."""
        carried, self.carried = self.carried, []
        return self.evaluate(self._merged(carried)) if carried else Emitted([], [], [])

    def _merged(self, buckets: list[Bucket]) -> Bucket:
        """Consecutive buckets as one: each variant's summaries merged, and the versions seen
        in any of them as if seen in the first."""
        first = buckets[0]
        if len(buckets) == 1:
            return first
        parts: dict[str, list[Summary]] = {}
        for bucket in buckets:
            for variant, summary in bucket.variants.items():
                parts.setdefault(variant, []).append(summary)
            if bucket is not first:
                for variant, seen in self.bucket_versions.pop(bucket.start, {}).items():
                    self._versions_seen(first.start, variant).update(seen)
        merged = {variant: Summary.total(summaries) for variant, summaries in parts.items()}
        return Bucket(first.start, merged, buckets[-1].end)

    def _forget_replaced_versions(self, start: int) -> None:
        """A variant now served by another version starts a fresh window (and CUSUM). The
        bucket in which the router switched belongs to the old version while any source saw
        it there first: the old version's traffic must not vouch for the new one."""
        for variant, seen in self.bucket_versions.pop(start, {}).items():
            current = self.versions.get(variant)
            if current in seen:
                continue
            if current is not None:
                self.window.forget(variant)
                self.drift.forget(variant)
                self.held = {k: v for k, v in self.held.items() if k[0] != variant}
            self.versions[variant] = min(seen)

    def evaluate(self, bucket: Bucket) -> Emitted:
        """Slide the window by one bucket and run every check on each variant."""
        self._forget_replaced_versions(bucket.start)
        windows = self.window.append(bucket)
        ring = self.window.buckets
        end = bucket.end
        out = Emitted([], [], [])
        spans = {
            variant: Window(ring[0].start, end, window.n) for variant, window in windows.items()
        }
        step = self.settings.window_step_ms  # the window tests run when a step ends in the bucket
        window_tests = end // step > bucket.start // step
        for variant, window in windows.items():
            out.evaluations.extend(
                self.drift.evaluate(
                    end,
                    spans[variant],
                    variant,
                    window,
                    bucket.variants.get(variant),
                    window.n / len(ring),
                    window_tests,
                )
            )
        q = self.baseline.tail(max(sum(w.n for w in windows.values()), 1))
        rollout_evs, verdicts = self.judge.evaluate(
            ring, end, spans, windows, bucket.variants, self.versions, q
        )
        out.evaluations.extend(rollout_evs)
        if window_tests:
            self.held = _held(out.evaluations)
            held = []
        else:  # a window test's verdict stands until it runs again
            held = [e for key, tests in self.held.items() if key[0] in windows for e in tests]
        # only the groups over their threshold or firing can change an alert
        alerting = {
            e.key
            for e in chain(out.evaluations, held)
            if e.threshold is not None and e.value > e.threshold
        }
        alerting.update(self.alerts.quiet)
        if alerting:
            relevant = (e for e in chain(out.evaluations, held) if e.key in alerting)
            for group in _group(relevant).values():
                alert = self.alerts.observe(end, *_worst(group))
                if alert:
                    out.alerts.append(alert)
        out.alerts.extend(
            self.alerts.observe_gone(end, set(windows), Window(ring[0].start, end, 0))
        )
        out.commands.extend(self.judge.decide(end, self.versions, verdicts, self.alerts.ids))
        if self.signer is not None:
            signed: list[Alert | Command] = [*out.alerts, *out.commands]
            for record in signed:
                record.signature = self.signer(record.to_json())["signature"]
        return out


class Misfit(ValueError):
    """A summary whose arrays do not fit its model's layout."""


def fitted(summary: Summary, baseline: Baseline) -> Summary:
    """``summary``; :class:`Misfit` when its arrays do not fit ``baseline``'s layout (of a
    forged or foreign partial or state record: merged, it would fail or skew every window it
    is in)."""
    layout = baseline.layout
    sizes = (len(summary.counts), len(summary.sums), len(summary.missing), len(summary.latency))
    if sizes != (layout.size, layout.size, len(layout.names), LATENCY_BINS):
        raise Misfit(
            f"a summary of {sizes[0]} bins, {sizes[1]} sums, {sizes[2]} columns and "
            f"{sizes[3]} latency bins does not fit {baseline.settings.name!r}'s layout "
            f"({layout.size} bins, {len(layout.names)} columns, {LATENCY_BINS} latency bins)"
        )
    return summary


class Emitted(NamedTuple):
    """What stage 2 publishes: evaluations (for metrics and replay files), alert state
    changes, rollout commands."""

    evaluations: list[Evaluation]
    alerts: list[Alert]
    commands: list[Command]

    def extend(self, other: Emitted) -> None:
        self.evaluations.extend(other.evaluations)
        self.alerts.extend(other.alerts)
        self.commands.extend(other.commands)


def _group(evs: Iterable[Evaluation]) -> dict[tuple, list[Evaluation]]:
    """Evaluations grouped by (variant, check, feature): one alert per group, on any of its
    statistics."""
    groups: dict[tuple, list[Evaluation]] = {}
    for e in evs:
        if e.threshold is not None:  # PSI and JS are reported, not alarmed on
            groups.setdefault(e.key, []).append(e)
    return groups


def _held(evs: list[Evaluation]) -> dict[tuple, list[Evaluation]]:
    """The window tests with a threshold, by (variant, check, feature): their verdicts stand
    until the window tests run again. A window test is a statistic of the window: not a CUSUM,
    nor a rollout check, which run every bucket (tested inline: this runs on every window test
    of every model)."""
    return _group([e for e in evs if e.check in _DRIFT_CHECKS and e.statistic[:5] != "cusum"])


_DRIFT_CHECKS = frozenset(DRIFT_CHECKS)


def _worst(group: list[Evaluation]) -> tuple[bool, Evaluation]:
    """Whether any evaluation of a group is over its threshold, and the one furthest over it
    (the first of equals): the worst of a group speaks for it. One pass: this runs for every
    group of every bucket."""
    worst = group[0]
    assert worst.threshold is not None, "only evaluations with a threshold are grouped"
    exceeded, top = worst.value > worst.threshold, worst.value / max(worst.threshold, 1e-12)
    for e in group[1:]:
        assert e.threshold is not None
        exceeded = exceeded or e.value > e.threshold
        if (ratio := e.value / max(e.threshold, 1e-12)) > top:
            worst, top = e, ratio
    return exceeded, worst
