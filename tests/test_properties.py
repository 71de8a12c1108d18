"""Property: no mix of variants, statuses, labels and gaps makes stage 1 or 2 raise, or a
statistic non-finite (issue 12, item 7)."""

from __future__ import annotations

import math
import operator
from functools import cache, reduce

import numpy as np
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from coalmine.cache import FileCalibrationCache
from coalmine.ingest import PartitionIngest
from coalmine.streams import Baseline, Evaluator, ModelSettings, ReferenceData, Summary
from coalmine.streams.rollout import RolloutPolicy
from coalmine.streams.settings import ALL_CHECKS

T0 = 1_700_000_000_000
CHECKS = tuple(c for c in ALL_CHECKS if c not in ("multivariate_drift", "uncertainty_drift"))
CHECKS = tuple(c for c in CHECKS if c != "estimated_performance")


@cache
def _baseline(bucket_ms: int = 1000) -> Baseline:
    """Built when a test first needs it (not at collection, in every xdist worker); the
    bucket size is not part of the calibration, which the session's cache shares."""
    rng = np.random.default_rng(3)
    ref = ReferenceData(
        {"f0": rng.standard_normal(2000), "prediction": rng.integers(0, 2, 2000).astype(float)},
        None,
    )
    policy = RolloutPolicy()
    return Baseline(
        ModelSettings(
            name="m", bucket_ms=bucket_ms, window_ms=10_000, checks=CHECKS, rollout=policy
        ),
        ref,
        cache=FileCalibrationCache(),
    )


steps = st.tuples(
    st.sampled_from(["champion", "canary", "shadow"]),
    st.sampled_from(["ok", "ok", "ok", "error"]),
    st.integers(0, 1),  # prediction
    st.sampled_from([None, 0, 1]),  # label, if any
    st.sampled_from([0, 5, 50, 400, 3_000, 30_000]),  # gap before it, ms
    st.floats(-1e308, 1e308, allow_nan=False),
)


def run(draws, baseline: Baseline | None = None) -> list:
    baseline = baseline or _baseline()
    ingest, evaluator = PartitionIngest({"m": baseline}), Evaluator(baseline)
    ts, evaluations = T0, []
    for start in range(0, len(draws), 40):
        preds, labels = [], []
        for i, (variant, status, pred, label, gap, f0) in enumerate(draws[start : start + 40]):
            ts += gap
            n = start + i
            preds.append(
                {
                    "event_id": f"e{n}",
                    "request_id": f"r{n}",
                    "model": "m",
                    "version": {"champion": "1", "canary": "2", "shadow": "3"}[variant],
                    "variant": variant,
                    "ts": ts,
                    "features": {"f0": f0},
                    "prediction": pred if status == "ok" else None,
                    "status": status,
                    "latency_ms": 5.0,
                }
            )
            if label is not None:
                labels.append(
                    {
                        "event_id": f"l{n}",
                        "request_id": f"r{n}",
                        "model": "m",
                        "ts": ts,
                        "label": label,
                    }
                )
        ingest.feed("prediction", [orjson.dumps(p) for p in preds])
        ingest.feed("label", [orjson.dumps(x) for x in labels])
        for partial in ingest.close():
            evaluations += evaluator.add(partial).evaluations
    for partial in ingest.flush():
        evaluations += evaluator.add(partial).evaluations
    return evaluations


def finite(e) -> bool:
    return math.isfinite(e.value) and (e.threshold is None or math.isfinite(e.threshold))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps, min_size=1, max_size=400))
def test_random_traffic_never_raises_and_statistics_stay_finite(draws):
    assert all(finite(e) for e in run(draws))


def test_a_canary_that_never_fails_but_is_wrong_more_often_is_judged_without_a_crash():
    rng = np.random.default_rng(7)
    draws = []
    for i in range(6000):
        variant = "canary" if i % 10 == 0 else "champion"
        truth = int(rng.integers(0, 2))
        wrong = rng.random() < (0.4 if variant == "canary" else 0.1)
        draws.append((variant, "ok", truth ^ wrong, truth, 5, float(rng.normal())))
    # 250 ms buckets: the window tests run every fourth bucket, their verdicts held between
    evaluations = run(draws, _baseline(bucket_ms=250))
    assert evaluations and all(finite(e) for e in evaluations)


_VALUES = st.floats(-1e9, 1e9, allow_nan=False, allow_subnormal=True)


@given(
    st.lists(
        st.tuples(st.integers(0, 9), st.lists(_VALUES, min_size=4, max_size=4), st.booleans()),
        min_size=1,
        max_size=15,
    )
)
@example([(0, [0.0, 0.0, 0.0, -0.0], False), (0, [0.0, 0.0, 0.0, -0.0], False)])  # found so
def test_many_summaries_merged_at_once_are_bit_for_bit_those_added_one_at_a_time(parts):
    """A step of a low-traffic model merges its buckets in one pass (``Summary.total``): the
    window it slides is the one adding them one after the other gives, to the last bit (live,
    replays and restarts would otherwise disagree)."""
    summaries = []
    for n, values, binned in parts:
        s = Summary.zeros(4, 2)
        s.n, s.counts[:] = n, np.arange(4) * n
        s.sums[:], s.abs_error_sum, s.outcome_sum = values, values[0], -values[1]
        if binned:  # a binary model's score bins, empty in the others
            s.score_positives, s.score_negatives = np.full((2, 3), n, dtype=np.int64)
        summaries.append(s)
    one_by_one, at_once = reduce(operator.add, summaries), Summary.total(summaries)
    assert list(at_once.__dict__) == list(one_by_one.__dict__)
    for name, expected in one_by_one.__dict__.items():
        got = at_once.__dict__[name]
        if isinstance(expected, np.ndarray):
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), name
        else:
            assert type(got) is type(expected) and repr(got) == repr(expected), name
