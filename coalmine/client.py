"""What producers and subscribers import: publish events, assign variants, read alerts.

>>> assign_variant("user-42", {"champion": 95, "canary": 5})
'champion'
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Literal

import orjson

from coalmine.broker import parse_broker_url
from coalmine.partials import readable_partial
from coalmine.security import client_kwargs

if TYPE_CHECKING:
    from coalmine.signing import Verifier

#: what a tail verifies, by default, when a key is configured: the signed kinds of topic
FROM_ENV: Literal["env"] = "env"
_SIGNED = {"commands": "command", "alerts": "alert"}

#: which field keys the messages of each kind of topic, named by its last dotted part so that
#: namespaced topics are keyed alike (predictions and labels by request: they co-partition)
_KEY_FIELD = {
    "predictions": "request_id",
    "labels": "request_id",
    "alerts": "model",
    "commands": "model",
}


def assign_variant(unit_id: str, weights: dict[str, float], salt: str = "") -> str:
    """Deterministic variant for a unit (user, session): the same unit always gets the same
    variant while the weights stay the same.

    The unit's point :math:`u = h / 2^{64} \\in [0, 1)`, with :math:`h` the first 8 bytes of
    ``blake2b(salt | unit_id)`` read as an integer, is uniform; the weights, normalised by their
    sum, cut :math:`[0, 1)` into consecutive intervals in their order, and the unit gets the
    variant whose interval holds :math:`u`. With two variants, new weights move only the units
    between the old and the new cut: a canary ramped from 5 % to 25 % keeps its first users.
    A new ``salt`` per experiment makes assignments independent across experiments.

    >>> assign_variant("u1", {"champion": 1.0}, salt="exp-7")
    'champion'
    >>> sorted({assign_variant(f"u{i}", {"a": 3, "b": 1, "off": 0}) for i in range(100)})
    ['a', 'b']
    """
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    digest = hashlib.blake2b(f"{salt}|{unit_id}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2**64 * sum(weights.values())
    for variant, weight in weights.items():
        point -= weight
        if point < 0:
            return variant
    # float rounding can leave a point at the very top: it belongs to the last variant with weight
    return next(v for v, w in reversed(weights.items()) if w > 0)


def _key(topic: str, event: dict | bytes) -> bytes | None:
    field = _KEY_FIELD.get(topic.rpartition(".")[2])
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

    ``bootstrap`` is ``host:port[,...]`` or a ``kafka://`` URL. Unless a key is given, messages
    are keyed by ``request_id`` on the predictions and labels topics (so that a prediction and
    its label share a partition) and by ``model`` on the alerts and commands topics, whatever
    their namespace (a topic ``*.predictions`` is a predictions topic).

    >>> async def main(bootstrap):                          # doctest: +SKIP
    ...     async with Publisher(bootstrap) as pub:
    ...         await pub.publish("coalmine.predictions", event)
    """

    def __init__(self, bootstrap: str, linger_ms: int = 5):
        from aiokafka import AIOKafkaProducer

        self.producer = AIOKafkaProducer(
            bootstrap_servers=parse_broker_url(bootstrap),
            linger_ms=linger_ms,
            acks=1,
            max_batch_size=256 * 1024,
            **client_kwargs(bootstrap),
        )

    async def __aenter__(self) -> Publisher:
        try:
            await self.producer.start()
        except BaseException:  # e.g. broker unreachable: release what start() opened
            await self.producer.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.producer.stop()

    async def publish(self, topic: str, event: dict | bytes, key: str | None = None) -> None:
        """Send one event and wait for the broker's acknowledgement."""
        await (await self.send(topic, event, key))

    async def send(self, topic: str, event: dict | bytes, key: str | None = None) -> asyncio.Future:
        """Queue one event for sending, without waiting for the broker; returns the future of its
        acknowledgement (await it, or gather many, before trusting the event is stored).

        Awaiting ``send`` itself may wait for room in the producer's buffer, never for the broker.
        """
        value = event if isinstance(event, bytes) else orjson.dumps(event)
        k = key.encode() if key is not None else _key(topic, event)
        return await self.producer.send(topic, value, key=k)

    async def publish_many(
        self, topic: str, events: Iterable[dict | bytes], chunk: int = 10_000
    ) -> int:
        """Send many events, waiting for acknowledgements a chunk at a time; returns the count."""
        pending, sent = [], 0
        for event in events:
            pending.append(await self.send(topic, event))
            if len(pending) >= chunk:
                await asyncio.gather(*pending)
                sent += len(pending)
                pending.clear()
        await asyncio.gather(*pending)
        return sent + len(pending)

    async def flush(self) -> None:
        await self.producer.flush()


def record_decoder(topic: str) -> Callable[[bytes | None], list[dict]]:
    """What reads a message of ``topic`` into its records: stage 1's partials are
    MessagePack, not JSON, several a message."""
    return readable_partial if topic.endswith("coalmine.partials") else _decode_one


def _decode_one(value: bytes | None) -> list[dict]:
    """A JSON message's record (its text, when it is not a JSON object), as a list of one."""
    try:
        record = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        record = {"_raw": (value or b"").decode("utf-8", "replace")}
    return [record]


async def tail(
    bootstrap: str,
    topic: str,
    *,
    from_end: bool = False,
    until_idle: float | None = None,
    stop: asyncio.Event | None = None,
    verifier: Verifier | None | Literal["env"] = FROM_ENV,
) -> AsyncIterator[dict]:
    """Yield the JSON records of a topic, every partition, from the beginning (or the end).

    On the commands and alerts topics (whatever their namespace), records are verified with
    ``$COALMINE_VERIFY_KEY`` (or ``$COALMINE_SIGNING_KEY``) when one is set, expiry included
    with ``from_end`` (a live feed), not when reading history; or with the ``verifier``
    given (:class:`coalmine.signing.Verifier`, of kind "command" for the commands topic,
    "alert" for the alerts topic); ``verifier=None`` reads them unverified. A record
    rejected (unsigned, altered, replayed, expired) comes as ``{"_rejected": why, "record":
    record}``, so that the reader can say so and must neither act on it nor believe it.

    With ``from_end``, what was published before the first ``__anext__`` is skipped. Stops
    after ``until_idle`` seconds without a message, or once ``stop`` is set; a message that is
    not a JSON object comes as ``{"_raw": text}``. No consumer group: nothing is committed, any
    number of tails may read at once. A topic that does not exist is a ``LookupError`` (asking
    the broker about it would auto-create it, with the wrong partition count).
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    if isinstance(verifier, str):  # FROM_ENV
        verifier = env_verifier(topic, live=from_end)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=parse_broker_url(bootstrap),
        enable_auto_commit=False,
        auto_offset_reset="latest" if from_end else "earliest",
        **client_kwargs(bootstrap),
    )
    try:
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka: stop() straight after start() raises CancelledError
        partitions = consumer.partitions_for_topic(topic)  # from the all-topics metadata of start()
        if not partitions:
            raise LookupError(
                f"topic {topic} does not exist on {bootstrap} "
                "(`coalmine topics create` creates coalmine's topics)"
            )
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        await (consumer.seek_to_end() if from_end else consumer.seek_to_beginning())
        for tp in assignment:  # resolve the offsets now, not at the first fetch
            await consumer.position(tp)
        last_message = time.monotonic()
        decode = record_decoder(topic)
        while not (stop and stop.is_set()):
            batch = await consumer.getmany(timeout_ms=200)
            if batch:
                last_message = time.monotonic()
            elif until_idle is not None and time.monotonic() - last_message >= until_idle:
                return
            for messages in batch.values():
                for record in (r for m in messages for r in decode(m.value)):
                    why = verifier.check(record) if verifier is not None else None
                    yield record if why is None else {"_rejected": why, "record": record}
    finally:
        await consumer.stop()


def env_verifier(topic: str, live: bool) -> Verifier | None:
    """The configured key's verifier for a commands or alerts topic (with expiry when
    ``live``), else None (another topic, or no key)."""
    from coalmine.signing import Verifier

    kind = _SIGNED.get(topic.rpartition(".")[2])
    if kind is None:
        return None
    return Verifier.from_env(kind=kind, **({} if live else {"clock": None}))
