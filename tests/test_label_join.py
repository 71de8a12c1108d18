"""Stage 1's label join: where a label counts does not depend on the order labels and
predictions are read in (issue 13), and the join table is bounded (issue 12)."""

from __future__ import annotations

from collections import Counter
from functools import cache

import numpy as np
import orjson
import pytest

from coalmine.agents import state
from coalmine.ingest import PartitionIngest
from coalmine.streams import Baseline, ModelSettings, ReferenceData, label_join
from coalmine.streams.label_join import JoinTable, read_record, request_keys

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
        out += [(ts, "prediction", prediction(i, ts))]
        out += [(ts + delay_ms, "label", label(i, ts + delay_ms))]
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


def test_a_late_prediction_is_dead_lettered_while_its_buckets_wait_for_the_labels():
    """Waiting for the labels side holds buckets open, not the predictions' watermark: an
    event later than the allowed lateness is late, as file replay (which does not wait) says,
    not folded into a bucket stage 2 has long evaluated."""
    events = [prediction(i, T0 + i * STEP_MS) for i in range(200)]
    late = [prediction(1000, T0 - 7_200_000), prediction(1001, 0)]  # two hours back; 1970
    for live in (False, True):
        ingest = PartitionIngest({"m": performance_baseline()}, wait_for_labels=live)
        ingest.feed("prediction", events)
        ingest.close()
        fed = ingest.feed("prediction", late)
        assert [reason.split(":")[0] for _, reason in fed.dead] == ["late event"] * 2, live


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


def test_request_keys_are_stable_and_do_not_depend_on_the_batch():
    ids = ["r1", "a-much-longer-request-id-0123456789", "é☃", "x" * 500]
    keys = request_keys(ids).tolist()
    assert keys == [request_keys([i])[0] for i in ids] == request_keys(ids[::-1]).tolist()[::-1]
    assert len(set(keys)) == 4 and len(set(request_keys([f"r{i}" for i in range(10**5)]))) == 10**5
    assert keys[0] == 0x6C8E37EB25FBA26A  # the same in every process: a state topic reads it back


def test_answers_come_out_of_the_table_as_they_went_in():
    table = JoinTable(["m", "n"], capacity=4)
    predictions = [1, 2.5, "cat", True, None, 2**60, -0.0, 7]
    latency = np.array([1.5, np.nan, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    keys = request_keys([f"r{i}" for i in range(8)])
    scores = np.array([0.25, np.nan, 0.5, 0.75, 1.0, 0.0, 0.1, 0.9])  # NaN: none
    table.add("n", keys, np.arange(8) + T0, latency, predictions, scores)
    # through state records (3 answers each) to a table whose models are in another order
    restored = JoinTable(["n", "m"])
    for record in table.dump("champion", 3):
        restored.load(*read_record(record))
    assert restored.pop_many(keys) == table.pop_many(keys[::-1])[::-1]
    table.add("n", keys, np.arange(8) + T0, latency, predictions, scores)
    answers = table.pop_many(np.concatenate([keys, keys[:1]]))
    assert answers[-1] is None  # a key repeated: taken once
    answers = answers[:-1]
    assert [(a.model, a.prediction, type(a.prediction), a.ts) for a in answers] == [
        ("n", p, type(p), T0 + i) for i, p in enumerate(predictions)
    ]
    assert [a.latency for a in answers[:3]] == [1.5, None, 3.0]
    assert [a.score for a in answers[:3]] == [0.25, None, 0.5]
    assert len(table) == 0 and table.pop_many(keys[:1]) == [None]


def test_the_table_drops_its_oldest_first_and_keeps_the_rest_findable():
    table, n = JoinTable(["m"], capacity=8), 1000
    keys = request_keys([f"r{i}" for i in range(n)])
    for start in range(0, n, 100):  # grows and compacts as it fills
        span = slice(start, start + 100)
        table.add("m", keys[span], T0 + np.arange(n)[span], np.zeros(100), list(range(100)))
        assert None not in table.pop_many(keys[span][::2])  # every other one labelled
    assert len(table) == 500
    assert table.expire({"m": T0 + 301}) == 150  # odd ones up to 299
    assert table.evict(100) == 100 and len(table) == 250
    # 301 to 499 evicted, the even ones labelled
    assert [a is not None for a in table.pop_many(keys[499:503])] == [False, False, True, False]
    assert table.nbytes() > 250 * 8


def test_the_label_join_is_bounded_evictions_are_counted_and_joined_labels_still_score():
    b = performance_baseline(label_join_max=300)
    ingest = PartitionIngest({"m": b})
    ingest.feed("prediction", [prediction(i, T0 + i) for i in range(1000)])
    ingest.close()
    sketcher = ingest.sketcher
    assert len(sketcher.joins["champion"]) == 300 and sketcher.evicted == 700
    ingest.feed("label", [label(i, T0 + 1000) for i in (0, 699, 700, 999)])
    partials = ingest.flush()
    labelled = sum(p["buckets"][b]["champion"]["labelled"] for p in partials for b in p["buckets"])
    assert labelled == 2 and sketcher.expired_unjoined_labels + len(sketcher.early_labels) == 2


def test_a_table_written_by_chunks_sends_only_the_chunks_that_changed(monkeypatch):
    monkeypatch.setattr(label_join, "CHUNK_ROWS", 100)
    table, topic = JoinTable(["m"], capacity=8), {}
    keys = request_keys([f"r{i}" for i in range(1000)])

    def write() -> list[int]:
        """Write the changed chunks to a compacted topic; which were written."""
        records = table.chunk_records("champion")
        table.saved()
        for chunk, record in records:
            topic[chunk] = record
        return [chunk for chunk, _ in records]

    def add(span: slice) -> None:
        n = len(keys[span])
        table.add("m", keys[span], T0 + np.arange(1000)[span], np.zeros(n), list(range(n)))

    for start in range(0, 1000, 50):
        add(slice(start, start + 50))
        assert write() == [start // 100]  # the newest chunk only
    table.pop_many(keys[[5, 250, 260]])
    assert write() == [0, 2]
    assert table.expire({"m": T0 + 420}) == 417
    assert write() == [0, 1, 2, 3, 4] and [topic[c] for c in range(4)] == [None] * 4
    add(slice(600, 601))  # answered again: the last answer counts
    assert write() == [6, 10] and write() == []
    restored = JoinTable(["m"])
    for chunk in sorted(c for c, record in topic.items() if record is not None):
        restored.load(*read_record(topic[chunk]))
    assert len(restored) == len(table) == 580
    assert restored.pop_many(keys) == table.pop_many(keys)


@pytest.mark.parametrize("written", ["at the stop", "by chunks after every batch"])
def test_a_new_owner_given_the_label_join_counts_every_label_as_an_uninterrupted_run(
    written, monkeypatch
):
    """A partition's stage 1 stops after a commit; a new owner restores the label join from
    its state records and reads again from the committed offsets: the buckets the old owner
    closed and those the new one closes count the labels of one uninterrupted run. The
    records are written at the stop, or as a worker writes them: after every batch, the
    chunks of the tables that changed and the rest whole, to a compacted topic."""
    monkeypatch.setattr(label_join, "CHUNK_ROWS", 16)
    events = stream(600, delay_ms=5000)
    events += [(T0 + 12_000 + i, "label", label(1000 + i, T0 + 12_000 + i)) for i in range(30)]
    events += [
        (T0 + 16_000 + i, "prediction", prediction(1000 + i, T0 + 16_000 + i)) for i in range(30)
    ]
    events.sort(key=lambda e: e[0])
    messages = {kind: [m for _, k, m in events if k == kind] for kind in ("prediction", "label")}

    topic: dict[bytes, bytes | None] = {}
    hashes: list[int] = []

    def save(sketcher) -> None:
        nonlocal hashes
        rest, hashes = state.join_state(0, sketcher.join_records(rows=40, waiting=False), hashes)
        topic.update(state.join_chunks(0, sketcher.joins) + rest)
        for table in sketcher.joins.values():
            table.saved()

    def run(ingest, stop: float, start: dict | None = None) -> list[dict]:
        """Feed the messages read before event time ``stop``, from offsets ``start``."""
        partials, at = [], dict(start or {"prediction": 0, "label": 0})
        for ts in range(T0, T0 + 30_000, 500):
            if ts >= stop:
                break
            for kind, sent in messages.items():
                stop_at = sum(1 for t, k, _ in events if k == kind and t < ts + 500)
                if stop_at > at[kind]:
                    ingest.feed(kind, sent[at[kind] : stop_at], list(range(at[kind], stop_at)))
                    at[kind] = stop_at
            partials += ingest.close()
            if written != "at the stop":
                save(ingest.sketcher)
        return partials

    uninterrupted = PartitionIngest({"m": performance_baseline()})
    whole = labelled_by_bucket(run(uninterrupted, 1e20) + uninterrupted.flush())
    old = PartitionIngest({"m": performance_baseline()})
    closed = labelled_by_bucket(run(old, T0 + 14_000))
    committed, records = old.committable(), old.sketcher.join_records(rows=40)
    assert len(records) > 3 and old.sketcher.joined and old.sketcher.early_labels
    if written != "at the stop":
        chunks, rest = state.join_records_of({k: v for k, v in topic.items() if v}, 0)
        assert len(chunks) > 3 and len(topic) > len(chunks) + len(rest), "some tombstoned"
        records = chunks + rest
    new = PartitionIngest({"m": performance_baseline()})
    new.sketcher.restore_joins(records)
    after = labelled_by_bucket(run(new, 1e20, committed) + new.flush())
    assert sum(whole.values()) > 20_000 and closed + after == whole
