"""Stage 2's drift judge: ``drift``, ``prediction_drift``, ``missing_rate`` and ``performance`` on
each variant's window, against a model's :class:`~coalmine.streams.baseline.Baseline`; and, when
configured, ``multivariate_drift`` and ``uncertainty_drift`` on the baseline's derived columns
(:mod:`coalmine.streams.derived`) and ``estimated_performance`` (:mod:`coalmine.streams.estimated`).

Window tests (KS, Wasserstein, chi-square, missing-value and error-rate surprises) run once per
window step; the rank CUSUMs (location and spread per numeric column, one joint over all
features) take in every bucket. Every alarming statistic counts against the model's false-alarm
budget: :func:`alarming_tests` is the count the thresholds are split over, and
:data:`ALARMING` names each column kind's statistics.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from scipy import special

from coalmine.streams import drift
from coalmine.streams.columns import ColumnModel
from coalmine.streams.estimated import EstimatedAccuracy, estimated_binary
from coalmine.streams.records import Evaluation, Window
from coalmine.streams.reference import PREDICTION
from coalmine.streams.sequential import CUSUM, JointCUSUM
from coalmine.streams.sketch import CATEGORICAL, NUMERIC, Summary

if TYPE_CHECKING:
    from coalmine.streams.baseline import Baseline

#: the alarming statistics of one column, by kind (PSI and Jensen-Shannon are reported only)
ALARMING = {NUMERIC: ("ks", "wasserstein", "cusum", "cusum_spread"), CATEGORICAL: ("chi2",)}


def alarming_tests(
    kinds: list[str], features: int, checks: tuple[str, ...], joint: bool, estimated: bool = False
) -> int:
    """Alarming tests per variant and evaluation: each watched column's :data:`ALARMING`
    statistics (derived columns included), a missing-rate test per feature, the performance
    test, the joint CUSUM and the estimated-accuracy test, as configured.

    >>> alarming_tests([NUMERIC, NUMERIC, CATEGORICAL], 3, ("drift", "missing_rate"), True)
    13
    """
    return (
        sum(len(ALARMING[k]) for k in kinds)
        + features * ("missing_rate" in checks)
        + ("performance" in checks)
        + joint
        + estimated
    )


class DriftJudge:
    """The drift checks of one model, with each variant's rank CUSUMs."""

    def __init__(self, baseline: Baseline):
        self.baseline = baseline
        self.cusums: dict[str, CUSUM | None] = {}
        self.joint_cusums: dict[str, JointCUSUM | None] = {}
        self._derive()

    #: what follows from the baseline, left out of a pickle (stage 2's state record: the
    #: watched columns were two thirds of its bytes and most of the time to write it)
    _DERIVED = ("watched", "numeric_names", "joint_rows", "missing_rows", "ref_missing")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._DERIVED}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._derive()

    def _derive(self) -> None:
        baseline = self.baseline
        checks = baseline.settings.checks
        #: (index, column, check, feature) of every column a configured check watches
        self.watched = [
            (j, col, check, None if col.name == PREDICTION else col.name)
            for j, col in enumerate(baseline.columns)
            if (check := baseline.check_of(col.name)) in checks
        ]
        #: the columns of the missing-rate test (the features) and their reference's missing
        m = baseline.reference.n
        drifting = [
            (j, round(col.missing_rate * m))
            for j, col, check, _ in self.watched
            if check == "drift"
        ]
        self.missing_rows, self.ref_missing = np.array(drifting, dtype=np.int64).reshape(-1, 2).T
        block = baseline.numeric_block
        self.numeric_names = [c.name for c in block.columns] if block is not None else []
        #: the joint CUSUM's columns, as rows of the numeric block
        self.joint_rows = np.array(
            [self.numeric_names.index(c.name) for c in baseline.joint_columns], dtype=np.int64
        )

    def forget(self, variant: str) -> None:
        """``variant`` is served by a new version: its CUSUMs start afresh."""
        self.cusums.pop(variant, None)
        self.joint_cusums.pop(variant, None)

    def evaluate(
        self,
        ts: int,
        span: Window,
        variant: str,
        window: Summary,
        current: Summary | None,
        bucket_events: float,
        window_tests: bool = True,
    ) -> list[Evaluation]:
        """Evaluations of ``variant``'s window; the rank CUSUMs take in ``current``, the bucket
        just closed, their thresholds following the window's ``bucket_events`` (they are
        checked once a bucket); the window tests run only when ``window_tests``."""
        base, settings = self.baseline, self.baseline.settings
        checks = settings.checks
        least: float = settings.min_window_events  # math.inf: no window test this bucket
        make = partial(Evaluation, settings.name, ts, span, variant)
        out: list[Evaluation] = []
        block = base.numeric_block
        if variant not in self.cusums:
            self.cusums[variant] = (
                block.new_cusums(settings.shift_to_detect_sd / 2) if block else None
            )
            self.joint_cusums[variant] = base.new_joint_cusum()
        q = base.window_test_tail(max(window.n, 1))
        least = least if window_tests else math.inf  # no window test this bucket
        cusum_h = base.cusum_h(bucket_events)
        numeric: dict = {}
        sequential: dict = {}
        bucket_n = bucket_ranks = None  # each numeric column's events and sum of ranks
        if block is not None and (cusums := self.cusums[variant]) is not None:
            names = self.numeric_names
            if current is not None and current.n:
                bucket_n, bucket_ranks = block.update_cusums(cusums, current, cusum_h)
            statistic = cusums.statistic.tolist()  # location rows, then spread rows
            sequential = dict(zip(names, zip(statistic, statistic[len(names) :])))
            # a column has at most the window's events: none can reach ``least`` when it does not
            if window.n >= least and (
                "drift" in checks or "prediction_drift" in checks or base.derived
            ):
                numeric = block.statistics(window, q)
        model = settings.name
        missing = (
            self._missing_surprises(window)
            if "missing_rate" in checks and window.n >= least
            else {}
        )
        for j, col, check, feature in self.watched:
            if col.kind == NUMERIC:
                # several a column every bucket: built directly, not through ``make``
                args = (model, ts, span, variant, check, feature)
                n, *statistics = numeric.get(col.name, (0,))
                if n >= least:
                    out += _numeric_drift(args, *statistics)
                location, spread = sequential[col.name]
                out.append(Evaluation(*args, "cusum", location, cusum_h, None, {}))
                out.append(Evaluation(*args, "cusum_spread", spread, cusum_h, None, {}))
            elif window.n >= least and (n := int(window.counts[col.bins].sum())) >= least:
                of_column = partial(make, check, feature)
                out += _categorical_drift(of_column, col, window.counts[col.bins], n, q)
            if j in missing:
                out.append(
                    self._missing(
                        make, col, feature, int(window.missing[j]), window.n, q, missing[j]
                    )
                )
        if (joint := self.joint_cusums[variant]) is not None:
            # a joint CUSUM exists only over joint columns, and then so does its threshold table
            assert base.joint_h is not None
            # it steps on at least min_events a column (smaller buckets are carried over)
            joint.threshold = base.joint_h(max(bucket_events, joint.min_events))
            if bucket_n is not None and bucket_ranks is not None:
                joint.update(bucket_n[self.joint_rows], bucket_ranks[self.joint_rows])
            out.append(make("drift", None, "cusum_joint", joint.statistic, joint.threshold))
        if "performance" in checks and base.ref_abs_errors is not None and window.labelled >= least:
            out.append(self._regression_performance(make, window, q))
        elif (
            "performance" in checks and base.ref_error_rate is not None and window.labelled >= least
        ):
            out.append(self._performance(make, window, q))
        if base.accuracy is not None:
            assert base.uncertainty is not None  # the accuracy is calibrated on its bins
            bins = base.layout.bins_of(base.uncertainty)
            if window.counts[bins].sum() >= least:
                out.append(self._estimated_performance(make, window, bins, q))
        return out

    def _estimated_performance(self, make, window: Summary, bins: slice, q: float) -> Evaluation:
        """The window's accuracy estimated from its uncertainty ``bins``, against the
        reference's level less the tolerance: one-sided z; the labels' accuracy beside it
        (and a binary model's estimated F1 and ROC AUC, :func:`estimated_binary`)."""
        base = self.baseline
        assert base.accuracy is not None
        est = EstimatedAccuracy(base.accuracy, base.settings.estimated_accuracy_tolerance)
        est.update(window.counts[bins], window.sums[bins])
        low, high = est.interval
        return make(
            "estimated_performance",
            None,
            "accuracy_z",
            est.statistic,
            float(-special.ndtri(q)),
            est.p_value,
            {
                "estimated_accuracy": est.estimate,
                "interval": [low, high],
                "reference_accuracy": base.accuracy.level,
                "tolerance": est.tolerance,
                # labels joined in this window (they may be of earlier predictions): None
                # until some arrive
                "realised_accuracy": 1 - window.label_errors / window.labelled
                if window.labelled
                else None,
                "labelled": window.labelled,
                **estimated_binary(base, window),
            },
        )

    def _missing_surprises(self, window: Summary) -> dict[int, float]:
        """Each feature's missing-rate surprise on ``window``, by its column's index."""
        surprises = drift.rate_increase_surprises(
            window.missing[self.missing_rows], window.n, self.ref_missing, self.baseline.reference.n
        )
        return dict(zip(self.missing_rows.tolist(), surprises))

    def _missing(
        self,
        make,
        col: ColumnModel,
        feature: str | None,
        missing: int,
        n: int,
        q: float,
        surprise: float,
    ) -> Evaluation:
        return make(
            "missing_rate",
            feature,
            "surprise",
            surprise,
            -math.log10(q),
            10**-surprise,
            {"missing_rate": missing / n, "reference_missing_rate": col.missing_rate},
        )

    def _regression_performance(self, make, window: Summary, q: float) -> Evaluation:
        """Mean absolute error of the window against the reference's: one-sided Welch z."""
        ref, n = self.baseline.ref_abs_errors, window.labelled
        assert ref is not None
        mae = window.abs_error_sum / n
        var = max(window.abs_error_sumsq / n - mae * mae, 0.0) * n / max(n - 1, 1)
        se = math.sqrt(var / n + ref.var(ddof=1) / len(ref)) or 1e-12
        z = (mae - float(ref.mean())) / se
        return make(
            "performance",
            None,
            "mae_z",
            z,
            float(-special.ndtri(q)),
            float(special.ndtr(-z)),
            {"mae": mae, "reference_mae": float(ref.mean())},
        )

    def _performance(self, make, window: Summary, q: float) -> Evaluation:
        base = self.baseline
        assert base.ref_error_rate is not None
        m = base.reference.n
        surprise = drift.rate_increase_surprise(
            window.label_errors, window.labelled, round(base.ref_error_rate * m), m
        )
        return make(
            "performance",
            None,
            "surprise",
            surprise,
            -math.log10(q),
            10**-surprise,
            {
                "error_rate": window.label_errors / window.labelled,
                "reference_error_rate": base.ref_error_rate,
            },
        )


def _numeric_drift(
    args: tuple[str, int, Window, str, str, str | None],
    ks: float,
    ks_p: float,
    ks_threshold: float,
    wasserstein: float,
    wasserstein_threshold: float,
    psi: float,
) -> list[Evaluation]:
    """A numeric column's window tests; ``args``: an :class:`Evaluation`'s first fields."""
    return [
        Evaluation(*args, "ks", ks, ks_threshold, ks_p, {}),
        Evaluation(*args, "wasserstein", wasserstein, wasserstein_threshold, None, {}),
        Evaluation(*args, "psi", psi, None, None, {}),
    ]


def _categorical_drift(
    make, col: ColumnModel, counts: np.ndarray, n: int, q: float
) -> list[Evaluation]:
    chi = drift.ChiSquare(col.ref_counts).update(counts)
    return [
        make("chi2", chi.statistic, col.fits["chi2"].threshold(n, q), chi.p_value),
        make("jensen_shannon", float(drift.js_statistic(col.ref_counts, counts)), None),
    ]
