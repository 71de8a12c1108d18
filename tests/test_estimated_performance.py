"""Check estimated_performance: accuracy estimated from the model's own uncertainty before the
labels come, tracking the realised accuracy within its interval, alerting before the label-based
performance check when a covariate shift hurts the model."""

import re

import numpy as np
import pytest

from coalmine.config import ConfigError, parse_config
from coalmine.streams import Baseline, Evaluator, ModelSettings, ReferenceData, Sketcher
from coalmine.streams.derived import ScoreMargin

PER_BUCKET = 200
SHIFT_AT = 40  # bucket (second) from which x0 crowds the decision boundary
LABEL_DELAY = 30  # buckets (seconds): labels arrive that late


def draw(rng, n, shifted=False):
    """A calibrated binary model: P(y = 1 | x) = sigmoid(3 x0), which it scores; x0 ~ N(0, 1),
    or N(0, 0.3) once shifted (events near the boundary, where the model is unsure)."""
    x0 = rng.standard_normal(n) * (0.3 if shifted else 1.0)
    x1 = rng.standard_normal(n)
    p = 1 / (1 + np.exp(-3 * x0))
    y = (rng.random(n) < p).astype(int)
    return x0, x1, p, y


@pytest.fixture(scope="module")
def estimated():
    x0, x1, p, y = draw(np.random.default_rng(21), 5000)
    ref = ReferenceData(
        {"x0": x0, "x1": x1, "prediction": (p > 0.5).astype(float), "scores.1": p},
        np.array(y.tolist(), dtype=object),
    )
    settings = ModelSettings(
        name="m",
        bucket_ms=1000,
        window_ms=20_000,
        checks=("performance", "estimated_performance"),
    )
    return Baseline(settings, ref)


def run(baseline, buckets, shift_at=None, seed=22):
    """Predictions a bucket at a time, each bucket's labels LABEL_DELAY buckets later; the
    evaluations, alerts, and every prediction's (ts, correct)."""
    rng = np.random.default_rng(seed)
    sketcher, evaluator = Sketcher({"m": baseline}), Evaluator(baseline)
    evaluations, alerts, truth, labels = [], [], [], {}
    for k in range(buckets + LABEL_DELAY):
        preds = []
        if k < buckets:
            x0, x1, p, y = draw(rng, PER_BUCKET, shift_at is not None and k >= shift_at)
            ts = k * 1000 + np.arange(PER_BUCKET) * 4
            preds = [
                {
                    "event_id": f"{k}-{j}",
                    "request_id": f"{k}-{j}",
                    "model": "m",
                    "version": "1",
                    "variant": "champion",
                    "ts": int(ts[j]),
                    "features": {"x0": float(x0[j]), "x1": float(x1[j])},
                    "prediction": int(p[j] > 0.5),
                    "scores": {"1": float(p[j])},
                    "status": "ok",
                }
                for j in range(PER_BUCKET)
            ]
            truth.append(np.column_stack([ts, (p > 0.5) == y]))
            labels[k] = [
                {
                    "event_id": f"l{k}-{j}",
                    "request_id": f"{k}-{j}",
                    "model": "m",
                    "ts": int(ts[j]) + LABEL_DELAY * 1000,
                    "label": int(y[j]),
                }
                for j in range(PER_BUCKET)
            ]
        assert sketcher.add_predictions(preds) == []
        assert sketcher.add_labels(labels.pop(k - LABEL_DELAY, [])) == []
        for out in map(evaluator.add, sketcher.close()):
            evaluations += out.evaluations
            alerts += out.alerts
    return evaluations, alerts, np.concatenate(truth)


def test_the_calibration_is_histogram_binning_on_the_margin_bins(estimated):
    """The uncertainty column is the score margin; the class score stays as its input without
    being watched; the accuracy per margin bin rises with the margin, and the reference level
    is the reference's accuracy."""
    assert [d.name for d in estimated.derived] == [ScoreMargin.name]
    assert estimated.layout.names == ("x0", "x1", "scores.1", ScoreMargin.name)
    cal = estimated.accuracy
    assert cal is not None and cal.accuracy[0] < 0.6 < 0.95 < cal.accuracy[-1]
    assert cal.level == pytest.approx(1 - estimated.ref_error_rate, abs=0.005)


def test_the_estimate_tracks_the_realised_accuracy_and_fires_before_the_labels(estimated):
    """x0 crowds the boundary from bucket 40: accuracy falls from ~0.84 to ~0.64. The estimate
    follows the accuracy the labels will show on each window's events, within its interval,
    and alerts within seconds; the label-based check, 30 s behind, only after the labels
    come. Nothing fires before the shift."""
    evaluations, alerts, truth = run(estimated, 90, shift_at=SHIFT_AT)
    firing = {a.check: a.ts for a in alerts if a.state == "firing"}
    assert set(firing) == {"estimated_performance", "performance"}
    # a window test: the shifted share of the 20 s window must first cost more than the tolerance
    assert SHIFT_AT * 1000 < firing["estimated_performance"] <= (SHIFT_AT + 8) * 1000
    assert firing["performance"] > (SHIFT_AT + LABEL_DELAY) * 1000
    estimates = [e for e in evaluations if e.check == "estimated_performance"]
    inside = []
    for e in estimates:
        mine = (truth[:, 0] >= e.window.start_ts) & (truth[:, 0] < e.window.end_ts)
        realised = truth[mine, 1].mean()
        low, high = e.evidence["interval"]
        inside.append(low <= realised <= high)
    # a 95% interval, on overlapping windows: most, not all
    assert np.mean(inside) >= 0.85
    before = [e for e in estimates if e.ts <= SHIFT_AT * 1000]
    after = [e for e in estimates if e.window.start_ts >= SHIFT_AT * 1000]
    assert np.mean([e.evidence["estimated_accuracy"] for e in before]) > 0.8
    assert np.mean([e.evidence["estimated_accuracy"] for e in after]) < 0.7
    # once labels come, the realised value sits beside the estimate
    assert before[0].evidence["realised_accuracy"] is None
    assert after[-1].evidence["realised_accuracy"] == pytest.approx(
        after[-1].evidence["estimated_accuracy"], abs=0.05
    )


def test_a_stationary_stream_is_silent(estimated):
    _, alerts, _ = run(estimated, 60)
    assert alerts == []


def test_settings_are_validated_naming_the_field():
    def model(**keys):
        doc = {"models": [{"name": "m", "reference": "r.jsonl", **keys}]}
        return parse_config(doc).models["m"]

    m = model(
        checks=["multivariate_drift", "uncertainty_drift", "estimated_performance"],
        pca_variance=0.8,
        uncertainty="entropy",
        estimated_accuracy_tolerance=0.05,
    )
    assert (m.pca_variance, m.uncertainty, m.estimated_accuracy_tolerance) == (0.8, "entropy", 0.05)
    assert model().checks == ("drift", "prediction_drift", "missing_rate", "performance")
    for key, value, message in (
        ("pca_variance", 1, "models[0].pca_variance: expected a number in (0, 1), got 1"),
        ("uncertainty", "doubt", "models[0].uncertainty: expected one of 'margin', 'entropy'"),
        ("estimated_accuracy_tolerance", -0.1, "models[0].estimated_accuracy_tolerance"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            model(**{key: value})
