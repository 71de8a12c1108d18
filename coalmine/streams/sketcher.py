"""Stage 1, one per source partition: prediction and label events in, closed-bucket partials
out.

A :class:`Sketcher` folds events into per-(model, variant, event-time bucket)
:class:`~coalmine.streams.sketch.Summary` partials, joins labels to their predictions, pairs
shadow answers with the champion's, keeps a watermark (largest prediction event time seen less
the allowed lateness) and hands out a bucket's partial once the watermark passes the bucket's
end. Predictions later than that are returned as late, never dropped silently. A label counts
in the bucket of the later of its own and its prediction's event time, whatever order the two
are read in: a reader that may read labels behind predictions (a worker's consumer) keeps
buckets open until the labels side has passed them too (``wait_for_labels``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from coalmine.streams.baseline import Baseline
from coalmine.streams.label_join import (
    Answer,
    JoinTable,
    labels_record,
    read_record,
    request_keys,
)
from coalmine.streams.latency import latency_histograms
from coalmine.streams.recent_ids import RecentIds
from coalmine.streams.reference import SCORES, normalized, same_answer
from coalmine.streams.settings import MAX_TS, VARIANTS
from coalmine.streams.sketch import Summary, column_arrays, values_of
from coalmine.streams.window import accumulate

_VARIANT_CODE = {v: i for i, v in enumerate(VARIANTS)}
#: prediction errors and outcomes are clipped to this magnitude: their squares, and sums of
#: those, stay finite (no valid value comes near)
MAX_MAGNITUDE = 1e100
#: latencies are clipped to this (30 years), so that sums of their differences stay finite
MAX_LATENCY_MS = 1e12
_STATUS_FAILED = {"ok": False, "error": True}
#: label-join entries a state record holds at most (~2.5 MB)
JOIN_RECORD_ROWS = 50_000


@dataclass
class PredictionBatch:
    """One model's valid prediction events, column by column: what stage 1 folds.

    ``columns`` holds the model's layout columns (features, ``prediction``, ``scores.<class>``)
    as :func:`~coalmine.streams.sketch.column_arrays` makes them; ``positions`` each event's
    position in the batch of messages it came in (for dead-letter reasons).
    """

    model: str
    ts: np.ndarray
    variant: list[str]
    version: list[str]
    status: list[str]
    latency_ms: np.ndarray
    request_id: list[str]
    prediction: list
    columns: dict[str, np.ndarray]
    positions: list[int] = field(default_factory=list)
    event_id: list[str] = field(default_factory=list)  # empty: not deduplicated

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, keep: np.ndarray) -> PredictionBatch:
        """The events where ``keep`` (a boolean mask) is true."""
        at = np.flatnonzero(keep).tolist()

        def pick(seq: list) -> list:
            return [seq[i] for i in at]

        return PredictionBatch(
            self.model,
            self.ts[keep],
            pick(self.variant),
            pick(self.version),
            pick(self.status),
            self.latency_ms[keep],
            pick(self.request_id),
            pick(self.prediction),
            {name: values[keep] for name, values in self.columns.items()},
            pick(self.positions) if self.positions else [],
            pick(self.event_id) if self.event_id else [],
        )


def batches_from_events(
    events: list[dict], baselines: dict[str, Baseline]
) -> tuple[list[PredictionBatch], list[tuple[int, str]]]:
    """Valid prediction events (dicts, as :func:`coalmine.events.split_valid` gives them) to one
    batch per model; ``(index, reason)`` of the events refused: an unknown model, an event
    time out of range, a value of the wrong type for its column."""
    rejected: list[tuple[int, str]] = []
    groups: dict[str, list[int]] = {}
    for i, model in enumerate(values_of(events, "model")):
        groups.setdefault(model, []).append(i)
    batches = []
    for model, idx in groups.items():
        if model not in baselines:
            rejected += [(i, f"unknown model {model!r}") for i in idx]
            continue
        mine = [events[i] for i in idx] if len(groups) > 1 else events
        far = {j for j, t in enumerate(values_of(mine, "ts")) if not 0 <= t <= MAX_TS}
        if far:
            rejected += [(idx[j], f"ts: out of range (0 to {MAX_TS})") for j in sorted(far)]
            keep = [j for j in range(len(mine)) if j not in far]
            mine, idx = [mine[j] for j in keep], [idx[j] for j in keep]
        batch, bad = _batch_of(model, baselines[model], mine, idx)
        rejected += bad
        if batch is not None:
            batches.append(batch)
    return batches, sorted(rejected)


def _batch_of(
    model: str, baseline: Baseline, events: list[dict], idx: list[int]
) -> tuple[PredictionBatch | None, list[tuple[int, str]]]:
    """One model's events as a batch, and those with a value of the wrong type for its column."""
    if not events:
        return None, []
    try:
        cols = column_arrays(
            baseline.layout,
            values_of(events, "features"),
            values_of(events, "prediction"),
            [e.get("scores") for e in events] if baseline.scored else None,
        )
    except TypeError:  # rare: find the culprits one by one, batch the rest
        good, bad = [], []
        for e, i in zip(events, idx):
            try:
                column_arrays(
                    baseline.layout, [e["features"]], [e.get("prediction")], [e.get("scores")]
                )
                good.append((e, i))
            except TypeError as exc:
                bad.append((i, f"features.{exc.args[0]}: expected a number for a numeric feature"))
        if not good:
            return None, bad
        batch, _ = _batch_of(model, baseline, [e for e, _ in good], [i for _, i in good])
        return batch, bad
    batch = PredictionBatch(
        model,
        np.array(values_of(events, "ts"), dtype=np.int64),
        values_of(events, "variant"),
        values_of(events, "version"),
        values_of(events, "status"),
        np.array([e.get("latency_ms", np.nan) for e in events], dtype=float),
        values_of(events, "request_id"),
        values_of(events, "prediction"),
        cols,
        list(idx),
        values_of(events, "event_id"),
    )
    return batch, []


def _coded(values: list, codes: dict, dtype) -> np.ndarray:
    """``codes[v]`` for each value, as an array: one lookup in all when all values are alike
    (one variant, no serving errors: the common batch)."""
    distinct = set(values)
    if len(distinct) == 1:
        return np.full(len(values), codes[distinct.pop()], dtype=dtype)
    return np.fromiter(map(codes.__getitem__, values), dtype=dtype, count=len(values))


def _bucket_groups(
    batch: PredictionBatch, bucket_ms: int
) -> tuple[list[tuple[int, str]], list[int], np.ndarray]:
    """The distinct (bucket start, variant) of the batch's events, sorted; each one's first
    event; each event's group (the index of its pair). A batch of one pair (the common batch of
    a model with little traffic) costs no array but the groups'."""
    ts, variant = batch.ts, batch.variant
    if ts.min() // bucket_ms == ts.max() // bucket_ms and len(set(variant)) == 1:
        return [(int(ts[0]) // bucket_ms * bucket_ms, variant[0])], [0], np.zeros(len(ts), np.int64)
    # np.unique's work in C-level loops over lists: its dozen numpy calls cost more here
    codes = (ts // bucket_ms * len(VARIANTS) + _coded(variant, _VARIANT_CODE, np.int64)).tolist()
    keys = sorted(set(codes))
    group_of = dict(zip(keys, range(len(keys))))
    groups = np.fromiter(map(group_of.__getitem__, codes), np.int64, len(codes))
    first_at = dict(zip(reversed(codes), range(len(codes) - 1, -1, -1)))  # set last: the first
    pairs = [(key // len(VARIANTS) * bucket_ms, VARIANTS[key % len(VARIANTS)]) for key in keys]
    return pairs, [first_at[key] for key in keys], groups


def _agree(a, b, tolerance: float) -> bool:
    """Same class, or (numbers) within ``tolerance``."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and tolerance:
        return abs(a - b) <= tolerance
    return same_answer(a, b)


class Sketcher:
    """Stage 1 for one source partition: events in, closed-bucket partials out.

    >>> # see tests/test_monitor.py for complete runs
    """

    def __init__(
        self,
        baselines: dict[str, Baseline],
        source: int = 0,
        clock: Callable[[], int] | None = None,
        wait_for_labels: bool = False,
    ):
        self.baselines, self.source = baselines, source
        # wall clock in ms (a worker's): events too far ahead of it are refused; replays have
        # none, so their results depend on the events alone
        self.clock = clock
        # a model that joins labels closes a bucket only once the labels side passed it too:
        # the largest label ts read, or the partition's time when the reader says it has read
        # every label there is (labels_caught_up); replays read labels merged by ts, no need
        self.wait_for_labels = wait_for_labels
        self.labels_ts: int | None = None
        self.late_labels: Counter = Counter()  # model -> labels whose bucket had closed
        self.max_ts: dict[str, int] = {}  # model -> largest event time folded
        self.partition_ts: int | None = None  # the largest of them
        # model -> its recent event ids' hashes: duplicates are dropped
        self.seen = {m: RecentIds(b.settings.dedup_events) for m, b in baselines.items()}
        self.duplicates: Counter = Counter()  # model -> duplicates dropped
        self.join_max = max((b.settings.label_join_max for b in baselines.values()), default=1)
        self.evicted = 0  # label-join entries dropped to keep the table under join_max
        self.open: dict[str, dict[tuple[int, str], Summary]] = {m: {} for m in baselines}
        self.closed_through: dict[str, int] = {m: -1 for m in baselines}
        # per model, the predictions' own watermark at the last close (never behind
        # closed_through): an event behind it is late even while its bucket waits for the
        # labels side (file replay, not waiting, closed it)
        self.late_before: dict[str, int] = {m: -1 for m in baselines}
        # the runs around the median of the last stream of event times (:meth:`_out_of_time`),
        # by gap: every model's batch of a fetch is judged against the same stream
        self._runs: tuple[np.ndarray | None, dict[int, tuple[int, int]]] = (None, {})
        # variant -> the answers waiting for their labels
        self.joins: dict[str, JoinTable] = {}
        # request key (request_keys) -> the label that came before its prediction
        self.early_labels: dict[int, dict] = {}
        # request key -> (event time of the bucket its label counted in, its answers), while
        # that bucket is open
        self.joined: dict[int, tuple[int, dict[str, Answer]]] = {}
        # model -> (bucket start, variant) -> version serving it (the first one seen there)
        self.versions: dict[str, dict[tuple[int, str], str]] = {m: {} for m in baselines}
        self.shadow_seen: dict[str, int] = {}  # model -> latest shadow answer's ts
        # request_id -> (variant, (model, prediction, ts, latency)): the first of a champion and
        # shadow answer, waiting for the other; kept apart from the label joins, which a label
        # read ahead of its predictions may close early
        self.unpaired: dict[str, tuple[str, tuple]] = {}
        self.expired_unlabelled = 0
        self.expired_unjoined_labels = 0

    def clock_of(self, model: str) -> int | None:
        """The model's event time on this partition: the largest of its own events, so that
        another model's stream running ahead never makes its events late; but no more than
        ``max_ahead_ms`` behind the partition's, so that a model quiet on this partition still
        has its buckets closed (stage 2 waits for every partition)."""
        if self.partition_ts is None:
            return None
        behind = self.partition_ts - self.baselines[model].settings.max_ahead_ms
        return max(self.max_ts.get(model, behind), behind)

    def _watermark(self, model: str, now: int) -> int:
        """The bucket start the model's buckets are closed through at event time ``now``: it
        less the allowed lateness."""
        settings = self.baselines[model].settings
        return (now - settings.allowed_lateness_ms) // settings.bucket_ms * settings.bucket_ms

    def add_predictions(self, events: list[dict]) -> list[tuple[int, str]]:
        """Fold valid prediction events (dicts); return ``(index, reason)`` of those refused
        (unknown model, wrong value types, later than the watermark)."""
        batches, rejected = batches_from_events(events, self.baselines)
        for batch in batches:
            rejected += self.add_batch(batch)[0]
        return sorted(rejected)

    def add_batch(
        self, batch: PredictionBatch, stream: np.ndarray | None = None
    ) -> tuple[list[tuple[int, str]], PredictionBatch]:
        """Fold one model's batch; return ``(position, reason)`` of the events refused
        (positions from ``batch.positions``): too far ahead of the wall clock or of the stream
        (:meth:`_out_of_time`), later than the watermark; and the events folded. ``stream``: the sorted event times of
        all the models' events that came with it (default: the batch's own). Duplicates of an
        event id seen lately are dropped and counted (:attr:`duplicates`)."""
        model, baseline = batch.model, self.baselines[batch.model]
        ok, rejected = self._out_of_time(batch, np.sort(batch.ts) if stream is None else stream)
        if ok is not None:
            batch = batch.take(ok)
            if not len(batch):
                return rejected, batch
        # safe before the late check: that compares with the watermark of the last close
        self._advance(model, int(batch.ts.max()))
        watermark = self.late_before[model]
        if batch.ts.min() < watermark:
            ok = batch.ts >= watermark
            rejected += [
                (
                    batch.positions[i],
                    f"late event: ts {batch.ts[i]} is behind the watermark "
                    f"{watermark} (allowed lateness "
                    f"{baseline.settings.allowed_lateness_ms} ms)",
                )
                for i in np.flatnonzero(~ok)
            ]
            batch = batch.take(ok)
            if not len(batch):
                return rejected, batch
        first = self.seen[model].first_seen(batch.event_id)
        if first is not None:
            self.duplicates[model] += len(batch) - int(first.sum())
            batch = batch.take(first)
            if not len(batch):
                return rejected, batch
        keys, firsts, groups = _bucket_groups(batch, baseline.settings.bucket_ms)
        columns = baseline.with_derived(baseline.layout.clipped(batch.columns))
        summaries = baseline.layout.fold(columns, groups, len(keys))
        failed = _coded(batch.status, _STATUS_FAILED, bool)
        errors = np.bincount(groups, weights=failed, minlength=len(keys))
        lat_hist = latency_histograms(batch.latency_ms, groups, len(keys))
        state, versions = self.open[model], self.versions[model]
        for k, summary, err, hist, i in zip(keys, summaries, errors.tolist(), lat_hist, firsts):
            summary.errors, summary.latency = int(err), hist
            accumulate(state, k, summary)
            versions.setdefault(k, batch.version[i])  # a hand-over bucket is the old version's
        if baseline.joins_needed:
            self._join_predictions(baseline, batch)
        return rejected, batch

    def _run_around_median(self, stream: np.ndarray, gap: int) -> tuple[int, int]:
        """:func:`_run_around_median`, once per stream and gap."""
        if stream is not self._runs[0]:
            self._runs = (stream, {})
        runs = self._runs[1]
        if gap not in runs:
            runs[gap] = _run_around_median(stream, gap)
        return runs[gap]

    def _out_of_time(
        self, batch: PredictionBatch, stream: np.ndarray
    ) -> tuple[np.ndarray | None, list[tuple[int, str]]]:
        """Events whose time cannot be right, refused before they move the watermark: more
        than ``max_future_ms`` ahead of the wall clock (a worker's only); more than
        ``max_ahead_ms`` ahead of both the partition's event time and the events that came
        with them (the run of ``stream`` around its median with no gap over ``max_ahead_ms``:
        a lone event dated 2100 among today's, not a stream that moved on as a whole); and,
        first of their model on the partition, that far behind them (an event dated 1970
        opens no bucket at the epoch). Returns (mask of the events kept, or None when all
        are; reasons)."""
        settings = self.baselines[batch.model].settings
        bound, ts = settings.max_ahead_ms, batch.ts
        low, high = self._run_around_median(stream, bound)
        ahead = max(high, (self.partition_ts or -1) + bound)  # beyond both
        first = batch.model not in self.max_ts
        now = None if self.clock is None else self.clock()
        latest = ts.max()
        if (
            latest <= ahead
            and (now is None or latest <= now + settings.max_future_ms)
            and not (first and ts.min() < low)
        ):  # the common batch: its extremes say so, without a mask
            return None, []
        bad = ts > ahead
        if first:
            bad |= ts < low
        future = None
        if now is not None:
            future = ts > now + settings.max_future_ms
            bad |= future
        rejected = []
        for i in np.flatnonzero(bad).tolist():
            if future is not None and future[i]:
                why = (
                    f"future event: ts {ts[i]} is more than {settings.max_future_ms} ms ahead "
                    f"of the wall clock ({now})"
                )
            else:
                why = (
                    f"outlier event: ts {ts[i]} is more than {bound} ms away from its stream "
                    f"({low} to {max(high, self.partition_ts or -1)})"
                )
            rejected.append((batch.positions[i], why))
        return ~bad, rejected

    def _join_predictions(self, baseline: Baseline, batch: PredictionBatch) -> None:
        """Keep predictions for their labels (one table per variant, filled a batch at a time);
        pair shadow answers with the champion's."""
        model = batch.model
        # clipped, so that a sum of latency differences stays finite
        latency = np.minimum(batch.latency_ms, MAX_LATENCY_MS)
        keys = request_keys(batch.request_id)
        score = baseline.positive_score  # kept for the realised ROC AUC
        variants = set(batch.variant)
        for variant in variants:
            mine = (
                slice(None)
                if len(variants) == 1
                else np.array([v == variant for v in batch.variant])
            )
            if variant not in self.joins:
                self.joins[variant] = JoinTable(list(self.baselines))
            predictions = batch.prediction
            if len(variants) > 1:
                predictions = [p for p, v in zip(predictions, batch.variant) if v == variant]
            self.joins[variant].add(
                model,
                keys[mine],
                batch.ts[mine],
                latency[mine],
                predictions,
                None if score is None else batch.columns[score][mine],
            )
        if "shadow" in baseline.settings.checks:
            timeout = baseline.policy.shadow_timeout_ms
            for rid, variant, prediction, ts, lat in zip(
                batch.request_id,
                batch.variant,
                batch.prediction,
                batch.ts.tolist(),
                latency.tolist(),
            ):
                answer = Answer(model, prediction, ts, None if lat != lat else lat)
                self._pair_shadow(baseline, rid, variant, answer, timeout)
        if self.early_labels:
            waited = sorted(self.early_labels.keys() & set(keys.tolist()))
            for key, entry in zip(waited, self._pop_joined(np.array(waited, np.uint64))):
                self._count(key, entry, self.early_labels.pop(key))

    def _pop_joined(self, keys: np.ndarray) -> list[dict[str, Answer]]:
        """Per request key (:func:`request_keys`), every variant's answer still waiting for
        its label, taken out (for a key repeated, at its first)."""
        found = {variant: table.pop_many(keys) for variant, table in self.joins.items()}
        return [
            {v: a for v, answers in found.items() if (a := answers[i]) is not None}
            for i in range(len(keys))
        ]

    def _pair_shadow(
        self, baseline: Baseline, rid: str, variant: str, mine: Answer, timeout: int
    ) -> None:
        """Pair champion and shadow answers of one request, in whichever order they come; while
        a shadow serves, a champion answer waits for its shadow at most ``timeout``."""
        model, ts = mine.model, mine.ts
        if variant == "shadow":
            self.shadow_seen[model] = max(self.shadow_seen.get(model, 0), ts)
        elif variant != "champion" or ts - self.shadow_seen.get(model, -timeout - 1) > timeout:
            return  # no shadow serving: nothing to wait for
        other = self.unpaired.pop(rid, None)
        if other is None:
            self.unpaired[rid] = (variant, mine)
        elif other[0] != variant:
            champion, shadow = (mine, other[1]) if variant == "champion" else (other[1], mine)
            self._pair(baseline, champion, shadow, ts)

    def _expire_shadow_waits(self) -> None:
        """A shadow that has not answered within the shadow timeout failed: it counts as a
        paired request that disagreed (if the shadow answered later requests, i.e. it still
        serves). Shadow answers whose champion never came are dropped."""
        clocks = {m: c for m in self.baselines if (c := self.clock_of(m)) is not None}
        expired = []
        for rid, (variant, (model, _, ts, _, _)) in self.unpaired.items():
            if ts >= clocks[model] - self.baselines[model].policy.shadow_timeout_ms:
                break  # arrival order: the rest are younger
            expired.append((rid, variant, model, ts))
        for rid, variant, model, ts in expired:
            del self.unpaired[rid]
            if variant == "champion" and self.shadow_seen[model] >= ts:
                s = self._open_summary(model, "shadow", clocks[model])
                s.paired += 1
                s.shadow_missing += 1

    def _pair(self, baseline: Baseline, champion: tuple, shadow: tuple, ts: int) -> None:
        (model, champ, _, champ_lat, _), (_, shadow_pred, _, shadow_lat, _) = champion, shadow
        s = self._open_summary(model, "shadow", ts)
        s.paired += 1
        s.agree += _agree(champ, shadow_pred, baseline.policy.shadow_tolerance)
        if champ_lat is not None and shadow_lat is not None:
            s.latency_overhead_sum += shadow_lat - champ_lat

    def _open_summary(self, model: str, variant: str, ts: int) -> Summary:
        """The open bucket's summary for ``ts``, or the first open one if ``ts`` is closed."""
        baseline = self.baselines[model]
        ts = max(ts, self.closed_through[model])
        k = (ts // baseline.settings.bucket_ms * baseline.settings.bucket_ms, variant)
        s = self.open[model].get(k)
        if s is None:
            s = self.open[model][k] = baseline.layout.empty()
        return s

    def add_labels(self, events: list[dict]) -> list[tuple[int, str]]:
        """Join labels to their predictions (by request_id) and count them (see
        :meth:`join_labels`); return ``(index, reason)`` of those refused (unknown model)."""
        return self.join_labels(events)[0]

    def join_labels(self, events: list[dict]) -> tuple[list[tuple[int, str]], list[int]]:
        """Join labels to their predictions (by request_id) and count each in the bucket of
        the later of its ts and its prediction's. A label that comes before its prediction
        waits for it (until the label TTL, then it is counted as unjoined). Returns the
        refused ``(index, reason)`` and, for each label kept, the event time of the bucket it
        counted in (its own ts while it waits)."""
        rejected = [
            (i, f"unknown model {e['model']!r}")
            for i, e in enumerate(events)
            if e["model"] not in self.baselines
        ]
        labels = without(events, rejected)
        keys = request_keys(values_of(labels, "request_id")) if labels else np.zeros(0, np.uint64)
        counted = []
        for e, key, joined in zip(labels, keys.tolist(), self._pop_joined(keys)):
            # the labels' own clock: with wait_for_labels, buckets wait for it (labels never
            # move the predictions' watermark: a labels topic read ahead would make them late)
            self.labels_ts = e["ts"] if self.labels_ts is None else max(self.labels_ts, e["ts"])
            if joined:
                counted.append(self._count(key, joined, e))
            else:
                self.early_labels[key] = e
                counted.append(e["ts"])
        return rejected, counted

    def labels_caught_up(self, through: int | None = None) -> None:
        """The reader has read every label published before the predictions folded up to
        event time ``through`` (default: all folded so far): the labels side is at least
        there."""
        ts = self.partition_ts if through is None else through
        if ts is not None:
            self.labels_ts = max(self.labels_ts or 0, ts)

    def _count(self, key: int, entry: dict[str, Answer], label: dict) -> int:
        """Score a label (:meth:`_score`) and keep its answers while its bucket is open: a
        new owner that reads the label again finds them in :meth:`join_records`."""
        ts = self._score(entry, label)
        self.joined[key] = (ts, entry)
        return ts

    def _score(self, entry: dict[str, Answer], label: dict) -> int:
        """Count a label against every variant's answer to its request, in the bucket of the
        later of its ts and theirs (the first open one if that one closed: a late label,
        counted in :attr:`late_labels`); return that event time. Outcomes count for the
        variants that served it (not the shadow), the paired table on the shadow."""
        truth = label["label"]
        right = {}
        ts = max(label["ts"], *(answer.ts for answer in entry.values()))
        model = next(iter(entry.values())).model
        if ts < self.closed_through[model]:
            self.late_labels[model] += 1
        for variant, (model, pred, _, _, score) in entry.items():
            s = self._open_summary(model, variant, ts)
            right[variant] = same_answer(pred, truth)
            s.labelled += 1
            s.label_errors += not right[variant]
            if (positive := self.baselines[model].positive_class) is not None:
                # same_answer's comparison, the positive class's side already a string
                said, was = str(normalized(pred)) == positive, str(normalized(truth)) == positive
                s.answer_positives += said
                s.label_positives += was
                s.true_positives += said and was
                if score is not None:
                    edges = self.baselines[model].layout.edges[SCORES + positive]
                    s.count_label(bisect_right(edges, score), was, len(edges) + 1)
            if isinstance(pred, (int, float)) and isinstance(truth, (int, float)):
                error = min(abs(pred - truth), MAX_MAGNITUDE)  # 1e308 - -1e308 is inf
                s.abs_error_sum += error
                s.abs_error_sumsq += error**2
            if "outcome" in label and variant != "shadow":
                outcome = min(max(label["outcome"], -MAX_MAGNITUDE), MAX_MAGNITUDE)
                s.outcome_n += 1
                s.outcome_sum += outcome
                s.outcome_sumsq += outcome**2
        if "champion" in right and "shadow" in right:
            s = self._open_summary(model, "shadow", ts)
            s.paired_labelled += 1
            s.b += right["champion"] and not right["shadow"]
            s.c += right["shadow"] and not right["champion"]
        return max(ts, self.closed_through[model])

    def _advance(self, model: str, ts: int) -> None:
        self.max_ts[model] = max(self.max_ts.get(model, ts), ts)
        self.partition_ts = max(self.partition_ts or ts, ts)

    def close(self) -> list[dict]:
        """Partials for every bucket the watermark has passed, one message per model (empty
        ones too: they tell stage 2 that this source has moved on)."""
        out = []
        for model, baseline in self.baselines.items():
            now = self.clock_of(model)
            if now is None:
                continue
            self.late_before[model] = max(self.late_before[model], self._watermark(model, now))
            if self.wait_for_labels and baseline.joins_needed:  # held back by the labels side
                if self.labels_ts is None:
                    continue
                now = min(now, self.labels_ts)
            wm = self._watermark(model, now)
            if wm <= self.closed_through[model]:
                continue
            state = self.open[model]
            done = sorted(k for k in state if k[0] + baseline.settings.bucket_ms <= wm)
            buckets: dict[str, dict[str, dict]] = {}  # str keys: JSON objects
            versions = self.versions[model]
            for k in done:
                buckets.setdefault(str(k[0]), {})[k[1]] = {
                    **state.pop(k).to_dict(),
                    "version": versions.pop(k, None),
                }
            self.closed_through[model] = wm
            out.append(
                {"model": model, "source": self.source, "closed_through": wm, "buckets": buckets}
            )
        self._expire()
        return out

    def flush(self) -> list[dict]:
        """End of input (file replay): close every open bucket."""
        ends = [
            max((k[0] for k in self.open[m]), default=-1) + baseline.settings.bucket_ms
            for m, baseline in self.baselines.items()
        ]
        end = max(ends) + max(b.settings.allowed_lateness_ms for b in self.baselines.values())
        for model in self.baselines:
            self._advance(model, end)
        self.labels_caught_up()
        return self.close()

    def _expire(self) -> None:
        """Drop predictions and early labels older than the label TTL, counting them. Both
        tables are in arrival order, so the scan stops at the first entry still alive."""
        if self.partition_ts is None:
            return
        if self.unpaired:
            self._expire_shadow_waits()
        oldest = {  # per model: the oldest event time still waiting for its label
            m: clock - baseline.settings.label_ttl_ms
            for m, baseline in self.baselines.items()
            if (clock := self.clock_of(m)) is not None
        }
        for table in self.joins.values():
            self.expired_unlabelled += table.expire(oldest)
        _drop_oldest(self.joined, lambda j: j[0] < self._closed_of(j[1]))
        self.expired_unjoined_labels += _drop_oldest(
            self.early_labels, lambda e: e["ts"] < oldest[e["model"]]
        )
        self._bound_joins()

    def join_records(self, rows: int = JOIN_RECORD_ROWS, waiting: bool = True) -> list[bytes]:
        """The label join (answers and labels waiting), as records of at most ``rows``
        entries for the state topic: a partition's new owner reads them back
        (:meth:`restore_joins`) and finds the predictions of buckets already closed, which
        the events it reads again do not bring back. ``waiting=False``: without the tables of
        answers waiting (a worker writes those by chunk: ``JoinTable.chunk_records``)."""
        out = [
            r
            for variant, table in (self.joins.items() if waiting else ())
            for r in table.dump(variant, rows)
        ]
        for variant, table in self._joined_tables().items():
            out += table.dump(variant, rows)
        labels = list(self.early_labels.values())
        return out + [labels_record(labels[i : i + rows]) for i in range(0, len(labels), rows)]

    def _joined_tables(self) -> dict[str, JoinTable]:
        """The answers of labels counted in buckets still open, as tables."""
        groups: dict[tuple[str, str], list[tuple[int, Answer]]] = {}
        for key, (_, entry) in self.joined.items():
            for variant, answer in entry.items():
                groups.setdefault((variant, answer.model), []).append((key, answer))
        tables: dict[str, JoinTable] = {}
        for (variant, model), rows in groups.items():
            if variant not in tables:
                tables[variant] = JoinTable(list(self.baselines))
            tables[variant].add(
                model,
                np.array([key for key, _ in rows], np.uint64),
                np.array([a.ts for _, a in rows], np.int64),
                np.array([np.nan if a.latency is None else a.latency for _, a in rows]),
                [a.prediction for _, a in rows],
                np.array([np.nan if a.score is None else a.score for _, a in rows]),
            )
        return tables

    def restore_joins(self, records: list[bytes]) -> None:
        """Add the entries of :meth:`join_records`' records (of the models known here)."""
        for record in records:
            header, arrays = read_record(record)
            if "labels" in header:
                labels = [e for e in header["labels"] if e["model"] in self.baselines]
                keys = request_keys(values_of(labels, "request_id")).tolist() if labels else []
                self.early_labels.update(zip(keys, labels))
            else:
                if header["variant"] not in self.joins:
                    self.joins[header["variant"]] = JoinTable(list(self.baselines))
                self.joins[header["variant"]].load(header, arrays)

    def _closed_of(self, entry: dict[str, Answer]) -> int:
        return self.closed_through[next(iter(entry.values())).model]

    def join_bytes(self) -> int:
        """Memory the tables of answers waiting for their labels hold."""
        return sum(table.nbytes() for table in self.joins.values())

    def _bound_joins(self) -> None:
        """Keep the label joins under ``label_join_max`` entries: beyond, the oldest of the
        largest table go first (counted in :attr:`evicted`)."""
        tables: list[JoinTable | dict] = [*self.joins.values(), self.early_labels]
        excess = sum(map(len, tables)) - self.join_max
        while excess > 0:
            table = max(tables, key=len)
            n = min(excess, len(table))
            if isinstance(table, JoinTable):
                table.evict(n)
            else:
                for key in list(islice(table, n)):
                    del table[key]
            self.evicted += n
            excess -= n


def _run_around_median(ts: np.ndarray, gap: int) -> tuple[int, int]:
    """First and last of the sorted event times ``ts`` in the run around their median with no
    gap between neighbours over ``gap``."""
    breaks = np.flatnonzero(np.diff(ts) > gap)  # a break at i: between ts[i] and ts[i + 1]
    mid = len(ts) // 2
    below, above = breaks[breaks < mid], breaks[breaks >= mid]
    start = int(below[-1]) + 1 if len(below) else 0
    end = int(above[0]) if len(above) else len(ts) - 1
    return int(ts[start]), int(ts[end])


def without(items: list, rejected: list[tuple[int, str]]) -> list:
    """``items`` less those at the positions ``rejected`` names."""
    if not rejected:
        return items
    refused = {i for i, _ in rejected}
    return [x for i, x in enumerate(items) if i not in refused]


def _drop_oldest(table: dict, expired) -> int:
    old = []
    for key, value in table.items():
        if not expired(value):
            break
        old.append(key)
    for key in old:
        del table[key]
    return len(old)
