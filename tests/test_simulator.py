"""The traffic simulator: real Shuttle rows through a trained champion, drift where the scenario
says, labels late, malformed events at the configured rate; deterministic given the seed."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pytest

from coalmine import events as contract
from coalmine import simulator as sim
from coalmine.config import load_config

HELD_OUT_X, HELD_OUT_Y = (
    sim.load_shuttle()[0][sim.TRAIN_ROWS :],
    sim.load_shuttle()[1][sim.TRAIN_ROWS :],
)


def stream(**kw) -> list[tuple[str, dict | bytes]]:
    return list(sim.generate(sim.Scenario(**kw)))


def as_bytes(events) -> bytes:
    return b"\n".join(e if isinstance(e, bytes) else orjson.dumps(e) for _, e in events)


def feature(events, name: str) -> np.ndarray:
    return np.array([e["features"][name] for k, e in events if k == "prediction"])


# ---- data and models -----------------------------------------------------------------------------


def test_shuttle_loads_as_numeric_arrays_with_its_own_feature_names():
    X, y, names = sim.load_shuttle()
    assert X.shape == (49_097, 9) and X.dtype == np.float64 and len(y) == len(X)
    assert names == [f"f{i}" for i in range(1, 10)]
    assert set(np.unique(y)) == {0, 1} and 0.06 < y.mean() < 0.08


def test_champion_is_accurate_on_held_out_rows_and_finds_the_anomalies():
    pred = sim.trained_model().predict(HELD_OUT_X)
    assert (pred == HELD_OUT_Y).mean() > 0.99 > 1 - HELD_OUT_Y.mean()  # beats always answering 0
    assert pred[HELD_OUT_Y == 1].mean() > 0.9
    proba = sim.trained_model().predict_proba(HELD_OUT_X)
    assert np.array_equal(proba >= 0.5, pred == 1) and ((proba >= 0) & (proba <= 1)).all()


def test_variants_a_clearly_worse_canary_and_a_different_shadow_of_similar_accuracy():
    champion = sim.trained_model()
    accuracy = {
        kind: (champion.make_variant(kind).predict(HELD_OUT_X) == HELD_OUT_Y).mean()
        for kind in ("bad_canary", "shadow")
    }
    assert accuracy["bad_canary"] < 0.95 < 0.99 < accuracy["shadow"]
    shadow_pred = champion.make_variant("shadow").predict(HELD_OUT_X)
    assert 0.99 < (shadow_pred == champion.predict(HELD_OUT_X)).mean() < 1
    with pytest.raises(ValueError, match="kind"):
        champion.make_variant("great")


# ---- the stream ------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes():
    kw = dict(n_events=3000, drift_at=1000, error_rate=0.05, bad_event_every=50)
    assert as_bytes(stream(seed=3, **kw)) == as_bytes(stream(seed=3, **kw))
    assert as_bytes(stream(seed=3, **kw)) != as_bytes(stream(seed=4, **kw))


def test_chunked_building_changes_nothing(monkeypatch):
    kw = dict(n_events=2500, drift_at=700, error_rate=0.05, bad_event_every=7, seed=2)
    whole = as_bytes(stream(**kw))
    monkeypatch.setattr(sim, "CHUNK", 333)  # chunk edges fall between malformed events
    assert as_bytes(stream(**kw)) == whole


def test_events_come_in_event_time_order_a_label_after_its_prediction():
    events = stream(
        n_events=5000, rate_per_s=1000, label_delay_ms=1500, bad_event_every=100, seed=1
    )
    ts = [e["ts"] for _, e in events if isinstance(e, dict)]
    assert ts == sorted(ts)
    predicted_at = {
        e["request_id"]: (i, e["ts"])
        for i, (k, e) in enumerate(events)
        if k == "prediction" and isinstance(e, dict)
    }
    labels = [
        (i, e)
        for i, (k, e) in enumerate(events)
        if k == "label" and e["request_id"] in predicted_at
    ]
    assert labels
    for i, label in labels:
        position, ts = predicted_at[label["request_id"]]
        assert label["ts"] == ts + 1500 and i > position


def test_event_times_follow_the_rate_from_the_start():
    events = stream(n_events=1000, rate_per_s=250, start_ts_ms=10_000, label_fraction=0)
    assert [e["ts"] for _, e in events] == [10_000 + 4 * i for i in range(1000)]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_label_fraction_of_the_served_predictions_get_a_label(fraction):
    events = stream(n_events=20_000, label_fraction=fraction, error_rate=0.1, seed=5)
    served = {e["request_id"] for k, e in events if k == "prediction" and e["status"] == "ok"}
    failed = {e["request_id"] for k, e in events if k == "prediction" and e["status"] == "error"}
    labelled = [e["request_id"] for k, e in events if k == "label"]
    assert (
        len(labelled) == len(set(labelled))
        and set(labelled) <= served
        and not set(labelled) & failed
    )
    assert abs(len(labelled) / len(served) - fraction) < 0.015
    assert abs(len(failed) / 20_000 - 0.1) < 0.01


def test_labels_are_the_true_classes_of_the_rows_served():
    preds, truth = sim.predictions(sim.Scenario(n_events=5000, seed=8))
    labels = {
        e["request_id"]: e["label"]
        for k, e in stream(n_events=5000, seed=8, label_fraction=1.0)
        if k == "label"
    }
    assert [labels[e["request_id"]] for e in preds] == truth.tolist()
    assert (np.array([e["prediction"] for e in preds]) == truth).mean() > 0.98


# ---- drift ---------------------------------------------------------------------------------------


def test_shift_moves_the_feature_mean_by_its_size_in_reference_sds_from_drift_at_on():
    n, at, size = 40_000, 20_000, 0.5
    f1 = feature(stream(n_events=n, drift_at=at, drift_feature="f1", drift_size=size, seed=6), "f1")
    mean, sd = HELD_OUT_X[:, 0].mean(), HELD_OUT_X[:, 0].std()
    assert abs(f1[:at].mean() - mean) / sd < 0.03  # no drift before
    assert abs((f1[at:].mean() - mean) / sd - size) < 0.03
    # the other features are untouched: a shorter stream shows it, over a chunk's edge
    untouched = sim.Scenario(n_events=sim.CHUNK + 2000, seed=6)
    assert np.array_equal(
        feature(stream(**vars(untouched)), "f5"),
        feature(stream(**{**vars(untouched), "drift_at": 1000, "drift_feature": "f1"}), "f5"),
    )


def test_scale_stretches_the_feature_about_its_mean_and_drift_until_ends_it():
    f9 = feature(
        stream(
            n_events=30_000,
            drift_at=10_000,
            drift_until=20_000,
            drift_feature="f9",
            drift_kind="scale",
            drift_size=2.0,
            seed=7,
        ),
        "f9",
    )
    sd = HELD_OUT_X[:, 8].std()
    assert abs(f9[:10_000].std() / sd - 1) < 0.05 and abs(f9[20_000:].std() / sd - 1) < 0.05
    assert abs(f9[10_000:20_000].std() / sd - 2) < 0.1


def test_class_mix_multiplies_the_share_of_anomalies_and_prediction_drift_follows():
    preds, truth = sim.predictions(
        sim.Scenario(
            n_events=40_000, drift_at=20_000, drift_kind="class_mix", drift_size=3.0, seed=9
        )
    )
    base = HELD_OUT_Y.mean()
    assert (
        abs(truth[:20_000].mean() - base) < 0.01 and abs(truth[20_000:].mean() - 3 * base) < 0.015
    )
    predicted = np.array([e["prediction"] for e in preds])
    assert predicted[20_000:].mean() > 2.5 * predicted[:20_000].mean()


def test_drift_is_applied_before_the_model_predicts():
    preds, _ = sim.predictions(
        sim.Scenario(n_events=20_000, drift_at=10_000, drift_feature="f1", drift_size=3.0, seed=10)
    )
    X = np.array([[e["features"][f] for f in sim.load_shuttle()[2]] for e in preds])
    assert [e["prediction"] for e in preds] == sim.trained_model().predict(X).tolist()
    predicted = np.array([e["prediction"] for e in preds])
    assert abs(predicted[10_000:].mean() - predicted[:10_000].mean()) > 0.05


def test_an_unknown_drift_kind_is_refused_up_front():
    with pytest.raises(ValueError, match="drift_kind"):
        sim.generate(sim.Scenario(drift_at=10, drift_kind="tilt"))


# ---- the contract --------------------------------------------------------------------------------


def test_every_valid_event_passes_the_contract_checks():
    events = stream(n_events=6000, drift_at=3000, error_rate=0.05, bad_event_every=40, seed=11)
    kinds = {"prediction": contract.parse_prediction, "label": contract.parse_label}
    valid = [(k, e) for k, e in events if isinstance(e, dict)]
    for kind, e in valid:
        assert kinds[kind](orjson.dumps(e)) == e
    predictions = [e for k, e in valid if k == "prediction"]
    assert len({e["event_id"] for e in predictions}) == len(predictions)
    assert {e["variant"] for e in predictions} == {"champion"} and {
        e["status"] for e in predictions
    } == {"ok", "error"}
    assert all(type(v) is float for e in predictions for v in e["features"].values())
    assert all(
        e["prediction"] in (0, 1) and abs(sum(e["scores"].values()) - 1) < 1e-3
        for e in predictions
        if e["status"] == "ok"
    )


def test_malformed_events_come_at_the_configured_rate_with_a_mix_of_defects():
    events = stream(n_events=4000, bad_event_every=50, seed=12)
    predictions = [e for k, e in events if k == "prediction"]
    bad = [e for e in predictions if isinstance(e, bytes)]
    assert len(predictions) == 4000 and len(bad) == 4000 // 50
    assert all(isinstance(e, bytes) == (i % 50 == 49) for i, e in enumerate(predictions))
    reasons = []
    for raw in bad:
        with pytest.raises(contract.InvalidEvent) as err:
            contract.parse_prediction(raw)
        reasons.append(err.value.reason.split(":")[0])
    assert {r: reasons.count(r) for r in set(reasons)} == {
        "not JSON": 20,
        "missing field": 20,
        "variant": 20,
        "features.f2": 20,
    }


# ---- files ---------------------------------------------------------------------------------------


def test_reference_is_an_undrifted_labelled_sample_of_the_held_out_rows(tmp_path):
    assert sim.write_reference(tmp_path / "ref.jsonl", n=4000, seed=1) == 4000
    rows = [orjson.loads(line) for line in (tmp_path / "ref.jsonl").read_bytes().splitlines()]
    assert len(rows) == 4000 and all(r["status"] == "ok" and r["label"] in (0, 1) for r in rows)
    f1 = np.array([r["features"]["f1"] for r in rows])
    assert abs(f1.mean() - HELD_OUT_X[:, 0].mean()) / HELD_OUT_X[:, 0].std() < 0.05
    sim.write_reference(tmp_path / "again.jsonl", n=4000, seed=1)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_write_jsonl_writes_dicts_as_json_and_bytes_as_they_are(tmp_path):
    assert sim.write_jsonl(tmp_path / "e.jsonl", [{"a": 1.5}, b"{not json"]) == 2
    assert (tmp_path / "e.jsonl").read_bytes() == b'{"a":1.5}\n{not json\n'


def test_demo_config_loads_and_finds_its_reference_from_anywhere(tmp_path, monkeypatch):
    (tmp_path / "refs").mkdir()
    sim.write_reference(tmp_path / "refs" / "reference.jsonl", n=500)
    monkeypatch.chdir(tmp_path)
    sim.write_demo_config(
        tmp_path / "monitor.toml", "refs/reference.jsonl", bucket="2s", window="30s"
    )
    text = (tmp_path / "monitor.toml").read_text()
    assert 'reference = "refs/reference.jsonl"' in text and 'bucket = "2s"' in text
    monkeypatch.chdir("/")
    config = load_config(tmp_path / "monitor.toml")
    [model] = config.models.values()
    assert model.name == "shuttle" and model.reference.resolve() == (
        tmp_path / "refs" / "reference.jsonl"
    )
    assert {"drift", "prediction_drift", "performance"} <= set(model.checks)


# ---- publishing ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_publish_paces_event_time_to_the_wall_clock(namespace):
    # 3 s of event time at speed 4: about 0.75 s of wall clock
    events = stream(
        n_events=600,
        rate_per_s=200,
        label_delay_ms=500,
        bad_event_every=100,
        start_ts_ms=int(time.time() * 1000),
        seed=13,
    )
    acknowledged = []
    started = time.monotonic()
    targets = {"prediction": namespace.topic["predictions"], "label": namespace.topic["labels"]}
    counts = asyncio.run(
        sim.publish(
            namespace.broker.bootstrap,
            events,
            realtime=True,
            speed=4.0,
            progress=acknowledged.append,
            targets=targets,
        )
    )
    elapsed = time.monotonic() - started
    n_labels = sum(k == "label" for k, _ in events)
    assert counts == {"prediction": 600, "label": n_labels} and sum(acknowledged) == 600 + n_labels
    assert 0.6 < elapsed < 5
    got = namespace.read("predictions")
    assert len(got) == 600 and sum("_raw" in r for r in got) == 2  # '{not json': events 99 and 499
    assert len(namespace.read("labels")) == n_labels
