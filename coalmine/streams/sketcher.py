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

import numpy as np

from coalmine.streams.baseline import Baseline
from coalmine.streams.latency import latency_bins
from coalmine.streams.reference import same_answer
from coalmine.streams.settings import VARIANTS
from coalmine.streams.sketch import LATENCY_BINS, Summary, column_arrays, values_of
from coalmine.streams.window import accumulate

_VARIANT_CODE = {v: i for i, v in enumerate(VARIANTS)}
_STATUS_FAILED = {"ok": False, "error": True}


def _coded(values: list, codes: dict, dtype) -> np.ndarray:
    """``codes[v]`` for each value, as an array: one lookup in all when all values are alike
    (one variant, no serving errors: the common batch)."""
    distinct = set(values)
    if len(distinct) == 1:
        return np.full(len(values), codes[distinct.pop()], dtype=dtype)
    return np.fromiter(map(codes.__getitem__, values), dtype=dtype, count=len(values))


def _latencies(events: list[dict]) -> np.ndarray:
    """Each event's ``latency_ms``, NaN where it reported none."""
    try:
        return np.array(values_of(events, "latency_ms"), dtype=float)
    except KeyError:
        return np.array([e.get("latency_ms", np.nan) for e in events], dtype=float)


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
        # request_id -> {variant: (model, prediction, ts, latency)}: labels and shadow pairing
        self.joins: dict[str, dict[str, tuple]] = {}
        self.early_labels: dict[
            str, dict
        ] = {}  # request_id -> label that came before its prediction
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
        """Fold valid prediction events; return (index, reason) of those rejected (unknown
        model, wrong value types, later than the watermark)."""
        rejected: list[tuple[int, str]] = []
        models = set(values_of(events, "model"))
        if len(models) == 1:  # the common case: no regrouping
            by_model = {models.pop(): (events, range(len(events)))}
        else:
            groups: dict[str, list[int]] = {}
            for i, e in enumerate(events):
                groups.setdefault(e["model"], []).append(i)
            by_model = {m: ([events[i] for i in idx], idx) for m, idx in groups.items()}
        for model, (mine, idx) in by_model.items():
            if model not in self.baselines:
                rejected += [(i, f"unknown model {model!r}") for i in idx]
                continue
            rejected += self._fold_model(model, mine, list(idx))
        return rejected

    def _fold_model(self, model: str, events: list[dict], idx: list[int]) -> list[tuple[int, str]]:
        baseline = self.baselines[model]
        ts = np.array(values_of(events, "ts"), dtype=np.int64)
        self._advance(
            int(ts.max())
        )  # safe before the late check: that compares with closed_through
        ok = ts >= self.closed_through[model]
        rejected = []
        if not ok.all():
            rejected = [
                (
                    idx[i],
                    f"late event: ts {ts[i]} is behind the watermark "
                    f"{self.closed_through[model]} (allowed lateness "
                    f"{baseline.settings.allowed_lateness_ms} ms)",
                )
                for i in np.flatnonzero(~ok)
            ]
            events = [e for e, good in zip(events, ok) if good]
            idx = [i for i, good in zip(idx, ok) if good]
            ts = ts[ok]
            if not events:
                return rejected
        try:
            cols = column_arrays(
                baseline.layout,
                values_of(events, "features"),
                values_of(events, "prediction"),
                [e.get("scores") for e in events] if baseline.scored else None,
            )
        except TypeError:
            # rare: find the culprits one by one, fold the rest
            good, bad = [], []
            for e, i in zip(events, idx):
                try:
                    column_arrays(
                        baseline.layout, [e["features"]], [e.get("prediction")], [e.get("scores")]
                    )
                    good.append((e, i))
                except TypeError as exc:
                    bad.append(
                        (i, f"features.{exc.args[0]}: expected a number for a numeric feature")
                    )
            return (
                rejected + bad + (self._fold_model(model, *map(list, zip(*good))) if good else [])
            )
        bucket_ms = baseline.settings.bucket_ms
        buckets = ts // bucket_ms
        variants = _coded(values_of(events, "variant"), _VARIANT_CODE, np.int64)
        keys, groups = np.unique(buckets * len(VARIANTS) + variants, return_inverse=True)
        summaries = baseline.layout.fold(cols, groups, len(keys))
        failed = _coded(values_of(events, "status"), _STATUS_FAILED, bool)
        errors = np.bincount(groups, weights=failed, minlength=len(keys))
        lat_bins = latency_bins(_latencies(events))
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
            versions.setdefault(k, events[i]["version"])  # a hand-over bucket is the old version's
        if baseline.joins_needed:
            self._join_predictions(model, baseline, events)
        return rejected

    def _join_predictions(self, model: str, baseline: Baseline, events: list[dict]) -> None:
        """Keep predictions for their labels; pair shadow answers with the champion's."""
        pairing = "shadow" in baseline.settings.checks
        timeout = baseline.policy.shadow_timeout_ms
        for e in events:
            rid, variant = e["request_id"], e["variant"]
            entry = self.joins.setdefault(rid, {})
            entry[variant] = (model, e.get("prediction"), e["ts"], e.get("latency_ms"))
            if pairing:
                self._pair_shadow(baseline, model, e, entry, timeout)
            if self.early_labels:
                label = self.early_labels.pop(rid, None)
                if label is not None:
                    self._score(self.joins.pop(rid), label)

    def _pair_shadow(
        self, baseline: Baseline, model: str, e: dict, entry: dict, timeout: int
    ) -> None:
        """Pair champion and shadow answers of one request, in whichever order they come; while
        a shadow serves, a champion answer waits for its shadow at most ``timeout``."""
        variant = e["variant"]
        if variant == "shadow":
            self.shadow_seen[model] = max(self.shadow_seen.get(model, 0), e["ts"])
        elif variant != "champion" or e["ts"] - self.shadow_seen.get(model, -timeout - 1) > timeout:
            return  # no shadow serving: nothing to wait for
        mine = entry[variant]
        other = self.unpaired.pop(e["request_id"], None)
        if other is None:
            self.unpaired[e["request_id"]] = (variant, mine)
        elif other[0] != variant:
            champion, shadow = (mine, other[1]) if variant == "champion" else (other[1], mine)
            self._pair(baseline, champion, shadow, e["ts"])

    def _expire_shadow_waits(self) -> None:
        """A shadow that has not answered within the shadow timeout failed: it counts as a
        paired request that disagreed (if the shadow answered later requests, i.e. it still
        serves). Shadow answers whose champion never came are dropped."""
        expired = []
        for rid, (variant, (model, _, ts, _)) in self.unpaired.items():
            if ts >= self.max_ts - self.baselines[model].policy.shadow_timeout_ms:
                break  # arrival order: the rest are younger
            expired.append((rid, variant, model, ts))
        for rid, variant, model, ts in expired:
            del self.unpaired[rid]
            if variant == "champion" and self.shadow_seen[model] >= ts:
                s = self._open_summary(model, "shadow", self.max_ts)
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
            joined = self.joins.pop(e["request_id"], None)
            if joined is None:
                self.early_labels[e["request_id"]] = e
            else:
                self._score(joined, e)
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
        self.expired_unlabelled += _drop_oldest(
            self.joins,
            lambda v: next(iter(v.values()))[2] < self.max_ts - ttl[next(iter(v.values()))[0]],
        )
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
