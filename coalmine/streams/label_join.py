"""Stage 1's table of predictions waiting for their labels, in columns.

A dict of tuples keyed by request id costs ~250 bytes a waiting prediction (the id's string,
a tuple, boxed numbers); here a prediction is a row of numpy columns found through an
open-addressing index of a 64-bit key of its request id (:func:`request_keys`, the same in
every process, so a table can be written to the state topic and read back by another worker):
~100 bytes (``benchmarks/label_join_memory.py``). Labels are looked up a batch at a time.
Rows are appended in arrival order, so the oldest go first (expiry, eviction) by moving a
head; the columns are compacted (or grown) when they fill up.

For the state topic a table is cut into chunks of :data:`CHUNK_ROWS` rows in arrival order,
each a record of its own: a table remembers which chunks changed (rows came, were joined,
expired) and :meth:`JoinTable.chunk_records` gives only those, so a write costs what changed
since the last, never the whole table.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, NamedTuple

import numpy as np
import orjson

#: request ids longer than this are keyed one by one (hashlib), not in the vectorised pass
_LONG = 128
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
_FLOAT, _INT, _OBJECT = 0, 1, 2  # how a prediction is kept: float, int (as float), object
_EXACT_INT = 2**53
#: rows of a table in one record of the state topic: the newest chunk is written again at
#: each write until it fills (~45 bytes a row)
CHUNK_ROWS = 4096


class Answer(NamedTuple):
    """One variant's answer waiting for its label."""

    model: str
    prediction: object
    ts: int
    latency: float | None
    #: a binary model's positive score, kept for its realised ROC AUC (None: not kept)
    score: float | None = None


def request_keys(request_ids: list[str]) -> np.ndarray:
    """Stable 64-bit keys of request ids: FNV-1a over their code points, then SplitMix64's
    finaliser. Two ids of a partition's 10^6 waiting share a key with odds ~3e-8."""
    n = len(request_ids)
    keys = np.empty(n, dtype=np.uint64)
    lengths = np.fromiter(map(len, request_ids), dtype=np.int64, count=n)
    long = lengths > _LONG
    short = np.flatnonzero(~long)
    if len(short):
        ids = request_ids if len(short) == n else [request_ids[i] for i in short]
        points = np.array(ids, dtype=f"<U{max(1, int(lengths[short].max()))}")
        points = points.view(np.uint32).reshape(len(ids), -1).astype(np.uint64)
        h = np.full(len(ids), _FNV_OFFSET)
        width = lengths[short]
        with np.errstate(over="ignore"):
            for j, column in enumerate(points.T):  # a shorter id's padding does not count
                h = np.where(j < width, (h ^ column) * _FNV_PRIME, h)
            keys[short] = _mix(h ^ width.astype(np.uint64))
    for i in np.flatnonzero(long).tolist():
        digest = hashlib.blake2b(request_ids[i].encode(), digest_size=8).digest()
        keys[i] = int.from_bytes(digest, "little")
    return keys


def _mix(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


class JoinTable:
    """One variant's predictions waiting for their labels, oldest first.

    ``models``: the model names (a row keeps its model's position in it).
    """

    COLUMNS = {
        "key": np.uint64,
        "ts": np.int64,
        "latency": np.float64,  # NaN: none
        "number": np.float64,  # the prediction, when a number
        "kind": np.int8,
        "model": np.int32,
        "live": np.bool_,
        "score": np.float64,  # a binary model's positive score (NaN: none)
        "chunk": np.int32,  # the row's chunk (arrival number // CHUNK_ROWS), never decreasing
    }

    def __init__(self, models: list[str], capacity: int = 1024):
        self.models = list(models)
        self._model_code = {m: i for i, m in enumerate(self.models)}
        self.columns: dict[str, np.ndarray] = {
            name: np.zeros(capacity, dtype) for name, dtype in self.COLUMNS.items()
        }
        self.objects = np.full(capacity, None, dtype=object)  # other predictions
        self.head = self.end = 0  # rows before head are gone; end: the next free row
        self.size = 0  # live rows
        self.appended = 0  # rows ever appended: the next one's arrival number
        self.changed: set[int] = set()  # chunks changed since they were last saved()
        self._index(capacity)

    def _index(self, capacity: int) -> None:
        """An empty index for ``capacity`` rows: open addressing, linear probing, at most two
        thirds full. Slots are never emptied: one whose row has gone is passed over, and the
        index is built again whenever the rows move (:meth:`_reserve`)."""
        slots = 1 << (capacity + capacity // 2 - 1).bit_length()
        self.slot_key = np.zeros(slots, np.uint64)
        self.slot_row = np.full(slots, -1, np.int32)

    def __len__(self) -> int:
        return self.size

    def __contains__(self, request_id: str) -> bool:
        return bool(self._rows(request_keys([request_id]))[0] >= 0)

    def nbytes(self) -> int:
        """Memory the table holds: its columns and index (predictions other than numbers
        are not counted)."""
        arrays = [*self.columns.values(), self.objects, self.slot_key, self.slot_row]
        return sum(a.nbytes for a in arrays)

    def _rows(self, keys: np.ndarray) -> np.ndarray:
        """The live row of each key, or -1 (vectorised :meth:`_row`)."""
        mask, live = np.uint64(len(self.slot_row) - 1), self.columns["live"]
        at = (keys & mask).astype(np.int64)
        out = np.full(len(keys), -1, np.int64)
        pending = np.arange(len(keys))
        while len(pending):
            slot = at[pending]
            row = self.slot_row[slot]
            hit = (row >= 0) & (self.slot_key[slot] == keys[pending]) & live[row]
            out[pending[hit]] = row[hit]
            pending = pending[(row >= 0) & ~hit]
            at[pending] = (at[pending] + 1) & int(mask)
        return out

    def _insert(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Put ``rows`` (distinct) in the index under their ``keys``. A key already there (a
        request answered again, or twice among ``rows``) keeps its latest row in its slot;
        returns the rows that lost theirs (the caller takes them out)."""
        mask = len(self.slot_row) - 1
        at = (keys & np.uint64(mask)).astype(np.int64)
        pending = np.arange(len(keys))
        lost = []
        while len(pending):
            slot = at[pending]
            row = self.slot_row[slot]
            same = (row >= 0) & (self.slot_key[slot] == keys[pending])
            if same.any():  # rare: the latest row takes the slot, the others lose
                slots, mine = slot[same], rows[pending[same]]
                np.maximum.at(self.slot_row, slots, mine.astype(np.int32))
                kept = self.slot_row[slots]
                lost += [mine[mine != kept], row[same][row[same] != kept]]
            free = row < 0
            # a free slot several keys reach goes to one of them (the row numpy wrote last);
            # the others look at it again (the same key may have taken it), then probe on
            self.slot_row[slot[free]] = rows[pending[free]]
            won = free & (self.slot_row[slot] == rows[pending])
            self.slot_key[slot[won]] = keys[pending[won]]
            on = ~free & ~same
            at[pending[on]] = (at[pending[on]] + 1) & mask
            pending = pending[on | (free & ~won)]
        return np.unique(np.concatenate(lost)) if lost else np.zeros(0, np.int64)

    def add(
        self,
        model: str,
        keys: np.ndarray,
        ts: np.ndarray,
        latency: np.ndarray,
        predictions,
        scores: np.ndarray | None = None,
    ) -> None:
        """Append one model's answers: their requests' keys (:func:`request_keys`), event
        times, latencies (NaN: none), predictions and positive scores (NaN or None: none). A
        later answer to the same request replaces one waiting."""
        number, kind, objects = _split(predictions)
        codes = np.full(len(keys), self._model_code[model], np.int32)
        score = np.full(len(keys), np.nan) if scores is None else scores
        self._append(keys, ts, latency, number, kind, codes, score, objects)

    def _append(
        self, keys, ts, latency, number, kind, models, scores, objects, chunks=None
    ) -> None:
        """Append rows; ``chunks``: theirs as read back from the state topic (they are there
        already), else new ones."""
        n = len(keys)
        if not n:
            return
        if chunks is None:
            chunks = (self.appended + np.arange(n)) // CHUNK_ROWS
            self.changed.update(range(int(chunks[0]), int(chunks[-1]) + 1))
            self.appended += n
        else:  # rows appended later go to chunks of their own
            self.appended = max(self.appended, (int(chunks.max()) + 1) * CHUNK_ROWS)
        self._reserve(n)
        rows = np.arange(self.end, self.end + n)
        c = self.columns
        c["key"][rows], c["ts"][rows], c["latency"][rows] = keys, ts, latency
        c["number"][rows], c["kind"][rows], c["model"][rows] = number, kind, models
        c["score"][rows], c["chunk"][rows], c["live"][rows] = scores, chunks, True
        for i, value in objects:
            self.objects[self.end + i] = value
        # a request answered again (rare): the last answer counts
        lost = self._insert(keys, rows)
        lost = lost[c["live"][lost]]
        self.size += n - len(lost)
        self._went(lost)
        self.end += n

    def _went(self, rows: np.ndarray) -> None:
        """Live ``rows`` leave the table (their chunks changed)."""
        self.columns["live"][rows] = False
        self.changed.update(np.unique(self.columns["chunk"][rows]).tolist())

    def dump(self, variant: str, rows: int) -> list[bytes]:
        """The answers waiting, oldest first, as records of at most ``rows`` answers each (for
        the state topic: numpy's format, read back without pickles, and a JSON header with
        the variant, the model names and the predictions that are not numbers); read back,
        they go to new chunks."""
        live = self.head + np.flatnonzero(self.columns["live"][self.head : self.end])
        return [self._record(variant, live[i : i + rows], False) for i in range(0, len(live), rows)]

    def chunk_records(self, variant: str) -> list[tuple[int, bytes | None]]:
        """The chunks that changed since they were last :meth:`saved`, each as a record of its
        answers still waiting (as :meth:`dump`'s, with their chunk), or None when none is
        left."""
        span = self.columns["chunk"][self.head : self.end]  # never decreasing
        out: list[tuple[int, bytes | None]] = []
        for chunk in sorted(self.changed):
            start, stop = self.head + np.searchsorted(span, [chunk, chunk + 1])
            live = start + np.flatnonzero(self.columns["live"][start:stop])
            out.append((chunk, self._record(variant, live, True) if len(live) else None))
        return out

    def saved(self) -> None:
        """The last :meth:`chunk_records` were written: none has changed since."""
        self.changed.clear()

    def _record(self, variant: str, at: np.ndarray, chunks: bool) -> bytes:
        others = np.flatnonzero(self.columns["kind"][at] == _OBJECT).tolist()
        header = {
            "variant": variant,
            "models": self.models,
            "objects": [[i, self.objects[at[i]]] for i in others],
        }
        skip = {"live"} if chunks else {"live", "chunk"}
        return _npz(header, **{name: c[at] for name, c in self.columns.items() if name not in skip})

    def load(self, header: dict, arrays) -> None:
        """Append the answers of a record :meth:`dump` or :meth:`chunk_records` wrote (of
        models this table knows; a record written before scores were kept has none). A
        chunk's rows keep their chunk, which is unchanged unless some of its rows were left
        out here."""
        codes = np.array([self._model_code.get(m, -1) for m in header["models"]], np.int32)
        models = codes[arrays["model"]] if len(codes) else np.zeros(0, np.int32)
        known = models >= 0
        objects = [(i, value) for i, value in header["objects"]]
        if not known.all():
            renumber = np.cumsum(known) - 1
            objects = [(int(renumber[i]), v) for i, v in objects if known[i]]
        self._append(
            arrays["key"][known],
            arrays["ts"][known],
            arrays["latency"][known],
            arrays["number"][known],
            arrays["kind"][known],
            models[known],
            arrays.get("score", np.full(len(known), np.nan))[known],
            objects,
            arrays["chunk"][known] if "chunk" in arrays else None,
        )
        if "chunk" in arrays and not known.all():
            self.changed.update(np.unique(arrays["chunk"][~known]).tolist())

    def pop_many(self, keys: np.ndarray) -> list[Answer | None]:
        """The answers waiting under ``keys`` (from :func:`request_keys`), taken out (None
        where none waits, and for a key repeated after its first)."""
        rows = self._rows(keys)
        _, first = np.unique(keys, return_index=True)
        if len(first) < len(keys):
            repeated = np.ones(len(keys), bool)
            repeated[first] = False
            rows[repeated] = -1
        out: list[Answer | None] = [None] * len(keys)
        found = np.flatnonzero(rows >= 0)
        if not len(found):
            return out
        at, c = rows[found], self.columns
        kind = c["kind"][at]
        predictions: list = c["number"][at].tolist()
        for i in np.flatnonzero(kind == _INT).tolist():
            predictions[i] = int(predictions[i])
        for i in np.flatnonzero(kind == _OBJECT).tolist():
            predictions[i] = self.objects[at[i]]
        models = [self.models[m] for m in c["model"][at].tolist()]
        answers = zip(
            models,
            predictions,
            c["ts"][at].tolist(),
            c["latency"][at].tolist(),
            c["score"][at].tolist(),
        )
        for i, (model, prediction, ts, latency, score) in zip(found.tolist(), answers):
            out[i] = Answer(model, prediction, ts, _none_if_nan(latency), _none_if_nan(score))
        self._went(at)
        self.objects[at] = None
        self.size -= len(at)
        return out

    def expire(self, oldest: dict[str, int]) -> int:
        """Drop the answers, from the oldest, with an event time before their model's
        ``oldest``, up to the first that is not; how many were live."""
        c = self.columns
        bounds = np.array([oldest.get(m, np.iinfo(np.int64).min) for m in self.models])
        stop = self.end
        for span in self._from_head():
            keep = c["live"][span] & (c["ts"][span] >= bounds[c["model"][span]])
            if keep.any():
                stop = span.start + int(np.argmax(keep))
                break
        return self._drop(stop)

    def evict(self, n: int) -> int:
        """Drop the ``n`` oldest answers."""
        for span in self._from_head():
            live = np.cumsum(self.columns["live"][span])
            if n <= 0 or live[-1] >= n:
                break
            n -= int(live[-1])
        return self._drop(span.start + int(np.searchsorted(live, n)) + 1) if n > 0 else 0

    def _from_head(self):
        """The rows from the oldest on, in spans that double: a scan that stops at the first
        row it keeps costs what it drops, not the whole table."""
        start, size = self.head, 1024
        while start < self.end:
            yield slice(start, min(start + size, self.end))
            start, size = start + size, 2 * size

    def _drop(self, stop: int) -> int:
        """Drop every row before ``stop``; how many were live."""
        span = slice(self.head, stop)
        gone = self.head + np.flatnonzero(self.columns["live"][span])
        self.size -= len(gone)
        self._went(gone)
        self.objects[span] = None
        self.head = stop
        return len(gone)

    def _reserve(self, n: int) -> None:
        """Room for ``n`` more rows: the live rows moved to the front, in a table half as
        large again when they would fill more than three quarters of it (so that a row is
        moved three times at most, on average, before it leaves)."""
        capacity = len(self.objects)
        if self.end + n <= capacity:
            return
        live = self.head + np.flatnonzero(self.columns["live"][self.head : self.end])
        size = capacity
        while len(live) + n > size * 3 // 4:
            size += size // 2
        columns: dict[str, np.ndarray] = {
            name: np.zeros(size, dtype) for name, dtype in self.COLUMNS.items()
        }
        for name, column in self.columns.items():
            columns[name][: len(live)] = column[live]
        objects = np.full(size, None, dtype=object)
        objects[: len(live)] = self.objects[live]
        self.columns, self.objects = columns, objects
        self._index(size)
        self._insert(columns["key"][: len(live)], np.arange(len(live)))
        self.head, self.end = 0, len(live)


def _none_if_nan(value: float) -> float | None:
    return None if value != value else value


def _npz(header: dict, **arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(orjson.dumps(header), np.uint8), **arrays)
    return buffer.getvalue()


def read_record(record: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """A record of :meth:`JoinTable.dump` or :func:`labels_record`: its header and arrays
    (no pickles are read)."""
    with np.load(io.BytesIO(record), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return orjson.loads(arrays.pop("header").tobytes()), arrays


def labels_record(labels: list[dict]) -> bytes:
    """A record of labels waiting for their prediction."""
    return _npz({"labels": labels})


def _split(predictions: list) -> tuple[np.ndarray, np.ndarray, list[tuple[int, object]]]:
    """Predictions as numbers (floats, and ints that floats hold exactly) and the others
    (strings, booleans, None), with each one's kind."""
    types = set(map(type, predictions))
    if types and types <= {int, float}:
        number = np.array(predictions, dtype=float)
        if int not in types or np.abs(number).max() < _EXACT_INT:
            if len(types) == 1:  # the common batch: one type
                return number, np.full(len(number), _INT if int in types else _FLOAT, np.int8), []
            kind = np.array([type(p) is int for p in predictions], dtype=np.int8)
            return number, kind, []
    number = np.zeros(len(predictions))
    kind = np.full(len(predictions), _OBJECT, np.int8)
    objects = []
    for i, p in enumerate(predictions):
        if type(p) is float or (type(p) is int and abs(p) < _EXACT_INT):
            number[i], kind[i] = p, _INT if type(p) is int else _FLOAT
        else:
            objects.append((i, p))
    return number, kind, objects
