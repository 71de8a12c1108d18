"""Derived columns and check multivariate_drift: the PCA reconstruction error of each event,
folded and watched like a feature, under the model's false-alarm budget."""

import numpy as np
import pytest

from coalmine.cache import FileCalibrationCache
from coalmine.streams import Baseline, Evaluator, ModelSettings, ReferenceData, Sketcher
from coalmine.streams.multivariate import ReconstructionError

PER_BUCKET = 200
RHO = 0.9


def correlated(rng, n, together=True):
    """a, b ~ N(0, 1) with correlation RHO (or none: the same marginals, independent); c
    independent of both."""
    a = rng.standard_normal(n)
    noise = rng.standard_normal(n)
    b = RHO * a + np.sqrt(1 - RHO**2) * noise if together else noise
    return a, b, rng.standard_normal(n)


@pytest.fixture(scope="module")
def multivariate():
    a, b, c = correlated(np.random.default_rng(11), 5000)
    ref = ReferenceData({"a": a, "b": b, "c": c}, None)
    settings = ModelSettings(
        name="m", bucket_ms=1000, window_ms=20_000, checks=("multivariate_drift",)
    )
    return Baseline(settings, ref, cache=FileCalibrationCache())


def events(buckets, apart_from=None, seed=12):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(buckets):
        a, b, c = correlated(rng, PER_BUCKET, together=apart_from is None or k < apart_from)
        out += [
            {
                "event_id": f"{k}-{j}",
                "request_id": f"{k}-{j}",
                "model": "m",
                "version": "1",
                "variant": "champion",
                "ts": k * 1000 + j * 4,
                "features": {"a": float(a[j]), "b": float(b[j]), "c": float(c[j])},
                "prediction": 0,
                "status": "ok",
            }
            for j in range(PER_BUCKET)
        ]
    return out


def replay(baseline, stream, chunk=1000):
    sketcher, evaluator = Sketcher({"m": baseline}), Evaluator(baseline)
    evaluations, alerts = [], []
    for start in range(0, len(stream), chunk):
        assert sketcher.add_predictions(stream[start : start + chunk]) == []
        for p in sketcher.close():
            out = evaluator.add(p)
            evaluations += out.evaluations
            alerts += out.alerts
    for p in sketcher.flush():
        out = evaluator.add(p)
        evaluations += out.evaluations
        alerts += out.alerts
    return evaluations, alerts


def test_the_reconstruction_error_is_a_derived_column_binned_on_the_reference(multivariate):
    """One component kept (a and b move together, c alone is a third of the variance: 0.9
    needs two of three); the error is binned on its reference quantiles and watched by the
    same statistics as a feature."""
    (pca,) = multivariate.derived
    assert isinstance(pca, ReconstructionError)
    assert pca.components.shape == (3, 2)
    name = pca.name
    assert name in multivariate.layout.names and multivariate.check_of(name) == "multivariate_drift"
    assert len(multivariate.layout.edges[name]) == 31  # 32 quantile bins, as any feature
    assert multivariate.feature_names == ["a", "b", "c"]


def test_losing_the_correlation_fires_multivariate_drift_and_a_stationary_stream_does_not(
    multivariate,
):
    """a and b keep their N(0, 1) marginals but stop moving together from bucket 60: no
    per-feature statistic could see it; the reconstruction error does, within a few buckets."""
    _, quiet = replay(multivariate, events(100))
    assert quiet == []
    evaluations, alerts = replay(multivariate, events(100, apart_from=60))
    firing = [a for a in alerts if a.state == "firing"]
    assert firing and {(a.check, a.feature) for a in firing} == {
        ("multivariate_drift", "derived.pca_reconstruction_error")
    }
    assert 60_000 < firing[0].ts <= 64_000
    assert {e.statistic for e in evaluations} == {
        "ks",
        "wasserstein",
        "psi",
        "cusum",
        "cusum_spread",
    }


def test_the_error_merges_across_partitions(multivariate):
    """Folded per event like any column: two partitions' summaries add up to one's."""
    stream = events(3)
    whole, halves = Sketcher({"m": multivariate}), [Sketcher({"m": multivariate}) for _ in "ab"]
    whole.add_predictions(stream)
    halves[0].add_predictions(stream[::2])
    halves[1].add_predictions(stream[1::2])
    one = whole.open["m"][(0, "champion")]
    two = halves[0].open["m"][(0, "champion")] + halves[1].open["m"][(0, "champion")]
    np.testing.assert_array_equal(one.counts, two.counts)
    np.testing.assert_allclose(one.sums, two.sums)


def test_the_budget_counts_the_derived_columns_and_the_estimated_accuracy():
    """K equals the alarming statistics a full evaluation produces, with every new check on:
    the reconstruction error's and the uncertainty column's four statistics each, and the
    estimated-accuracy test; the class score kept only as the uncertainty's input is not
    watched, so not counted."""
    rng = np.random.default_rng(3)
    a, b, c = correlated(rng, 5000)
    p1 = 1 / (1 + np.exp(-3 * a))
    labels = np.array([int(v) for v in rng.random(5000) < p1], dtype=object)
    ref = ReferenceData(
        {"a": a, "b": b, "c": c, "prediction": (p1 > 0.5).astype(float), "scores.1": p1}, labels
    )
    checks = ("drift", "missing_rate", "multivariate_drift", "uncertainty_drift")
    mon = Baseline(
        ModelSettings(
            name="m",
            bucket_ms=1000,
            window_ms=20_000,
            checks=(*checks, "estimated_performance"),
        ),
        ref,
        cache=FileCalibrationCache(),  # the session's, kept between runs (conftest.py)
    )
    stream = events(25)
    for e in stream:
        p = 1 / (1 + np.exp(-3 * e["features"]["a"]))
        e["scores"], e["prediction"] = {"1": p}, int(p > 0.5)
    evaluations, _ = replay(mon, stream)
    last = max(e.ts for e in evaluations if e.statistic == "ks")
    alarming = [e for e in evaluations if e.ts == last and e.threshold is not None]
    assert {e.check for e in alarming} == {*checks, "estimated_performance"}
    assert "scores.1" not in {e.feature for e in alarming}
    # 3 features x 4 + 3 missing-rate + joint CUSUM + 2 derived x 4 + estimated accuracy
    assert len(alarming) == mon.tests == 12 + 3 + 1 + 8 + 1
