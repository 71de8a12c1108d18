"""Stage 1, one per source partition: prediction and label events in, closed-bucket partials
out.

A :class:`Sketcher` folds events into per-(model, variant, event-time bucket)
:class:`~coalmine.streams.sketch.Summary` partials, joins labels to their predictions, pairs
shadow answers with the champion's, keeps a watermark (largest prediction event time seen less
the allowed lateness) and hands out a bucket's partial once the watermark passes the bucket's
end. Predictions later than that are returned as late, never dropped silently; a label counts
in the bucket open when it meets its prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from coalmine.streams.baseline import Baseline
from coalmine.streams.latency import latency_bins
from coalmine.streams.reference import same_answer
from coalmine.streams.settings import VARIANTS
from coalmine.streams.sketch import LATENCY_BINS, Summary, column_arrays, values_of
from coalmine.streams.window import accumulate

_VARIANT_CODE = {v: i for i, v in enumerate(VARIANTS)}
_STATUS_FAILED = {"ok": False, "error": True}


#: the largest event time accepted (year ~2255 in ms): event times stay exact in float64 and
#: int64 arithmetic
MAX_TS = 2**53


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
    )
    return batch, []


def _coded(values: list, codes: dict, dtype) -> np.ndarray:
    """``codes[v]`` for each value, as an array: one lookup in all when all values are alike
    (one variant, no serving errors: the common batch)."""
    distinct = set(values)
    if len(distinct) == 1:
        return np.full(len(values), codes[distinct.pop()], dtype=dtype)
    return np.fromiter(map(codes.__getitem__, values), dtype=dtype, count=len(values))


def _agree(a, b, tolerance: float) -> bool:
    """Same class, or (numbers) within ``tolerance``."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and tolerance:
        return abs(a - b) <= tolerance
    return same_answer(a, b)


class Sketcher:
    """Stage 1 for one source partition: events in, closed-bucket partials out.

    >>> # see tests/test_monitor.py for complete runs
    """

    def __init__(self, baselines: dict[str, Baseline], source: int = 0):
        self.baselines, self.source = baselines, source
        self.max_ts: int | None = None
        self.open: dict[str, dict[tuple[int, str], Summary]] = {m: {} for m in baselines}
        self.closed_through: dict[str, int] = {m: -1 for m in baselines}
        # variant -> request_id -> (model, prediction, ts, latency): for labels and shadow pairing
        self.joins: dict[str, dict[str, tuple]] = {}
        # request_id -> the label that came before its prediction
        self.early_labels: dict[str, dict] = {}
        # model -> (bucket start, variant) -> version serving it (the first one seen there)
        self.versions: dict[str, dict[tuple[int, str], str]] = {m: {} for m in baselines}
        self.shadow_seen: dict[str, int] = {}  # model -> latest shadow answer's ts
        # request_id -> (variant, (model, prediction, ts, latency)): the first of a champion and
        # shadow answer, waiting for the other; kept apart from the label joins, which a label
        # read ahead of its predictions may close early
        self.unpaired: dict[str, tuple[str, tuple]] = {}
        self.expired_unlabelled = 0
        self.expired_unjoined_labels = 0

    def _watermark(self, model: str) -> int | None:
        if self.max_ts is None:
            return None
        settings = self.baselines[model].settings
        return (
            (self.max_ts - settings.allowed_lateness_ms) // settings.bucket_ms * settings.bucket_ms
        )

    def add_predictions(self, events: list[dict]) -> list[tuple[int, str]]:
        """Fold valid prediction events (dicts); return ``(index, reason)`` of those refused
        (unknown model, wrong value types, later than the watermark)."""
        batches, rejected = batches_from_events(events, self.baselines)
        for batch in batches:
            rejected += self.add_batch(batch)
        return sorted(rejected)

    def add_batch(self, batch: PredictionBatch) -> list[tuple[int, str]]:
        """Fold one model's batch; return ``(position, reason)`` of the events later than the
        watermark (positions from ``batch.positions``)."""
        model, baseline = batch.model, self.baselines[batch.model]
        # safe before the late check: that compares with closed_through
        self._advance(int(batch.ts.max()))
        ok = batch.ts >= self.closed_through[model]
        rejected = []
        if not ok.all():
            rejected = [
                (
                    batch.positions[i],
                    f"late event: ts {batch.ts[i]} is behind the watermark "
                    f"{self.closed_through[model]} (allowed lateness "
                    f"{baseline.settings.allowed_lateness_ms} ms)",
                )
                for i in np.flatnonzero(~ok)
            ]
            batch = batch.take(ok)
            if not len(batch):
                return rejected
        bucket_ms = baseline.settings.bucket_ms
        variants = _coded(batch.variant, _VARIANT_CODE, np.int64)
        keys, groups = np.unique(
            batch.ts // bucket_ms * len(VARIANTS) + variants, return_inverse=True
        )
        summaries = baseline.layout.fold(baseline.with_derived(batch.columns), groups, len(keys))
        failed = _coded(batch.status, _STATUS_FAILED, bool)
        errors = np.bincount(groups, weights=failed, minlength=len(keys))
        lat_bins = latency_bins(batch.latency_ms)
        has = lat_bins >= 0
        lat_hist = np.bincount(
            groups[has] * LATENCY_BINS + lat_bins[has], minlength=len(keys) * LATENCY_BINS
        ).reshape(len(keys), LATENCY_BINS)
        _, first = np.unique(groups, return_index=True)  # each group's first event
        state, versions = self.open[model], self.versions[model]
        for key, summary, err, hist, i in zip(
            keys.tolist(), summaries, errors.tolist(), lat_hist, first.tolist()
        ):
            summary.errors, summary.latency = int(err), hist
            k = (key // len(VARIANTS) * bucket_ms, VARIANTS[key % len(VARIANTS)])
            accumulate(state, k, summary)
            versions.setdefault(k, batch.version[i])  # a hand-over bucket is the old version's
        if baseline.joins_needed:
            self._join_predictions(baseline, batch)
        return rejected

    def _join_predictions(self, baseline: Baseline, batch: PredictionBatch) -> None:
        """Keep predictions for their labels (one table per variant, filled a batch at a time);
        pair shadow answers with the champion's."""
        model = batch.model
        latency = [None if v != v else v for v in batch.latency_ms.tolist()]  # NaN: none
        entries = zip(repeat(model), batch.prediction, batch.ts.tolist(), latency)
        variants = set(batch.variant)
        if len(variants) == 1:
            self.joins.setdefault(variants.pop(), {}).update(zip(batch.request_id, entries))
        else:
            for rid, variant, entry in zip(batch.request_id, batch.variant, entries):
                self.joins.setdefault(variant, {})[rid] = entry
        if "shadow" in baseline.settings.checks:
            timeout = baseline.policy.shadow_timeout_ms
            for rid, variant in zip(batch.request_id, batch.variant):
                self._pair_shadow(baseline, model, rid, variant, timeout)
        if self.early_labels:
            for rid in self.early_labels.keys() & set(batch.request_id):
                self._score(self._pop_joined(rid), self.early_labels.pop(rid))

    def _pop_joined(self, request_id: str) -> dict[str, tuple]:
        """Every variant's answer to ``request_id`` still waiting for its label, taken out."""
        return {
            variant: table.pop(request_id)
            for variant, table in self.joins.items()
            if request_id in table
        }

    def _pair_shadow(
        self, baseline: Baseline, model: str, rid: str, variant: str, timeout: int
    ) -> None:
        """Pair champion and shadow answers of one request, in whichever order they come; while
        a shadow serves, a champion answer waits for its shadow at most ``timeout``."""
        mine = self.joins[variant][rid]
        ts = mine[2]
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
        assert self.max_ts is not None  # there are waits: an event came
        now, expired = self.max_ts, []
        for rid, (variant, (model, _, ts, _)) in self.unpaired.items():
            if ts >= now - self.baselines[model].policy.shadow_timeout_ms:
                break  # arrival order: the rest are younger
            expired.append((rid, variant, model, ts))
        for rid, variant, model, ts in expired:
            del self.unpaired[rid]
            if variant == "champion" and self.shadow_seen[model] >= ts:
                s = self._open_summary(model, "shadow", now)
                s.paired += 1
                s.shadow_missing += 1

    def _pair(self, baseline: Baseline, champion: tuple, shadow: tuple, ts: int) -> None:
        (model, champ, _, champ_lat), (_, shadow_pred, _, shadow_lat) = champion, shadow
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
        """Join labels to their predictions (by request_id) and count labelled errors in the
        current bucket. A label that comes before its prediction waits for it (until the
        label TTL, then it is counted as unjoined)."""
        rejected = []
        for i, e in enumerate(events):
            if e["model"] not in self.baselines:
                rejected.append((i, f"unknown model {e['model']!r}"))
                continue
            joined = self._pop_joined(e["request_id"])
            if joined:
                self._score(joined, e)
            else:
                self.early_labels[e["request_id"]] = e
        # labels do not move the watermark: they are late by nature (seconds to hours), and a
        # labels topic read ahead of the predictions topic would make predictions look late
        return rejected

    def _score(self, entry: dict[str, tuple], label: dict) -> None:
        """Count a label against every variant's answer to its request; outcomes count for
        the variants that served it (not the shadow), the paired table on the shadow."""
        truth = label["label"]
        right = {}
        for variant, (model, pred, pred_ts, _) in entry.items():
            s = self._open_summary(model, variant, max(label["ts"], pred_ts))
            right[variant] = same_answer(pred, truth)
            s.labelled += 1
            s.label_errors += not right[variant]
            if isinstance(pred, (int, float)) and isinstance(truth, (int, float)):
                s.abs_error_sum += abs(pred - truth)
                s.abs_error_sumsq += (pred - truth) ** 2
            if "outcome" in label and variant != "shadow":
                s.outcome_n += 1
                s.outcome_sum += label["outcome"]
                s.outcome_sumsq += label["outcome"] ** 2
        if "champion" in right and "shadow" in right:
            s = self._open_summary(entry["shadow"][0], "shadow", label["ts"])
            s.paired_labelled += 1
            s.b += right["champion"] and not right["shadow"]
            s.c += right["shadow"] and not right["champion"]

    def _advance(self, ts: int | None) -> None:
        if ts is not None and (self.max_ts is None or ts > self.max_ts):
            self.max_ts = ts

    def close(self) -> list[dict]:
        """Partials for every bucket the watermark has passed, one message per model (empty
        ones too: they tell stage 2 that this source has moved on)."""
        out = []
        for model, baseline in self.baselines.items():
            wm = self._watermark(model)
            if wm is None or wm <= self.closed_through[model]:
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
        self._advance(
            max(ends)
            + max(baseline.settings.allowed_lateness_ms for baseline in self.baselines.values())
        )
        return self.close()

    def _expire(self) -> None:
        """Drop predictions and early labels older than the label TTL, counting them. Both
        tables are in arrival order, so the scan stops at the first entry still alive."""
        if self.max_ts is None:
            return
        if self.unpaired:
            self._expire_shadow_waits()
        ttl = {m: baseline.settings.label_ttl_ms for m, baseline in self.baselines.items()}
        for table in self.joins.values():
            self.expired_unlabelled += _drop_oldest(table, lambda v: v[2] < self.max_ts - ttl[v[0]])
        self.expired_unjoined_labels += _drop_oldest(
            self.early_labels, lambda e: e["ts"] < self.max_ts - ttl[e["model"]]
        )


def _drop_oldest(table: dict, expired) -> int:
    old = []
    for key, value in table.items():
        if not expired(value):
            break
        old.append(key)
    for key in old:
        del table[key]
    return len(old)
