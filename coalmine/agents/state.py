"""Stage 2's state in a compacted topic, so that a partition's new owner resumes exactly.

Each model's :class:`~coalmine.streams.evaluator.Evaluator` (merged partials, the window ring,
CUSUMs, alert states and ids, the rollout controller) is written to ``coalmine.state``, in the
partition of the model's partials, about once a second while it evaluates (less often when a
write takes long: ``coalmine.agents.app.SAVE_SHARE``; at once after an alert or a command) and
always before the partials it covers are acknowledged: whatever a new owner does not find in
the state, Kafka delivers again (and what it finds, it does not merge twice: the merged
(source, bucket) set is part of the state). Records that do not read are dead-lettered, and
their model starts afresh.

Records, keyed ``<model> NUL <what>``: ``head`` (the evaluator without its window's buckets)
and one per bucket in the window, written once (again only when a version hand-over changed
it), deleted (a tombstone) when it leaves the window. The model's baseline, settings and
signer are never written: they are the worker's own, referenced by name.

Stage 1's label join (answers and labels waiting, per input partition) is written there too,
with each of stage 1's commits, in the state partition numbered as the input partition (modulo
the state topic's partitions): the tables of answers waiting by chunk (:func:`join_chunks`),
the rest whole (:func:`join_state`), each write only what changed.

Only the classes of coalmine's statistics, numpy arrays and plain containers are read back:
a forged record cannot run code.
"""

from __future__ import annotations

import asyncio
import functools
import io
import pickle
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from coalmine import topics
from coalmine.partials import decode_summaries, encode_summaries
from coalmine.security import client_kwargs
from coalmine.signing import Signer
from coalmine.streams.baseline import Baseline
from coalmine.streams.evaluator import Evaluator, fitted
from coalmine.streams.label_join import JoinTable
from coalmine.streams.rollout import RolloutPolicy
from coalmine.streams.settings import ModelSettings
from coalmine.streams.sketch import Packed, Summary
from coalmine.streams.window import PackedBucket

_SEP = b"\x00"
_HEAD = b"head"
#: what a state record may contain besides coalmine's statistics classes
_ALLOWED = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("collections", "Counter"),
    ("collections", "deque"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
}


def key(model: str, what: bytes) -> bytes:
    return model.encode() + _SEP + what


def join_chunks(partition: int, joins: dict[str, JoinTable]) -> list[tuple[bytes, bytes | None]]:
    """The state records of the chunks of stage 1's tables of answers waiting (``Sketcher.joins``
    of input ``partition``) that changed since the last call (a tombstone for a chunk with no
    answer left): a write costs what changed, never the whole join."""
    return [
        (_chunk_key(partition, variant, chunk), record)
        for variant, table in joins.items()
        for chunk, record in table.chunk_records(variant)
    ]


def join_state(
    partition: int, records: list[bytes], written: list[int]
) -> tuple[list[tuple[bytes, bytes | None]], list[int]]:
    """The rest of stage 1's label join of input ``partition`` (``Sketcher.join_records(
    waiting=False)``: labels waiting, answers of labels counted in open buckets) as the state
    records to write, given the hashes of the last write's records (``written``): those that
    changed (an unchanged one stays in the compacted topic), and tombstones for the last
    write's beyond them. Returns them and the hashes of ``records``, for the next write."""
    hashes = join_hashes(records)
    out: list[tuple[bytes, bytes | None]] = [
        (_join_key(partition, i), r)
        for i, (r, h) in enumerate(zip(records, hashes))
        if i >= len(written) or h != written[i]
    ]
    out += [(_join_key(partition, i), None) for i in range(len(records), len(written))]
    return out, hashes


def join_hashes(records: list[bytes]) -> list[int]:
    """What :func:`join_state` remembers of records written (or read back) to tell a changed
    one: their hashes."""
    return list(map(hash, records))


def join_records_of(records: dict[bytes, bytes], partition: int) -> tuple[list[bytes], list[bytes]]:
    """Stage 1's label-join records of input ``partition`` among a state partition's latest
    records: the chunks (each table's in order, for ``Sketcher.restore_joins``), and the rest
    in the order :func:`join_state` wrote them. Keyed as no model's records are (no model is
    named the empty string), so stage 2's :func:`restore` passes them by."""
    chunks, rest = _chunk_prefix(partition), _join_prefix(partition)
    found = {}
    for k, v in records.items():
        if k.startswith(chunks):
            variant, _, chunk = k[len(chunks) :].rpartition(b" ")
            found[0, variant, int(chunk)] = v
        elif k.startswith(rest):
            found[1, b"", int(k[len(rest) :])] = v
    ordered = [found[k] for k in sorted(found)]
    n = sum(1 for k in found if k[0] == 0)
    return ordered[:n], ordered[n:]


def _join_prefix(partition: int) -> bytes:
    return key("", b"stage1 join %d " % partition)


def _join_key(partition: int, i: int) -> bytes:
    return _join_prefix(partition) + b"%d" % i


def _chunk_prefix(partition: int) -> bytes:
    return key("", b"stage1 chunk %d " % partition)


def _chunk_key(partition: int, variant: str, chunk: int) -> bytes:
    return _chunk_prefix(partition) + variant.encode() + b" %d" % chunk


def model_of(record_key: bytes) -> tuple[str, bytes]:
    model, _, what = record_key.partition(_SEP)
    return model.decode(), what


class _Pickler(pickle.Pickler):
    """Writes the worker's own objects (baseline, settings, signer) by name, the window's
    buckets by their start (each has a record of its own), and the summaries of ``compact``
    (ids) in the partials' compact form: a backlog's pending buckets, dense, made heads of
    ~100 KB a model."""

    def __init__(self, buffer: io.BytesIO, buckets: dict[int, PackedBucket], compact: set[int]):
        super().__init__(buffer, protocol=4)  # arrays come back writable (5: read-only views)
        self.buckets, self.compact = buckets, compact

    def persistent_id(self, obj):  # noqa: D102 (pickle's hook, called for every object)
        kind = _own_kind(type(obj))
        if kind is None:
            return None
        if kind == "bucket":
            self.buckets[obj.start] = obj
            return ("bucket", obj.start)
        if kind == "summary":
            return ("summary", _dumps_summaries({"": obj})) if id(obj) in self.compact else None
        return (kind,)


#: the worker's own classes, written by name (a bucket: by its start)
_OWN = (
    (Baseline, "baseline"),
    (ModelSettings, "settings"),
    (RolloutPolicy, "policy"),
    (Signer, "signer"),
    (PackedBucket, "bucket"),
    (Summary, "summary"),
)


@functools.cache
def _own_kind(cls: type) -> str | None:
    """How :class:`_Pickler` writes an object of class ``cls``: one of :data:`_OWN`'s names,
    or None (pickled). Cached: a head holds thousands of objects of a few classes."""
    return next((kind for own, kind in _OWN if issubclass(cls, own)), None)


class _Unpickler(pickle.Unpickler):
    def __init__(self, raw: bytes, own: dict, buckets: dict[int, PackedBucket]):
        super().__init__(io.BytesIO(raw))
        self.own, self.buckets = own, buckets

    def persistent_load(self, pid):  # noqa: D102
        if pid[0] == "bucket":
            return self.buckets[pid[1]]
        if pid[0] == "summary":
            return _loads_summaries(pid[1])[""]
        return self.own[pid[0]]

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module.startswith("coalmine.streams."):
            found = super().find_class(module, name)
            if isinstance(found, type):  # a class of the statistics, never a function
                return found
        raise pickle.UnpicklingError(f"state record: {module}.{name} is not allowed")


def _dumps_summaries(summaries: dict[str, Summary] | dict[str, Packed]) -> bytes:
    """Summaries by name in the partials' compact form (a low-traffic model's buckets hold a
    few events in a few of their bins); exact for sums of stage 1's summaries, whose bin sums
    are 0 wherever their counts are (a window's sums, less its oldest buckets, keep rounding
    residues there)."""
    return encode_summaries(
        {
            name: s.sparse_dict() if isinstance(s, Packed) else s.to_dict()
            for name, s in summaries.items()
        }
    )


def _loads_summaries(raw: bytes) -> dict[str, Summary]:
    """:func:`_dumps_summaries` back."""
    return {name: Summary.from_dict(d) for name, d in decode_summaries(raw).items()}


def _loads_bucket(raw: bytes, own: dict) -> dict[str, Summary]:
    """A bucket record's summaries by variant; a record written before the compact form:
    pickled ``(start, variants)``."""
    if raw[:1] == b"\x80":  # a pickle's PROTO opcode, never a MessagePack map's first byte
        return _Unpickler(raw, own, {}).load()[1]
    return _loads_summaries(raw)


@dataclass
class ModelState:
    """What was last written of one model's evaluator."""

    written: set[int] = field(default_factory=set)  # bucket starts with a record
    versions: dict[str, str] = field(default_factory=dict)  # as of the last head

    def records(self, model: str, evaluator: Evaluator) -> list[tuple[bytes, bytes | None]]:
        """The records that bring the topic up to ``evaluator``: new buckets (all of them after
        a version hand-over, which may have changed old ones), tombstones for buckets that
        left the window, then the head."""
        buffer = io.BytesIO()
        ring: dict[int, PackedBucket] = {}
        pending = {id(s) for variants in _waiting(evaluator) for s in variants.values()}
        _Pickler(buffer, ring, pending).dump(evaluator)
        rewrite = evaluator.versions != self.versions
        out: list[tuple[bytes, bytes | None]] = [
            (key(model, b"b%d" % start), _dumps_summaries(bucket.variants))
            for start, bucket in sorted(ring.items())
            if rewrite or start not in self.written
        ]
        out += [(key(model, b"b%d" % start), None) for start in sorted(self.written - set(ring))]
        out.append((key(model, _HEAD), buffer.getvalue()))
        self.written, self.versions = set(ring), dict(evaluator.versions)
        return out


def restore(
    records: dict[bytes, bytes], baseline: Baseline, signer: Signer | None
) -> tuple[Evaluator, ModelState] | None:
    """One model's evaluator from its latest records (key -> value, tombstones removed), or
    None when it has no head; ValueError when a summary of theirs does not fit the model's
    layout (:func:`~coalmine.streams.evaluator.fitted`)."""
    model = baseline.settings.name
    head = head_record(records, model)
    if head is None:
        return None
    own = {
        "baseline": baseline,
        "settings": baseline.settings,
        "policy": baseline.policy,
        "signer": signer,
    }
    buckets: dict[int, PackedBucket] = {}
    for record_key, value in records.items():
        name, what = model_of(record_key)
        if name == model and what.startswith(b"b"):
            start = int(what[1:])
            loaded = _loads_bucket(value, own).items()
            packed = {v: Packed(fitted(s, baseline)) for v, s in loaded}
            buckets[start] = PackedBucket(start, packed)
    evaluator = _Unpickler(head, own, buckets).load()
    if not isinstance(evaluator, Evaluator):
        raise pickle.UnpicklingError(f"state record of {model}: not an evaluator")
    for variants in (evaluator.window.sums, *_waiting(evaluator)):
        for summary in variants.values():
            fitted(summary, baseline)
    return evaluator, ModelState(set(buckets), dict(evaluator.versions))


def _waiting(evaluator: Evaluator) -> list[dict[str, Summary]]:
    """The summaries of the buckets waiting to be evaluated: pending, and carried."""
    return [*evaluator.pending.values(), *(bucket.variants for bucket in evaluator.carried)]


def head_record(records: dict[bytes, bytes], model: str) -> bytes | None:
    """A model's head among a partition's latest records (:func:`restore`)."""
    return records.get(key(model, _HEAD))


def partition_of(model: str, partitions: int) -> int:
    """The partition of a model's partials (and so of its state): the producers' default
    partitioner on the model's name, the partials' key."""
    return DefaultPartitioner()(model.encode(), list(range(partitions)), list(range(partitions)))


class StateTopic:
    """Writes state records (acknowledged before :meth:`write` returns) and reads a
    partition's latest records back, with a producer (started at the first write) and
    consumers of its own."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.producer: AIOKafkaProducer | None = None

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def _producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            self.producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                linger_ms=2,
                # a write holds thousands of records (every model's new buckets and head), more
                # than aiokafka's default 16 KB batches carry well: 1,000 models' catch-up write
                # of 132 MB took 7.7 s with these, 10.3 s with those (one run each)
                max_batch_size=512 * 1024,
                max_request_size=8 << 20,
                acks=1,
                **client_kwargs(self.bootstrap),
            )
            await self.producer.start()
        return self.producer

    async def partitions(self) -> int:
        """How many partitions the state topic has."""
        return len(await (await self._producer()).partitions_for(topics.STATE))

    async def write(self, records: dict[int, list[tuple[bytes, bytes | None]]]) -> None:
        """Partition -> records; returns once the broker has them all."""
        producer = await self._producer()
        sent = [
            await producer.send(topics.STATE, value, key=k, partition=p)
            for p, batch in records.items()
            for k, value in batch
        ]
        await asyncio.gather(*sent)

    async def read(self, partition: int) -> dict[bytes, bytes]:
        """The partition's latest value per key (deleted keys left out)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            max_partition_fetch_bytes=16 << 20,  # a head may be megabytes (pending partials)
            fetch_max_bytes=64 << 20,
            **client_kwargs(self.bootstrap),
        )
        await consumer.start()
        latest: dict[bytes, bytes | None] = {}
        try:
            tp = TopicPartition(topics.STATE, partition)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while True:
                records = (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
                latest.update((r.key, r.value) for r in records)
                # the embedded broker's end offset may stop short of the last record batch:
                # read on until nothing more comes
                if not records and await consumer.position(tp) >= end:
                    break
        finally:
            await consumer.stop()
        return {k: v for k, v in latest.items() if v is not None}
