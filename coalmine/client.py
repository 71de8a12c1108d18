"""What producers and subscribers import: publish events, assign variants, read alerts.

>>> assign_variant("user-42", {"champion": 95, "canary": 5})
'champion'
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import numpy as np
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


def _decode(value: bytes | None) -> dict:
    try:
        record = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        record = None
    return (
        record if isinstance(record, dict) else {"_raw": (value or b"").decode("utf-8", "replace")}
    )


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
        # stage 1's partials are MessagePack, not JSON
        decode = readable_partial if topic.endswith("coalmine.partials") else _decode
        while not (stop and stop.is_set()):
            batch = await consumer.getmany(timeout_ms=200)
            if batch:
                last_message = time.monotonic()
            elif until_idle is not None and time.monotonic() - last_message >= until_idle:
                return
            for messages in batch.values():
                for m in messages:
                    record = decode(m.value)
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


# ------------------------------------------------------------------ slices by message time

#: a message's timestamp (Kafka's, set by the producer at send time) bounds a slice
_MIN_KEY = -(2**62)
_TS = re.compile(rb'"ts":(-?\d{1,18})[,}]')


def parse_time(text: str) -> int:
    """Epoch milliseconds from an ISO-8601 date-time (no offset: UTC) or from epoch milliseconds.

    >>> parse_time("1700000000000"), parse_time("2023-11-14T22:13:20Z")
    (1700000000000, 1700000000000)
    >>> parse_time("2023-11-14T23:13:20+01:00")
    1700000000000
    """
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO-8601 date-time nor epoch milliseconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def event_ts(raw: bytes) -> int | None:
    """The top-level integer ``ts`` of a JSON event, or None (not JSON, no integer ``ts``).

    Cheap on well-formed events: a single ``"ts":<digits>`` is read without parsing the rest
    (only a key can be a quoted ``ts`` followed by a colon, since quotes inside strings are
    escaped); anything else (``ts`` twice, nested, spaced, a float) takes ``orjson``.

    >>> event_ts(b'{"a":1,"ts":1700000000000}'), event_ts(b'{"f":{"ts":1},"ts":2}'), event_ts(b"{x")
    (1700000000000, 2, None)
    """
    if raw.count(b'"ts"') == 1:
        found = _TS.search(raw)
        if found:
            return int(found[1])
    try:
        ts = orjson.loads(raw)["ts"]
    except (orjson.JSONDecodeError, TypeError, KeyError, IndexError):
        return None
    return ts if type(ts) is int and abs(ts) < -_MIN_KEY else None


def merge_by_event_time(pulls: list[Callable[[], list[bytes] | None]]) -> Iterator[list[bytes]]:
    """Merge per-partition streams of raw events into one in event-time order.

    ``pulls[p]()`` gives partition ``p``'s next messages (in offset order), ``None`` once it
    has no more. Each message's key is the largest ``ts`` of its partition so far (see
    :func:`event_ts`), so that a message without a readable ``ts`` (it will be dead-lettered)
    or a late one keeps its place right after the message before it in its partition; ties go
    to the lower partition, then offset order. That is ``heapq.merge`` of the partitions by
    that key, done a fetched batch at a time with numpy: a message is let out once no
    partition can still bring one that sorts before it. Yields lists of values (any lengths).
    """
    n = len(pulls)
    bufs: list[list[bytes]] = [[] for _ in range(n)]
    keys = [np.empty(0, dtype=np.int64) for _ in range(n)]
    last = [_MIN_KEY] * n
    live = [True] * n
    while True:
        for p in range(n):
            while live[p] and not bufs[p]:
                got = pulls[p]()
                if got is None:
                    live[p] = False
                elif got:
                    bufs[p], keys[p] = got, _running_max_keys(got, last[p])
                    last[p] = int(keys[p][-1])
        if not any(bufs):
            return
        active = [(int(keys[p][-1]), p) for p in range(n) if live[p]]
        bound = min(active) if active else None
        parts, part_keys = [], []
        for q in range(n):
            if not bufs[q]:
                continue
            if bound is None:
                cut = len(bufs[q])
            else:  # (key, partition) up to the bound's: nothing later can sort before them
                side: Literal["left", "right"] = "right" if q <= bound[1] else "left"
                cut = int(np.searchsorted(keys[q], bound[0], side=side))
            if cut:
                parts.append(bufs[q][:cut])
                part_keys.append(keys[q][:cut])
                bufs[q], keys[q] = bufs[q][cut:], keys[q][cut:]
        if len(parts) == 1:
            yield parts[0]
        elif parts:
            values = [v for part in parts for v in part]
            order = np.argsort(np.concatenate(part_keys), kind="stable")
            yield [values[i] for i in order.tolist()]


def _running_max_keys(values: list[bytes], previous: int) -> np.ndarray:
    """Each message's key: the largest :func:`event_ts` of its partition up to it."""
    stamps = _event_times(values)
    return np.maximum.accumulate(np.concatenate([[previous], stamps]))[1:]


class _Ts(msgspec.Struct):
    ts: int | None = None


_ts_lines = msgspec.json.Decoder(_Ts).decode_lines


def _event_times(values: list[bytes]) -> np.ndarray:
    """:func:`event_ts` of each message (``_MIN_KEY`` for None), all in one C call when every
    message is a one-line JSON object whose ``ts``, if any, is an integer."""
    lines = b"\n".join(values)
    try:
        if lines.count(b"\n") != len(values) - 1:
            raise ValueError("a message of several lines")
        stamps = np.array([t.ts for t in _ts_lines(lines)], dtype=np.int64)  # None: fails
        if len(stamps) != len(values) or ((stamps >= -_MIN_KEY) | (stamps <= _MIN_KEY)).any():
            raise ValueError("not one event a line, or a ts out of range")
        return stamps
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError, TypeError, OverflowError):
        return np.array(
            [_MIN_KEY if (ts := event_ts(v)) is None else ts for v in values], dtype=np.int64
        )


class TopicSlice:
    """The messages of a topic (every partition) whose Kafka timestamp is in ``[since, until)``,
    read synchronously by a consumer of its own, which runs in an event loop of its own in a
    thread: it fetches the next messages while the caller works on the last.

    Message timestamps are the ones producers set at send time (``CreateTime``), not the events'
    ``ts``. ``offsets_for_times`` gives each partition's first offset at or after ``since``
    (none: nothing to read) and at or after ``until`` (none: read to the end offsets taken on
    entry); the messages' own timestamps then decide, so a broker that answers at record-batch
    granularity (the embedded one does) gives the same slice. No consumer group and
    ``enable_auto_commit=False``: manual ``assign`` and ``seek``, nothing committed, a live
    worker group is never disturbed.

    >>> with TopicSlice(bootstrap, "coalmine.predictions", since=t0) as s:  # doctest: +SKIP
    ...     for chunk in s.merged():
    ...         ...
    """

    def __init__(
        self, bootstrap: str, topic: str, since: int | None = None, until: int | None = None
    ):
        self.bootstrap, self.topic = parse_broker_url(bootstrap), topic
        self.security = client_kwargs(bootstrap)
        self.since, self.until = since, until
        self.total = 0  # messages between the start and end offsets (the slice, about)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Any = None  # an AIOKafkaConsumer while open

    def __enter__(self) -> TopicSlice:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"slice {self.topic}", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._open())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is None:
            return
        try:
            if self._consumer is not None:
                self._run(self._consumer.stop())
                self._consumer = None
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._loop = None

    def _run(self, coroutine: Any) -> Any:
        """Run a coroutine in the consumer's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _open(self) -> None:
        from aiokafka.structs import TopicPartition

        from coalmine.chunks import chunked_consumer

        # records of a fetch as chunks: aiokafka builds no ConsumerRecord for each
        self._consumer = consumer = chunked_consumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            **self.security,
        )
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka: stop() straight after start() raises CancelledError
        partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            raise LookupError(
                f"topic {self.topic} does not exist on {self.bootstrap} "
                "(`coalmine topics create` creates coalmine's topics)"
            )
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = await self._end_offsets(tps)
        starts = await self._offsets_at(tps, self.since, ends) if self.since is not None else {}
        if self.since is None:
            starts = await consumer.beginning_offsets(tps)
        stops = await self._offsets_at(tps, self.until, {}) if self.until is not None else {}
        self._state = {}
        for tp in tps:
            start = min(starts[tp], ends[tp])
            consumer.seek(tp, start)
            self._state[tp] = [start, ends[tp], stops.get(tp)]  # next, end, until's offset
            self.total += ends[tp] - start

    async def _offsets_at(self, tps: list, ms: int, default: dict) -> dict:
        """Per partition the first offset whose timestamp is at or after ``ms``, else
        ``default``'s (a broker may say "none" as ``None`` or as timestamp -1)."""
        found = await self._consumer.offsets_for_times({tp: ms for tp in tps})
        return {
            tp: at.offset if at is not None and at.timestamp >= 0 else default.get(tp)
            for tp, at in found.items()
        }

    async def _end_offsets(self, tps: list) -> dict:
        """End offsets now. The embedded broker reports the last record *batch*'s first
        offset + 1 as the end: fetching from there finds the batch's true last offset (on Kafka
        the fetch just returns the last record again)."""
        from coalmine.chunks import records

        consumer = self._consumer
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            if ends[tp] > 0:
                consumer.seek(tp, ends[tp] - 1)
                got = records((await consumer.getmany(tp, timeout_ms=1000)).get(tp, [[]]))
                ends[tp] = max([ends[tp]] + [m.offset + 1 for m in got])
        return ends

    def _pull(self, tp) -> list[bytes] | None:
        """The next messages of one partition in the slice; None when it has no more."""
        from coalmine.chunks import records

        assert self._loop is not None and self._consumer is not None
        state = self._state[tp]
        since, until = self.since, self.until
        lo = since if since is not None else _MIN_KEY
        hi = until if until is not None else -_MIN_KEY
        stalled = 0
        while state[0] < state[1]:
            batch = self._run(self._consumer.getmany(tp, timeout_ms=500))
            fetched = records(batch.get(tp, [[]]))
            if not fetched:
                stalled += 1
                if stalled > 60:
                    raise TimeoutError(f"{tp.topic}[{tp.partition}]: no message for 30 s")
                continue
            stamps = [m.timestamp for m in fetched]
            if fetched[-1].offset < state[1] and lo <= min(stamps) and max(stamps) < hi:
                state[0] = fetched[-1].offset + 1  # the common fetch: all of it in the slice
                return [m.value or b"" for m in fetched]
            out = []
            for m in fetched:
                if m.offset >= state[1] or (
                    state[2] is not None and m.offset >= state[2] and m.timestamp >= hi
                ):
                    state[0] = state[1]  # the end, or the first message at or after `until`
                    break
                state[0] = m.offset + 1
                if lo <= m.timestamp < hi:
                    out.append(m.value or b"")
            if out:
                return out
        return None

    def merged(self) -> Iterator[list[bytes]]:
        """The slice's message values, every partition merged in event-time order (see
        :func:`merge_by_event_time`)."""
        return merge_by_event_time([partial(self._pull, tp) for tp in self._state])
