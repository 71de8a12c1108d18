"""Stage 1 as a batch consumer: the worker's high-volume path.

Faust's per-message stream path costs ~75 us an event, more than all of stage 1's work, so
stage 1 reads predictions and labels with an aiokafka consumer of its own, whole fetches at a
time (:mod:`coalmine.chunks`), as a Faust service started and stopped with the app. It
decodes and folds each partition's batch (:class:`~coalmine.ingest.PartitionIngest`), sends
dead letters and closed-bucket partials with its own producer, and commits an offset only
once every partial and dead letter of the events before it was acknowledged by the broker,
so a worker killed at any moment loses nothing: the new owner of a partition reads the open
buckets' events again, and stage 2 merges each (partition, bucket) partial once.

Predictions and labels must be co-partitioned (same count, keyed by request_id); the range
assignor hands partition p of both topics to the same member, so joins stay local.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import time
from collections import defaultdict, deque
from functools import cached_property

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from mode import Service

from coalmine import chunks, topics
from coalmine import events as contract
from coalmine.agents import metrics, state
from coalmine.decode import PredictionDecoder
from coalmine.ingest import PartitionIngest
from coalmine.partials import encode_heartbeat, encode_partials
from coalmine.security import client_kwargs
from coalmine.streams.baseline import Baseline

log = logging.getLogger("coalmine.stage1")

#: bytes fetched per partition at a time, and partitions' fetches taken per poll: large batches
#: amortise the per-batch numpy work, which is per model (~0.3 ms a model however few its
#: events), so a worker of many models fetches more at a time: 1 MB per 100 models, 1-8 MB
#: (1,000 models of 250-byte events, live: 8 MB, ~8,000 events a fetch, 142 s against 214 s
#: at 1 MB). A fetch holds the event loop (stage 2, the web server, the consumers' heartbeats)
#: while it is folded: up to ~1 s; the loop runs between fetches
FETCH_BYTES, MAX_FETCH_BYTES = 1 << 20, 8 << 20
MODELS_PER_FETCH_MB = 100
FETCHES_PER_POLL = 4
#: offsets are committed this often (and on every revocation)
COMMIT_EVERY_S = 1.0
#: a message the broker refused is sent again this many times per commit before the commit
#: waits for the next round (nothing after it is committed until it is delivered)
SEND_ATTEMPTS = 3
#: a dead letter's key (the original's) longer than this is replaced by its SHA-256
MAX_KEY = 1024
#: the label join is written to the state topic with the commits at most this fast (a large
#: one less often than every commit: the offsets wait for it)
JOIN_STATE_BYTES_PER_S = 2 << 20
#: container allocations between young-generation collections (CPython's default: 700). A
#: batch's tens of thousands of records and columns, freed by reference counting, are
#: otherwise traversed by collection after collection, with the worker's whole heap
#: (measured: aiokafka's record objects cost 3x more with the default)
GC_YOUNG = 100_000
#: while a partition is behind, each model's stage 2 hears so at least this often
HEARTBEAT_S = 5.0
#: a label published before a prediction may reach the broker after it (a producer sends each
#: partition's batches apart): the labels side counts as caught up only with the predictions
#: fetched this long before a fetch that found the labels partition at its end
LABELS_SETTLE_MS = 2000


def fetch_bytes(models: int) -> int:
    """Bytes a fetch of a partition may bring for a worker of ``models`` models.

    >>> fetch_bytes(1) >> 20, fetch_bytes(250) >> 20, fetch_bytes(5000) >> 20
    (1, 3, 8)
    """
    return min(MAX_FETCH_BYTES, FETCH_BYTES * -(-models // MODELS_PER_FETCH_MB))


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


def dead_letter(
    tp: TopicPartition, offset: int | None, key: bytes | None, value: bytes | None, reason: str
) -> tuple[bytes | None, bytes]:
    """The dead letter of the message at ``offset`` of ``tp`` (None: a record read back by key),
    counted in the metrics: its key (the original's, hashed when longer than :data:`MAX_KEY`)
    and value, to send."""
    if reason.startswith("late event"):
        try:
            metrics.LATE.labels(orjson.loads(value or b"")["model"]).inc()
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
    metrics.DEADLETTERS.labels(tp.topic, metrics.reason_kind(reason)).inc()
    letter = contract.deadletter_record(
        value, reason, tp.topic, tp.partition, offset, wall_clock_ms()
    )
    if key is not None and len(key) > MAX_KEY:
        key = hashlib.sha256(key).hexdigest().encode()
    return key, contract.encode(letter)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, stage1: Stage1):
        self.stage1 = stage1

    async def on_partitions_revoked(self, revoked) -> None:
        await self.stage1.revoke(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        pass


class Stage1(Service):
    """Stage 1 of one worker: every input partition assigned to it, batch by batch."""

    def __init__(
        self,
        baselines: dict[str, Baseline],
        bootstrap: str,
        group_id: str,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.baselines, self.bootstrap, self.group_id = baselines, bootstrap, group_id
        self.ingests: dict[int, PartitionIngest] = {}
        self.partials_partitions: int | None = None
        self.lock = asyncio.Lock()  # a batch is processed whole before a revocation commits
        # sends not yet acknowledged, and those the broker refused: (future or None, message)
        self.pending: list[tuple[asyncio.Future | None, tuple[str, bytes | None, bytes]]] = []
        self.positions: dict[TopicPartition, int] = {}  # next offset to read, per partition
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.failure: str | None = None  # why stage 1 stopped, for /health
        self.said: dict[int, bool] = {}  # per partition, whether stage 2 was told it is behind
        # per partition, (when, the partition's event time) of the predictions fetched: the
        # labels side catches up with them (:meth:`_labels_through`)
        self.fetched: dict[int, deque[tuple[int, int]]] = defaultdict(deque)
        self.spoke: dict[tuple[int, str], float] = {}  # (partition, model) -> last message sent
        # the label join goes to the state topic with the commits: per partition, the hashes
        # of the records last written besides the tables' chunks (state.join_state writes
        # only those that changed), and when the last write was and how long the next may wait
        self.state_topic = state.StateTopic(bootstrap)
        self.join_hashes: dict[int, list[int]] = {}
        self.join_saved, self.join_wait = 0.0, 0.0

    async def on_start(self) -> None:
        gc.freeze()  # what start-up made lives on: no collection traverses it again
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        security = client_kwargs(self.bootstrap)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            linger_ms=5,
            max_batch_size=256 * 1024,
            acks=1,
            **security,
        )
        await self.producer.start()
        self.consumer = chunks.chunked_consumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_partition_fetch_bytes=fetch_bytes(len(self.baselines)),
            fetch_max_bytes=16 * FETCH_BYTES,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            **security,
        )
        await self.consumer.start()
        # after start, which would otherwise wait for the group's join: the app's services
        # start after this one (:class:`coalmine.agents.app._App`), the app's consumer joining
        # its group meanwhile
        self.consumer.subscribe([topics.PREDICTIONS, topics.LABELS], listener=_Rebalance(self))

    async def on_stop(self) -> None:
        if self.consumer is not None:
            async with self.lock:
                await self._commit(only=set(self.ingests))  # the label join written now
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()
        await self.state_topic.close()

    @Service.task
    async def _consume(self) -> None:
        try:
            await self._consume_loop()
        except Exception as exc:  # the loop is gone: /health must say so, not answer 200
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("stage 1 stopped")
            raise

    async def _consume_loop(self) -> None:
        assert self.consumer is not None
        last_commit = time.monotonic()
        while not self.should_stop:
            batch = await self.consumer.getmany(timeout_ms=200, max_records=FETCHES_PER_POLL)
            async with self.lock:
                if batch:
                    t0 = time.perf_counter()
                    n = await self._process(batch)
                    metrics.PROCESSING.labels("sketch").observe(time.perf_counter() - t0)
                    metrics.BATCH_EVENTS.labels("sketch").observe(n)
                await self._close_caught_up()
                if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                    await self._commit()
                    last_commit = time.monotonic()
                    self._report()
                    await self._heartbeats()

    async def _process(self, batch: dict[TopicPartition, list[chunks.Chunk]]) -> int:
        """Fold a fetch's records (:func:`coalmine.chunks.chunked_consumer`); how many."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        # the label joins of partitions new here are read at once: each read ends with a wait
        new = sorted({tp.partition for tp in batch if tp in assigned} - set(self.ingests))
        await asyncio.gather(*(self._ingest(partition) for partition in new))
        n = 0
        # per partition, predictions first: their labels then find them in the join
        for tp in sorted(batch, key=lambda tp: (tp.partition, tp.topic == topics.LABELS)):
            if tp not in assigned:
                continue  # revoked while this batch was fetched: its new owner reads it
            records = await self._in_sequence(tp, chunks.records(batch[tp]))
            if not records:
                continue
            n += len(records)
            kind = "label" if tp.topic == topics.LABELS else "prediction"
            ingest = await self._ingest(tp.partition)
            dead = self._feed(ingest, tp, kind, records, 0)
            self.positions[tp] = records[-1].offset + 1
            for i, reason in dead:
                record = records[i]
                await self._send(
                    topics.DEADLETTER,
                    *dead_letter(tp, record.offset, record.key, record.value, reason),
                )
            if kind == "prediction":
                self._note_fetched(tp, ingest)
            # the labels of this batch are folded before their side counts as caught up
            if kind == "label" or TopicPartition(topics.LABELS, tp.partition) not in batch:
                await self._catch_up(tp.partition, ingest)
            await self._close(tp.partition, ingest)
            await asyncio.sleep(0)  # the loop runs between fetches (heartbeats, stage 2)
        return n

    async def _close(self, partition: int, ingest: PartitionIngest) -> None:
        """Send the partials of the buckets the partition closed."""
        partials = ingest.close()
        _count_label_join(ingest)
        if not partials:
            return
        # the models of a partials partition go together, keyed by the first of them
        together: dict[int, list[dict]] = defaultdict(list)
        count = await self._partials_partitions()
        for partial in partials:
            together[state.partition_of(partial["model"], count)].append(partial)
            self.spoke[partition, partial["model"]] = time.monotonic()
        for batch in together.values():
            for message in encode_partials(batch):
                await self._send(topics.PARTIALS, batch[0]["model"].encode(), message)

    async def _partials_partitions(self) -> int:
        """How many partitions the partials topic has (asked once)."""
        if self.partials_partitions is None:
            assert self.producer is not None
            self.partials_partitions = len(await self.producer.partitions_for(topics.PARTIALS))
        return self.partials_partitions

    async def _catch_up(self, partition: int, ingest: PartitionIngest) -> bool:
        """Bring the partition's labels side up to the predictions it caught up with
        (:meth:`_labels_through`); whether it moved."""
        through = await self._labels_through(partition)
        if through is not None:
            ingest.sketcher.labels_caught_up(through)
        return through is not None

    async def _close_caught_up(self) -> None:
        """Close the buckets of the partitions whose labels side caught up since their last
        batch (their last buckets, once the predictions stop coming)."""
        for partition in [p for p, fetched in self.fetched.items() if fetched]:
            ingest = self.ingests.get(partition)
            if ingest is not None and await self._catch_up(partition, ingest):
                await self._close(partition, ingest)

    def _note_fetched(self, predictions: TopicPartition, ingest: PartitionIngest) -> None:
        """Remember when the predictions folded so far were fetched (at the latest)."""
        assert self.consumer is not None
        ts, when = ingest.sketcher.partition_ts, self.consumer.last_poll_timestamp(predictions)
        fetched = self.fetched[predictions.partition]
        if ts is not None and when is not None and (not fetched or fetched[-1][1] < ts):
            fetched.append((when, ts))

    async def _in_sequence(self, tp: TopicPartition, records: chunks.Chunk) -> chunks.Chunk:
        """The records that continue where this worker's reading of ``tp`` stands (for a
        partition new here: its committed offset). A fetch made before a rebalance took the
        partition away and gave it back would otherwise be folded ahead of the events before
        it, which the consumer then reads again from the committed offset: skipped, and the
        consumer sent back to where it must go on."""
        assert self.consumer is not None
        expected = self.positions.get(tp)
        if expected is None:
            expected = await self.consumer.committed(tp)
            if expected is None:  # nothing committed yet: the log's start, whatever it is
                return records
        if records[0].offset > expected:
            log.info(
                "stage 1: %s fetched from %d, not %d: read again", tp, records[0].offset, expected
            )
            self.consumer.seek(tp, expected)
            return []
        return (
            records
            if records[0].offset == expected
            else [r for r in records if r.offset >= expected]
        )

    async def _labels_through(self, partition: int) -> int | None:
        """The partition's event time up to which every label published was read, if it
        moved on: that of the predictions fetched :data:`LABELS_SETTLE_MS` or more before the
        labels partition's latest fetch, which found it at its end (buckets wait for the
        labels side until then: see Sketcher). A label sent before a prediction may reach the
        broker after it, so the latest fetch of the predictions does not vouch for it."""
        assert self.consumer is not None
        labels, fetched = TopicPartition(topics.LABELS, partition), self.fetched[partition]
        if labels not in self.consumer.assignment():
            polled = None  # no labels here: caught up with every prediction
        else:
            end, polled = self.consumer.highwater(labels), self.consumer.last_poll_timestamp(labels)
            if end is None or polled is None or await self.consumer.position(labels) < end:
                return None
        through = None
        while fetched and (polled is None or fetched[0][0] <= polled - LABELS_SETTLE_MS):
            through = fetched.popleft()[1]
        return through

    def _feed(
        self, ingest: PartitionIngest, tp: TopicPartition, kind: str, records: list, at: int
    ) -> list:
        """Feed ``records`` (from position ``at`` of their batch); ``(position, reason)`` of
        those to dead-letter. A batch that raises is halved until the events that cause the
        error are alone: only they are dead-lettered (an internal error), never the batch."""
        try:
            fed = ingest.feed(kind, [r.value for r in records], [r.offset for r in records])
        except Exception as exc:  # a worker never dies on one batch
            if len(records) == 1:
                log.exception("stage 1 failed on %s[%s]@%s", *tp, records[0].offset)
                return [(at, f"internal error: {exc!r}")]
            mid = len(records) // 2
            return self._feed(ingest, tp, kind, records[:mid], at) + self._feed(
                ingest, tp, kind, records[mid:], at + mid
            )
        metrics.count_events(kind, fed.counts)
        for model, n in fed.duplicates.items():
            metrics.DUPLICATES.labels(model).inc(n)
        return [(at + i, reason) for i, reason in fed.dead]

    async def _heartbeats(self) -> None:
        """Tell each model's stage 2 whether each partition here is behind (has messages not
        read yet): when that changes, and every :data:`HEARTBEAT_S` while it lasts unless a
        partial went meanwhile. Stage 2 never evaluates a window without a source behind,
        however long its partials take (a new owner catching up after a rebalance)."""
        assert self.consumer is not None
        now = time.monotonic()
        for partition in sorted({tp.partition for tp in self.consumer.assignment()}):
            behind = await self._behind(partition)
            if behind is None:
                continue
            changed = self.said.get(partition) != behind
            self.said[partition] = behind
            for model in self.baselines:
                quiet = now - self.spoke.get((partition, model), -HEARTBEAT_S) >= HEARTBEAT_S
                if changed or (behind and quiet):
                    heartbeat = encode_heartbeat(model, partition, behind)
                    await self._send(topics.PARTIALS, model.encode(), heartbeat)
                    self.spoke[partition, model] = now

    async def _behind(self, partition: int) -> bool | None:
        """Whether ``partition`` has messages not read yet (None: not fetched from yet)."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        for topic in (topics.PREDICTIONS, topics.LABELS):
            tp = TopicPartition(topic, partition)
            if tp not in assigned:
                continue
            end = self.consumer.highwater(tp)
            if end is None:
                return None
            if await self.consumer.position(tp) < end:
                return True
        return False

    async def _send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue a message; its delivery is awaited before the next commit (:meth:`_flush`).
        One the producer refuses at once (too large, say) is kept to be sent again."""
        assert self.producer is not None
        message = (topic, key, value)
        try:
            self.pending.append((await self.producer.send(topic, value, key=key), message))
        except KafkaError as exc:
            self._refused(message, exc)
            self.pending.append((None, message))

    def _refused(self, message: tuple[str, bytes | None, bytes], exc: BaseException) -> None:
        log.error("stage 1: the broker refused a message to %s: %r", message[0], exc)
        metrics.SEND_FAILURES.labels(message[0]).inc()

    async def _flush(self) -> bool:
        """Wait until the broker acknowledged everything sent so far; send again (up to
        :data:`SEND_ATTEMPTS` times) what it refused. False when some message is still not
        delivered: it stays pending, and nothing may be committed past it."""
        for attempt in range(SEND_ATTEMPTS + 1):
            sent, self.pending = self.pending, []
            results = await asyncio.gather(
                *(f for f, _ in sent if f is not None), return_exceptions=True
            )
            outcome = iter(results)
            failed = []
            for future, message in sent:
                result = next(outcome) if future is not None else None
                if future is None or isinstance(result, BaseException):
                    if isinstance(result, BaseException):
                        self._refused(message, result)
                    failed.append(message)
            if not failed:
                return True
            if attempt == SEND_ATTEMPTS:
                self.pending = [(None, m) for m in failed]
                return False
            await asyncio.sleep(0.1 * 2**attempt)
            for topic, key, value in failed:
                await self._send(topic, key, _smaller(topic, value))
        return False

    @cached_property
    def decoder(self) -> PredictionDecoder:
        """Every partition's (it is stateless): 1,000 models take ~0.2 s to build one."""
        return PredictionDecoder(self.baselines)

    async def _ingest(self, partition: int) -> PartitionIngest:
        """The partition's stage 1; a partition new here starts from the label join its last
        owner wrote with its last commit (:meth:`_save_joins`), read before its first events
        are folded (so in the batch loop: a rebalance listener may run after a fetch)."""
        ingest = self.ingests.get(partition)
        if ingest is None:
            ingest = PartitionIngest(
                self.baselines,
                source=partition,
                clock=wall_clock_ms,
                wait_for_labels=True,
                decoder=self.decoder,
            )
            try:
                records = await self.state_topic.read(
                    partition % await self.state_topic.partitions()
                )
                chunks, rest = state.join_records_of(records, partition)
                ingest.sketcher.restore_joins(chunks + rest)
                self.join_hashes[partition] = state.join_hashes(rest)
            except KafkaError:  # labels of closed buckets will count as unjoined
                log.error("stage 1: the label join was not read back", exc_info=True)
            self.ingests[partition] = ingest
        return ingest

    async def _commit(self, only: set[int] | None = None) -> None:
        """Commit, per input partition, the first offset whose events may still be needed,
        once the label join those offsets leave behind was written (:meth:`_save_joins`)."""
        assert self.consumer is not None
        if not await self._flush():
            log.error("stage 1: %d messages not delivered; offsets wait", len(self.pending))
            return
        if not await self._save_joins(only):
            return
        offsets = {}
        for partition, ingest in self.ingests.items():
            if only is not None and partition not in only:
                continue
            for kind, offset in ingest.committable().items():
                topic = topics.LABELS if kind == "label" else topics.PREDICTIONS
                offsets[TopicPartition(topic, partition)] = offset
        assigned = self.consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if offsets:
            await self.consumer.commit(offsets)

    async def _save_joins(self, only: set[int] | None) -> bool:
        """Write the label join of the partitions (``only``: those) to the state topic: a new
        owner reads the events after the committed offsets again, and finds the predictions
        and labels from before them waiting there. A large join is written less often (at
        most :data:`JOIN_STATE_BYTES_PER_S`), and offsets wait for it. False: not written."""
        if only is None and time.monotonic() - self.join_saved < self.join_wait:
            return False
        started = time.monotonic()
        written = {p: i for p, i in self.ingests.items() if only is None or p in only}
        hashes: dict[int, list[int]] = {}
        try:
            partitions = await self.state_topic.partitions()
            records: dict[int, list] = defaultdict(list)
            for p, ingest in written.items():
                sketcher = ingest.sketcher
                rest, hashes[p] = state.join_state(
                    p, sketcher.join_records(waiting=False), self.join_hashes.get(p, [])
                )
                records[p % partitions] += state.join_chunks(p, sketcher.joins) + rest
            await self.state_topic.write(records)
        except KafkaError:  # the next write sends these changes again
            log.error("stage 1: the label join was not written; offsets wait", exc_info=True)
            return False
        self.join_hashes.update(hashes)
        for ingest in written.values():
            for table in ingest.sketcher.joins.values():
                table.saved()
        if only is None:
            size = sum(len(v or b"") for batch in records.values() for _, v in batch)
            self.join_saved, self.join_wait = started, size / JOIN_STATE_BYTES_PER_S
        return True

    async def revoke(self, revoked) -> None:
        """Partitions leave this worker: commit what is safe and forget their state (the new
        owner re-reads the events of their open buckets)."""
        async with self.lock:
            gone = {tp.partition for tp in revoked}
            try:
                await self._commit(only=gone)
            except Exception:  # the group moved on: the new owner re-reads a little more
                log.warning("stage 1: commit on revocation failed", exc_info=True)
            for partition in gone:
                self.ingests.pop(partition, None)
                self.join_hashes.pop(partition, None)
                self.said.pop(partition, None)
                self.fetched.pop(partition, None)
            self.spoke = {k: t for k, t in self.spoke.items() if k[0] not in gone}
            for tp in revoked:
                self.positions.pop(tp, None)

    def _report(self) -> None:
        """Gauges of the consumer's lag and the label join's size."""
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            end, position = self.consumer.highwater(tp), self.positions.get(tp)
            if end is not None and position is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, tp.partition).set(max(end - position, 0))
        sketchers = [i.sketcher for i in self.ingests.values()]
        metrics.EXPIRED.set(sum(s.expired_unlabelled for s in sketchers))
        metrics.UNJOINED.set(sum(s.expired_unjoined_labels for s in sketchers))
        metrics.LABEL_JOIN.labels("predictions").set(
            sum(len(t) for s in sketchers for t in s.joins.values())
        )
        metrics.LABEL_JOIN.labels("labels").set(sum(len(s.early_labels) for s in sketchers))
        metrics.LABEL_JOIN_BYTES.set(sum(s.join_bytes() for s in sketchers))


def _count_label_join(ingest: PartitionIngest) -> None:
    """Export the label join's evictions and late labels, counted here, then started afresh."""
    sketcher = ingest.sketcher
    if sketcher.evicted:
        metrics.LABEL_JOIN_EVICTIONS.inc(sketcher.evicted)
        sketcher.evicted = 0
    for model, n in sketcher.late_labels.items():
        metrics.LATE_LABELS.labels(model).inc(n)
    sketcher.late_labels.clear()


def _smaller(topic: str, value: bytes) -> bytes:
    """A message to send again: a dead letter without its original (the letter itself is
    too large, or malformed: its topic, partition and offset still say where the original
    is); any other message as it is."""
    if topic != topics.DEADLETTER:
        return value
    letter = orjson.loads(value)
    return contract.encode({**letter, "original_b64": "", "original_text": None})
