"""What producers and subscribers import: publish events, assign variants, read alerts.

>>> assign_variant("user-42", {"champion": 95, "canary": 5})
'champion'
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import AsyncIterator, Iterable

import orjson

from coalmine import topics

#: which field keys each topic's messages (predictions and labels by request, so they co-partition)
_KEY_FIELD = {topics.PREDICTIONS: "request_id", topics.LABELS: "request_id",
              topics.ALERTS: "model", topics.COMMANDS: "model"}


def assign_variant(unit_id: str, weights: dict[str, float], salt: str = "") -> str:
    """Deterministic variant for a unit (user, session): the same unit always gets the same
    variant while the weights stay the same. A 64-bit hash gives a uniform point in [0, 1);
    weights (any positive scale) cut that interval in order.

    >>> assign_variant("u1", {"champion": 1.0}, salt="exp-7")
    'champion'
    """
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    digest = hashlib.blake2b(f"{salt}|{unit_id}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2**64 * total
    for variant, weight in weights.items():
        point -= weight
        if point < 0:
            return variant
    return next(reversed(weights))


def _key(topic: str, event: dict | bytes) -> bytes | None:
    field = _KEY_FIELD.get(topic)
    if field and isinstance(event, dict) and isinstance(event.get(field), str):
        return event[field].encode()
    if field and isinstance(event, bytes):
        try:
            value = orjson.loads(event).get(field)
            return value.encode() if isinstance(value, str) else None
        except (orjson.JSONDecodeError, AttributeError):
            return None
    return None


class Publisher:
    """Async producer of coalmine events (dicts are serialised with orjson; bytes go as-is).

    >>> async def main(bootstrap):                          # doctest: +SKIP
    ...     async with Publisher(bootstrap) as pub:
    ...         await pub.publish("coalmine.predictions", event)
    """

    def __init__(self, bootstrap: str, linger_ms: int = 5):
        from aiokafka import AIOKafkaProducer

        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms, acks=1,
                                         max_batch_size=256 * 1024)

    async def __aenter__(self) -> "Publisher":
        await self.producer.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.producer.stop()

    async def publish(self, topic: str, event: dict | bytes, key: str | None = None) -> None:
        """Send one event and wait for the broker's acknowledgement."""
        await (await self._send(topic, event, key))

    async def _send(self, topic: str, event: dict | bytes, key: str | None = None):
        value = event if isinstance(event, bytes) else orjson.dumps(event)
        k = key.encode() if key is not None else _key(topic, event)
        return await self.producer.send(topic, value, key=k)

    async def publish_many(self, topic: str, events: Iterable[dict | bytes], chunk: int = 10_000) -> int:
        """Send many events, waiting for acknowledgements a chunk at a time; returns the count."""
        pending, sent = [], 0
        for event in events:
            pending.append(await self._send(topic, event))
            if len(pending) >= chunk:
                await asyncio.gather(*pending)
                sent += len(pending)
                pending.clear()
        await asyncio.gather(*pending)
        return sent + len(pending)

    async def flush(self) -> None:
        await self.producer.flush()


async def tail(bootstrap: str, topic: str, *, from_end: bool = False, until_idle: float | None = None,
               stop: asyncio.Event | None = None) -> AsyncIterator[dict]:
    """Yield the JSON records of a topic, every partition, from the beginning (or the end).

    Stops after ``until_idle`` seconds without a message, or once ``stop`` is set; a message
    that is not a JSON object comes as ``{"_raw": text}``. No consumer group: nothing is
    committed, any number of tails may read at once.
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="latest" if from_end else "earliest")
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()  # first look at this topic
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        if from_end:
            await consumer.seek_to_end()
        else:
            await consumer.seek_to_beginning()
        idle = 0.0
        while not (stop and stop.is_set()):
            batch = await consumer.getmany(timeout_ms=200)
            if not batch:
                idle += 0.2
                if until_idle is not None and idle >= until_idle:
                    return
                continue
            idle = 0.0
            for messages in batch.values():
                for m in messages:
                    try:
                        record = orjson.loads(m.value)
                    except orjson.JSONDecodeError:
                        record = None
                    yield record if isinstance(record, dict) else {"_raw": m.value.decode("utf-8", "replace")}
    finally:
        await consumer.stop()
