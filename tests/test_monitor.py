"""The two pipeline stages without a broker: alerts at the right buckets, silence on
stationary streams, the same alerts however the events are spread over partitions."""

import copy
import zlib

import numpy as np
import pytest

from coalmine.cache import FileCalibrationCache
from coalmine.streams import (
    VARIANTS,
    Baseline,
    Bucket,
    Evaluation,
    Evaluator,
    ModelSettings,
    ReferenceData,
    Sketcher,
    SlidingWindow,
    Window,
    drift,
)
from coalmine.streams.sketch import Layout, Packed

PER_BUCKET = 200


@pytest.fixture(scope="module")
def monitor():
    rng = np.random.default_rng(1)
    ref = ReferenceData(
        {
            "f0": rng.standard_normal(5000),
            "f1": rng.exponential(size=5000),
            "color": np.array(rng.choice(["red", "blue"], 5000), dtype=object),
            "prediction": rng.integers(0, 3, 5000).astype(float),
        },
        None,
    )
    settings = ModelSettings(
        name="m",
        bucket_ms=1000,
        window_ms=20_000,
        checks=("drift", "prediction_drift", "missing_rate"),
    )
    # the session's calibration cache: tests/test_state.py builds the same baseline
    return Baseline(settings, ref, cache=FileCalibrationCache())


def stream(buckets, shift_from=None, shift=0.0, seed=2, missing_from=None, scale=1.0):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(buckets):
        drifted = shift_from is not None and b >= shift_from
        f0 = rng.standard_normal(PER_BUCKET) * (scale if drifted else 1.0) + (
            shift if drifted else 0
        )
        f1 = rng.exponential(size=PER_BUCKET)
        color = rng.choice(["red", "blue"], PER_BUCKET)
        pred = rng.integers(0, 3, PER_BUCKET)
        for j in range(PER_BUCKET):
            gone = missing_from is not None and b >= missing_from and j % 5 == 0
            out.append(
                {
                    "event_id": f"{b}-{j}",
                    "request_id": f"{b}-{j}",
                    "model": "m",
                    "version": "1",
                    "variant": "champion",
                    "ts": b * 1000 + j * 4,
                    "features": {
                        "f0": float(f0[j]),
                        "f1": None if gone else float(f1[j]),
                        "color": str(color[j]),
                    },
                    "prediction": int(pred[j]),
                    "status": "ok",
                }
            )
    return out


def run(monitor, events, sources=1, chunk=500) -> list[dict]:
    """The alert state changes, in their wire form."""
    sketchers = [Sketcher({"m": monitor}, source=s) for s in range(sources)]
    evaluator = Evaluator(monitor, sources=sources)
    alerts = []
    for start in range(0, len(events), chunk):
        part = events[start : start + chunk]
        for s, sk in enumerate(sketchers):
            mine = (
                [e for e in part if zlib.crc32(e["request_id"].encode()) % sources == s]
                if sources > 1
                else part
            )
            assert sk.add_predictions(mine) == []
            for p in sk.close():
                alerts += evaluator.add(p).alerts
    for sk in sketchers:
        for p in sk.flush():
            alerts += evaluator.add(p).alerts
    return [a.to_json() for a in alerts]


def test_stationary_stream_is_silent(monitor):
    assert run(monitor, stream(200)) == []


def test_mean_shift_fires_on_the_feature_within_a_few_buckets(monitor):
    alerts = run(monitor, stream(120, shift_from=60, shift=0.5))
    firing = [a for a in alerts if a["state"] == "firing"]
    assert firing, "a 0.5 sd shift must be detected"
    first = firing[0]
    assert first["feature"] == "f0" and first["check"] == "drift"
    assert 60_000 < first["ts"] <= 65_000  # within 5 buckets (1000 events) of the change
    # f0 alone, and the joint CUSUM over all features (no "feature"), which sees it too
    assert {a.get("feature") for a in firing} == {"f0", None}
    assert all(a["statistic"] == "cusum_joint" for a in firing if "feature" not in a)


def test_feature_and_model_wide_alerts_fire_side_by_side(monitor):
    """A feature's alert and the joint CUSUM's (feature None) can fire together; the worker
    lists and counts them, which sorts None among feature names."""
    evaluator = Evaluator(monitor)
    for b in range(4):
        for feature, statistic in (("f0", "cusum"), (None, "cusum_joint")):
            evaluator.alerts.observe(
                b,
                True,
                Evaluation(
                    "m", b, Window(0, b, 1), "champion", "drift", feature, statistic, 2.0, 1.0
                ),
            )
    assert evaluator.alerts.firing == [("champion", "drift", None), ("champion", "drift", "f0")]


def test_a_scale_change_fires_the_spread_cusum_within_a_few_buckets(monitor):
    """Same mean and median, 1.5 x the spread: the location CUSUM has nothing to see, the
    spread CUSUM (squared distance of the rank from the median) does."""
    alerts = run(monitor, stream(120, shift_from=60, scale=1.5))
    firing = [a for a in alerts if a["state"] == "firing"]
    assert firing and all(
        a.get("feature") == "f0" for a in firing if a["statistic"] != "cusum_joint"
    )
    assert firing[0]["statistic"] == "cusum_spread"
    assert 60_000 < firing[0]["ts"] <= 64_000


def test_the_location_cusum_sums_smoothed_ranks_exactly_from_bins(monitor):
    """A bucket's sum of smoothed reference ranks, taken from its bin counts and sums, equals
    the sum of each event's own score (ties included)."""
    rng = np.random.default_rng(5)
    values = np.concatenate(
        [rng.standard_normal(300), np.round(rng.standard_normal(200), 1), [-50.0, 50.0]]
    )  # ties, and both open outer bins
    col = next(c for c in monitor.columns if c.name == "f0")
    block = monitor.numeric_block
    bucket = monitor.layout.fold(
        {
            **{
                n: np.full(len(values), np.nan)
                for n in monitor.layout.names
                if monitor.layout.kinds[n] == "numeric"
            },
            "f0": values,
            "color": np.full(len(values), None, dtype=object),
        }
    )
    cusums = block.new_cusums(k=0.0)
    block.update_cusums(cusums, bucket, threshold=1e9)
    row = block.columns.index(col)  # the column's location row
    expected = drift.smoothed_ranks(values, col.edges, col.rank_intercepts, col.rank_slopes).sum()
    z = (expected - len(values) * col.rank_mean) / col.rank_sd
    assert cusums.statistic[row] == pytest.approx(abs(z), rel=1e-9)


def _window(monitor, f0, f1, prediction):
    return monitor.layout.fold(
        {"f0": f0, "f1": f1, "prediction": prediction, "color": np.full(len(f0), None, object)}
    )


def _windows(monitor):
    """Windows with ties, empty bins, values beyond the reference's range and no values."""
    rng = np.random.default_rng(9)
    n = 3000
    yield _window(monitor, rng.standard_normal(n), rng.exponential(size=n), rng.integers(0, 3, n))
    yield _window(monitor, rng.standard_normal(n) + 0.7, 3 * rng.exponential(size=n), np.ones(n))
    yield _window(monitor, rng.standard_normal(5), rng.exponential(size=5), np.full(5, 2.0))
    yield _window(monitor, np.full(50, 0.3), np.full(50, 1e6), np.round(rng.standard_normal(50)))
    yield _window(monitor, np.full(40, -1e6), np.full(40, np.nan), np.zeros(40))


def test_window_statistics_equal_each_columns_own_on_the_same_bins(monitor):
    """The stacked window tests (all numeric columns in one pass) give every column's KS, its
    p-value, Wasserstein-1 (scipy's on the bins' masses at their winsorized means) and PSI, on
    windows with empty bins, columns of few bins (the prediction's 3) and no values."""
    from scipy import stats

    block = monitor.numeric_block
    for window in _windows(monitor):
        got = block.statistics(window, q=1e-6)
        for col in block.columns:
            counts, sums = window.counts[col.bins], window.sums[col.bins]
            n, ks, ks_p, _, w, _, psi = got[col.name]
            assert n == counts.sum()
            if not n:
                continue
            expected_ks = drift.KolmogorovSmirnov(col.ref_counts).update(counts)
            assert ks == pytest.approx(expected_ks.statistic, rel=1e-12, abs=1e-15)
            assert ks_p == pytest.approx(expected_ks.p_value, rel=1e-9, abs=1e-15)
            positions = drift.bin_positions(counts, sums, col.edges)
            exact = stats.wasserstein_distance(col.ref_pos, positions, col.ref_counts, counts)
            assert w == pytest.approx(exact / col.sd, rel=1e-9, abs=1e-12)
            expected_psi = drift.psi_statistic(col.ref_counts, counts)
            assert psi == pytest.approx(expected_psi, rel=1e-12)


def test_missing_values_fire_missing_rate(monitor):
    alerts = run(monitor, stream(80, missing_from=40))
    firing = [(a["check"], a.get("feature")) for a in alerts if a["state"] == "firing"]
    assert ("missing_rate", "f1") in firing
    assert all(a["ts"] > 40_000 for a in alerts)


def test_alerts_do_not_depend_on_partitions(monitor):
    events = stream(90, shift_from=50, shift=0.4)
    one = run(monitor, events, sources=1)
    four = run(monitor, events, sources=4, chunk=300)
    assert one and [a["alert_id"] for a in one] == [a["alert_id"] for a in four]


def test_late_events_are_rejected_with_a_reason(monitor):
    sk = Sketcher({"m": monitor})
    events = stream(10)
    sk.add_predictions(events)
    sk.close()
    rejected = sk.add_predictions([dict(events[0], event_id="late")])
    assert len(rejected) == 1 and rejected[0][1].startswith("late event")


def test_resent_partial_is_merged_once(monitor):
    sk = Sketcher({"m": monitor})
    sk.add_predictions(stream(30))
    partials = sk.flush()
    once, twice = Evaluator(monitor), Evaluator(monitor)
    for p in partials:
        once.add(p)
        twice.add(p)
        twice.add(p)
    assert [b.variants["champion"].n for b in once.window.buckets] == [
        b.variants["champion"].n for b in twice.window.buckets
    ]


def test_a_partial_that_does_not_fit_the_layout_changes_nothing(monitor):
    """A forged partial whose last summary is a bin short is refused whole (the worker
    dead-letters it with this reason): none of its buckets is merged, and the real partials
    then give the evaluations of a run that never saw it."""
    sk = Sketcher({"m": monitor})
    sk.add_predictions(stream(30))
    partials = sk.flush()
    forged = copy.deepcopy(partials[0])
    last = max(forged["buckets"], key=int)
    forged["buckets"][last]["champion"]["counts"] = forged["buckets"][last]["champion"]["counts"][
        :-1
    ]
    clean, attacked = Evaluator(monitor), Evaluator(monitor)
    with pytest.raises(ValueError, match="does not fit 'm'"):
        attacked.add(forged)
    assert not attacked.pending and not attacked.applied

    def evaluations(evaluator):
        return [
            (e.ts, e.key, e.statistic, e.value)
            for p in copy.deepcopy(partials)
            for e in evaluator.add(p).evaluations
        ]

    assert evaluations(attacked) == evaluations(clean) != []


def test_unknown_model_is_rejected(monitor):
    sk = Sketcher({"m": monitor})
    ev = dict(stream(1)[0], model="other")
    assert sk.add_predictions([ev]) == [(0, "unknown model 'other'")]


@pytest.mark.parametrize(
    "x,n,x_ref,n_ref", [(12, 1000, 12, 5000), (3, 200, 0, 5000), (40, 900, 30, 900)]
)
def test_rate_increase_matches_scipy_binomtest(x, n, x_ref, n_ref):
    from scipy.stats import binomtest

    from coalmine.streams.drift import rate_increase_surprise

    p = binomtest(x, x + x_ref, n / (n + n_ref), alternative="greater").pvalue
    assert rate_increase_surprise(x, n, x_ref, n_ref) == pytest.approx(-np.log10(p))


def test_regression_performance_fires_when_absolute_error_grows():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(5000)
    truth = 2 * x + rng.normal(0, 0.5, 5000)
    ref = ReferenceData({"x": x, "prediction": 2 * x}, np.array(truth, dtype=object))
    mon = Baseline(
        ModelSettings(name="m", window_ms=10_000, checks=("performance",)),
        ref,
        cache=FileCalibrationCache(),
    )
    sk, ev = Sketcher({"m": mon}), Evaluator(mon)
    alerts = []
    for b in range(60):
        xs = rng.standard_normal(200)
        noise = 0.5 if b < 30 else 1.0  # the model gets worse at bucket 30
        preds = [
            {
                "event_id": f"{b}-{j}",
                "request_id": f"{b}-{j}",
                "model": "m",
                "version": "1",
                "variant": "champion",
                "ts": b * 1000 + j * 5,
                "features": {"x": float(xs[j])},
                "prediction": float(2 * xs[j]),
                "status": "ok",
            }
            for j in range(200)
        ]
        labels = [
            {
                "event_id": f"l{b}-{j}",
                "request_id": f"{b}-{j}",
                "model": "m",
                "ts": b * 1000 + j * 5,
                "label": float(2 * xs[j] + rng.normal(0, noise)),
            }
            for j in range(200)
        ]
        sk.add_predictions(preds)
        sk.add_labels(labels)
        for p in sk.close():
            alerts += ev.add(p).alerts
    firing = [a for a in alerts if a.state == "firing"]
    assert firing and firing[0].check == "performance" and firing[0].statistic == "mae_z"
    assert 30_000 < firing[0].ts <= 33_000


def test_file_replay_is_byte_identical(tmp_path):
    from coalmine import simulator
    from coalmine.config import load_config
    from coalmine.replay import replay_files, write_jsonl

    # the reference of the other replay tests: its calibration is cached for the session
    simulator.write_reference(tmp_path / "ref.jsonl", n=5000)
    simulator.write_demo_config(tmp_path / "m.toml", tmp_path / "ref.jsonl", window="10s")
    s = simulator.Scenario(
        n_events=9000, rate_per_s=300, drift_at=4500, drift_size=0.8, bad_event_every=300
    )
    simulator.write_streams(s, tmp_path / "p.jsonl", tmp_path / "l.jsonl")
    outputs = []
    for i in range(2):
        with open(tmp_path / f"e{i}.jsonl", "wb") as evaluations:
            run = replay_files(
                load_config(tmp_path / "m.toml"),
                tmp_path / "p.jsonl",
                tmp_path / "l.jsonl",
                progress=False,
                on_evaluations=lambda batch: write_jsonl(batch, evaluations),
            )
            write_jsonl(run.alerts, evaluations)
        outputs.append((tmp_path / f"e{i}.jsonl").read_bytes())
    assert (
        run.alerts and outputs[0].count(b"\n") > 10 * len(run.alerts) and outputs[0] == outputs[1]
    )


def test_sliding_window_equals_the_sum_of_its_buckets():
    """Running sums (add the new bucket, subtract the one leaving) give the window a full
    re-sum gives, as variants come, go and are forgotten."""
    rng = np.random.default_rng(3)
    layout = Layout.from_columns({"x": rng.standard_normal(500)}, bins=8)
    window = SlidingWindow(window_ms=5000)
    appended = []  # the buckets as they came (the ring keeps them packed)
    for i in range(60):
        if i == 23:
            window.forget("canary")
            for b in appended:
                b.variants.pop("canary", None)
        variants = {
            # a few bins (held packed) or most (held dense) occupied
            v: layout.fold(
                {"x": rng.standard_normal(int(rng.integers(1, 50))) * (1 + 99 * (i % 2))}
            )
            for v in VARIANTS
            if rng.random() < (0.9 if v == "champion" else 0.3)
        }
        appended.append(Bucket(i * 1000, copy.deepcopy(variants), (i + 1) * 1000))
        got = window.append(Bucket(i * 1000, variants, (i + 1) * 1000))
        expected: dict = {}
        for b in appended[-5:]:
            for v, summary in b.variants.items():
                expected[v] = expected[v] + summary if v in expected else summary
        assert list(got) == sorted(expected)
        for v, summary in got.items():
            assert (
                summary.n == expected[v].n
                and summary.counts.tolist() == expected[v].counts.tolist()
            )
            np.testing.assert_allclose(summary.sums, expected[v].sums, rtol=1e-12, atol=1e-9)


def test_a_window_pickled_when_it_held_a_number_of_buckets_reads_as_that_window():
    """A state head written before windows went by event time pickled ``size`` buckets of
    ``bucket_ms`` (a ring with a maximum length): it reads as a window of their span, which
    slides by time."""
    import pickle
    from collections import Counter, deque

    layout = Layout.from_columns({"x": np.arange(100.0)}, bins=4)
    old = SlidingWindow.__new__(SlidingWindow)
    old.__dict__.update(size=4, bucket_ms=250, buckets=deque(maxlen=4), sums={}, present=Counter())
    window = pickle.loads(pickle.dumps(old))
    assert window.window_ms == 1000 and window.buckets.maxlen is None
    for i in range(6):
        got = window.append(Bucket(i * 250, {"champion": layout.fold({"x": [1.0]})}, (i + 1) * 250))
    assert [b.start for b in window.buckets] == [500, 750, 1000, 1250]
    assert got["champion"].n == 4


def _bits(summary) -> list:
    """A summary's every field, arrays and floats as their bytes (so -0.0 differs from 0.0)."""
    return [
        (name, np.asarray(v).tobytes(), np.asarray(v).dtype.str)
        for name, v in sorted(summary.__dict__.items())
    ]


def test_packed_buckets_give_back_their_summaries_bit_for_bit():
    """The window's ring keeps buckets packed; unpacked, or subtracted from a window's sum in
    place, they give exactly what the dense summaries give: few and many events, latency,
    score bins, a -0.0 scalar."""
    rng = np.random.default_rng(5)
    layout = Layout.from_columns({"x": rng.standard_normal(500), "y": rng.random(500)}, bins=64)
    for events in (1, 3, 40, 400):
        columns = {"x": rng.standard_normal(events), "y": rng.random(events)}
        columns["x"][0] = np.nan
        bucket = layout.fold(columns)
        bucket.latency[int(rng.integers(0, len(bucket.latency)))] += events
        bucket.errors, bucket.outcome_sum = 2, -0.0
        if events == 40:
            bucket.count_label(3, True, bins=10)
        packed = Packed(bucket)
        assert _bits(packed.unpack()) == _bits(bucket)
        window = layout.fold({"x": rng.standard_normal(900), "y": rng.random(900)}) + bucket
        total = window + bucket  # a sum made anew, as the window's is
        for merge, op in ((packed.subtract_from, "__sub__"), (packed.add_to, "__add__")):
            expected = getattr(total, op)(bucket)
            merge(total)
            assert _bits(total) == _bits(expected)
        assert _bits(packed.unpack()) == _bits(bucket)  # unchanged by the merges


def test_a_low_traffic_models_window_holds_its_buckets_in_little_memory():
    """A one-minute window of 250 ms buckets, 3 events each in 11 columns of 33 bins: the ring
    holds a fifth of the dense arrays' bytes at most, and its sum is still exact."""
    rng = np.random.default_rng(6)
    layout = Layout.from_columns({f"x{i}": rng.standard_normal(900) for i in range(11)}, bins=32)
    window = SlidingWindow(window_ms=60_000)
    dense = 0
    for i in range(300):
        bucket = layout.fold({f"x{j}": rng.standard_normal(3) for j in range(11)})
        dense += bucket.counts.nbytes + bucket.sums.nbytes + bucket.latency.nbytes
        got = window.append(Bucket(i * 250, {"champion": bucket}, (i + 1) * 250))
    packed = sum(b.variants["champion"].nbytes for b in window.buckets)
    assert packed < dense * 240 / 300 / 5
    assert got["champion"].n == 720 and got["champion"].counts.sum() == 720 * 11


def scored_stream(buckets, unsure_from=None, seed=4):
    """A binary classifier that always predicts 1, with P(1) = 0.5 + Beta(8, 2) / 2; from
    ``unsure_from`` on, Beta(4, 2): the same predictions, less sure."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(buckets):
        p1 = 0.5 + rng.beta(8 if unsure_from is None or b < unsure_from else 4, 2, PER_BUCKET) / 2
        f0 = rng.standard_normal(PER_BUCKET)
        out += [
            {
                "event_id": f"{b}-{j}",
                "request_id": f"{b}-{j}",
                "model": "m",
                "version": "1",
                "variant": "champion",
                "ts": b * 1000 + j * 4,
                "features": {"f0": float(f0[j])},
                "prediction": 1,
                "scores": {"0": float(1 - p1[j]), "1": float(p1[j])},
                "status": "ok",
            }
            for j in range(PER_BUCKET)
        ]
    return out


def test_score_drift_fires_prediction_drift_for_the_class_scores():
    """Predictions unchanged, scores drifting: prediction_drift names each class's score; the
    same model is silent while nothing changes."""
    from coalmine.streams.reference import event_rows, reference_from_rows

    ref = reference_from_rows(event_rows(scored_stream(25, seed=1)))
    assert [n for n in ref.columns if n != "f0"] == ["prediction", "scores.0", "scores.1"]
    scored = Baseline(
        ModelSettings(
            name="m", bucket_ms=1000, window_ms=20_000, checks=("drift", "prediction_drift")
        ),
        ref,
        cache=FileCalibrationCache(),
    )
    alerts = run(scored, scored_stream(120, unsure_from=60))
    assert all(a["ts"] > 60_000 for a in alerts), "silent over the first 60 buckets"
    firing = [a for a in alerts if a["state"] == "firing"]
    assert {(a["check"], a["feature"]) for a in firing} == {
        ("prediction_drift", "scores.0"),
        ("prediction_drift", "scores.1"),
    }
    assert all(60_000 < a["ts"] <= 65_000 for a in firing)


def test_a_version_hand_over_mid_bucket_is_not_credited_to_the_new_version(monitor):
    """The router swaps the canary from v2 to v3 in the middle of bucket 10: that bucket still
    counts for v2 (a healthy v2 must not vouch for v3), and v3's window starts with bucket 11,
    whichever partition saw which version first."""
    events = stream(14)
    for e in events:
        b, j = map(int, e["event_id"].split("-"))
        e["variant"] = "canary" if j % 2 else "champion"
        if e["variant"] == "canary":
            e["version"] = "v3" if b > 10 or (b == 10 and j >= PER_BUCKET // 2) else "v2"
    for sources in (1, 3):
        sketchers = [Sketcher({"m": monitor}, source=s) for s in range(sources)]
        evaluator = Evaluator(monitor, sources=sources)
        seen, evaluate = {}, evaluator.evaluate

        def watch(bucket, evaluate=evaluate, evaluator=evaluator, seen=seen):
            out = evaluate(bucket)
            seen[bucket.start] = (
                evaluator.versions.get("canary"),
                evaluator.window.sums["canary"].n,
            )
            return out

        evaluator.evaluate = watch
        for s, sk in enumerate(sketchers):
            sk.add_predictions(
                [e for e in events if zlib.crc32(e["request_id"].encode()) % sources == s]
            )
        for sk in sketchers:
            for p in sk.flush():
                evaluator.add(p)
        canary_n = sum(1 for e in events if e["variant"] == "canary" and e["ts"] // 1000 == 11)
        assert seen[10_000][0] == "v2"  # the hand-over bucket still counts for v2
        assert seen[11_000] == ("v3", canary_n)  # v3's window: bucket 11 alone


def test_replay_command_writes_alerts_and_every_evaluation(tmp_path, capsys):
    """`coalmine replay --alerts --evaluations`: the alerts of the same replay run in code, and
    one line per check per evaluation with the fields the issue names (streamed to the file,
    not kept in memory)."""
    import orjson

    from coalmine import simulator
    from coalmine.cli import main
    from coalmine.config import load_config
    from coalmine.replay import replay_files

    simulator.write_reference(tmp_path / "ref.jsonl", n=5000)
    simulator.write_demo_config(tmp_path / "m.toml", tmp_path / "ref.jsonl", window="10s")
    s = simulator.Scenario(n_events=9000, rate_per_s=300, drift_at=4500, drift_size=0.8)
    simulator.write_streams(s, tmp_path / "p.jsonl", tmp_path / "l.jsonl")
    code = main(
        [
            "replay",
            "--predictions",
            str(tmp_path / "p.jsonl"),
            "--labels",
            str(tmp_path / "l.jsonl"),
            "--config",
            str(tmp_path / "m.toml"),
            "--alerts",
            str(tmp_path / "a.jsonl"),
            "--evaluations",
            str(tmp_path / "e.jsonl"),
            "--quiet",
        ]
    )
    assert code == 0 and "alert changes" in capsys.readouterr().err
    alerts = [orjson.loads(line) for line in (tmp_path / "a.jsonl").read_bytes().splitlines()]
    expected = replay_files(
        load_config(tmp_path / "m.toml"), tmp_path / "p.jsonl", tmp_path / "l.jsonl", progress=False
    ).alerts
    assert alerts and alerts == orjson.loads(
        orjson.dumps([a.to_json() for a in expected], option=orjson.OPT_SERIALIZE_NUMPY)
    )
    evaluations = [orjson.loads(line) for line in (tmp_path / "e.jsonl").read_bytes().splitlines()]
    buckets = {e["ts"] for e in evaluations}
    assert len(buckets) >= 9000 // 300  # one per second of predictions (labels run 2 s later)
    for e in evaluations:
        assert {
            "model",
            "variant",
            "check",
            "feature",
            "statistic",
            "value",
            "threshold",
        } <= e.keys()
        assert {"start_ts", "end_ts", "n"} <= e["window"].keys()
    cusum = [e for e in evaluations if e["feature"] == "f1" and e["statistic"] == "cusum"]
    assert len(cusum) == len(buckets) and cusum[-1]["value"] > cusum[-1]["threshold"]


def _correlation_break(per_bucket: int, bucket_ms: int, buckets: int, at: int):
    """A model of two features that move together in the reference, and a stream of
    ``per_bucket`` events a bucket in which they stop doing so from bucket ``at`` on; each
    keeps its own distribution, so the per-feature checks have nothing to see."""
    rng = np.random.default_rng(8)
    base = rng.standard_normal(5000)
    ref = ReferenceData({"a": base, "b": 0.95 * base + 0.31 * rng.standard_normal(5000)}, None)
    mon = Baseline(
        ModelSettings(name="m", bucket_ms=bucket_ms, window_ms=20_000, checks=("drift",)),
        ref,
        cache=FileCalibrationCache(),
    )
    events = []
    for b in range(buckets):
        a = rng.standard_normal(per_bucket)
        together = 0.95 * a + 0.31 * rng.standard_normal(per_bucket)
        apart = rng.standard_normal(per_bucket)  # same N(0, 1) marginal, no tie to a
        for j in range(per_bucket):
            events.append(
                {
                    "event_id": f"{b}-{j}",
                    "request_id": f"{b}-{j}",
                    "model": "m",
                    "version": "1",
                    "variant": "champion",
                    "ts": b * bucket_ms + j * bucket_ms // per_bucket,
                    "status": "ok",
                    "prediction": 0,
                    "features": {"a": float(a[j]), "b": float((apart if b >= at else together)[j])},
                }
            )
    return mon, events


def test_a_correlation_break_fires_only_the_joint_cusum():
    mon, events = _correlation_break(PER_BUCKET, 1000, 120, at=60)
    firing = [a for a in run(mon, events) if a["state"] == "firing"]
    assert firing and {a["statistic"] for a in firing} == {"cusum_joint"}
    assert 60_000 < firing[0]["ts"] <= 63_000


def test_the_joint_cusum_judges_low_traffic_in_steps_of_enough_events():
    """At 10 events a bucket, fewer than the 30 a column the joint CUSUM needs for a step,
    buckets are carried over until every column has them: the break is seen, and the
    stationary part before it stays silent."""
    mon, events = _correlation_break(10, 250, 480, at=240)
    firing = [a for a in run(mon, events) if a["state"] == "firing"]
    assert firing and {a["statistic"] for a in firing} == {"cusum_joint"}
    assert 60_000 < firing[0]["ts"] <= 90_000


def test_window_tests_run_once_a_second_and_their_verdict_holds_between(monitor):
    """With 250 ms buckets the CUSUMs run every bucket and the window tests once a second. A
    drift alert raised by a window test does not resolve on the CUSUM-only buckets in between
    (the CUSUMs are kept out of it here by a huge allowance: shift_to_detect_sd = 100; every
    bucket evaluated, however few its events: min_bucket_events = 0)."""
    from dataclasses import replace

    fine = Baseline(
        replace(monitor.settings, bucket_ms=250, shift_to_detect_sd=100.0, min_bucket_events=0),
        monitor.reference,
        cache=FileCalibrationCache(),  # the bucket size and allowance are not part of it
    )
    sketcher, evaluator = Sketcher({"m": fine}), Evaluator(fine)
    evaluations, alerts = [], []
    events = stream(50, shift_from=20, shift=0.5)
    for start in range(0, len(events), 500):
        assert sketcher.add_predictions(events[start : start + 500]) == []
        for p in sketcher.close():
            out = evaluator.add(p)
            evaluations += out.evaluations
            alerts += out.alerts
    ks_ts = {e.ts for e in evaluations if e.statistic == "ks"}
    cusum_ts = {e.ts for e in evaluations if e.statistic == "cusum"}
    assert ks_ts and all(ts % 1000 == 0 for ts in ks_ts)
    assert len(cusum_ts) > 3 * len(ks_ts)
    f0 = [a for a in alerts if a.feature == "f0"]
    assert [a.state for a in f0] == ["firing"] and f0[0].statistic in ("ks", "wasserstein")


def test_the_budget_is_split_over_exactly_the_alarming_statistics_evaluated(monitor):
    """The false-alarm budget's K (tests per evaluation) is the number of statistics with a
    threshold that a full evaluation (window tests included) actually produces: a statistic
    added to the judge without being counted would spend budget nobody gave it."""
    sketcher, evaluator = Sketcher({"m": monitor}), Evaluator(monitor)
    evaluations = []
    for p in sketcher.add_predictions(stream(25)) or sketcher.flush():
        evaluations += evaluator.add(p).evaluations
    last = max(e.ts for e in evaluations if e.statistic == "ks")
    alarming = [e for e in evaluations if e.ts == last and e.threshold is not None]
    assert {e.check for e in alarming} == {"drift", "prediction_drift", "missing_rate"}
    assert len(alarming) == monitor.tests  # one variant watched: the champion


def test_a_sparse_partial_is_evaluated_as_the_dense_and_sent_in_few_bytes(monitor):
    """A low-traffic bucket (4 events) fills few of its bins: the wire carries only those, and
    stage 2 evaluates the decoded partials exactly as the summaries they came from; a forged
    sparse array that does not fit is refused."""
    import msgspec

    from coalmine.partials import decode_partial, encode_partial

    events = stream(60)[::50]
    sketcher = Sketcher({"m": monitor})
    assert sketcher.add_predictions(events) == []
    [partial] = sketcher.close()
    [raw] = encode_partial(partial)
    [summary] = partial["buckets"]["7000"].values()
    dense_bytes = summary["counts"].nbytes + summary["sums"].nbytes + summary["latency"].nbytes
    assert len(raw) / len(partial["buckets"]) < dense_bytes / 2
    decoded = decode_partial(raw)
    [back] = decoded["buckets"]["7000"].values()
    for name in ("counts", "sums", "latency"):
        assert np.array_equal(back[name], summary[name]) and back[name].dtype == summary[name].dtype
    dense, sparse = Evaluator(monitor), Evaluator(monitor)
    expected = [e.to_json() for e in dense.add(partial).evaluations]
    assert [e.to_json() for e in sparse.add(decoded).evaluations] == expected and expected
    seven = np.array([7], dtype="<u4").tobytes()  # bin 7 of an array of 3
    forged = {"n": 1, "counts": [3, seven, np.ones(1, "<i8").tobytes()], "sums": bytes(24)}
    message = {"model": "m", "source": 0, "closed_through": 0, "buckets": {"0": {"a": forged}}}
    with pytest.raises(ValueError, match="does not fit"):
        decode_partial(msgspec.msgpack.encode(message))


def test_empty_buckets_are_evaluated_alike_however_the_partials_come(monitor):
    """A low-traffic model has buckets with no event. Stage 2 carries them into the next
    (fewer than ``min_bucket_events``), or evaluates them when told to judge every bucket (a
    window of 20 buckets spans 20 s), whether the partials came a bucket at a time, as a
    worker sends them, or all at once, as a replay's large chunk gives them; a gap longer than
    the window starts a fresh window both ways."""
    from dataclasses import replace

    events = [e for e in stream(80) if e["ts"] // 1000 % 4 != 1 and not 40 <= e["ts"] // 1000 < 65]
    every = Baseline(replace(monitor.settings, min_bucket_events=0), monitor.reference)

    def evaluated(baseline, batches):
        sketcher, evaluator, out = Sketcher({"m": baseline}), Evaluator(baseline), []
        for batch in batches:
            assert sketcher.add_predictions(batch) == []
            for p in sketcher.close():
                out += evaluator.add(p).evaluations
        for p in sketcher.flush():
            out += evaluator.add(p).evaluations
        return [e.to_json() for e in out]

    by_bucket = [[e for e in events if e["ts"] // 1000 == b] for b in range(80)]
    for baseline, empty_evaluated in ((every, True), (monitor, False)):
        one_at_a_time = evaluated(baseline, (b for b in by_bucket if b))
        at_once = evaluated(baseline, [events])
        assert one_at_a_time == at_once
        ends = sorted({e["ts"] // 1000 - 1 for e in at_once})  # the last bucket of each step
        assert {1, 5} & set(ends) == ({1, 5} if empty_evaluated else set())
        assert {2, 6} <= set(ends), "a bucket with events after an empty one is evaluated"
        assert not set(range(40, 65)) & set(ends), "the gap longer than the window is not"


@pytest.mark.parametrize("every, step_ms", [(20, 3000), (100, 5000)])
def test_a_low_traffic_model_is_judged_in_steps_of_enough_events(monitor, every, step_ms):
    """A bucket of fewer than ``min_bucket_events`` (30) events is carried into the next: at 10
    events a 1 s bucket stage 2 evaluates every third bucket; at 2, every fifth
    (``max_carry_ms``: a quarter of the 20 s window). Each window holds exactly the events of
    the span it names, and the end of the input evaluates the last buckets carried."""
    events = stream(41)[::every]
    sketcher, evaluator, evaluations = Sketcher({"m": monitor}), Evaluator(monitor), []
    for p in sketcher.add_predictions(events) + sketcher.flush():
        evaluations += evaluator.add(p).evaluations
    evaluations += evaluator.finish().evaluations
    ends = sorted({e.ts for e in evaluations})
    assert ends == [*range(step_ms, 41_000, step_ms), 41_000]  # the last: what was left carried
    ts = np.array([e["ts"] for e in events])
    for e in evaluations:
        span = e.window
        assert span.n == ((span.start_ts <= ts) & (ts < span.end_ts)).sum()
        assert span.end_ts == e.ts and e.ts - span.start_ts <= monitor.settings.window_ms
    assert "cusum" in {e.statistic for e in evaluations if e.ts == ends[-1]}


def test_partials_of_a_close_travel_in_few_messages_and_evaluate_as_sent_alone(monitor):
    """A worker sends the partials of a partials partition's models together: a few messages
    under the size limit, in order, that stage 2 evaluates as the partials one by one; a
    message of one partial, as sent before, still reads."""
    from coalmine.partials import decode_partial, decode_partials, encode_partial, encode_partials

    events = stream(40)
    partials = []
    for source in range(4):  # the events in four partitions: four sources of each bucket
        sketcher, mine = Sketcher({"m": monitor}, source=source), events[source::4]
        for start in range(0, len(mine), 100):  # a close every other bucket
            assert sketcher.add_predictions(mine[start : start + 100]) == []
            partials += sketcher.close()
    messages = encode_partials(partials, max_bytes=30_000)
    alone = [decode_partial(raw) for p in partials for raw in encode_partial(p, 30_000)]
    assert 1 < len(messages) < len(alone) / 4 and max(map(len, messages)) <= 30_000
    together = [p for raw in messages for p in decode_partials(raw)]
    assert [(p["source"], sorted(p["buckets"])) for p in together] == [
        (p["source"], sorted(p["buckets"])) for p in alone
    ]
    one, other = Evaluator(monitor, sources=4), Evaluator(monitor, sources=4)
    expected = [e.to_json() for p in alone for e in one.add(p).evaluations]
    assert [e.to_json() for p in together for e in other.add(p).evaluations] == expected
    assert len({e["ts"] for e in expected}) > 30
    [raw] = encode_partial(partials[0], 10**9)
    assert [p["closed_through"] for p in decode_partials(raw)] == [partials[0]["closed_through"]]


def test_a_partial_split_for_the_wire_is_evaluated_as_the_whole(monitor):
    """A source catching up closes many buckets at once; the partial is split into messages
    under the size limit, and stage 2, fed the parts in order, evaluates exactly as from the
    whole (no bucket is evaluated before all of it arrived)."""
    from coalmine.partials import decode_partial, encode_partial

    sketcher = Sketcher({"m": monitor})
    assert sketcher.add_predictions(stream(40)) == []
    [partial] = sketcher.close()
    parts = [decode_partial(raw) for raw in encode_partial(partial, max_bytes=10_000)]
    assert len(parts) > 4 and sum(len(p["buckets"]) for p in parts) == len(partial["buckets"])
    whole, split = Evaluator(monitor), Evaluator(monitor)
    expected = [e.to_json() for e in whole.add(partial).evaluations]
    got = [e.to_json() for p in parts for e in split.add(p).evaluations]
    assert got == expected and len({e["ts"] for e in got}) > 30
