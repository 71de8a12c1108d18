"""Stage 2 never evaluates a window without a source partition whose stage 1 is catching up:
stage 1 says which partitions are behind (heartbeats on the partials topic), and stage 2 does
not release a source as idle while its last word was "behind", however long it is silent."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka.structs import TopicPartition

from coalmine import topics
from coalmine.agents import stage1 as stage1_module
from coalmine.agents.app import IDLE_SOURCE_S, Sources
from coalmine.agents.stage1 import Stage1
from coalmine.partials import decode_partial, encode_heartbeat, is_heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_source_behind_is_never_idle_and_one_caught_up_is_after_its_silence():
    clock = Clock()
    sources = Sources(partitions=3, clock=clock)
    sources.resume("m")
    sources.hear(decode_partial(encode_heartbeat("m", 0, True)))
    sources.hear({"model": "m", "source": 1, "closed_through": 0, "buckets": {}})
    clock.now += 10 * IDLE_SOURCE_S
    assert sources.idle("m") == {1, 2}  # 0 is behind: its partials will come
    sources.hear(decode_partial(encode_heartbeat("m", 0, False)))
    assert sources.idle("m") == {1, 2}
    clock.now += IDLE_SOURCE_S + 1
    assert sources.idle("m") == {0, 1, 2}


class Consumer:
    """What stage 1's heartbeats read of its consumer: assignment, end and position."""

    def __init__(self, ends: dict[TopicPartition, int], positions: dict[TopicPartition, int]):
        self.ends, self.positions = ends, positions
        self.polled: dict[TopicPartition, int] = {}  # when each was last fetched, ms

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return self.polled.get(tp)

    def assignment(self) -> set[TopicPartition]:
        return set(self.ends)

    def highwater(self, tp: TopicPartition) -> int:
        return self.ends[tp]

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


def test_stage1_tells_every_model_which_partitions_are_behind(monkeypatch):
    preds = [TopicPartition(topics.PREDICTIONS, p) for p in (0, 1)]
    labels = [TopicPartition(topics.LABELS, p) for p in (0, 1)]
    consumer = Consumer(
        dict.fromkeys(preds + labels, 100),
        {preds[0]: 40, labels[0]: 100, preds[1]: 100, labels[1]: 100},
    )
    stage1 = Stage1(dict.fromkeys(["a", "b"]), "127.0.0.1:1", group_id="g")  # type: ignore[arg-type]
    stage1.consumer = consumer  # type: ignore[assignment]
    sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(topic: str, key: bytes | None, value: bytes) -> None:
        sent.append((topic, key, value))

    monkeypatch.setattr(stage1, "_send", send)
    clock = Clock()
    monkeypatch.setattr(stage1_module, "time", SimpleNamespace(monotonic=clock))

    def said() -> set[tuple[str, int, bool]]:
        out = {(k.decode(), (p := decode_partial(v))["source"], p["behind"]) for _, k, v in sent}
        assert all(t == topics.PARTIALS and is_heartbeat(decode_partial(v)) for t, _, v in sent)
        sent.clear()
        return out

    asyncio.run(stage1._heartbeats())
    assert said() == {("a", 0, True), ("b", 0, True), ("a", 1, False), ("b", 1, False)}
    asyncio.run(stage1._heartbeats())
    assert said() == set()  # nothing changed, and it was said just now
    clock.now += stage1_module.HEARTBEAT_S
    asyncio.run(stage1._heartbeats())
    assert said() == {("a", 0, True), ("b", 0, True)}  # behind: said again
    consumer.positions[preds[0]] = 100
    asyncio.run(stage1._heartbeats())
    assert said() == {("a", 0, False), ("b", 0, False)}  # caught up: said once


def test_labels_count_as_caught_up_only_with_predictions_fetched_long_enough_before():
    """A label sent before a prediction may reach the broker after it (each partition is
    batched apart): a fetch that found the labels partition at its end together with the
    predictions does not close their buckets (their labels would count as late); one made
    LABELS_SETTLE_MS later does."""
    preds, labels = TopicPartition(topics.PREDICTIONS, 0), TopicPartition(topics.LABELS, 0)
    consumer = Consumer({preds: 100, labels: 50}, {preds: 100, labels: 50})
    stage1 = Stage1(dict.fromkeys(["a"]), "127.0.0.1:1", group_id="g")  # type: ignore[arg-type]
    stage1.consumer = consumer  # type: ignore[assignment]
    fetched_at = 1_700_000_000_000
    consumer.polled = {preds: fetched_at, labels: fetched_at}
    ingest = SimpleNamespace(sketcher=SimpleNamespace(partition_ts=42_000))
    stage1._note_fetched(preds, ingest)  # type: ignore[arg-type]
    assert asyncio.run(stage1._labels_through(0)) is None
    consumer.polled[labels] = fetched_at + stage1_module.LABELS_SETTLE_MS
    consumer.positions[labels] = 40  # more labels came meanwhile: not read yet
    assert asyncio.run(stage1._labels_through(0)) is None
    consumer.positions[labels] = 50
    assert asyncio.run(stage1._labels_through(0)) == 42_000
