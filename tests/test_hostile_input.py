"""Issue 12, "data lost or miscounted by one event": one hostile event costs itself only."""

from __future__ import annotations

import hashlib

import numpy as np
import orjson
import pytest

from coalmine import events
from coalmine.cache import FileCalibrationCache
from coalmine.ingest import PartitionIngest
from coalmine.streams import Baseline, Evaluator, ModelSettings, ReferenceData

T0 = 1_700_000_000_000


def baseline(name: str = "m", **settings) -> Baseline:
    rng = np.random.default_rng(1)
    ref = ReferenceData(
        {
            "f0": rng.standard_normal(5000),
            "prediction": rng.integers(0, 3, 5000).astype(float),
        },
        None,
    )
    checks = ("drift", "prediction_drift", "missing_rate")
    return Baseline(
        ModelSettings(name=name, bucket_ms=1000, window_ms=20_000, checks=checks, **settings),
        ref,
        cache=FileCalibrationCache(),  # the session's: the same fits serve every test here
    )


def event(i: int, ts: int, model: str = "m", f0=0.0, **fields) -> dict:
    return {
        "event_id": f"{model}-{i}",
        "request_id": f"{model}-{i}",
        "model": model,
        "version": "1",
        "variant": "champion",
        "ts": ts,
        "features": {"f0": f0},
        "prediction": i % 3,
        "status": "ok",
        **fields,
    }


def wire(evs) -> list[bytes]:
    return [orjson.dumps(e) for e in evs]


def counted(fed) -> int:
    return sum(fed.counts.values())


def test_a_dead_letter_of_a_600_kb_message_fits_and_says_where_the_whole_is():
    raw = b"\xff" + b"x" * 600_000
    letter = events.deadletter_record(raw, "not JSON: " + "y" * 5000, "t", 3, 17, 1)
    assert len(events.encode(letter)) < 200_000
    assert letter["original_size"] == len(raw)
    assert letter["original_sha256"] == hashlib.sha256(raw).hexdigest()
    assert (letter["partition"], letter["offset"]) == (3, 17)
    assert len(letter["reason"]) == events.MAX_REASON
    assert events.parse("deadletter", events.encode(letter)) == letter
    # a cut inside a character keeps the text of the whole characters before it
    text = events.deadletter_record("é".encode() * events.MAX_ORIGINAL, "r", "t", 0, 0, 1)[
        "original_text"
    ]
    assert text == "é" * (events.MAX_ORIGINAL // 2)


def test_a_huge_ts_is_against_the_contract_and_costs_only_itself():
    ingest = PartitionIngest({"m": baseline()})
    evs = [event(i, T0 + i) for i in range(300)]
    raws = wire(evs[:150]) + [orjson.dumps(event(999, 0)).replace(b'"ts":0', b'"ts":1e30')]
    raws += wire(evs[150:]) + [orjson.dumps(event(998, 2**60))]
    fed = ingest.feed("prediction", raws)
    assert counted(fed) == 300
    assert [(i, r.split(":")[0]) for i, r in fed.dead] == [(150, "ts"), (301, "ts")]


def test_a_far_future_event_is_dead_lettered_itself_and_later_events_are_not_late():
    ingest = PartitionIngest({"m": baseline()})
    evs = [event(i, T0 + i * 10) for i in range(1000)]
    year_2100 = 4_102_444_800_000
    fed = ingest.feed("prediction", wire(evs[:500] + [event(5000, year_2100)]))
    assert counted(fed) == 500 and fed.dead[0][1].startswith("outlier event: ts 4102444800000")
    fed = ingest.feed("prediction", wire(evs[500:]))
    assert counted(fed) == 500 and fed.dead == []


def test_live_an_event_ahead_of_the_wall_clock_is_dead_lettered_even_alone():
    now = T0 + 10_000
    ingest = PartitionIngest({"m": baseline(max_future_ms=60_000)}, clock=lambda: now)
    fed = ingest.feed("prediction", wire([event(1, now + 61_000)]))
    assert fed.dead and fed.dead[0][1].startswith("future event: ts")
    fed = ingest.feed("prediction", wire([event(2, now + 59_000), event(3, now)]))
    assert counted(fed) == 2 and fed.dead == []
    # replay (no clock) takes a lone batch as the stream having moved on
    assert counted(PartitionIngest({"m": baseline()}).feed("prediction", wire([event(1, T0)])))


def test_one_models_events_do_not_move_another_models_watermark():
    ingest = PartitionIngest({"m": baseline(), "n": baseline("n")})
    # model n's producer runs a minute ahead of model m's: none of m's events is late
    fed = ingest.feed("prediction", wire([event(i, T0 + 60_000 + i, "n") for i in range(100)]))
    ingest.close()
    fed = ingest.feed("prediction", wire([event(i, T0 + i * 10) for i in range(100)]))
    assert counted(fed) == 100 and fed.dead == []


def test_ts_zero_first_on_a_partition_opens_no_bucket_at_the_epoch():
    ingest = PartitionIngest({"m": baseline()})
    fed = ingest.feed("prediction", wire([event(0, 0)] + [event(i, T0 + i) for i in range(1, 50)]))
    assert counted(fed) == 49 and fed.dead[0][0] == 0
    assert fed.dead[0][1].startswith("outlier event: ts 0 ")
    assert all(int(b) >= T0 - 1000 for p in ingest.flush() for b in p["buckets"])


@pytest.mark.parametrize("value", [1e308, -1e308])
def test_extreme_values_keep_every_sum_finite_and_the_cusum_alive(value):
    b = baseline()
    ingest = PartitionIngest({"m": b})
    evaluator = Evaluator(b)
    evaluations = []
    for second in range(120):
        shift = 1.5 if second >= 80 else 0.0  # a real shift after the extreme values
        rng = np.random.default_rng(second)
        evs = [
            event(second * 100 + j, T0 + second * 1000 + j, f0=float(rng.normal() + shift))
            for j in range(100)
        ]
        if second in (10, 11):
            evs[5]["features"]["f0"] = value  # twice: 2e308 overflows a float
        assert ingest.feed("prediction", wire(evs)).dead == []
        for partial in ingest.close():
            for variants in partial["buckets"].values():
                for d in variants.values():
                    assert np.isfinite(np.asarray(d["sums"], dtype=float)).all()
            evaluations += evaluator.add(partial).evaluations
    assert all(np.isfinite(e.value) for e in evaluations)
    cusum = [
        e
        for e in evaluations
        if e.feature == "f0" and e.statistic.startswith("cusum") and e.exceeded
    ]
    assert any(e.ts > T0 + 80_000 for e in cusum), "the location CUSUM fires on the later shift"


def test_499_duplicates_count_once():
    ingest = PartitionIngest({"m": baseline()})
    evs = [event(i, T0 + i) for i in range(1000)]
    fed = ingest.feed("prediction", wire(evs[:600]))
    again = evs[101:600]  # 499 retries, some in the same batch as new events
    fed2 = ingest.feed("prediction", wire(again[:200] + evs[600:] + again[200:]))
    assert counted(fed) + counted(fed2) == 1000
    assert fed2.duplicates == {"m": 499} and fed2.dead == []
    partials = ingest.flush()
    assert sum(v["n"] for p in partials for b in p["buckets"].values() for v in b.values()) == 1000


def test_duplicates_are_remembered_within_a_bounded_horizon():
    ingest = PartitionIngest({"m": baseline(dedup_events=100)})
    for start in range(0, 1000, 10):
        ingest.feed("prediction", wire([event(i, T0 + i) for i in range(start, start + 10)]))
        assert len(ingest.sketcher.seen["m"]) <= 200


def test_numeric_strings_are_dead_lettered_on_both_decode_paths():
    ingest = PartitionIngest({"m": baseline()})
    bad = event(1, T0, f0="1.23")
    for raws in (wire([bad, event(2, T0)]), [orjson.dumps(bad, option=orjson.OPT_INDENT_2)]):
        fed = ingest.feed("prediction", raws)
        assert [r for _, r in fed.dead] == ["features.f0: expected a number for a numeric feature"]
    fed = ingest.fold_predictions([bad])  # events given as dicts: the same reason
    assert [r for _, r in fed.dead] == ["features.f0: expected a number for a numeric feature"]


def test_events_counted_exclude_those_then_dead_lettered_as_late():
    ingest = PartitionIngest({"m": baseline()})
    ingest.feed("prediction", wire([event(i, T0 + i * 100) for i in range(100)]))
    ingest.close()
    fed = ingest.feed("prediction", wire([event(1000, T0), event(1001, T0 + 10_000)]))
    assert counted(fed) == 1 and fed.late == 1


def test_the_label_join_is_bounded_and_counts_its_evictions():
    b = baseline(label_join_max=300)
    settings = b.settings
    b = Baseline(
        ModelSettings(**{**settings.__dict__, "checks": (*settings.checks, "performance")}),
        b.reference,
        cache=FileCalibrationCache(),
    )
    ingest = PartitionIngest({"m": b})
    ingest.feed("prediction", wire([event(i, T0 + i) for i in range(1000)]))
    ingest.close()
    sketcher = ingest.sketcher
    assert sum(map(len, sketcher.joins.values())) == 300 and sketcher.evicted == 700
    assert "m-999" in sketcher.joins["champion"] and "m-0" not in sketcher.joins["champion"]


def test_late_partials_are_counted():
    evaluator = Evaluator(baseline(), sources=2)
    empty = {"model": "m", "buckets": {}}
    evaluator.add({**empty, "source": 0, "closed_through": T0 + 5000, "buckets": {str(T0): {}}})
    evaluator.add({**empty, "source": 1, "closed_through": T0 + 5000})
    assert evaluator.late_partials == 0
    evaluator.add({**empty, "source": 1, "closed_through": T0 + 6000, "buckets": {str(T0): {}}})
    assert evaluator.late_partials == 1
