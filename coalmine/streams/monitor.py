"""The two pipeline stages as plain objects: the worker, topic replay and file replay all run
exactly this code.

* :class:`Sketcher` (stage 1, one per source partition): folds prediction and label events
  into per-(model, variant, event-time bucket) :class:`~coalmine.streams.sketch.Summary`
  partials, joins labels to their predictions, keeps a watermark (largest prediction event
  time seen less the allowed lateness) and hands out a bucket's partial once the watermark
  passes the bucket's end. Predictions later than that are returned as late, never dropped
  silently; a label counts in the bucket open when it meets its prediction.
* :class:`Evaluator` (stage 2, one per model): merges partials from every source, and once
  every source has closed a bucket, slides the window (a ring of buckets) and runs the
  checks; returns evaluations and alert state changes.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy import special

from coalmine.config import ModelConfig
from coalmine.events import values_of
from coalmine.streams import calibration, drift
from coalmine.streams.alerts import AlertTracker
from coalmine.streams.reference import PREDICTION, SCORES, ReferenceData, is_model_output, load_reference
from coalmine.streams.rollout import RolloutPolicy, latency_bins
from coalmine.streams.rollout_checks import RolloutJudge
from coalmine.streams.sequential import (CUSUM, CusumThresholds, JointCUSUM, ThresholdTable,
                                         joint_cusum_threshold)
from coalmine.streams.sketch import LATENCY_BINS, NUMERIC, Layout, Summary, column_arrays

VARIANTS = ("champion", "canary", "shadow")
#: checks whose statistics (but for the CUSUMs) are window tests, run once per window step
WINDOW_CHECKS = frozenset({"drift", "prediction_drift", "missing_rate", "performance"})
_VARIANT_CODE = {v: i for i, v in enumerate(VARIANTS)}
_STATUS_FAILED = {"ok": False, "error": True}


def _accumulate(table: dict, key, summary: Summary) -> None:
    """Merge ``summary`` into ``table[key]``."""
    table[key] = table[key] + summary if key in table else summary


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


@dataclass
class ColumnModel:
    """What the checks know of one reference column."""

    name: str
    kind: str
    bins: slice
    ref_counts: np.ndarray
    ref_pos: np.ndarray
    edges: np.ndarray | None = None
    sd: float = 1.0
    missing_rate: float = 0.0
    #: the rank CUSUM's per-event score is ``rank_intercepts[b] + rank_slopes[b] * x`` for a value
    #: ``x`` in bin ``b`` (see :func:`coalmine.streams.drift.smoothed_rank_coefficients`)
    rank_intercepts: np.ndarray | None = None
    rank_slopes: np.ndarray | None = None
    #: mean and standard deviation of that score over the reference's own values
    rank_mean: float = 0.5
    rank_sd: float = 0.0
    fits: dict[str, calibration.TailFit] = field(default_factory=dict)


@dataclass
class NumericBlock:
    """All numeric columns stacked one row each, so that one numpy pass per statistic
    evaluates them all (per-column calls cost more in overhead than in work). Columns with
    fewer bins (ties merge quantile edges) are padded at the top with empty bins, which
    change no statistic: KS and PSI terms of two empty bins are 0, an empty bin adds no
    Wasserstein mass and no CUSUM score."""

    columns: list[ColumnModel]
    bins: np.ndarray  # (columns, bins): indices into the flat summary arrays; -1 for padding
    edges: np.ndarray  # (columns, bins - 1), the last edge repeated over the padding
    top_bin: np.ndarray  # (columns,): each column's last real bin, the upper outer one
    rank_intercepts: np.ndarray  # (columns, bins)
    rank_slopes: np.ndarray  # (columns, bins)
    #: (bin mid-rank - 1/2)^2 per bin: the spread CUSUM's per-event score (Mood's scale score)
    spread_scores: np.ndarray  # (columns, bins)
    ks: drift.KolmogorovSmirnov
    wasserstein: drift.Wasserstein
    ks_fits: calibration.TailFit  # stacked, one row per column
    wasserstein_fits: calibration.TailFit

    @classmethod
    def stack(cls, columns: list[ColumnModel]) -> "NumericBlock":
        width = max(c.bins.stop - c.bins.start for c in columns)

        def rows(arrays, size=width, **pad):
            return np.stack([np.pad(a, (0, size - len(a)), **pad) for a in arrays])

        ref = rows([c.ref_counts for c in columns])
        p = ref / np.maximum(ref.sum(axis=1, keepdims=True), 1)
        return cls(columns, rows([np.arange(c.bins.start, c.bins.stop) for c in columns], constant_values=-1),
                   rows([c.edges for c in columns], width - 1, mode="edge"),
                   np.array([c.bins.stop - c.bins.start - 1 for c in columns]),
                   rows([c.rank_intercepts for c in columns]), rows([c.rank_slopes for c in columns]),
                   (np.cumsum(p, axis=1) - p / 2 - 0.5) ** 2,
                   drift.KolmogorovSmirnov(ref),
                   drift.Wasserstein(rows([c.ref_pos for c in columns], mode="edge"), ref,
                                     np.array([c.sd for c in columns])),
                   calibration.TailFit.stack([c.fits["ks"] for c in columns]),
                   calibration.TailFit.stack([c.fits["wasserstein"] for c in columns]))

    def _gather(self, flat: np.ndarray) -> np.ndarray:
        """(columns, bins) from a summary's flat array; padding reads the appended 0."""
        return np.append(flat, 0)[self.bins]

    def statistics(self, window: "Summary", q: float) -> dict[str, tuple]:
        """Column name -> (events with a value, KS, its p-value, its threshold, Wasserstein-1 /
        reference SD, its threshold, PSI) on ``window``, thresholds at tail probability ``q``."""
        counts = self._gather(window.counts)
        n = counts.sum(axis=1)
        ks = self.ks.update(counts)
        positions = drift.bin_positions(counts, self._gather(window.sums), self.edges)
        positions[np.arange(len(self.columns)), self.top_bin] = self.edges[:, -1]  # winsorized, as unpadded
        w = self.wasserstein.update(positions, counts)
        psi = drift.psi_statistic(self.ks.ref_counts, counts)
        # the fits are of sqrt(n_eff) x statistic: back to the statistic's own scale
        scale = np.sqrt(np.maximum(drift.effective_n(self.ks.ref_counts.sum(axis=1), n), 1e-12))
        rows = zip(n.tolist(), ks.statistic.tolist(), ks.p_value.tolist(),
                   (self.ks_fits.threshold(n, q) / scale).tolist(), w.normalized.tolist(),
                   (self.wasserstein_fits.threshold(n, q) / scale).tolist(), psi.tolist())
        return dict(zip((c.name for c in self.columns), rows))

    def new_cusums(self, k: float) -> tuple[CUSUM, CUSUM]:
        """A location and a spread CUSUM over the block's columns (:meth:`update_cusums`): on
        the events' smoothed reference ranks and on their squared distance from the median
        rank. Ranks bound each event's weight, so heavy tails do not page anyone; a location
        shift of d standard deviations moves the mean rank by about d rank standard deviations
        on normal data, and by more on features with many ties, where a small shift moves
        values past whole steps of the reference CDF."""
        p = self.ks.ref_counts / np.maximum(self.ks.ref_counts.sum(axis=1, keepdims=True), 1)
        spread_mean = (p * self.spread_scores).sum(axis=1)
        spread_sd = np.sqrt((p * (self.spread_scores - spread_mean[:, None]) ** 2).sum(axis=1))
        return (CUSUM([c.rank_mean for c in self.columns], [c.rank_sd for c in self.columns], k, math.inf),
                CUSUM(spread_mean, spread_sd, k, math.inf))

    def update_cusums(self, cusums: tuple[CUSUM, CUSUM], bucket: "Summary",
                      threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Feed a bucket to the rank CUSUMs: the location CUSUM takes each event's smoothed
        reference rank (linear in the value within a bin, so the bin counts and sums give the
        exact sum), the spread CUSUM its bin's squared distance from the median rank."""
        counts = self._gather(bucket.counts)
        n = counts.sum(axis=1)
        location, spread = cusums
        location.threshold = spread.threshold = threshold
        ranks = (counts * self.rank_intercepts + self._gather(bucket.sums) * self.rank_slopes).sum(axis=1)
        location.update(n, ranks)
        spread.update(n, (counts * self.spread_scores).sum(axis=1))
        return n, ranks


class ModelMonitor:
    """A model's reference, bins and calibrated thresholds: everything both stages share."""

    def __init__(self, cfg: ModelConfig, reference: ReferenceData | None = None, seed: int = 0):
        self.cfg = cfg
        if reference is None and cfg.reference is None:
            raise ValueError(f"model {cfg.name}: reference_first_events needs the events passed in "
                             "(see coalmine.streams.reference.first_events)")
        ref = reference if reference is not None else load_reference(cfg.reference, cfg.features)
        self.ref_error_rate = self._reference_error_rate(ref)
        self.ref_abs_errors = self._reference_abs_errors(ref)
        if "prediction_drift" not in cfg.checks:
            ref = ReferenceData({k: v for k, v in ref.columns.items() if not is_model_output(k)}, ref.labels)
        self.reference = ref
        self.layout = Layout.from_reference(ref, cfg.bins)
        self.ref_summary = self.layout.fold(ref.columns)
        rng = np.random.default_rng(seed)
        key = self._calibration_key(seed)
        cached = calibration.load_cached(key)
        self.columns = [self._column(name, rng, cached[i] if cached else None)
                        for i, name in enumerate(self.layout.names)]
        if cached is None:
            calibration.store_cached(key, [c.fits for c in self.columns])
        self.joint_columns, self.joint_corr, joint_rows = self._joint_reference()
        numeric = [c for c in self.columns if c.kind == NUMERIC]
        #: every numeric column stacked for one numpy pass per statistic (None without any)
        self.numeric_block = NumericBlock.stack(numeric) if numeric else None
        self.tests = self._count_tests()
        self.policy = RolloutPolicy(**cfg.settings)
        self.scored = any(n.startswith(SCORES) for n in self.layout.names)
        self.joins_needed = any(c in cfg.checks for c in ("performance", "shadow", "ab", "canary"))
        present = [int(np.count_nonzero(~np.isnan(ref.columns[c.name]))) for c in self.columns if c.kind == NUMERIC]
        # budgeted for twice the reference mean's sampling variance (half the rows), as the joint
        # CUSUM's noncentrality is: on average over references, with a margin for an unlucky one
        self.cusum_h = CusumThresholds(cfg.false_alarm_every_events * self.tests, cfg.shift_to_detect_sd / 2,
                                       reference_events=min(present, default=0) / 2 or None)
        self.joint_h = ThresholdTable(lambda n: joint_cusum_threshold(
            cfg.false_alarm_every_events * self.tests, len(self.joint_columns), cfg.shift_to_detect_sd, n,
            joint_rows)) if self.joint_columns else None

    def _joint_reference(self) -> tuple[list[ColumnModel], np.ndarray | None, int]:
        """The feature columns the joint CUSUM watches (numeric, not constant; at least two)
        and the correlation of their smoothed reference ranks over the reference rows that
        have them all (at least 100), with that row count."""
        cols = [c for c in self.columns if c.kind == NUMERIC and not is_model_output(c.name) and c.rank_sd > 0]
        if len(cols) < 2 or "drift" not in self.cfg.checks:
            return [], None, 0
        values = np.stack([self.reference.columns[c.name] for c in cols], axis=1)
        rows = values[~np.isnan(values).any(axis=1)]
        if len(rows) < 100:
            return [], None, 0
        scores = np.stack([drift.smoothed_ranks(rows[:, j], c.edges, c.rank_intercepts, c.rank_slopes)
                           for j, c in enumerate(cols)], axis=1)
        return cols, np.corrcoef(scores, rowvar=False), len(rows)

    def new_joint_cusum(self) -> JointCUSUM | None:
        """The joint CUSUM over :attr:`joint_columns` (None when there are fewer than two)."""
        if not self.joint_columns:
            return None
        return JointCUSUM([c.rank_mean for c in self.joint_columns], [c.rank_sd for c in self.joint_columns],
                          self.joint_corr, self.cfg.shift_to_detect_sd)

    @property
    def feature_names(self) -> list[str]:
        return [n for n in self.layout.names if not is_model_output(n)]

    def _calibration_key(self, seed: int) -> str:
        """Everything the simulated thresholds depend on: same key, same thresholds."""
        h = hashlib.sha256(f"{calibration.VERSION}|{seed}|{self.layout.names}|{self.layout.vocab}".encode())
        for arr in (self.ref_summary.counts, self.ref_summary.sums, *self.layout.edges.values()):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:32]

    def _column(self, name: str, rng: np.random.Generator, fits: dict | None = None) -> ColumnModel:
        sl = self.layout.bins_of(name)
        counts, sums = self.ref_summary.counts[sl], self.ref_summary.sums[sl]
        values = self.reference.columns[name]
        edges = self.layout.edges.get(name)
        col = ColumnModel(name, self.layout.kinds[name], sl, counts, drift.bin_positions(counts, sums, edges),
                          edges)
        j = self.layout.names.index(name)
        col.missing_rate = self.ref_summary.missing[j] / max(self.reference.n, 1)
        if col.kind == NUMERIC:
            present = values[~np.isnan(values)]
            col.sd = float(np.clip(present, edges[0], edges[-1]).std()) if len(present) > 1 else 0.0
            bin_sd = self._bin_sd(name, present)
            bin_sd[[0, -1]] = 0.0  # the outer bins sit at fixed edges
            col.fits = fits or calibration.calibrate_numeric(counts, col.ref_pos, bin_sd, col.sd, rng)
            col.rank_intercepts, col.rank_slopes = drift.smoothed_rank_coefficients(counts, edges)
            ref_scores = drift.smoothed_ranks(present, edges, col.rank_intercepts, col.rank_slopes)
            col.rank_mean, col.rank_sd = float(ref_scores.mean()), float(ref_scores.std())
        else:
            col.fits = fits or calibration.calibrate_categorical(counts, rng)
        return col

    def _bin_sd(self, name: str, values: np.ndarray) -> np.ndarray:
        """Standard deviation of the reference values inside each bin of a numeric column."""
        width = self.layout.bins_of(name).stop - self.layout.bins_of(name).start
        idx = np.searchsorted(self.layout.edges[name], values, side="right")
        n = np.maximum(np.bincount(idx, minlength=width), 1)
        mean = np.bincount(idx, weights=values, minlength=width) / n
        return np.sqrt(np.maximum(np.bincount(idx, weights=values**2, minlength=width) / n - mean**2, 0))

    def _reference_abs_errors(self, ref: ReferenceData) -> np.ndarray | None:
        """|prediction - label| on the reference, for a regression model (numeric predictions
        with more than 20 distinct values); None otherwise."""
        pred = ref.columns.get(PREDICTION)
        if ref.labels is None or pred is None or pred.dtype == object or len(np.unique(pred[~np.isnan(pred)])) <= 20:
            return None
        labels = np.array([v if isinstance(v, (int, float)) else np.nan for v in ref.labels], dtype=float)
        err = np.abs(pred - labels)
        return err[~np.isnan(err)] if (~np.isnan(err)).any() else None

    def _reference_error_rate(self, ref: ReferenceData) -> float | None:
        if self.cfg.baseline_error_rate is not None:
            return self.cfg.baseline_error_rate
        if ref.labels is None or PREDICTION not in ref.columns:
            return None
        has = np.array([v is not None for v in ref.labels])
        if not has.any():
            return None
        wrong = [str(_norm(p)) != str(_norm(l)) for p, l in zip(ref.columns[PREDICTION][has], ref.labels[has])]
        return float(np.mean(wrong))

    def _count_tests(self) -> int:
        """K: alarming tests per evaluation, over every variant the checks may see."""
        per_variant = sum(4 if c.kind == NUMERIC else 1 for c in self.columns)
        per_variant += len(self.feature_names) * ("missing_rate" in self.cfg.checks)
        per_variant += "performance" in self.cfg.checks
        per_variant += bool(self.joint_columns)
        variants = 1 + any(c in self.cfg.checks for c in ("canary", "ab")) + ("shadow" in self.cfg.checks)
        return per_variant * variants

    def tail(self, window_n: int) -> float:
        """Tail probability of a check run after every bucket (the rollout checks)."""
        return calibration.tail_share(window_n, self.cfg.window_buckets,
                                      self.cfg.false_alarm_every_events, self.tests)

    def window_test_tail(self, window_n: int) -> float:
        """Tail probability of a window test, run once per :attr:`ModelConfig.window_step_ms`."""
        return calibration.tail_share(window_n, self.cfg.window_ms / self.cfg.window_step_ms,
                                      self.cfg.false_alarm_every_events, self.tests)


def _agree(a, b, tolerance: float) -> bool:
    """Same class, or (numbers) within ``tolerance``."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and tolerance:
        return abs(a - b) <= tolerance
    return str(_norm(a)) == str(_norm(b))


def _norm(v):
    """Labels and predictions compare as the same number whatever JSON type carried them."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# ---------------------------------------------------------------- stage 1


class Sketcher:
    """Stage 1 for one source partition: events in, closed-bucket partials out.

    >>> # see tests/test_monitor.py for complete runs
    """

    def __init__(self, monitors: dict[str, ModelMonitor], source: int = 0):
        self.monitors, self.source = monitors, source
        self.max_ts: int | None = None
        self.open: dict[str, dict[tuple[int, str], Summary]] = {m: {} for m in monitors}
        self.closed_through: dict[str, int] = {m: -1 for m in monitors}
        # request_id -> {variant: (model, prediction, ts, latency)}: labels and shadow pairing
        self.joins: dict[str, dict[str, tuple]] = {}
        self.early_labels: dict[str, dict] = {}  # request_id -> label that came before its prediction
        # model -> (bucket start, variant) -> version serving it (the first one seen there)
        self.versions: dict[str, dict[tuple[int, str], str]] = {m: {} for m in monitors}
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
        cfg = self.monitors[model].cfg
        return (self.max_ts - cfg.allowed_lateness_ms) // cfg.bucket_ms * cfg.bucket_ms

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
            if model not in self.monitors:
                rejected += [(i, f"unknown model {model!r}") for i in idx]
                continue
            rejected += self._fold_model(model, mine, list(idx))
        return rejected

    def _fold_model(self, model: str, events: list[dict], idx: list[int]) -> list[tuple[int, str]]:
        mon = self.monitors[model]
        ts = np.array(values_of(events, "ts"), dtype=np.int64)
        self._advance(int(ts.max()))  # safe before the late check: that compares with closed_through
        ok = ts >= self.closed_through[model]
        rejected = []
        if not ok.all():
            rejected = [(idx[i], f"late event: ts {ts[i]} is behind the watermark "
                                 f"{self.closed_through[model]} (allowed lateness "
                                 f"{mon.cfg.allowed_lateness_ms} ms)") for i in np.flatnonzero(~ok)]
            events = [e for e, good in zip(events, ok) if good]
            idx = [i for i, good in zip(idx, ok) if good]
            ts = ts[ok]
            if not events:
                return rejected
        try:
            cols = column_arrays(mon.layout, values_of(events, "features"), values_of(events, "prediction"),
                                 [e.get("scores") for e in events] if mon.scored else None)
        except TypeError:
            # rare: find the culprits one by one, fold the rest
            good, bad = [], []
            for e, i in zip(events, idx):
                try:
                    column_arrays(mon.layout, [e["features"]], [e.get("prediction")], [e.get("scores")])
                    good.append((e, i))
                except TypeError as exc:
                    bad.append((i, f"features.{exc.args[0]}: expected a number for a numeric feature"))
            return rejected + bad + (self._fold_model(model, *map(list, zip(*good))) if good else [])
        bucket_ms = mon.cfg.bucket_ms
        buckets = ts // bucket_ms
        variants = _coded(values_of(events, "variant"), _VARIANT_CODE, np.int64)
        keys, groups = np.unique(buckets * len(VARIANTS) + variants, return_inverse=True)
        summaries = mon.layout.fold(cols, groups, len(keys))
        failed = _coded(values_of(events, "status"), _STATUS_FAILED, bool)
        errors = np.bincount(groups, weights=failed, minlength=len(keys))
        lat_bins = latency_bins(_latencies(events))
        has = lat_bins >= 0
        lat_hist = np.bincount(groups[has] * LATENCY_BINS + lat_bins[has],
                               minlength=len(keys) * LATENCY_BINS).reshape(len(keys), LATENCY_BINS)
        _, first = np.unique(groups, return_index=True)  # each group's first event
        state, versions = self.open[model], self.versions[model]
        for key, summary, err, hist, i in zip(keys.tolist(), summaries, errors.tolist(), lat_hist, first.tolist()):
            summary.errors, summary.latency = int(err), hist
            k = (key // len(VARIANTS) * bucket_ms, VARIANTS[key % len(VARIANTS)])
            _accumulate(state, k, summary)
            versions.setdefault(k, events[i]["version"])  # a hand-over bucket is the old version's
        if mon.joins_needed:
            self._join_predictions(model, mon, events)
        return rejected

    def _join_predictions(self, model: str, mon: "ModelMonitor", events: list[dict]) -> None:
        """Keep predictions for their labels; pair shadow answers with the champion's."""
        pairing = "shadow" in mon.cfg.checks
        timeout = mon.policy.shadow_timeout_ms
        for e in events:
            rid, variant = e["request_id"], e["variant"]
            entry = self.joins.setdefault(rid, {})
            entry[variant] = (model, e.get("prediction"), e["ts"], e.get("latency_ms"))
            if pairing:
                self._pair_shadow(mon, model, e, entry, timeout)
            if self.early_labels:
                label = self.early_labels.pop(rid, None)
                if label is not None:
                    self._score(self.joins.pop(rid), label)

    def _pair_shadow(self, mon: "ModelMonitor", model: str, e: dict, entry: dict, timeout: int) -> None:
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
            self._pair(mon, champion, shadow, e["ts"])

    def _expire_shadow_waits(self) -> None:
        """A shadow that has not answered within the shadow timeout failed: it counts as a
        paired request that disagreed (if the shadow answered later requests, i.e. it still
        serves). Shadow answers whose champion never came are dropped."""
        expired = []
        for rid, (variant, (model, _, ts, _)) in self.unpaired.items():
            if ts >= self.max_ts - self.monitors[model].policy.shadow_timeout_ms:
                break  # arrival order: the rest are younger
            expired.append((rid, variant, model, ts))
        for rid, variant, model, ts in expired:
            del self.unpaired[rid]
            if variant == "champion" and self.shadow_seen[model] >= ts:
                s = self._open_summary(model, "shadow", self.max_ts)
                s.paired += 1
                s.shadow_missing += 1

    def _pair(self, mon: "ModelMonitor", champion: tuple, shadow: tuple, ts: int) -> None:
        (model, champ, _, champ_lat), (_, shadow_pred, _, shadow_lat) = champion, shadow
        s = self._open_summary(model, "shadow", ts)
        s.paired += 1
        s.agree += _agree(champ, shadow_pred, mon.policy.shadow_tolerance)
        if champ_lat is not None and shadow_lat is not None:
            s.latency_overhead_sum += shadow_lat - champ_lat

    def _open_summary(self, model: str, variant: str, ts: int) -> Summary:
        """The open bucket's summary for ``ts``, or the first open one if ``ts`` is closed."""
        mon = self.monitors[model]
        ts = max(ts, self.closed_through[model])
        k = (ts // mon.cfg.bucket_ms * mon.cfg.bucket_ms, variant)
        s = self.open[model].get(k)
        if s is None:
            s = self.open[model][k] = mon.layout.empty()
        return s

    def add_labels(self, events: list[dict]) -> list[tuple[int, str]]:
        """Join labels to their predictions (by request_id) and count labelled errors in the
        current bucket. A label that comes before its prediction waits for it (until the
        label TTL, then it is counted as unjoined)."""
        rejected = []
        for i, e in enumerate(events):
            if e["model"] not in self.monitors:
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
            right[variant] = str(_norm(pred)) == str(_norm(truth))
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
        for model, mon in self.monitors.items():
            wm = self._watermark(model)
            if wm is None or wm <= self.closed_through[model]:
                continue
            state = self.open[model]
            done = sorted(k for k in state if k[0] + mon.cfg.bucket_ms <= wm)
            buckets: dict[str, dict[str, dict]] = {}  # str keys: JSON objects
            versions = self.versions[model]
            for k in done:
                buckets.setdefault(str(k[0]), {})[k[1]] = {**state.pop(k).to_dict(), "version": versions.pop(k, None)}
            self.closed_through[model] = wm
            out.append({"model": model, "source": self.source, "closed_through": wm,
                        "buckets": buckets})
        self._expire()
        return out

    def flush(self) -> list[dict]:
        """End of input (file replay): close every open bucket."""
        ends = [max((k[0] for k in self.open[m]), default=-1) + mon.cfg.bucket_ms
                for m, mon in self.monitors.items()]
        self._advance(max(ends) + max(mon.cfg.allowed_lateness_ms for mon in self.monitors.values()))
        return self.close()

    def _expire(self) -> None:
        """Drop predictions and early labels older than the label TTL, counting them. Both
        tables are in arrival order, so the scan stops at the first entry still alive."""
        if self.max_ts is None:
            return
        if self.unpaired:
            self._expire_shadow_waits()
        ttl = {m: mon.cfg.label_ttl_ms for m, mon in self.monitors.items()}
        self.expired_unlabelled += _drop_oldest(
            self.joins, lambda v: next(iter(v.values()))[2] < self.max_ts - ttl[next(iter(v.values()))[0]])
        self.expired_unjoined_labels += _drop_oldest(
            self.early_labels, lambda e: e["ts"] < self.max_ts - ttl[e["model"]])


def _drop_oldest(table: dict, expired) -> int:
    old = []
    for key, value in table.items():
        if not expired(value):
            break
        old.append(key)
    for key in old:
        del table[key]
    return len(old)


# ---------------------------------------------------------------- stage 2


@dataclass
class Bucket:
    start: int
    variants: dict[str, Summary]


class SlidingWindow:
    """The last ``size`` buckets and, per variant, the sum of their summaries, kept by adding
    the bucket that comes in and subtracting the one that drops out: two merges a slide, not
    a window's worth. Counts stay exact. Float sums are re-added from the buckets whenever a
    bucket starts a multiple of the window length in event time, so rounding cannot build up,
    and live runs, replays and restarted workers re-add at the same buckets."""

    def __init__(self, size: int, bucket_ms: int):
        self.buckets: deque[Bucket] = deque(maxlen=size)
        self.bucket_ms = bucket_ms
        self.sums: dict[str, Summary] = {}

    def append(self, bucket: Bucket) -> dict[str, Summary]:
        """Slide by ``bucket``; return the window of every variant present, by variant name."""
        out = self.buckets[0] if len(self.buckets) == self.buckets.maxlen else None
        self.buckets.append(bucket)
        if bucket.start // self.bucket_ms % self.buckets.maxlen == 0:
            self._add_up()
        else:
            for variant, s in bucket.variants.items():
                _accumulate(self.sums, variant, s)
            for variant, s in (out.variants.items() if out is not None else ()):
                self.sums[variant] = self.sums[variant] - s
                if not any(variant in b.variants for b in self.buckets):
                    del self.sums[variant]
        return {v: self.sums[v] for v in sorted(self.sums)}

    def forget(self, variant: str) -> None:
        """Drop ``variant`` from every bucket: it starts a fresh window."""
        for b in self.buckets:
            b.variants.pop(variant, None)
        self.sums.pop(variant, None)

    def clear(self) -> None:
        self.buckets.clear()
        self.sums.clear()

    def _add_up(self) -> None:
        self.sums = {}
        for b in self.buckets:
            for variant, s in b.variants.items():
                _accumulate(self.sums, variant, s)


class Evaluator:
    """Stage 2 for one model: partials from ``sources`` partitions in, evaluations and alerts
    out, once every source has closed a bucket."""

    def __init__(self, monitor: ModelMonitor, sources: int = 1):
        self.mon, self.cfg = monitor, monitor.cfg
        self.sources = sources
        self.closed: dict[int, int] = {}
        self.pending: dict[int, dict[str, Summary]] = {}
        self.applied: set[tuple[int, int]] = set()
        self.next_bucket: int | None = None
        self.window = SlidingWindow(monitor.cfg.window_buckets, monitor.cfg.bucket_ms)
        self.cusums: dict[str, tuple[CUSUM, CUSUM] | None] = {}
        self.joint_cusums: dict[str, JointCUSUM | None] = {}
        self.alerts = AlertTracker(monitor.cfg.name)
        self.judge = RolloutJudge(monitor.cfg.name, monitor.cfg.checks, monitor.policy, monitor.cfg.bucket_ms)
        self.versions: dict[str, str] = {}  # variant -> version serving it, as of the evaluated bucket
        # pending bucket -> variant -> the version each source saw first in it
        self.bucket_versions: dict[int, dict[str, set[str]]] = {}
        self.late_partials = 0
        # (variant, check, feature) -> the window tests' evaluations at their last run
        self.held: dict[tuple, list[dict]] = {}

    def add(self, partial: dict, idle_sources: set[int] = frozenset()) -> "Emitted":
        """Merge one stage-1 partial; evaluate every bucket that all (non-idle) sources have
        closed."""
        src = partial["source"]
        for start, variants in partial["buckets"].items():
            start = int(start)
            if (src, start) in self.applied:
                continue  # a re-sent partial (at-least-once delivery): already merged
            if self.next_bucket is not None and start < self.next_bucket:
                self.late_partials += 1
                continue
            self.applied.add((src, start))
            merged = self.pending.setdefault(start, {})
            for variant, d in variants.items():
                version = d.pop("version", None)
                if version is not None:
                    self.bucket_versions.setdefault(start, {}).setdefault(variant, set()).add(version)
                _accumulate(merged, variant, Summary.from_dict(d))
        self.closed[src] = max(self.closed.get(src, -1), partial["closed_through"])
        return self.poll(idle_sources)

    def poll(self, idle: set[int] = frozenset()) -> "Emitted":
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
        step = self.cfg.bucket_ms
        while self.next_bucket + step <= through:
            if not self.pending:
                self.next_bucket = through // step * step  # nothing anywhere: jump the gap
                break
            if min(self.pending) - self.next_bucket > self.cfg.window_ms:
                self.window.clear()  # a gap longer than the window: start afresh
                self.next_bucket = min(self.pending)
                continue
            out.extend(self.evaluate(Bucket(self.next_bucket, self.pending.pop(self.next_bucket, {}))))
            self.next_bucket += step
        self.applied = {a for a in self.applied if a[1] >= self.next_bucket}
        self.bucket_versions = {b: v for b, v in self.bucket_versions.items() if b >= self.next_bucket}
        return out

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
                self.cusums.pop(variant, None)
                self.held = {k: v for k, v in self.held.items() if k[0] != variant}
                self.joint_cusums.pop(variant, None)
            self.versions[variant] = min(seen)

    def evaluate(self, bucket: Bucket) -> "Emitted":
        """Slide the window by one bucket and run every check on each variant."""
        self._forget_replaced_versions(bucket.start)
        windows = self.window.append(bucket)
        ring = self.window.buckets
        end = bucket.start + self.cfg.bucket_ms
        out = Emitted([], [], [])
        ctx = {variant: {"model": self.cfg.name, "ts": end, "window": {
            "start_ts": ring[0].start, "end_ts": end, "n": window.n}, "variant": variant}
            for variant, window in windows.items()}
        window_tests = end % self.cfg.window_step_ms == 0
        for variant, window in windows.items():
            out.evaluations.extend(self._checks(ctx[variant], variant, window, bucket.variants.get(variant),
                                                window.n / len(ring), window_tests))
        q = self.mon.tail(max(sum(w.n for w in windows.values()), 1))
        rollout_evs, verdicts = self.judge.evaluate(ring, end, windows, bucket.variants, self.versions, q)
        out.evaluations.extend({**ctx[e["variant"]], **e} for e in rollout_evs)
        groups = _group(out.evaluations)
        if window_tests:
            self.held = {key: [e for e in group if _is_window_test(e)] for key, group in groups.items()}
        else:  # a window test's verdict stands until it runs again
            for key, held in self.held.items():
                if key[0] in windows:
                    groups.setdefault(key, []).extend(held)
        for group in groups.values():
            exceeded = any(e["value"] > e["threshold"] for e in group)
            worst = max(group, key=lambda e: e["value"] / max(e["threshold"], 1e-12))
            alert = self.alerts.observe(end, exceeded, worst)
            if alert:
                out.alerts.append(alert)
        out.alerts.extend(self.alerts.observe_gone(end, set(windows), {
            "start_ts": ring[0].start, "end_ts": end, "n": 0}))
        out.commands.extend(self.judge.decide(end, self.versions, verdicts, self.alerts.ids))
        return out

    def _checks(self, ctx: dict, variant: str, window: Summary, current: Summary | None,
                bucket_events: float, window_tests: bool = True) -> list[dict]:
        """Evaluations of ``variant``'s window (each ``ctx`` plus one statistic); the rank
        CUSUMs take in ``current``, the bucket just closed, their thresholds following the
        window's ``bucket_events`` (they are checked once a bucket); the window tests run only
        when ``window_tests``."""
        mon, checks, least = self.mon, self.cfg.checks, self.cfg.min_window_events
        out: list[dict] = []
        block = mon.numeric_block
        if variant not in self.cusums:
            self.cusums[variant] = block.new_cusums(self.cfg.shift_to_detect_sd / 2) if block else None
            self.joint_cusums[variant] = mon.new_joint_cusum()
        q = mon.window_test_tail(max(window.n, 1))
        least = least if window_tests else math.inf  # no window test this bucket
        cusum_h = mon.cusum_h(bucket_events)
        numeric, sequential, bucket_ranks = {}, {}, {}
        if block is not None:
            names, cusums = [c.name for c in block.columns], self.cusums[variant]
            if current is not None and current.n:
                bucket_ranks = dict(zip(names, zip(*block.update_cusums(cusums, current, cusum_h))))
            sequential = dict(zip(names, zip(*(c.statistic.tolist() for c in cusums))))
            if window_tests and ("drift" in checks or "prediction_drift" in checks):
                numeric = block.statistics(window, q)
        for j, col in enumerate(mon.columns):
            check = "prediction_drift" if is_model_output(col.name) else "drift"
            feature = None if col.name == PREDICTION else col.name
            if check not in checks:
                continue
            base = {**ctx, "check": check, "feature": feature}
            if col.kind == NUMERIC:
                n, *statistics = numeric.get(col.name, (0,))
                if n >= least:
                    out += self._numeric_drift(base, *statistics)
                location, spread = sequential[col.name]
                out.append({**base, "statistic": "cusum", "value": location, "threshold": cusum_h,
                            "p_value": None})
                out.append({**base, "statistic": "cusum_spread", "value": spread, "threshold": cusum_h,
                            "p_value": None})
            elif (n := int(window.counts[col.bins].sum())) >= least:
                out += self._categorical_drift(col, base, window.counts[col.bins], n, q)
            if "missing_rate" in checks and check == "drift" and window.n >= least:
                out.append({**ctx, **self._missing(col, feature, int(window.missing[j]), window.n, q)})
        if (joint := self.joint_cusums[variant]) is not None:
            joint.threshold = mon.joint_h(bucket_events)
            if bucket_ranks:
                joint.update(*zip(*(bucket_ranks[c.name] for c in mon.joint_columns)))
            out.append({**ctx, "check": "drift", "feature": None, "statistic": "cusum_joint",
                        "value": joint.statistic, "threshold": joint.threshold, "p_value": None})
        if "performance" in checks and mon.ref_abs_errors is not None and window.labelled >= least:
            out.append({**ctx, **self._regression_performance(window, q)})
        elif "performance" in checks and mon.ref_error_rate is not None and window.labelled >= least:
            out.append({**ctx, **self._performance(window, q)})
        return out

    @staticmethod
    def _numeric_drift(base: dict, ks: float, ks_p: float, ks_threshold: float, wasserstein: float,
                       wasserstein_threshold: float, psi: float) -> list[dict]:
        return [
            {**base, "statistic": "ks", "value": ks, "threshold": ks_threshold, "p_value": ks_p},
            {**base, "statistic": "wasserstein", "value": wasserstein, "threshold": wasserstein_threshold,
             "p_value": None},
            {**base, "statistic": "psi", "value": psi, "threshold": None, "p_value": None},
        ]

    @staticmethod
    def _categorical_drift(col: ColumnModel, base: dict, counts: np.ndarray, n: int, q: float) -> list[dict]:
        chi = drift.ChiSquare(col.ref_counts).update(counts)
        return [
            {**base, "statistic": "chi2", "value": chi.statistic, "threshold": col.fits["chi2"].threshold(n, q),
             "p_value": chi.p_value},
            {**base, "statistic": "jensen_shannon", "value": float(drift.js_statistic(col.ref_counts, counts)),
             "threshold": None, "p_value": None},
        ]

    def _missing(self, col: ColumnModel, feature: str, missing: int, n: int, q: float) -> dict:
        m = self.mon.reference.n
        surprise = drift.rate_increase_surprise(missing, n, round(col.missing_rate * m), m)
        return {"check": "missing_rate", "feature": feature, "statistic": "surprise",
                "value": surprise, "threshold": -math.log10(q), "p_value": 10 ** -surprise,
                "missing_rate": missing / n, "reference_missing_rate": col.missing_rate}

    def _regression_performance(self, window: Summary, q: float) -> dict:
        """Mean absolute error of the window against the reference's: one-sided Welch z."""
        ref, n = self.mon.ref_abs_errors, window.labelled
        mae = window.abs_error_sum / n
        var = max(window.abs_error_sumsq / n - mae * mae, 0.0) * n / max(n - 1, 1)
        se = math.sqrt(var / n + ref.var(ddof=1) / len(ref)) or 1e-12
        z = (mae - float(ref.mean())) / se
        return {"check": "performance", "feature": None, "statistic": "mae_z", "value": z,
                "threshold": float(-special.ndtri(q)), "p_value": float(special.ndtr(-z)),
                "mae": mae, "reference_mae": float(ref.mean())}

    def _performance(self, window: Summary, q: float) -> dict:
        m = self.mon.reference.n
        surprise = drift.rate_increase_surprise(window.label_errors, window.labelled,
                                          round(self.mon.ref_error_rate * m), m)
        return {"check": "performance", "feature": None, "statistic": "surprise", "value": surprise,
                "threshold": -math.log10(q), "p_value": 10 ** -surprise,
                "error_rate": window.label_errors / window.labelled,
                "reference_error_rate": self.mon.ref_error_rate}


class Emitted(NamedTuple):
    """What stage 2 publishes: evaluations (for metrics and replay files), alert state
    changes, rollout commands."""

    evaluations: list[dict]
    alerts: list[dict]
    commands: list[dict]

    def extend(self, other: "Emitted") -> None:
        for mine, theirs in zip(self, other):
            mine.extend(theirs)


def _group(evs: list[dict]) -> dict[tuple, list[dict]]:
    """Evaluations grouped by (variant, check, feature): one alert per group, on any of its
    statistics."""
    groups: dict[tuple, list[dict]] = {}
    for e in evs:
        if e["threshold"] is not None:  # PSI and JS are reported, not alarmed on
            groups.setdefault((e["variant"], e["check"], e["feature"]), []).append(e)
    return groups


def _is_window_test(e: dict) -> bool:
    """A statistic of the window (not a CUSUM, not a rollout check, which run every bucket)."""
    return e["check"] in WINDOW_CHECKS and not e["statistic"].startswith("cusum")
