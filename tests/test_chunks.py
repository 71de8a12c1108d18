"""coalmine.chunks hooks into aiokafka's fetcher: these tests fail loudly when the internals it
relies on change, and check that only chunked consumers take its path."""

from __future__ import annotations

import asyncio
import inspect

from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord, TopicPartition

from coalmine import chunks
from coalmine.client import Publisher

TP = TopicPartition("t", 3)


def record_batch(base_offset: int, values: list[bytes]) -> bytes:
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for delta, value in enumerate(values):
        builder.append(delta, 1_700_000_000_000 + delta, b"k", value, [])
    raw = builder.build()
    raw[:8] = base_offset.to_bytes(8, "big")  # the broker sets it; outside the CRC
    return bytes(raw)


def partition_records(value_deserializer, fetch_offset: int):
    """Two record batches (offsets 10-12 and 13-14) fetched from ``fetch_offset``, as
    aiokafka's fetcher builds them (its positional arguments, checked here)."""
    raw = record_batch(10, [b"a", b"b", b"c"]) + record_batch(13, [b"d", b"e"])
    return fetcher.PartitionRecords(
        TP, MemoryRecords(raw), [], fetch_offset, None, value_deserializer, True, 0
    )


def test_the_fetcher_builds_partition_records_from_its_module_global():
    chunks.install()
    assert fetcher.PartitionRecords is chunks._PartitionChunks
    assert "PartitionRecords(" in inspect.getsource(fetcher.Fetcher)
    assert list(inspect.signature(fetcher.PartitionRecords.__init__).parameters) == [
        "self",
        "tp",
        "records",
        "aborted_transactions",
        "fetch_offset",
        "key_deserializer",
        "value_deserializer",
        "check_crcs",
        "isolation_level",
    ]


def test_a_chunked_fetch_is_one_list_of_the_records_from_the_fetch_offset_on():
    chunks.install()
    parts = partition_records(chunks._chunked, fetch_offset=11)
    [chunk] = list(parts)
    assert [(r.offset, r.value, r.key) for r in chunk] == [
        (11, b"b", b"k"),
        (12, b"c", b"k"),
        (13, b"d", b"k"),
        (14, b"e", b"k"),
    ]
    assert parts.next_fetch_offset == 15
    assert chunks.records([chunk, chunk[:1]]) == chunk + chunk[:1]


def test_other_consumers_get_aiokafkas_consumer_records():
    chunks.install()
    got = list(partition_records(None, fetch_offset=11))
    assert all(isinstance(r, ConsumerRecord) for r in got)
    assert [(r.topic, r.partition, r.offset, r.value) for r in got][:1] == [("t", 3, 11, b"b")]


def test_a_chunked_consumer_reads_what_was_published(broker, namespace):
    topic = namespace.topic["predictions"]
    values = [b'{"i":%d}' % i for i in range(3000)]

    async def run() -> list:
        async with Publisher(broker.bootstrap) as pub:
            assert await pub.publish_many(topic, values) == len(values)
        consumer = chunks.chunked_consumer(
            bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            consumer.assign(tps)
            got: list = []
            while len(got) < len(values):
                batch = await consumer.getmany(timeout_ms=2000)
                assert batch, "nothing fetched"
                for tp, fetched in batch.items():
                    got += [(tp.partition, r.offset, r.value) for r in chunks.records(fetched)]
            return got
        finally:
            await consumer.stop()

    got = asyncio.run(run())
    assert sorted(v for _, _, v in got) == sorted(values)
    for p in {p for p, _, _ in got}:
        offsets = [o for q, o, _ in got if q == p]
        assert offsets == list(range(len(offsets)))
