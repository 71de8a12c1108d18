"""Check estimated_performance: accuracy estimated from the model's own uncertainty before the
labels come, tracking the realised accuracy within its interval, alerting before the label-based
performance check when a covariate shift hurts the model."""

import re

import numpy as np
import pytest
from scipy import stats

from coalmine.cache import FileCalibrationCache
from coalmine.config import ConfigError, parse_config
from coalmine.streams import Baseline, Evaluator, ModelSettings, ReferenceData, Sketcher
from coalmine.streams.derived import ScoreMargin
from coalmine.streams.label_join import request_keys

PER_BUCKET = 200
SHIFT_AT = 40  # bucket (second) from which x0 crowds the decision boundary
LABEL_DELAY = 30  # buckets (seconds): labels arrive that late


def draw(rng, n, shifted=False, sure=False):
    """A calibrated binary model: P(y = 1 | x) = sigmoid(3 x0), which it scores; x0 ~ N(0, 1),
    or N(0, 0.3) once shifted (events near the boundary, where the model is unsure); ``sure``:
    only events with |x0| > 1.5, where the model is at least 98% sure."""
    x0 = rng.standard_normal(n) * (0.3 if shifted else 1.0)
    if sure:
        x0 = np.sign(x0) * (1.5 + np.abs(x0))
    x1 = rng.standard_normal(n)
    p = 1 / (1 + np.exp(-3 * x0))
    y = (rng.random(n) < p).astype(int)
    return x0, x1, p, y


def baseline(sure=False, checks=("performance", "estimated_performance")):
    x0, x1, p, y = draw(np.random.default_rng(21), 5000, sure=sure)
    ref = ReferenceData(
        {"x0": x0, "x1": x1, "prediction": (p > 0.5).astype(float), "scores.1": p},
        np.array(y.tolist(), dtype=object),
    )
    settings = ModelSettings(
        name="m",
        bucket_ms=1000,
        window_ms=20_000,
        checks=checks,
    )
    return Baseline(settings, ref, cache=FileCalibrationCache())


@pytest.fixture(scope="module")
def estimated():
    return baseline()


def run(baseline, buckets, shift_at=None, seed=22, sure=False):
    """Predictions a bucket at a time (``sure`` ones until the shift), each bucket's labels
    LABEL_DELAY buckets later; the evaluations, alerts, and every prediction's (ts, correct,
    label, score)."""
    rng = np.random.default_rng(seed)
    sketcher, evaluator = Sketcher({"m": baseline}), Evaluator(baseline)
    evaluations, alerts, truth, labels = [], [], [], {}
    for k in range(buckets + LABEL_DELAY):
        preds = []
        if k < buckets:
            shifted = shift_at is not None and k >= shift_at
            x0, x1, p, y = draw(rng, PER_BUCKET, shifted, sure=sure and not shifted)
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
            truth.append(np.column_stack([ts, (p > 0.5) == y, y, p]))
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
    assert cal is not None and cal.rates()[0] < 0.6 < 0.95 < cal.rates()[-1]
    assert cal.level == pytest.approx(1 - estimated.ref_error_rate, abs=0.005)


@pytest.fixture(scope="module")
def sure_run():
    """A baseline whose reference was always sure, and its run over 95 buckets that crowd the
    boundary from SHIFT_AT (three tests read it)."""
    sure = baseline(sure=True)
    return sure, run(sure, 95, shift_at=SHIFT_AT, sure=True)


def test_where_the_reference_was_always_sure_the_estimate_follows_the_score(sure_run):
    """The reference holds only events the model is 98% sure of; from bucket 40 the events
    crowd the boundary, where the reference has no row. Their accuracy is what their scores
    say (~0.64): the estimate follows it within its interval and alerts, where bins on the
    reference's margins alone would put them all in the lowest, 98% right."""
    sure, (evaluations, alerts, truth) = sure_run
    assert estimated_bins_reach(sure) < 0.5  # bins of their own below the reference's margins
    firing = [a for a in alerts if a.state == "firing" and a.check == "estimated_performance"]
    assert firing and SHIFT_AT * 1000 < firing[0].ts <= (SHIFT_AT + 8) * 1000
    shifted = [
        e
        for e in evaluations
        if e.check == "estimated_performance" and e.window.start_ts >= SHIFT_AT * 1000
    ]
    inside = []
    for e in shifted:
        realised = truth[(truth[:, 0] >= e.window.start_ts) & (truth[:, 0] < e.window.end_ts), 1]
        low, high = e.evidence["interval"]
        inside.append(low <= realised.mean() <= high)
        assert e.evidence["estimated_accuracy"] == pytest.approx(realised.mean(), abs=0.05)
    assert np.mean(inside) >= 0.8


def estimated_bins_reach(b):
    """The lowest inner edge of the margin's bins."""
    return float(b.layout.edges[ScoreMargin.name][0])


def test_a_binary_model_gets_estimated_f1_and_roc_auc_beside_the_realised(sure_run):
    """Beside the accuracy: F1 and ROC AUC expected from the positive score's bins, close to
    what the window's labels will show, before and after the shift; once labels come, the
    realised F1 of the labelled events sits beside the estimate."""
    _, (evaluations, _, truth) = sure_run
    estimates = [e for e in evaluations if e.check == "estimated_performance"]
    for e in estimates[::5]:
        mine = truth[(truth[:, 0] >= e.window.start_ts) & (truth[:, 0] < e.window.end_ts)]
        y, p = mine[:, 2], mine[:, 3]
        said = p > 0.5
        f1 = 2 * (said & (y == 1)).sum() / (said.sum() + y.sum())
        assert e.evidence["estimated_f1"] == pytest.approx(f1, abs=0.05)
        low, high = e.evidence["f1_interval"]
        assert low < e.evidence["estimated_f1"] < high
        pos, neg = p[y == 1], p[y == 0]
        auc = (pos[:, None] > neg[None]).mean() + (pos[:, None] == neg[None]).mean() / 2
        assert e.evidence["estimated_roc_auc"] == pytest.approx(auc, abs=0.05)
        low, high = e.evidence["roc_auc_interval"]
        assert low < e.evidence["estimated_roc_auc"] < high
    assert estimates[0].evidence["realised_f1"] is None
    # the labels joined in a window are of the predictions LABEL_DELAY earlier
    by_ts = {e.ts: e.evidence for e in estimates}
    for ts in ((SHIFT_AT - 5) * 1000, (SHIFT_AT + 20) * 1000):
        labelled = by_ts[ts + LABEL_DELAY * 1000]["realised_f1"]
        assert labelled == pytest.approx(by_ts[ts]["estimated_f1"], abs=0.08)


def test_the_realised_roc_auc_is_the_mann_whitney_statistic_of_the_labelled_score_bins(sure_run):
    """Once labels come, the realised ROC AUC sits beside the estimate: that of the labels
    joined in the window (those of the predictions LABEL_DELAY earlier), on the positive
    score's bins, ties within a bin counting one half."""
    b, (evaluations, _, truth) = sure_run
    estimates = [e for e in evaluations if e.check == "estimated_performance"]
    assert estimates[0].evidence["realised_roc_auc"] is None
    edges, compared = b.layout.edges["scores.1"], 0
    for e in estimates[LABEL_DELAY::5]:
        labelled_at = truth[:, 0] + LABEL_DELAY * 1000
        mine = truth[(labelled_at >= e.window.start_ts) & (labelled_at < e.window.end_ts)]
        bins = np.searchsorted(edges, mine[:, 3], side="right")
        pos, neg = bins[mine[:, 2] == 1], bins[mine[:, 2] == 0]
        u = stats.mannwhitneyu(pos, neg).statistic
        assert e.evidence["realised_roc_auc"] == pytest.approx(u / (len(pos) * len(neg)))
        compared += 1
    assert compared >= 10
    # and lies within the interval estimated before the labels came, before and after the shift
    by_ts = {e.ts: e.evidence for e in estimates}
    for ts in ((SHIFT_AT - 5) * 1000, (SHIFT_AT + 20) * 1000):
        low, high = by_ts[ts]["roc_auc_interval"]
        assert low <= by_ts[ts + LABEL_DELAY * 1000]["realised_roc_auc"] <= high


def test_models_without_the_estimate_count_no_score_bins():
    """A binary model checking its performance from labels alone, without the estimate, keeps
    its partials as they were: no score bins, no realised ROC AUC."""
    evaluations, _, _ = run(baseline(checks=("performance",)), 40)
    assert evaluations and all("realised_roc_auc" not in e.evidence for e in evaluations)
    sketcher = Sketcher({"m": baseline(checks=("performance",))})
    assert sketcher.add_predictions([prediction(0, 0.9)]) == []
    assert sketcher.add_labels([label(0)]) == []
    [summary] = sketcher.flush()[0]["buckets"]["0"].values()
    assert "score_positives" not in summary and summary["labelled"] == 1


def test_the_label_join_state_keeps_the_positive_score():
    """A partition's new owner reads the label join back with each answer's positive score,
    whether its label is still awaited or counted in a bucket still open."""
    scores = np.linspace(0.05, 0.95, 10)
    old = Sketcher({"m": baseline(sure=True)})
    assert old.add_predictions([prediction(j, p) for j, p in enumerate(scores)]) == []
    assert old.add_labels([label(j) for j in range(4)]) == []  # counted, the bucket open
    new = Sketcher({"m": baseline(sure=True)})
    new.restore_joins(old.join_records(rows=3))
    keys = request_keys([f"r{j}" for j in range(10)])
    answers = new.joins["champion"].pop_many(keys)
    assert [a.score for a in answers] == pytest.approx(scores.tolist())


def prediction(j: int, score: float) -> dict:
    return {
        "event_id": f"e{j}",
        "request_id": f"r{j}",
        "model": "m",
        "version": "1",
        "variant": "champion",
        "ts": j,
        "features": {"x0": 0.0, "x1": 0.0},
        "prediction": int(score > 0.5),
        "scores": {"1": score},
        "status": "ok",
    }


def label(j: int) -> dict:
    return {"event_id": f"l{j}", "request_id": f"r{j}", "model": "m", "ts": j, "label": j % 2}


def test_models_without_the_estimate_keep_their_bins():
    """The score grid is added to the calibrated columns only: a model watching its
    uncertainty without estimating its performance bins it on the reference's quantiles."""
    watched = baseline(sure=True, checks=("uncertainty_drift",))
    assert estimated_bins_reach(watched) > 0.9
    assert watched.positive_class is None and watched.binary is None


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


def test_a_multiclass_model_gets_the_accuracy_alone():
    """Three classes: no positive class, so no F1 or ROC AUC; the accuracy is calibrated on
    the margin, and a margin the reference never had takes the top score it implies with the
    runner-ups tied, (1 + 2 m) / 3."""
    rng = np.random.default_rng(23)
    logits = rng.standard_normal((6000, 3)) * 3
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    top2 = -np.sort(-scores, axis=1)[:, :2]
    logits, scores = logits[top2[:, 0] - top2[:, 1] > 0.5], scores[top2[:, 0] - top2[:, 1] > 0.5]
    labels = [str(rng.choice(3, p=s)) for s in scores]
    ref = ReferenceData(
        {
            "x0": logits[:, 0],
            "prediction": np.array([str(k) for k in scores.argmax(axis=1)], dtype=object),
            **{f"scores.{k}": scores[:, k] for k in range(3)},
        },
        np.array(labels, dtype=object),
    )
    settings = ModelSettings(name="m", checks=("estimated_performance",))
    b = Baseline(settings, ref, cache=FileCalibrationCache())
    assert b.positive_class is None and b.binary is None
    realised = np.mean([str(k) == y for k, y in zip(scores.argmax(axis=1), labels)])
    assert b.accuracy is not None and b.accuracy.level == pytest.approx(realised, abs=0.01)
    margins = b.reference.columns[ScoreMargin.name]
    empty = np.flatnonzero(b.accuracy.labelled == 0)
    assert len(empty) and margins.min() > 0.5  # bins the reference never reached
    counts = np.zeros_like(b.accuracy.labelled)
    counts[empty[0]] = 10
    sums = counts * 0.0
    sums[empty[0]] = 10 * 0.3  # ten events of margin 0.3 there
    assert b.accuracy.rates(counts, sums)[empty[0]] == pytest.approx((1 + 2 * 0.3) / 3)
