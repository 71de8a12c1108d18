"""A model's baseline: its reference rows, the bins they fix, and the thresholds calibrated on
them for the model's false-alarm budget. Built once per model; stage 1 folds events on its
layout, stage 2 judges windows against it."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from typing import Protocol

import numpy as np

from coalmine.streams import calibration, drift
from coalmine.streams.columns import ColumnModel, NumericBlock
from coalmine.streams.derived import (
    UNCERTAINTY,
    DerivedColumn,
    ScoreEntropy,
    ScoreMargin,
    is_derived,
    with_derived,
)
from coalmine.streams.drift_checks import alarming_tests
from coalmine.streams.estimated import SCORE_GRID, AccuracyCalibration, BinaryCalibration
from coalmine.streams.multivariate import ReconstructionError
from coalmine.streams.reference import (
    PREDICTION,
    SCORES,
    ReferenceData,
    is_model_output,
    same_answer,
)
from coalmine.streams.rollout_judge import variants_watched
from coalmine.streams.sequential import (
    JointCUSUM,
    ThresholdTable,
    joint_cusum_threshold,
    shared_cusum_thresholds,
)
from coalmine.streams.settings import ModelSettings
from coalmine.streams.sketch import NUMERIC, Layout

#: the check of the model's uncertainty column (which estimated_performance is calibrated on)
UNCERTAINTY_CHECK = "uncertainty_drift"


class CalibrationCache(Protocol):
    """Where calibrated tail fits outlive a process (:class:`coalmine.cache.FileCalibrationCache`)."""

    def load(self, key: str) -> list | None: ...

    def store(self, key: str, fits: list) -> None: ...


class Baseline:
    """A model's reference, its bins and calibrated thresholds: everything both stages share.

    ``cache`` (optional) keeps calibrated tail fits between runs: any object with
    ``load(key) -> list | None`` and ``store(key, fits)``; the fits depend only on the key.
    """

    def __init__(
        self,
        settings: ModelSettings,
        reference: ReferenceData,
        seed: int = 0,
        cache: CalibrationCache | None = None,
    ):
        self.settings = cfg = settings
        ref = reference
        self.ref_error_rate = self._reference_error_rate(ref)
        self.ref_abs_errors = self._reference_abs_errors(ref)
        #: columns computed from each batch's columns before folding (stage 1 adds them)
        self.derived: list[DerivedColumn] = self._derived_columns(ref)
        #: the model's uncertainty column, when a check needs it
        self.uncertainty = next(
            (d.name for d in self.derived if d.check == UNCERTAINTY_CHECK), None
        )
        estimating = (
            "estimated_performance" in cfg.checks
            and self.uncertainty is not None
            and ref.labels is not None
            and PREDICTION in ref.columns
        )
        #: a binary model's positive class, on whose score estimated_performance estimates F1
        #: and ROC AUC (None: not binary, or no estimate)
        self.positive_class = self._positive_class(ref) if estimating else None
        if "prediction_drift" not in cfg.checks:
            # the class scores stay when the uncertainty column needs them: folded, not watched
            ref = ReferenceData(
                {
                    k: v
                    for k, v in ref.columns.items()
                    if not is_model_output(k) or (self.uncertainty and k.startswith(SCORES))
                },
                ref.labels,
            )
        ref = ReferenceData(with_derived(ref.columns, self.derived), ref.labels)
        self.reference = ref
        # the calibrated columns get bins over the scores' whole range, reached by the
        # reference or not
        calibrated = [self.uncertainty, self.positive_score] if estimating else []
        self.layout = Layout.from_reference(
            ref, cfg.bins, {name: SCORE_GRID for name in calibrated if name is not None}
        )
        #: estimated_performance's accuracy per bin of the uncertainty column, and a binary
        #: model's rates of positive labels and answers per bin of its positive score (None:
        #: not run)
        calibrations = self._calibrations(reference) if estimating else (None, None)
        self.accuracy: AccuracyCalibration | None = calibrations[0]
        self.binary: BinaryCalibration | None = calibrations[1]
        self.ref_summary = self.layout.fold(ref.columns)
        key = self._calibration_key(seed)
        cached = cache.load(key) if cache is not None else None
        self.columns = [
            self._column(name, seed, cached[i] if cached else None)
            for i, name in enumerate(self.layout.names)
        ]
        if cache is not None and cached is None:
            cache.store(key, [c.fits for c in self.columns])
        self.joint_columns, self.joint_corr, joint_rows = self._joint_reference()
        numeric = [c for c in self.columns if c.kind == NUMERIC]
        #: every numeric column stacked for one numpy pass per statistic (None without any)
        self.numeric_block = NumericBlock.stack(numeric) if numeric else None
        self.tests = self._count_tests()
        self.policy = cfg.rollout
        self.scored = any(n.startswith(SCORES) for n in self.layout.names)
        # estimated_performance joins labels only to set the realised accuracy beside its estimate
        self.joins_needed = any(
            c in cfg.checks
            for c in ("performance", "shadow", "ab", "canary", "estimated_performance")
        )
        present = [
            int(np.count_nonzero(~np.isnan(ref.columns[c.name])))
            for c in self.columns
            if c.kind == NUMERIC
        ]
        # budgeted for twice the reference mean's sampling variance (half the rows), as the joint
        # CUSUM's noncentrality is: on average over references, with a margin for an unlucky one
        self.cusum_h = shared_cusum_thresholds(
            cfg.false_alarm_every_events * self.tests,
            cfg.shift_to_detect_sd / 2,
            reference_events=min(present, default=0) / 2 or None,
        )
        self.joint_h = (
            ThresholdTable(
                lambda n: joint_cusum_threshold(
                    cfg.false_alarm_every_events * self.tests,
                    len(self.joint_columns),
                    cfg.shift_to_detect_sd,
                    n,
                    joint_rows,
                )
            )
            if self.joint_columns
            else None
        )

    def renamed(self, settings: ModelSettings) -> Baseline:
        """This baseline for another model whose settings differ from this one's in the name
        only: everything else it holds follows from the reference and those settings."""
        assert replace(settings, name="") == replace(self.settings, name=""), "not a twin"
        twin = copy.copy(self)
        twin.settings = settings
        return twin

    def _derived_columns(self, ref: ReferenceData) -> list[DerivedColumn]:
        """The derived columns the configured checks watch or need: the PCA reconstruction
        error (``multivariate_drift``, over the numeric features) and the model's uncertainty
        (``uncertainty_drift``, ``estimated_performance``, from the class scores). A check whose
        inputs the reference lacks gets no column (and no share of the budget)."""
        checks, out = self.settings.checks, list[DerivedColumn]()
        taken = [n for n in ref.columns if is_derived(n)]
        if taken:
            raise ValueError(f"feature {taken[0]!r}: the prefix 'derived.' is for derived columns")
        if "multivariate_drift" in checks:
            numeric = [
                n for n, v in ref.columns.items() if not is_model_output(n) and v.dtype != object
            ]
            pca = ReconstructionError.fit(ref.columns, numeric, self.settings.pca_variance)
            if pca is not None:
                out.append(pca)
        classes = [
            n[len(SCORES) :]
            for n, v in ref.columns.items()
            if n.startswith(SCORES) and v.dtype != object
        ]
        if classes and ("uncertainty_drift" in checks or "estimated_performance" in checks):
            out.append(UNCERTAINTY[self.settings.uncertainty](classes))
        return out

    @staticmethod
    def _positive_class(ref: ReferenceData) -> str | None:
        """A binary model's positive class: its only scored class, or the later of two in
        sorting order ("1" of "0" and "1", "true", "yes", "spam"); None with more classes."""
        classes = sorted(n[len(SCORES) :] for n in ref.columns if n.startswith(SCORES))
        return classes[-1] if len(classes) in (1, 2) else None

    @property
    def positive_score(self) -> str | None:
        """The column of the positive class's score (None: no binary estimate)."""
        return None if self.positive_class is None else SCORES + self.positive_class

    def _calibrations(
        self, ref: ReferenceData
    ) -> tuple[AccuracyCalibration, BinaryCalibration | None]:
        """``estimated_performance``'s calibrations over the reference's labelled rows: the
        accuracy per bin of the uncertainty column, and for a binary model the rates of
        positive labels and answers per bin of its positive score."""
        assert ref.labels is not None and self.uncertainty is not None
        labelled = np.array([v is not None for v in ref.labels])
        answers, labels = ref.columns[PREDICTION], ref.labels
        correct = np.array(
            [has and same_answer(p, y) for has, p, y in zip(labelled, answers, labels)],
            dtype=float,
        )
        measure = next(d for d in self.derived if isinstance(d, (ScoreMargin, ScoreEntropy)))
        accuracy = AccuracyCalibration.fit(
            self.reference.columns[self.uncertainty],
            correct,
            labelled,
            self.layout.edges[self.uncertainty],
            measure.top_score,
        )
        if (score := self.positive_score) is None:
            return accuracy, None
        positive = self.positive_class
        binary = BinaryCalibration.fit(
            self.reference.columns[score],
            np.array([has and same_answer(y, positive) for has, y in zip(labelled, labels)]),
            np.array([same_answer(p, positive) for p in answers]),
            labelled,
            self.layout.edges[score],
        )
        return accuracy, binary

    def with_derived(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch's columns with this model's derived columns added: what stage 1 folds."""
        return with_derived(columns, self.derived)

    def check_of(self, name: str) -> str:
        """The check that watches column ``name``."""
        if is_derived(name):
            return next(d.check for d in self.derived if d.name == name)
        return "prediction_drift" if is_model_output(name) else "drift"

    def _joint_reference(self) -> tuple[list[ColumnModel], np.ndarray | None, int]:
        """The feature columns the joint CUSUM watches (numeric, not constant; at least two)
        and the correlation of their smoothed reference ranks over the reference rows that
        have them all (at least 100), with that row count."""
        cols = [
            c
            for c in self.columns
            if c.kind == NUMERIC and self.check_of(c.name) == "drift" and c.rank_sd > 0
        ]
        if len(cols) < 2 or "drift" not in self.settings.checks:
            return [], None, 0
        values = np.stack([self.reference.columns[c.name] for c in cols], axis=1)
        rows = values[~np.isnan(values).any(axis=1)]
        if len(rows) < 100:
            return [], None, 0
        scores = np.stack(
            [c.smoothed_ranks(rows[:, j]) for j, c in enumerate(cols)],
            axis=1,
        )
        return cols, np.corrcoef(scores, rowvar=False), len(rows)

    def new_joint_cusum(self) -> JointCUSUM | None:
        """The joint CUSUM over :attr:`joint_columns` (None when there are fewer than two)."""
        if not self.joint_columns:
            return None
        return JointCUSUM(
            [c.rank_mean for c in self.joint_columns],
            [c.rank_sd for c in self.joint_columns],
            self.joint_corr,
            self.settings.shift_to_detect_sd,
        )

    @property
    def feature_names(self) -> list[str]:
        return [n for n in self.layout.names if self.check_of(n) == "drift"]

    def _calibration_key(self, seed: int) -> str:
        """Everything the simulated thresholds depend on: same key, same thresholds."""
        h = hashlib.sha256(
            f"{calibration.VERSION}|{seed}|{self.layout.names}|{self.layout.vocab}".encode()
        )
        for arr in (self.ref_summary.counts, self.ref_summary.sums, *self.layout.edges.values()):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:32]

    def _column(self, name: str, seed: int, fits: dict | None = None) -> ColumnModel:
        sl = self.layout.bins_of(name)
        counts, sums = self.ref_summary.counts[sl], self.ref_summary.sums[sl]
        values = self.reference.columns[name]
        edges = self.layout.edges.get(name)
        col = ColumnModel(
            name,
            self.layout.kinds[name],
            sl,
            counts,
            drift.bin_positions(counts, sums, edges),
            edges,
        )
        j = self.layout.names.index(name)
        col.missing_rate = self.ref_summary.missing[j] / max(self.reference.n, 1)
        if col.kind == NUMERIC:
            assert edges is not None, f"numeric column {name} without bin edges"
            present = values[~np.isnan(values)]
            col.sd = float(np.clip(present, edges[0], edges[-1]).std()) if len(present) > 1 else 0.0
            bin_sd = self._bin_sd(name, present)
            bin_sd[[0, -1]] = 0.0  # the outer bins sit at fixed edges
            col.fits = fits or calibration.calibrate_numeric(
                counts, col.ref_pos, bin_sd, col.sd, seed
            )
            col.rank_intercepts, col.rank_slopes = drift.smoothed_rank_coefficients(counts, edges)
            ref_scores = drift.smoothed_ranks(present, edges, col.rank_intercepts, col.rank_slopes)
            col.rank_mean, col.rank_sd = float(ref_scores.mean()), float(ref_scores.std())
        else:
            col.fits = fits or calibration.calibrate_categorical(counts, seed)
        return col

    def _bin_sd(self, name: str, values: np.ndarray) -> np.ndarray:
        """Standard deviation of the reference values inside each bin of a numeric column."""
        width = self.layout.bins_of(name).stop - self.layout.bins_of(name).start
        idx = np.searchsorted(self.layout.edges[name], values, side="right")
        n = np.maximum(np.bincount(idx, minlength=width), 1)
        mean = np.bincount(idx, weights=values, minlength=width) / n
        return np.sqrt(
            np.maximum(np.bincount(idx, weights=values**2, minlength=width) / n - mean**2, 0)
        )

    def _reference_abs_errors(self, ref: ReferenceData) -> np.ndarray | None:
        """|prediction - label| on the reference, for a regression model (numeric predictions
        with more than 20 distinct values); None otherwise."""
        pred = ref.columns.get(PREDICTION)
        if (
            ref.labels is None
            or pred is None
            or pred.dtype == object
            or len(np.unique(pred[~np.isnan(pred)])) <= 20
        ):
            return None
        labels = np.array(
            [v if isinstance(v, (int, float)) else np.nan for v in ref.labels], dtype=float
        )
        err = np.abs(pred - labels)
        return err[~np.isnan(err)] if (~np.isnan(err)).any() else None

    def _reference_error_rate(self, ref: ReferenceData) -> float | None:
        if self.settings.baseline_error_rate is not None:
            return self.settings.baseline_error_rate
        if ref.labels is None or PREDICTION not in ref.columns:
            return None
        has = np.array([v is not None for v in ref.labels])
        if not has.any():
            return None
        wrong = [
            not same_answer(p, y) for p, y in zip(ref.columns[PREDICTION][has], ref.labels[has])
        ]
        return float(np.mean(wrong))

    def _count_tests(self) -> int:
        """K: alarming tests per evaluation, over every variant the checks may see. Features
        count whatever the checks; the other columns when their check is on (class scores kept
        only as the uncertainty column's inputs, or that column kept only for
        ``estimated_performance``, are not watched)."""
        checks, features = self.settings.checks, set(self.feature_names)
        per_variant = alarming_tests(
            [c.kind for c in self.columns if c.name in features or self.check_of(c.name) in checks],
            len(features),
            checks,
            bool(self.joint_columns),
            self.accuracy is not None,
        )
        return per_variant * len(variants_watched(self.settings.checks))

    def tail(self, window_n: int) -> float:
        """Tail probability of a check run after every bucket (the rollout checks)."""
        return calibration.tail_share(
            window_n,
            self.settings.window_buckets,
            self.settings.false_alarm_every_events,
            self.tests,
        )

    def window_test_tail(self, window_n: int) -> float:
        """Tail probability of a window test, run once per :attr:`ModelSettings.window_step_ms`."""
        return calibration.tail_share(
            window_n,
            self.settings.window_ms / self.settings.window_step_ms,
            self.settings.false_alarm_every_events,
            self.tests,
        )
