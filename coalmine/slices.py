"""Slices of topics by message time, read by a consumer of its own: what ``coalmine replay
--from-topics``, ``coalmine report --from-topics`` and ``coalmine tail --since/--until`` read.

:class:`TopicSlice` reads one topic's slice in the caller's process; :class:`SlicesProcess`
reads several in a process of its own, which imports this module only (no numpy: it starts
while the caller builds its baselines); :func:`read_slices` takes the process when a core is
free for it. Each slice's partitions are merged by event time (:func:`merge_by_event_time`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import queue
import re
import subprocess
import sys
import threading
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any

import msgspec
import orjson

from coalmine.broker import parse_broker_url
from coalmine.security import client_kwargs

#: a message's timestamp (Kafka's, set by the producer at send time) bounds a slice
_MIN_KEY = -(2**62)
_TS = re.compile(rb'"ts":(-?\d{1,18})[,}]')


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


def merge_by_event_time(pulls: list[Callable[[], list[bytes] | None]]) -> Iterator[list[bytes]]:
    """Merge per-partition streams of raw events into one in event-time order.

    ``pulls[p]()`` gives partition ``p``'s next messages (in offset order), ``None`` once it
    has no more. Each message's key is the largest ``ts`` of its partition so far (see
    :func:`event_ts`), so that a message without a readable ``ts`` (it will be dead-lettered)
    or a late one keeps its place right after the message before it in its partition; ties go
    to the lower partition, then offset order. That is ``heapq.merge`` of the partitions by
    that key, done a fetched batch at a time: a message is let out once no partition can still
    bring one that sorts before it. Yields lists of values (any lengths).
    """
    n = len(pulls)
    bufs: list[list[bytes]] = [[] for _ in range(n)]
    keys: list[list[int]] = [[] for _ in range(n)]
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
                    last[p] = keys[p][-1]
        if not any(bufs):
            return
        active = [(keys[p][-1], p) for p in range(n) if live[p]]
        bound = min(active) if active else None
        parts, part_keys = [], []
        for q in range(n):
            if not bufs[q]:
                continue
            if bound is None:
                cut = len(bufs[q])
            else:  # (key, partition) up to the bound's: nothing later can sort before them
                cut = (bisect_right if q <= bound[1] else bisect_left)(keys[q], bound[0])
            if cut:
                parts.append(bufs[q][:cut])
                part_keys += keys[q][:cut]
                bufs[q], keys[q] = bufs[q][cut:], keys[q][cut:]
        if len(parts) == 1:
            yield parts[0]
        elif parts:
            values = [v for part in parts for v in part]
            order = sorted(range(len(values)), key=part_keys.__getitem__)  # stable
            yield [values[i] for i in order]


def _running_max_keys(values: list[bytes], previous: int) -> list[int]:
    """Each message's key: the largest :func:`event_ts` of its partition up to it."""
    stamps = _event_times(values)
    if stamps[0] >= previous and sorted(stamps) == stamps:  # in order, as a partition mostly is
        return stamps
    return list(accumulate(stamps, max, initial=previous))[1:]


class _Ts(msgspec.Struct, gc=False):
    ts: int | None = None


_ts_lines = msgspec.json.Decoder(_Ts).decode_lines


def _event_times(values: list[bytes]) -> list[int]:
    """:func:`event_ts` of each message (``_MIN_KEY`` for None), all in one C call when every
    message is a one-line JSON object whose ``ts``, if any, is an integer."""
    lines = b"\n".join(values)
    if lines.count(b"\n") == len(values) - 1:  # one message a line
        try:
            stamps: list[Any] = [t.ts for t in _ts_lines(lines)]  # a None fails min()
            if len(stamps) == len(values) and _MIN_KEY < min(stamps) and max(stamps) < -_MIN_KEY:
                return stamps
        except (msgspec.DecodeError, UnicodeDecodeError, TypeError):
            pass
    return [_MIN_KEY if (ts := event_ts(v)) is None else ts for v in values]


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
        self._filling: asyncio.Future | None = None  # :meth:`_fill`, while open

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
                self._run(self._stop())
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
            # fetches of 1 MB at most: every partition's first records come soon (the merge waits
            # for them; 64 MB fetches took 1.3 s), and the next comes while the last is merged
            max_partition_fetch_bytes=1024 * 1024,
            fetch_max_bytes=1024 * 1024,
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
        self._arrived = threading.Condition()  # a fetch taken, or the reading failed
        self._failure: BaseException | None = None
        self._filling = asyncio.ensure_future(self._fill())

    async def _stop(self) -> None:
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filling
        await self._consumer.stop()

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
        with self._arrived:
            while not fetched and state[0] < state[1] and self._failure is None:
                self._arrived.wait()
            if self._failure is not None:
                raise self._failure
            if not fetched:
                return None
            if len(fetched) == _FETCHES_AHEAD and state[0] < state[1]:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._consumer.resume, tp)  # paused when full
            return fetched.popleft()

    async def _fill(self) -> None:
        """Take every partition's fetched records into :attr:`_fetched` as they come, so that
        the consumer fetches the next at once (all partitions in one request) while the caller
        works; a partition is paused while ``_FETCHES_AHEAD`` of its fetches wait, and once
        read to its end."""
        from coalmine.chunks import records

        consumer, state = self._consumer, self._state
        stalled = 0
        try:
            while unread := {tp for tp in state if state[tp][0] < state[tp][1]}:
                batch = await consumer.getmany(timeout_ms=500)
                waiting = not unread - consumer.paused()  # for the caller, not the broker
                stalled = 0 if batch or waiting else stalled + 1
                if stalled > 60:
                    raise TimeoutError(f"{self.topic}: no message for 30 s")
                with self._arrived:
                    for tp, chunks in batch.items():
                        values = self._in_slice(tp, records(chunks))
                        if values:
                            self._fetched[tp].append(values)
                        if len(self._fetched[tp]) >= _FETCHES_AHEAD or state[tp][0] >= state[tp][1]:
                            consumer.pause(tp)
                    self._arrived.notify_all()
        except Exception as exc:  # the caller's next pull raises it
            with self._arrived:
                self._failure = exc
                self._arrived.notify_all()

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


@contextlib.contextmanager
def read_slices(
    bootstrap: str, topics: list[str], since: int | None = None, until: int | None = None
) -> Iterator[list[TopicSlice] | list[ReceivedSlice]]:
    """Each topic's slice, with ``topic``, ``total`` and ``merged()``: read in a process of its
    own (:class:`SlicesProcess`) when a core is free for it, else in this one (a
    :class:`TopicSlice` each, whose merging then shares the caller's interpreter lock).

    With a free core the caller does no more than replay from a file (its CPU for the
    benchmark's 200,000 events: 2.3 s, as file replay's; in this process, 3.0-3.1 s); on busy
    cores the process's start and its share of them cost more than that saves (2 cores at load
    4.6-6.5, topic/file replay: 0.47-0.87 in a process, 0.60-1.06 here, 14 runs each)."""
    if _a_core_is_free():
        with SlicesProcess(bootstrap, topics, since, until) as received:
            yield received
    else:
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(TopicSlice(bootstrap, t, since, until)) for t in topics]


def _a_core_is_free() -> bool:
    """Whether another process than the caller leaves a core free for a reading process
    (POSIX; elsewhere no process: its pipes are passed as POSIX file descriptors). Others are
    the 1-minute load average, or fewer: the tasks running now (Linux) but the caller. The
    average alone counts the caller's own work of the last minute (a benchmark's file replay
    just before) as another's."""
    try:
        others = os.getloadavg()[0]
        with contextlib.suppress(OSError, ValueError, IndexError):
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            others = min(others, int(running) - 1)
        return others + 1 < len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return False


class SlicesProcess:
    """:class:`TopicSlice` s of several topics read in one process of its own:
    ``with SlicesProcess(bootstrap, [t1, t2], since, until) as (s1, s2)`` gives each topic's
    :class:`ReceivedSlice`, with ``total`` and ``merged()`` as the slice's.

    The child fetches, unpacks the records and merges the partitions by event time while the
    caller works on what it sent before: none of that holds the caller's interpreter lock
    (worth it with a core free for the child: :func:`read_slices`). It starts on entry and
    opens the slices without the caller waiting (errors, such as a missing topic, come at the first
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
        import fcntl  # POSIX, as the pipes passed to the child
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
                [sys.executable, "-c", f"import coalmine.slices as s; s._send_slices({ends})"],
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
    the error that stopped it."""
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


#: a :class:`SlicesProcess`'s child sends a slice's merged values in pieces of at least
#: ``_PIECE`` (the last may be shorter), holding up to ``_AHEAD`` pieces ahead of its caller
_PIECE, _AHEAD = 5000, 8


def _read_ahead(args: tuple, ahead: queue.Queue) -> None:
    """Put a slice's total, its merged values in pieces and None (or the error that stopped
    it) in ``ahead``."""
    try:
        with TopicSlice(*args) as piece:
            ahead.put(piece.total)
            held: list[bytes] = []
            for values in piece.merged():
                held += values
                if len(held) >= _PIECE:
                    ahead.put(held)
                    held = []
            if held:
                ahead.put(held)
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
