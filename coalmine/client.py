"""What producers and subscribers import: publish events, assign variants, read alerts.

>>> assign_variant("user-42", {"champion": 95, "canary": 5})
'champion'
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import pickle
import queue
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
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


#: fetches of a partition a :class:`TopicSlice` holds before it pauses that partition
_FETCHES_AHEAD = 8


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
            # small fetches: every partition's first records come at once (the merge waits for
            # them), and the broker answers the next while the last is merged
            max_partition_fetch_bytes=256 * 1024,
            fetch_max_bytes=256 * 1024,
            fetch_max_wait_ms=20,  # what the slice reads is there: no long polls at the ends
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
        # per partition, the values fetched and not yet pulled
        self._fetched: dict[Any, deque[list[bytes]]] = {tp: deque() for tp in tps}
        for tp in tps:
            start = min(starts[tp], ends[tp])
            consumer.seek(tp, start)
            self._state[tp] = [start, ends[tp], stops.get(tp)]  # next, end, until's offset
            self.total += ends[tp] - start
            if start >= ends[tp]:
                consumer.pause(tp)  # nothing to read

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
        probe = [tp for tp in tps if ends[tp] > 0]
        for tp in probe:  # every partition at once: one fetch for all
            consumer.seek(tp, ends[tp] - 1)
        while probe and (got := await consumer.getmany(*probe, timeout_ms=1000)):
            for tp, chunks in got.items():
                ends[tp] = max([ends[tp]] + [m.offset + 1 for m in records(chunks)])
            probe = [tp for tp in probe if tp not in got]
        return ends

    def _pull(self, tp) -> list[bytes] | None:
        """The next messages of one partition in the slice; None when it has no more."""
        fetched, state = self._fetched[tp], self._state[tp]
        stalled = 0
        while not fetched and state[0] < state[1]:
            if self._run(self._fetch()):
                stalled = 0
            elif (stalled := stalled + 1) > 60:
                raise TimeoutError(f"{tp.topic}[{tp.partition}]: no message for 30 s")
        if not fetched:
            return None
        if len(fetched) == _FETCHES_AHEAD and state[0] < state[1]:
            self._run(self._resume(tp))
        return fetched.popleft()

    async def _fetch(self) -> bool:
        """Take every partition's fetched records into :attr:`_fetched` (so the consumer
        fetches the next ones at once, all partitions in one request); a partition is paused
        while ``_FETCHES_AHEAD`` of its fetches wait, and once read to its end. Whether any
        records came."""
        from coalmine.chunks import records

        batch = await self._consumer.getmany(timeout_ms=500)
        for tp, chunks in batch.items():
            values = self._in_slice(tp, records(chunks))
            if values:
                self._fetched[tp].append(values)
            if len(self._fetched[tp]) >= _FETCHES_AHEAD or self._state[tp][0] >= self._state[tp][1]:
                self._consumer.pause(tp)
        return bool(batch)

    async def _resume(self, tp) -> None:
        self._consumer.resume(tp)

    def _in_slice(self, tp, fetched: list) -> list[bytes]:
        """The values of a partition's fetched records that are in the slice (its reading
        position moves past them; to its end at the first record at or after ``until``)."""
        state = self._state[tp]
        lo = self.since if self.since is not None else _MIN_KEY
        hi = self.until if self.until is not None else -_MIN_KEY
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
        return out

    def merged(self) -> Iterator[list[bytes]]:
        """The slice's message values, every partition merged in event-time order (see
        :func:`merge_by_event_time`)."""
        return merge_by_event_time([partial(self._pull, tp) for tp in self._state])


class SlicesProcess:
    """:class:`TopicSlice` s of several topics read in one process of its own:
    ``with SlicesProcess(bootstrap, [t1, t2], since, until) as (s1, s2)`` gives each topic's
    :class:`ReceivedSlice`, with ``total`` and ``merged()`` as the slice's.

    The child fetches, unpacks the records and merges the partitions by event time while the
    caller works on what it sent before: none of that holds the caller's interpreter lock,
    which is what lets topic replay keep up with file replay. It starts on entry and opens the
    slices without the caller waiting (errors, such as a missing topic, come at the first
    ``total`` or ``merged()``); it is stopped on leaving the ``with`` block, and (on Linux)
    dies with its caller. It is a fresh interpreter running this module, not a fork nor
    ``multiprocessing``'s spawn, which would run the caller's main script again.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: list[str],
        since: int | None = None,
        until: int | None = None,
    ):
        self._args = (bootstrap, topics, since, until)

    def __enter__(self) -> list[ReceivedSlice]:
        from multiprocessing.connection import Connection

        from coalmine.broker import _die_with_parent

        topics = self._args[1]
        pipes = [os.pipe() for _ in topics]
        for _, write_end in pipes:
            with contextlib.suppress(AttributeError, OSError):  # Linux: 1 MB a wake-up, not 64 kB
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
        ends = [write_end for _, write_end in pipes]
        here = str(Path(__file__).resolve().parent.parent)  # where this coalmine is imported from
        paths = [here, os.environ.get("PYTHONPATH", "")]
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", f"import coalmine.client as c; c._send_slices({ends})"],
                stdin=subprocess.PIPE,
                pass_fds=ends,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))},
                preexec_fn=_die_with_parent(),
            )
        finally:
            for end in ends:
                os.close(end)
        self._slices = [
            ReceivedSlice(topic, Connection(read_end, writable=False), self._process)
            for topic, (read_end, _) in zip(topics, pipes, strict=True)
        ]
        assert self._process.stdin is not None
        with self._process.stdin as args:  # not on the command line: the URL may hold a password
            args.write(pickle.dumps(self._args))
        return self._slices

    def __exit__(self, *exc) -> None:
        for piece in self._slices:
            piece.conn.close()  # a child still sending stops at its next message
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class ReceivedSlice:
    """One topic's slice as a :class:`SlicesProcess`'s child sends it."""

    def __init__(self, topic: str, conn: Any, process: subprocess.Popen):
        self.topic, self.conn, self._process = topic, conn, process
        self._total: int | None = None

    @property
    def total(self) -> int:
        """Messages between the start and end offsets (waits for the child to open the slice)."""
        if self._total is None:
            self._total = self._receive()
        return self._total

    def merged(self) -> Iterator[list[bytes]]:
        """The slice's message values, every partition merged in event-time order."""
        assert self.total is not None
        while (values := self._receive()) is not None:
            yield values

    def _receive(self) -> Any:
        try:
            got = self.conn.recv()
        except EOFError:
            code = self._process.wait()
            raise RuntimeError(f"reading {self.topic} stopped (exit code {code})") from None
        if isinstance(got, BaseException):
            raise got
        return got


def _send_slices(fds: list[int]) -> None:
    """A :class:`SlicesProcess`'s child: reads the slices' arguments from stdin, then sends on
    each topic's ``fd`` its slice's total, its merged values a fetch at a time, and None; or
    the error that stopped it. Each slice is read up to ``_AHEAD`` merges ahead of what the
    caller has taken."""
    from multiprocessing.connection import Connection

    bootstrap, topics, since, until = pickle.load(sys.stdin.buffer)
    senders = []
    for fd, topic in zip(fds, topics, strict=True):
        ahead: queue.Queue = queue.Queue(maxsize=_AHEAD)
        reader = threading.Thread(
            target=_read_ahead, args=((bootstrap, topic, since, until), ahead), daemon=True
        )
        sender = threading.Thread(
            target=_send_from, args=(ahead, Connection(fd, readable=False)), daemon=True
        )
        reader.start()
        sender.start()
        senders.append(sender)
    try:
        for sender in senders:
            sender.join()
    except KeyboardInterrupt:  # the caller was interrupted too
        os._exit(0)


#: merged pieces of a slice a :class:`SlicesProcess`'s child holds ahead of its caller
_AHEAD = 4


def _read_ahead(args: tuple, ahead: queue.Queue) -> None:
    """Put a slice's total, its merged values and None (or the error that stopped it) in
    ``ahead``."""
    try:
        with TopicSlice(*args) as piece:
            ahead.put(piece.total)
            for values in piece.merged():
                ahead.put(values)
        ahead.put(None)
    except Exception as exc:
        ahead.put(exc)


def _send_from(ahead: queue.Queue, conn: Any) -> None:
    """Send what :func:`_read_ahead` puts in ``ahead`` until its end."""
    while True:
        got = ahead.get()
        try:
            conn.send(got)
        except BrokenPipeError:  # the caller left: no more to read, nothing to commit
            os._exit(0)
        except (pickle.PicklingError, TypeError, AttributeError):  # an error's own fields
            conn.send(RuntimeError(f"{type(got).__name__}: {got}"))
        if got is None or isinstance(got, BaseException):
            return
