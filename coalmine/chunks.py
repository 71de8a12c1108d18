"""aiokafka fetches handed over whole: a partition's fetched records as one list, not one
``ConsumerRecord`` per message.

aiokafka unpacks a fetch response one record at a time, through a generator that builds a
``ConsumerRecord`` for each (about two thirds of the consumer's cost per message, measured).
Stage 1 and topic replay only need each record's value and offset, so a consumer made by
:func:`chunked_consumer` gets, per partition, the C ``DefaultRecord`` objects of a whole fetch
response in one list: ``getmany()`` answers ``{tp: [chunk, ...]}`` where each chunk is a list of
records with ``offset``, ``timestamp``, ``key`` and ``value``; :func:`records` flattens them.

aiokafka has no public hook for this: :func:`install` replaces the fetcher's
``PartitionRecords`` with a subclass that takes the chunked path only for consumers made here
(marked by their value deserializer) and reading uncommitted records (the default); every other
consumer in the process, Faust's included, runs aiokafka's own code. ``tests/test_chunks.py``
fails if aiokafka's internals this relies on change; ``pyproject.toml`` pins the versions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka import errors as kafka_errors
from aiokafka.consumer import fetcher

#: one fetch response's records of one partition, in offset order
Chunk = list


def _chunked(value: bytes | None) -> bytes | None:
    """The value deserializer marking a chunked consumer (an identity: aiokafka's own path,
    taken for read-committed consumers, stays correct)."""
    return value


class _PartitionChunks(fetcher.PartitionRecords):
    """aiokafka's ``PartitionRecords``, yielding a chunked consumer's records as one list."""

    def _unpack_records(self) -> Iterator[Any]:
        if self._value_deserializer is not _chunked or self._isolation_level != 0:
            yield from super()._unpack_records()
            return
        records, out = self._records, []
        start: int = self.next_fetch_offset  # type: ignore[has-type]
        while records.has_next():
            batch = records.next_batch()
            if self._check_crcs and not batch.validate_crc():
                raise kafka_errors.CorruptRecordException(f"Invalid CRC - {self._tp}")
            if not batch.is_control_batch:
                got = list(batch)
                if got and got[0].offset < start:  # fetched from mid-batch
                    got = [r for r in got if r.offset >= start]
                out += got
            self.next_fetch_offset = batch.next_offset
        if out:
            yield out


def install() -> None:
    """Make aiokafka's fetcher build :class:`_PartitionChunks` (idempotent)."""
    if fetcher.PartitionRecords is not _PartitionChunks:
        fetcher.PartitionRecords = _PartitionChunks  # type: ignore[misc]


def chunked_consumer(*topics: str, **kwargs: Any) -> AIOKafkaConsumer:
    """An ``AIOKafkaConsumer`` (``kwargs`` as aiokafka's, but no deserializers and no
    ``isolation_level``) whose ``getmany()`` answers chunks of raw records per partition."""
    install()
    return AIOKafkaConsumer(*topics, value_deserializer=_chunked, **kwargs)


def records(chunks: list[Chunk]) -> Chunk:
    """The records of a partition's chunks (``getmany()[tp]``), in offset order."""
    return chunks[0] if len(chunks) == 1 else [r for chunk in chunks for r in chunk]
