"""Stage 2's state records: an evaluator written mid-stream and read back by a new owner goes
on exactly as the one that never stopped."""

import pickle

import numpy as np
import pytest

from coalmine.agents import state as state_module
from coalmine.agents.state import (
    ModelState,
    _dumps_summaries,
    join_records_of,
    join_state,
    key,
    restore,
)
from coalmine.streams import Evaluator, Sketcher, Summary
from tests.test_monitor import _correlation_break, monitor, stream  # noqa: F401 (the fixture)


def compacted(records: list[tuple[bytes, bytes | None]]) -> dict[bytes, bytes]:
    """What a compacted topic keeps: the latest value per key, deletions dropped."""
    latest: dict[bytes, bytes | None] = {}
    for k, v in records:
        latest[k] = v
    return {k: v for k, v in latest.items() if v is not None}


def partials_of(baseline, events, chunk=500):
    sketcher = Sketcher({"m": baseline})
    out = []
    for start in range(0, len(events), chunk):
        assert sketcher.add_predictions(events[start : start + chunk]) == []
        out += sketcher.close()
    return out + sketcher.flush()


def test_a_restored_evaluator_goes_on_as_the_one_that_never_stopped(monitor):  # noqa: F811
    assert_restored_goes_on(monitor, partials_of(monitor, stream(120, shift_from=60, shift=0.5)))


def test_a_restart_keeps_the_joint_cusums_buckets_carried_over():
    """At 10 events a bucket the joint CUSUM carries buckets into its next step: a restart
    between two steps resumes with them, and the alerts are those of the run that never
    stopped."""
    mon, events = _correlation_break(10, 250, 480, at=240)
    assert_restored_goes_on(mon, partials_of(mon, events, chunk=100))


def test_a_restart_keeps_the_buckets_carried_for_too_few_events(monitor):  # noqa: F811
    """At 20 events a bucket stage 2 evaluates two buckets at a time (min_bucket_events = 30):
    a restart after the first of two resumes with it carried."""
    events = stream(120, shift_from=60, shift=0.5)[::10]
    assert_restored_goes_on(monitor, partials_of(monitor, events, chunk=50), mid_carry=True)


def test_a_head_written_while_the_carry_was_kept_merged_still_restores(monitor):  # noqa: F811
    """A state head written by an earlier version, which kept the buckets carried merged into
    one, resumes with that bucket carried, as the run that never stopped."""
    events = stream(120, shift_from=60, shift=0.5)[::10]
    partials = partials_of(monitor, events, chunk=50)
    assert_restored_goes_on(monitor, partials, mid_carry=True, merged_carry=True)


def assert_restored_goes_on(monitor, partials, mid_carry=False, merged_carry=False):  # noqa: F811
    assert len(partials) > 20
    whole, first = Evaluator(monitor), Evaluator(monitor)
    expected = [whole.add(dict(p)) for p in partials]
    state, topic = ModelState(), []
    half = len(partials) // 2
    for p in partials[:half]:
        first.add(dict(p))
        topic += state.records("m", first)  # written after every batch
    assert first.carried or not mid_carry
    if merged_carry:  # a head as written before 2026-12-01: the carry one merged bucket
        first.carried = first._merged(first.carried)  # type: ignore[assignment]
        with pytest.MonkeyPatch.context() as patch:
            waiting = lambda e: [*e.pending.values(), e.carried.variants]  # noqa: E731
            patch.setattr(state_module, "_waiting", waiting)
            topic += state.records("m", first)
    restored, _ = restore(compacted(topic), monitor, None)
    got = [restored.add(dict(p)) for p in partials[half - 3 :]]  # re-delivered ones: merged once
    evaluations = [e.to_json() for out in got for e in out.evaluations]
    assert evaluations == [e.to_json() for out in expected[half:] for e in out.evaluations]
    assert [a.alert_id for out in got for a in out.alerts] == [
        a.alert_id for out in expected[half:] for a in out.alerts
    ]
    assert any(out.alerts for out in expected[half:]), "the drift fires after the restart"


def test_buckets_are_written_once_and_deleted_when_they_leave_the_window(monitor):  # noqa: F811
    evaluator, state, topic = Evaluator(monitor), ModelState(), []
    for p in partials_of(monitor, stream(60)):
        evaluator.add(dict(p))
        topic += state.records("m", evaluator)
    buckets = [k for k, _ in topic if k.startswith(key("m", b"b"))]
    live = [k for k in compacted(topic) if k.startswith(key("m", b"b"))]
    assert len(live) == monitor.settings.window_buckets
    # each bucket written once, and deleted once: no rewrites without a version change
    assert len(buckets) == 2 * 60 - len(live)


def test_bucket_records_are_compact_and_those_pickled_before_still_read(monitor):  # noqa: F811
    """A low-traffic model's bucket fills a few bins: its record holds those, not the dense
    arrays; a record pickled by an earlier version still restores the same window."""
    evaluator, state, topic = Evaluator(monitor), ModelState(), []
    for p in partials_of(monitor, stream(60)[::400]):  # an event every 2 s, carried 5 s at a time
        evaluator.add(dict(p))
        topic += state.records("m", evaluator)
    records = compacted(topic)
    buckets = {k: v for k, v in records.items() if k.startswith(key("m", b"b"))}
    assert len(buckets) == len(evaluator.window.buckets) == 4
    assert max(map(len, buckets.values())) < 8 * monitor.layout.size  # one dense counts array
    earlier = dict(records)
    for b in evaluator.window.buckets:
        summaries = {v: packed.unpack() for v, packed in b.variants.items()}
        earlier[key("m", b"b%d" % b.start)] = pickle.dumps((b.start, summaries), protocol=4)
    for written in (records, earlier):
        restored, _ = restore(written, monitor, None)
        for got, want in zip(restored.window.buckets, evaluator.window.buckets, strict=True):
            assert got.start == want.start and got.variants.keys() == want.variants.keys()
            for variant, summary in want.variants.items():
                assert repr(got.variants[variant].unpack().to_dict()) == repr(
                    summary.unpack().to_dict()
                )


def test_a_backlogs_pending_buckets_are_written_compact_and_restore_exactly(monitor):  # noqa: F811
    """A source catching up sends many buckets that wait for another source: the head holds
    them in the partials' compact form (each a few events, not the dense arrays), and the
    restored evaluator evaluates them exactly as the one that never stopped."""
    partials = partials_of(monitor, stream(60)[::50])  # 4 events a bucket
    whole = Evaluator(monitor, sources=2)
    for p in partials:
        whole.add(dict(p))  # source 0 only: every bucket waits for source 1
    assert len(whole.pending) >= 50
    head = compacted(ModelState().records("m", whole))[key("m", b"head")]
    # under one dense counts array a bucket (before: ~2,500 bytes a bucket, 148,124 in all)
    assert len(head) < 8 * monitor.layout.size * len(whole.pending)
    restored, _ = restore({key("m", b"head"): head}, monitor, None)
    for start, variants in whole.pending.items():
        for variant, summary in variants.items():
            got = restored.pending[start][variant].to_dict()
            assert repr(got) == repr(summary.to_dict())
    other = [dict(p, source=1) for p in partials_of(monitor, stream(60)[1::50])]
    expected = [e.to_json() for p in other for e in whole.add(dict(p)).evaluations]
    assert expected, "the other source's partials complete the buckets"
    assert [e.to_json() for p in other for e in restored.add(dict(p)).evaluations] == expected


def test_the_head_holds_the_evaluators_state_not_its_baselines_columns(monitor):  # noqa: F811
    """Each evaluation rewrites a model's head: the columns a check watches follow from the
    baseline (written by name) and are derived again on restore, not pickled with it."""
    evaluator, state = Evaluator(monitor), ModelState()
    for p in partials_of(monitor, stream(30)):
        evaluator.add(dict(p))
    records = compacted(state.records("m", evaluator))
    assert b"ColumnModel" not in records[key("m", b"head")]
    restored, _ = restore(records, monitor, None)
    assert restored.drift.watched == evaluator.drift.watched


def test_a_forged_state_record_cannot_run_code(monitor):  # noqa: F811
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    forged = {key("m", b"head"): pickle.dumps(Evil())}
    with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system"):
        restore(forged, monitor, None)


def test_a_label_join_write_sends_only_what_changed_and_reads_back_whole():
    """A join that grew rewrites its newest record only (the compacted topic keeps the
    others); one that shrank tombstones the records beyond it; a reader of the topic's latest
    records gets the join as last written."""
    topic: dict[bytes, bytes] = {}

    def write(records, written):
        out, hashes = join_state(3, records, written)
        for k, v in out:
            if v is None:
                topic.pop(k, None)
            else:
                topic[k] = v
        return out, hashes

    first, written = write([b"a", b"b"], [])
    assert [v for _, v in first] == [b"a", b"b"]
    grown, written = write([b"a", b"b2", b"c"], written)
    assert [v for _, v in grown] == [b"b2", b"c"]
    shrunk, written = write([b"x"], written)
    assert [v for _, v in shrunk] == [b"x", None, None]
    assert join_records_of(topic, 3) == ([], [b"x"]) and join_records_of(topic, 4) == ([], [])


def test_a_state_record_whose_summaries_do_not_fit_is_refused(monitor):  # noqa: F811
    """A forged record, a bucket of 3 bins or a head whose window sum is 3 bins, is refused
    (the worker dead-letters the state and the model starts afresh) instead of restored into
    a window it would fail or skew at every bucket."""
    evaluator = Evaluator(monitor)
    for p in partials_of(monitor, stream(60)):
        evaluator.add(dict(p))
    records = compacted(ModelState().records("m", evaluator))
    assert restore(records, monitor, None) is not None  # the real ones read
    columns = len(monitor.layout.names)
    small = Summary(1, np.array([1, 0, 0]), np.zeros(3), np.zeros(columns, dtype=np.int64))
    start = evaluator.window.buckets[-1].start
    forged_bucket = {**records, key("m", b"b%d" % start): _dumps_summaries({"champion": small})}
    evaluator.window.sums["champion"] = small
    forged_head = compacted(ModelState().records("m", evaluator))
    for forged in (forged_bucket, forged_head):
        with pytest.raises(ValueError, match="a summary of 3 bins.* does not fit 'm'"):
            restore(forged, monitor, None)
