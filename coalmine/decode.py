"""Prediction messages to columns in C: the fast path of stage 1's decoding.

Each monitored model gets a msgspec ``Struct`` type (tagged by ``model``) whose ``features``
field is itself a struct of the model's monitored features, typed as its reference typed them
(numeric: a number or null). One ``decode`` per message parses and type-checks it in C, with
no dict per event; the columns the sketch needs are then read off the structs with
``attrgetter``. What the types cannot say is checked on whole columns (non-empty ids,
``ts >= 0``, ``latency_ms >= 0``, a null prediction only on failed requests).

The fast path only ever *accepts*: a message it cannot vouch for (malformed, against the
schema, of an unknown model, a numeric feature given a string, or a string holding ``{`` or
``[``, which the cheap check for nested values cannot tell from structure) goes through
:func:`coalmine.events.split_valid`, the exact validator, which gives the reason. So the
events accepted, and the reasons given, are those of the schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import attrgetter
from typing import Any, Literal

import msgspec
import numpy as np

from coalmine import events as contract
from coalmine.streams.baseline import Baseline
from coalmine.streams.derived import is_derived
from coalmine.streams.reference import PREDICTION, SCORES, is_model_output
from coalmine.streams.settings import MAX_TS
from coalmine.streams.sketch import NUMERIC
from coalmine.streams.sketcher import PredictionBatch, batches_from_events

_SCALAR = int | float | str | None
_ENVELOPE = (
    ("event_id", str),
    ("request_id", str),
    ("version", str),
    ("variant", Literal["champion", "canary", "shadow"]),
    ("ts", int),
    ("features", Any),  # replaced by the model's features struct
    ("status", Literal["ok", "error"]),
    # absent reads as null, which the column check allows only on failed requests (msgspec
    # wants the fields with defaults after the required ones)
    ("prediction", _SCALAR, None),
    ("scores", dict[str, float] | None, None),
    ("latency_ms", float | None, None),
    ("error", str | None, None),
    ("unit_id", str | None, None),
)
_IDS = ("event_id", "request_id", "version")
#: the envelope fields :meth:`_Model.batch` reads off a decoded event
_envelope = attrgetter(
    "ts",
    "variant",
    "version",
    "status",
    "request_id",
    "event_id",
    "prediction",
    "latency_ms",
    "scores",
    "features",
)


def _inputs(baseline: Baseline) -> list[str]:
    """The model's monitored features: its layout's columns but the model's outputs and the
    columns derived from the others."""
    return [n for n in baseline.layout.names if not is_model_output(n) and not is_derived(n)]


def _features_struct(features: tuple[tuple[str, bool], ...]) -> type:
    """A struct of the monitored ``features`` (name, whether numeric); field ``f{j}`` is
    feature ``j`` (feature names need not be identifiers). Others are skipped when decoding."""
    fields = [
        (f"f{j}", float | None if numeric else _SCALAR, None)
        for j, (_, numeric) in enumerate(features)
    ]
    return msgspec.defstruct(
        "Features",
        fields,
        rename={f"f{j}": name for j, (name, _) in enumerate(features)},
        gc=False,
    )


class _Model:
    """One model's struct type and how to read its columns off decoded events."""

    def __init__(self, name: str, baseline: Baseline, shared: dict[tuple, type]):
        self.name, self.baseline = name, baseline
        layout = baseline.layout
        inputs = list(enumerate(_inputs(baseline)))
        # models monitoring the same features share their struct: one type for msgspec to
        # inspect, not one a model (a decoder of 1,000 models is built once a worker)
        key = tuple((n, layout.kinds[n] == NUMERIC) for _, n in inputs)
        if key not in shared:
            shared[key] = _features_struct(key)
        fields = [(f[0], shared[key], *f[2:]) if f[0] == "features" else f for f in _ENVELOPE]
        self.struct = msgspec.defstruct(
            f"Prediction_{name}",
            fields,
            tag=name,
            tag_field="model",
            forbid_unknown_fields=True,
            gc=False,
        )
        numeric = [(f"f{j}", n) for j, n in inputs if layout.kinds[n] == NUMERIC]
        self.numeric = [n for _, n in numeric]
        # the numeric features' values off a features struct (a tuple when several)
        self.numeric_values = attrgetter(*(f for f, _ in numeric)) if numeric else None
        self.categorical = [(f"f{j}", n) for j, n in inputs if layout.kinds[n] != NUMERIC]
        self.outputs = [n for n in layout.names if is_model_output(n)]

    def batch(self, events: list) -> PredictionBatch:
        """The columns of this model's decoded events."""
        n = len(events)
        # every envelope field in one pass: a batch of a few events costs calls, not values
        (
            ts,
            variant,
            version,
            status,
            request_id,
            event_id,
            predictions,
            latency,
            scores,
            features,
        ) = zip(*map(_envelope, events))
        columns: dict[str, np.ndarray] = {}
        if self.numeric_values is not None:
            rows = map(self.numeric_values, features)
            # one flat list: numpy reads it twice as fast as a list of rows (None -> NaN)
            flat = list(chain.from_iterable(rows) if len(self.numeric) > 1 else rows)
            matrix = np.array(flat, dtype=float).reshape(n, len(self.numeric))
            columns.update(zip(self.numeric, matrix.T))
        for field, name in self.categorical:
            columns[name] = _categories(map(attrgetter(field), features))
        values: Sequence
        for name in self.outputs:
            if name == PREDICTION:
                values = predictions
            else:
                cls = name[len(SCORES) :]
                values = [(s or {}).get(cls) for s in scores]
            if self.baseline.layout.kinds[name] == NUMERIC:
                columns[name] = np.array(values, dtype=float)
            else:
                columns[name] = _categories(values)
        return PredictionBatch(
            model=self.name,
            ts=_event_times(ts),
            variant=list(variant),
            version=list(version),
            status=list(status),
            latency_ms=np.array(latency, dtype=float),  # None (not reported) -> NaN
            request_id=list(request_id),
            prediction=list(predictions),
            columns=columns,
            event_id=list(event_id),
        )


class PredictionDecoder:
    """Raw prediction messages of the monitored models to :class:`PredictionBatch` columns."""

    def __init__(self, baselines: dict[str, Baseline]):
        self.baselines = baselines
        shared: dict[tuple, type] = {}  # features -> their struct
        self.models = {name: _Model(name, b, shared) for name, b in baselines.items()}
        structs = tuple(m.struct for m in self.models.values())
        self._decoder = msgspec.json.Decoder(structs[0] if len(structs) == 1 else _union(structs))
        self._models = list(self.models.values())
        self._code_of = {m.struct: code for code, m in enumerate(self._models)}
        self._model_of = {m.struct: m for m in self._models}

    def decode(self, raws: list[bytes]) -> tuple[list[PredictionBatch], list[tuple[int, str]]]:
        """Batches (one per model, each in message order) of the valid events, with each
        event's position in ``raws`` (``PredictionBatch.positions``), and ``(position,
        reason)`` of the others."""
        events = self._decode_all(raws)
        if events is not None:
            at = list(range(len(raws)))
            slow_at: list[int] = []
        else:
            events, at, slow_at = self._decode_each(raws)
        batches = self._fast_batches(events, at, slow_at)
        invalid: list[tuple[int, str]] = []
        if slow_at:
            more, invalid = self._slow(raws, slow_at)
            batches += more
        return batches, sorted(invalid)

    def _decode_all(self, raws: list[bytes]) -> list | None:
        """Every message decoded in one C call, or None when any one needs a closer look.
        One message a line: JSON strings cannot hold a raw newline, so a message that has one
        (pretty-printed) is caught by the count and goes the slow way, and no message can
        reach into its neighbour."""
        lines = b"\n".join(raws)
        if lines.count(b"\n") != len(raws) - 1:
            return None
        try:
            events = self._decoder.decode_lines(lines)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return None
        if len(events) != len(raws) or not self._flat(lines, events):
            return None
        return events

    @staticmethod
    def _flat(raw: bytes, events: list) -> bool:
        """No value hides under a key the structs skip (an unmonitored feature holding an
        object or an array): every "{" is an event, its features or its scores."""
        objects = 3 * len(events) - list(map(attrgetter("scores"), events)).count(None)
        return b"[" not in raw and raw.count(b"{") == objects

    def _decode_each(self, raws: list[bytes]) -> tuple[list, list[int], list[int]]:
        """Message by message: (decoded events, their positions, positions to validate
        exactly)."""
        decode = self._decoder.decode
        events: list = []
        at: list[int] = []
        slow_at: list[int] = []
        for i, raw in enumerate(raws):
            try:
                event = decode(raw)
            except (msgspec.DecodeError, UnicodeDecodeError):
                slow_at.append(i)
                continue
            if self._flat(raw, [event]):
                events.append(event)
                at.append(i)
            else:
                slow_at.append(i)
        return events, at, slow_at

    def _fast_batches(
        self, events: list, at: list[int], slow_at: list[int]
    ) -> list[PredictionBatch]:
        """Group decoded events by model; events the column checks refuse join ``slow_at``."""
        if not events:
            return []
        kinds = list(map(type, events))
        if len(set(kinds)) == 1:  # the common batch: one model
            groups = [(self._model_of[kinds[0]], events, at)]
        else:
            codes = np.fromiter(map(self._code_of.__getitem__, kinds), np.int64, len(kinds))
            groups = [
                (self._models[codes[mine[0]]], [events[i] for i in mine], [at[i] for i in mine])
                for mine in _positions_by_code(codes)
            ]
        batches = []
        for model, decoded, positions in groups:
            batch = model.batch(decoded)
            batch.positions = list(positions)
            ok = _column_checks(batch, decoded)
            if ok is not None:
                slow_at += [p for p, good in zip(positions, ok) if not good]
                if not ok.any():
                    continue
                batch = batch.take(ok)
            batches.append(batch)
        return batches

    def _slow(self, raws: list[bytes], at: list[int]):
        """The exact validator on the messages the fast path could not vouch for."""
        at = sorted(at)
        valid, invalid = contract.split_valid("prediction", [raws[i] for i in at], set(self.models))
        bad = {j for j, _ in invalid}
        kept = [at[j] for j in range(len(at)) if j not in bad]
        batches, rejected = batches_from_events(valid, self.baselines)
        for batch in batches:
            batch.positions = [kept[j] for j in batch.positions]
        return batches, [(at[j], r) for j, r in invalid] + [(kept[j], r) for j, r in rejected]


def _positions_by_code(codes: np.ndarray) -> list[list[int]]:
    """The positions of each distinct code, in order; the codes in the order they first
    appear. A stable sort in C groups them, not a loop over the events."""
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.diff(codes[order], prepend=-1))  # codes are >= 0
    ends = np.append(starts[1:], len(order))
    by_first = np.argsort(order[starts])
    positions = order.tolist()
    return [positions[a:b] for a, b in zip(starts[by_first].tolist(), ends[by_first].tolist())]


def _event_times(ts: Sequence[int]) -> np.ndarray:
    """The events' ``ts`` as int64; one beyond int64 becomes -1, which the column checks send
    to the exact validator (the struct type lets any JSON integer through)."""
    try:
        return np.array(ts, dtype=np.int64)
    except OverflowError:
        return np.array([t if -(2**63) <= t < 2**63 else -1 for t in ts], dtype=np.int64)


def _categories(values) -> np.ndarray:
    """A categorical column: each value as a string, None where missing."""
    return np.array([None if v is None else str(v) for v in values], dtype=object)


def _union(structs: tuple[type, ...]) -> Any:
    out: Any = structs[0]
    for s in structs[1:]:
        out = out | s
    return out


def _column_checks(batch: PredictionBatch, events: list) -> np.ndarray | None:
    """What the struct types leave to the schema, on whole columns: non-empty ids, ``0 <= ts
    <= MAX_TS``, ``latency_ms >= 0``, non-empty ``unit_id``, a null prediction only when status
    is error. None when every event passes; else which do. A check builds its mask only when
    an event fails it (a batch of a few events costs calls, not values)."""
    passed: list[np.ndarray] = []  # per check failed by some event, the events passing it
    for values in (batch.request_id, batch.version, batch.event_id):
        if not all(values):
            passed.append(np.fromiter(map(bool, values), dtype=bool, count=len(values)))
    ts = batch.ts
    if ts.min() < 0 or ts.max() > MAX_TS:
        passed.append((ts >= 0) & (ts <= MAX_TS))
    negative = batch.latency_ms < 0
    if negative.any():
        passed.append(~negative)
    if None in batch.prediction:
        passed.append(
            np.array(
                [p is not None or s == "error" for p, s in zip(batch.prediction, batch.status)]
            )
        )
    units = list(map(attrgetter("unit_id"), events))
    if "" in units:
        passed.append(np.array([u != "" for u in units]))
    if not passed:
        return None
    ok = np.logical_and.reduce(passed)
    return None if ok.all() else ok
