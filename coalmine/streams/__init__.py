"""coalmine's statistics, with no Kafka, no files and no clock: the same events in give the
same evaluations, alerts and commands out, whether they come from a worker, a replay or a
notebook.

* settings and reference: :mod:`~coalmine.streams.settings` (:class:`ModelSettings`),
  :mod:`~coalmine.streams.reference` (:class:`ReferenceData`);
* a model's bins and calibrated thresholds: :mod:`~coalmine.streams.baseline`
  (:class:`Baseline`), with :mod:`~coalmine.streams.calibration` and
  :mod:`~coalmine.streams.columns`;
* mergeable summaries: :mod:`~coalmine.streams.sketch` (:class:`Layout`, :class:`Summary`),
  :mod:`~coalmine.streams.latency`;
* stage 1: :mod:`~coalmine.streams.sketcher` (:class:`Sketcher`);
* stage 2: :mod:`~coalmine.streams.evaluator` (:class:`Evaluator`), its window
  (:mod:`~coalmine.streams.window`), its judges (:mod:`~coalmine.streams.drift_checks`,
  :mod:`~coalmine.streams.rollout_judge`) and alert states (:mod:`~coalmine.streams.alerts`);
* derived columns, computed from a batch's columns before folding and watched like features:
  :mod:`~coalmine.streams.derived` (the model's uncertainty), :mod:`~coalmine.streams.multivariate`
  (PCA reconstruction error); the accuracy estimated from the uncertainty's bins:
  :mod:`~coalmine.streams.estimated`;
* the statistics themselves: :mod:`~coalmine.streams.drift` (KS, Wasserstein, chi-square,
  PSI, Jensen-Shannon), :mod:`~coalmine.streams.sequential` (CUSUMs),
  :mod:`~coalmine.streams.rollout` (Wilson, McNemar, Welch, mSPRT, SRM; the rollout
  controller);
* what stage 2 says: :mod:`~coalmine.streams.records` (:class:`Evaluation`, :class:`Alert`,
  :class:`Command`).
"""

from coalmine.streams.alerts import AlertTracker
from coalmine.streams.baseline import Baseline, CalibrationCache
from coalmine.streams.derived import DerivedColumn, ScoreEntropy, ScoreMargin
from coalmine.streams.drift_checks import DriftJudge
from coalmine.streams.estimated import AccuracyCalibration, EstimatedAccuracy
from coalmine.streams.evaluator import Emitted, Evaluator
from coalmine.streams.multivariate import ReconstructionError
from coalmine.streams.records import Alert, Command, Evaluation, Window
from coalmine.streams.reference import ReferenceData, event_rows, first_events, reference_from_rows
from coalmine.streams.rollout import RolloutController, RolloutPolicy
from coalmine.streams.rollout_judge import RolloutJudge
from coalmine.streams.sequential import CUSUM, JointCUSUM
from coalmine.streams.settings import (
    ALL_CHECKS,
    DEFAULT_CHECKS,
    DRIFT_CHECKS,
    ESTIMATION_CHECKS,
    ROLLOUT_CHECKS,
    VARIANTS,
    ModelSettings,
)
from coalmine.streams.sketch import Layout, Summary
from coalmine.streams.sketcher import Sketcher
from coalmine.streams.window import Bucket, SlidingWindow

__all__ = [
    "ALL_CHECKS",
    "DEFAULT_CHECKS",
    "DRIFT_CHECKS",
    "ESTIMATION_CHECKS",
    "ROLLOUT_CHECKS",
    "VARIANTS",
    "AccuracyCalibration",
    "Alert",
    "AlertTracker",
    "Baseline",
    "Bucket",
    "CUSUM",
    "CalibrationCache",
    "Command",
    "DerivedColumn",
    "DriftJudge",
    "Emitted",
    "EstimatedAccuracy",
    "Evaluation",
    "Evaluator",
    "JointCUSUM",
    "Layout",
    "ModelSettings",
    "ReconstructionError",
    "ReferenceData",
    "RolloutController",
    "RolloutJudge",
    "RolloutPolicy",
    "ScoreEntropy",
    "ScoreMargin",
    "Sketcher",
    "SlidingWindow",
    "Summary",
    "Window",
    "event_rows",
    "first_events",
    "reference_from_rows",
]
