"""Stage 1's label join: where a label counts does not depend on the order labels and
predictions are read in (issue 13), and the join table is bounded (issue 12)."""

from __future__ import annotations

from collections import Counter
from functools import cache

import numpy as np
import orjson

from coalmine.ingest import PartitionIngest
from coalmine.streams import Baseline, ModelSettings, ReferenceData

T0 = 1_700_000_000_000
STEP_MS = 50  # between predictions: 20 a one-second bucket


@cache
def performance_baseline(**settings) -> Baseline:
    rng = np.random.default_rng(1)
    ref = ReferenceData(
        {"f0": rng.standard_normal(2000), "prediction": rng.integers(0, 3, 2000).astype(float)},
        rng.integers(0, 3, 2000).astype(float),
    )
    checks = ("performance",)
    return Baseline(
        ModelSettings(name="m", bucket_ms=1000, window_ms=20_000, checks=checks, **settings), ref
    )


def prediction(i: int, ts: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"p{i}",
            "request_id": f"r{i}",
            "model": "m",
            "version": "1",
            "variant": "champion",
            "ts": ts,
            "features": {"f0": 0.1},
            "prediction": i % 3,
            "status": "ok",
        }
    )


def label(i: int, ts: int) -> bytes:
    truth = i % 3 if i % 4 else (i + 1) % 3  # a quarter wrong
    return orjson.dumps(
        {"event_id": f"l{i}", "request_id": f"r{i}", "model": "m", "ts": ts, "label": truth}
    )


def stream(n: int = 600, delay_ms: int = 1500) -> list[tuple[int, str, bytes]]:
    """(ts, kind, message): a prediction every STEP_MS, its label ``delay_ms`` later."""
    out = []
    for i in range(n):
        ts = T0 + i * STEP_MS
        out += [(ts, "prediction", prediction(i, ts)), (ts + delay_ms, "label", label(i, ts))]
    return sorted(out, key=lambda e: (e[0], e[1] == "label"))


def labelled_by_bucket(partials: list[dict]) -> Counter:
    """(bucket, labelled, label errors) of every bucket with labels, as partials say."""
    out: Counter = Counter()
    for p in partials:
        for start, variants in p["buckets"].items():
            s = variants["champion"]
            if s["labelled"]:
                out[int(start)] += s["labelled"] + 1000 * s["label_errors"]
    return out


def test_labels_read_behind_their_predictions_count_in_the_buckets_of_event_time_order():
    events = stream()
    # file replay: predictions and labels merged by event time, a chunk at a time
    replay, partials = PartitionIngest({"m": performance_baseline()}), []
    for start in range(0, len(events), 100):
        for kind in ("prediction", "label"):
            replay.feed(kind, [m for _, k, m in events[start : start + 100] if k == kind])
        partials += replay.close()
    expected = labelled_by_bucket(partials + replay.flush())
    # a worker whose labels topic is read a long way behind its predictions topic
    live = PartitionIngest({"m": performance_baseline()}, wait_for_labels=True)
    live.feed("prediction", [m for _, k, m in events if k == "prediction"])
    assert not [p for p in live.close() if p["buckets"]], "buckets wait for their labels"
    labels, partials = [m for _, k, m in events if k == "label"], []
    for start in range(0, len(labels), 100):
        live.feed("label", labels[start : start + 100])
        partials += live.close()
    live.sketcher.labels_caught_up()
    partials += live.close()
    assert sum(expected.values()) and labelled_by_bucket(partials + live.flush()) == expected
    assert not live.sketcher.late_labels


def test_a_label_read_after_its_bucket_closed_counts_late():
    ingest = PartitionIngest({"m": performance_baseline()})
    ingest.feed("prediction", [prediction(i, T0 + i * STEP_MS) for i in range(200)])
    ingest.close()  # the watermark passed the first predictions' buckets
    ingest.feed("label", [label(0, T0)])
    assert ingest.sketcher.late_labels == {"m": 1}


def test_a_label_is_held_for_commit_by_the_bucket_it_counted_in():
    """A label dated before its prediction counts in the prediction's bucket: its offset
    waits for that bucket to close, not its own."""
    ingest = PartitionIngest({"m": performance_baseline()}, wait_for_labels=True)
    ingest.feed("prediction", [prediction(0, T0 + 5000)], offsets=[0])
    ingest.feed("label", [label(0, T0)], offsets=[0])
    ingest.feed("prediction", [prediction(1, T0 + 7500)], offsets=[1])
    ingest.sketcher.labels_caught_up()
    ingest.close()  # closed through T0 + 5000: the label's own bucket, not its prediction's
    assert ingest.committable() == {"prediction": 0, "label": 0}
