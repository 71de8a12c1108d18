"""The event contract in Python: fast checks that agree with ``schemas/*.json``.

No jsonschema call per event: each kind is a table of field -> value check over the
orjson-parsed dict, proved equal to the schemas in ``tests/test_schemas.py`` (hand-written
examples and hypothesis). A broken event raises :class:`InvalidEvent` whose ``reason`` names
the field, in JSON's words, so producers in any language can read it.

>>> raw = (b'{"event_id": "e1", "request_id": "r1", "model": "m", "version": "v1", "variant": "champion",'
...        b' "ts": 1700000000000, "features": {"f1": 0.5, "f2": "red"}, "prediction": 1, "status": "ok"}')
>>> parse_prediction(raw)["features"]
{'f1': 0.5, 'f2': 'red'}
>>> parse_prediction(raw.replace(b'"champion"', b'"blue"'))
Traceback (most recent call last):
...
coalmine.events.InvalidEvent: variant: expected one of champion, canary, shadow, got 'blue'
>>> parse_prediction(raw.replace(b'"red"', b'NaN'))
Traceback (most recent call last):
...
coalmine.events.InvalidEvent: features.f2: NaN is not allowed (JSON numbers are finite)
>>> parse_prediction(raw.replace(b' "ts": 1700000000000,', b''))
Traceback (most recent call last):
...
coalmine.events.InvalidEvent: missing field: ts
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable
from importlib import resources
from itertools import chain
from operator import itemgetter
from pathlib import Path

import numpy as np
import orjson

from coalmine.streams.settings import MAX_TS, VARIANTS
from coalmine.streams.sketch import values_of

KINDS = ("prediction", "label", "alert", "command", "deadletter")
STATUSES = ("ok", "error")
STATES = ("firing", "resolved")
ACTIONS = ("rollback", "set_weight", "promote", "pause")
STAGES = ("validation", "shadow", "canary", "production")
#: a dead letter keeps the first this many bytes of its original: with base64, the text and
#: JSON escapes it stays far under Kafka's 1 MB message limit
MAX_ORIGINAL = 64 * 1024
#: reasons quote values (an unknown model's name, a field name): they are cut to this length
MAX_REASON = 1000


class InvalidEvent(ValueError):
    """An event that breaks the contract; ``reason`` names the field and the defect."""

    @property
    def reason(self) -> str:
        return self.args[0]


def schema_path(kind: str) -> Path:
    """Path of the JSON Schema of ``kind`` (one of :data:`KINDS`), shipped inside the package
    (``coalmine/schemas/``; the repository's top-level ``schemas/`` holds the same bytes for
    producers in other languages, and ``tests/test_packaging.py`` keeps the two equal).

    >>> schema_path("alert").relative_to(Path(__file__).resolve().parent).as_posix()
    'schemas/alert.json'
    """
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {', '.join(KINDS)}")
    return Path(__file__).resolve().parent / "schemas" / f"{kind}.json"


def load_schema(kind: str) -> dict:
    """The JSON Schema of ``kind`` as a dict, read from the package's data with
    :mod:`importlib.resources` (works from any install, a wheel's included).

    >>> load_schema("label")["$id"]
    'https://coalmine.dev/schemas/label.json'
    """
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {', '.join(KINDS)}")
    return json.loads(resources.files(__package__).joinpath("schemas", f"{kind}.json").read_bytes())


# ---- values ------------------------------------------------------------------------------


class _Defect(Exception):
    """A value's defect; the object holding the value adds the field name. ``path`` names a
    part inside the value (``.f2`` for a feature)."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


def _show(v) -> str:
    """A value as JSON spells it: the reader may not know Python."""
    if v is None:
        return "null"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, (list, tuple)):
        return "an array"
    return repr(v)


def _wrong(expected: str, v) -> _Defect:
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
        return _Defect(f"{_show(v)} is not allowed (JSON numbers are finite)")
    return _Defect(f"expected {expected}, got {_show(v)}")


def _is_number(v) -> bool:
    """int or finite float; bool is not a number (orjson gives Python bools, an int subclass);
    numpy scalars are numbers, as :func:`encode` writes them."""
    t = type(v)
    if t is int:
        return True
    if t is float:
        return v - v == 0  # False for NaN and infinities
    return isinstance(v, (np.integer, np.floating)) and bool(np.isfinite(v))


def _is_whole(v) -> bool:
    """JSON Schema's ``integer``: any number with a zero fractional part (5.0 included)."""
    t = type(v)
    if t is int or isinstance(v, np.integer):
        return True
    return _is_number(v) and float(v).is_integer()


def _id(v) -> None:
    if type(v) is not str or not v:
        raise _wrong("a non-empty string", v)


def _text(v) -> None:
    if type(v) is not str:
        raise _wrong("a string", v)


def _number(v) -> None:
    if not _is_number(v):
        raise _wrong("a number", v)


def _non_negative(v) -> None:
    if not _is_number(v) or v < 0:
        raise _wrong("a number >= 0", v)


def _bounded(low: float, high: float) -> Callable:
    def check(v) -> None:
        if not _is_number(v) or not low <= v <= high:
            raise _wrong(f"a number from {low:g} to {high:g}", v)

    return check


def _millis(v) -> None:
    if not _is_whole(v) or v < 0:
        raise _wrong("integer milliseconds since the epoch (>= 0)", v)


def _event_millis(v) -> None:
    """An event time: bounded by :data:`MAX_TS`, so it stays exact in float64 and int64."""
    _millis(v)
    if v > MAX_TS:
        raise _wrong(f"integer milliseconds since the epoch up to {MAX_TS} (year 2255)", v)


def _count(v) -> None:
    if not _is_whole(v) or v < 0:
        raise _wrong("an integer >= 0", v)


def _reason(v) -> None:
    _id(v)
    if len(v) > MAX_REASON:
        raise _wrong(f"a string of at most {MAX_REASON} characters", v)


def _scalar(v) -> None:
    """number | string."""
    if type(v) is not str and not _is_number(v):
        raise _wrong("a number or a string", v)


def _one_of(*allowed: str) -> Callable:
    members = frozenset(allowed)

    def check(v) -> None:
        if type(v) is not str or v not in members:
            raise _Defect(f"expected one of {', '.join(allowed)}, got {_show(v)}")

    return check


def _or_null(check: Callable) -> Callable:
    def or_null(v) -> None:
        if v is not None:
            check(v)

    return or_null


def _mapping_of(check: Callable, what: str) -> Callable:
    """An object whose every value passes ``check``; a defect names the entry."""

    def mapping(v) -> None:
        if type(v) is not dict:
            raise _wrong(f"an object of {what}", v)
        for name, x in v.items():
            try:
                check(x)
            except _Defect as defect:
                raise _Defect(str(defect), f".{name}{defect.path}") from None

    return mapping


def _feature(v) -> None:
    """number | string | null."""
    if v is not None and type(v) is not str and not _is_number(v):
        raise _wrong("a number, a string or null", v)


def _list_of_ids(v) -> None:
    if type(v) is not list:
        raise _wrong("an array of non-empty strings", v)
    for i, x in enumerate(v):
        try:
            _id(x)
        except _Defect as defect:
            raise _Defect(str(defect), f"[{i}]") from None


def _object(v) -> None:
    """A free-form object, as JSON can carry it: no NaN or Infinity anywhere inside."""
    if type(v) is not dict:
        raise _wrong("an object", v)
    _json_numbers(v)


def _json_numbers(v, path: str = "") -> None:
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
        raise _Defect(str(_wrong("", v)), path)
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for key, x in items:
        _json_numbers(x, f"{path}.{key}" if isinstance(v, dict) else f"{path}[{key}]")


def _matching(pattern: str, what: str) -> Callable:
    match = re.compile(pattern).fullmatch

    def check(v) -> None:
        if type(v) is not str or not match(v):
            raise _wrong(what, v)

    return check


# ---- objects -----------------------------------------------------------------------------


class _Shape:
    """The fields of one JSON object: name -> check, which are required, and a rule that
    relates fields (JSON Schema's if/then)."""

    def __init__(
        self,
        fields: dict[str, Callable],
        optional: tuple[str, ...] = (),
        rule: Callable[[dict], None] | None = None,
    ):
        self.fields, self.rule = fields, rule
        self.required = tuple(k for k in fields if k not in optional)
        self.required_set = frozenset(self.required)

    def check(self, d, where: str = "") -> dict:
        if type(d) is not dict:
            raise InvalidEvent(
                f"{where.rstrip('.') or 'event'}: expected a JSON object, got {_show(d)}"
            )
        fields = self.fields
        try:
            for key, value in d.items():
                fields[key](value)
        except KeyError:  # from fields[key]: the checks themselves never index a dict
            raise InvalidEvent(
                f"unknown field: {where}{key} (allowed: {', '.join(fields)})"
            ) from None
        except _Defect as defect:
            raise InvalidEvent(f"{where}{key}{defect.path}: {defect}") from None
        if len(d) != len(fields) and not d.keys() >= self.required_set:
            raise InvalidEvent(
                f"missing field: {where}{next(k for k in self.required if k not in d)}"
            )
        if self.rule is not None:
            self.rule(d)
        return d


def _prediction_rule(d: dict) -> None:
    if d["status"] == "error":
        # a failed request often has no answer to send: an absent prediction reads as null,
        # so that everything downstream sees one shape
        d.setdefault("prediction", None)
    elif "prediction" not in d:
        raise InvalidEvent("missing field: prediction (required unless status is error)")
    elif d["prediction"] is None:
        raise InvalidEvent("prediction: null is allowed only when status is error")


def _command_rule(d: dict) -> None:
    if d["action"] == "set_weight" and "weight" not in d:
        raise InvalidEvent("missing field: weight (required when action is set_weight)")


_WINDOW = _Shape({"start_ts": _millis, "end_ts": _millis, "n": _count})
_SIGNATURE = _matching(
    "[0-9a-f]{64}([0-9a-f]{64})?", "128 (Ed25519) or 64 (HMAC-SHA256) lowercase hex digits"
)

_SHAPES = {
    "prediction": _Shape(
        {
            "event_id": _id,
            "request_id": _id,
            "model": _id,
            "version": _id,
            "variant": _one_of(*VARIANTS),
            "ts": _event_millis,
            "features": _mapping_of(_feature, "name -> number, string or null"),
            "prediction": _or_null(_scalar),
            "status": _one_of(*STATUSES),
            "scores": _mapping_of(_number, "class -> probability"),
            "latency_ms": _non_negative,
            "error": _text,
            "unit_id": _id,
        },
        optional=("prediction", "scores", "latency_ms", "error", "unit_id"),
        rule=_prediction_rule,
    ),
    "label": _Shape(
        {
            "event_id": _id,
            "request_id": _id,
            "model": _id,
            "ts": _event_millis,
            "label": _scalar,
            "outcome": _number,
        },
        optional=("outcome",),
    ),
    "alert": _Shape(
        {
            "alert_id": _id,
            "ts": _millis,
            "model": _id,
            "variant": _one_of(*VARIANTS),
            "check": _id,
            "feature": _id,
            "state": _one_of(*STATES),
            "statistic": _id,
            "value": _number,
            "threshold": _number,
            "p_value": _bounded(0, 1),
            "window": lambda v: _WINDOW.check(v, "window."),
            "message": _text,
            "signature": _SIGNATURE,
        },
        optional=("feature", "p_value", "signature"),
    ),
    "command": _Shape(
        {
            "command_id": _id,
            "ts": _millis,
            "model": _id,
            "version": _id,
            "action": _one_of(*ACTIONS),
            "weight": _bounded(0, 100),
            "reason": _text,
            "alert_ids": _list_of_ids,
            "evidence": _object,
            "stage": _one_of(*STAGES),
            "signature": _SIGNATURE,
        },
        optional=("weight", "evidence", "stage", "signature"),
        rule=_command_rule,
    ),
    "deadletter": _Shape(
        {
            "deadletter_id": _matching("[0-9a-f]{64}", "64 lowercase hex digits (SHA-256)"),
            "ts": _millis,
            "source_topic": _id,
            "partition": _or_null(_count),
            "offset": _or_null(_count),
            "reason": _reason,
            "original_b64": _matching("[A-Za-z0-9+/]*={0,2}", "base64 text"),
            "original_text": _or_null(_text),
            "original_size": _count,
            "original_sha256": _matching("[0-9a-f]{64}", "64 lowercase hex digits (SHA-256)"),
        },
        optional=("original_size", "original_sha256"),
    ),
}


def validate(kind: str, d) -> dict:
    """Raise :class:`InvalidEvent` unless ``d`` is a valid ``kind`` event; return it, with an
    integral ``ts`` that came as a float (5.0 is a JSON Schema integer) made an int."""
    _SHAPES[kind].check(d)
    if type(d["ts"]) is not int:
        d["ts"] = int(d["ts"])
    return d


def validate_alert(d) -> dict:
    """:func:`validate` for an alert (``schemas/alert.json``)."""
    return validate("alert", d)


def validate_command(d) -> dict:
    """:func:`validate` for a rollout command (``schemas/command.json``)."""
    return validate("command", d)


# ---- bytes -------------------------------------------------------------------------------


def _not_json(raw, error: Exception, kind: str) -> InvalidEvent:
    """The reason for bytes orjson refused. JSON with NaN or Infinity (what Python's json
    module writes by default) gets the name of the field that holds it."""
    if not isinstance(raw, (bytes, bytearray, memoryview, str)):
        return InvalidEvent(
            f"not JSON: expected bytes, got {'no value' if raw is None else type(raw).__name__}"
        )
    try:
        d = json.loads(bytes(raw) if isinstance(raw, memoryview) else raw)
        validate(kind, d)
    except InvalidEvent as exc:
        return exc
    except (ValueError, RecursionError):  # not JSON for Python either
        pass
    return InvalidEvent(f"not JSON: {error}")


# ---- batches: the hot path -----------------------------------------------------------------
# Checking field by field, event by event, costs more than parsing the JSON. So a batch is
# checked column by column with C-level iteration (itemgetter, zip, map, set), which vouches
# for a whole clean batch at once. A batch that fails is halved until the suspects are few;
# those go through :func:`validate`, which decides and gives the reason. Only orjson's output
# comes here, and orjson never yields NaN or infinities, so a float is a finite number.
# ``tests/test_schemas.py`` judges single events and mixed batches against the schemas.

_STR, _DICT = frozenset({str}), frozenset({dict})
_NUMBERS = frozenset({int, float})  # type() is exact: a bool is not an int here
_SCALARS = _NUMBERS | _STR
_FEATURE_VALUES = _SCALARS | {type(None)}
_SMALL_BATCH = 32  # a failed batch this small goes to validate() whole


def _types(values) -> set:
    return set(map(type, values))


def _texts_column(values) -> bool:
    """Every value a str: ``str.join`` takes nothing else, and is 4x faster than collecting
    the types (orjson makes no str subclasses)."""
    try:
        "".join(values)
    except TypeError:
        return False
    return True


def _ids_column(values) -> bool:
    return _texts_column(values) and all(values)


def _millis_column(values) -> bool:
    return _types(values) <= {int} and min(values) >= 0 and max(values) <= MAX_TS


def _numbers_column(values) -> bool:
    return _types(values) <= _NUMBERS


def _non_negative_column(values) -> bool:
    return _types(values) <= _NUMBERS and min(values) >= 0


def _members_column(*allowed: str) -> Callable:
    members = frozenset(allowed)

    def check(values) -> bool:
        try:
            return members.issuperset(values)  # a number is no member; a list or an object raises
        except TypeError:
            return False

    return check


def _mappings_column(value_types: frozenset) -> Callable:
    return lambda values: (
        _types(values) <= _DICT
        and _types(chain.from_iterable(map(dict.values, values))) <= value_types
    )


def _predictions_column(values) -> bool:
    return _types(values) <= _FEATURE_VALUES  # null: see _prediction_rows_rule


def _prediction_rows_rule(columns: dict) -> bool:
    preds = columns.get("prediction", [])
    if len(preds) != len(columns["status"]):
        return False  # one has none: validate() decides, and reads it as null if it may
    return None not in preds or all(
        s == "error" for p, s in zip(preds, columns["status"]) if p is None
    )


#: kind -> (field -> check of the column of its values, rule over the columns)
_COLUMNS: dict[str, tuple[dict[str, Callable], Callable | None]] = {
    "prediction": (
        {
            "event_id": _ids_column,
            "request_id": _ids_column,
            "model": _ids_column,
            "version": _ids_column,
            "variant": _members_column(*VARIANTS),
            "ts": _millis_column,
            "features": _mappings_column(_FEATURE_VALUES),
            "prediction": _predictions_column,
            "status": _members_column(*STATUSES),
            "scores": _mappings_column(_NUMBERS),
            "latency_ms": _non_negative_column,
            "error": _texts_column,
            "unit_id": _ids_column,
        },
        _prediction_rows_rule,
    ),
    "label": (
        {
            "event_id": _ids_column,
            "request_id": _ids_column,
            "model": _ids_column,
            "ts": _millis_column,
            "label": lambda values: _types(values) <= _SCALARS,
            "outcome": _numbers_column,
        },
        None,
    ),
}


class Events(list):
    """Valid events, in batch order. ``columns`` (field -> the events' values, in order) is
    kept when the column checks vouched for the whole batch: stage 1 then reads fields from
    it instead of extracting them again (see :func:`coalmine.streams.sketch.values_of`)."""

    columns: dict[str, list] | None = None


def _batch_columns(kind: str, docs: list) -> dict[str, list] | None:
    """The columns (field -> values of the documents that have it) when every parsed document
    in ``docs`` is a valid ``kind`` event; None when the column checks cannot vouch for all
    of them (then :func:`validate` decides one by one)."""
    if kind not in _COLUMNS or not docs or _types(docs) != _DICT:
        return None if docs else {}
    shape, (checks, rule) = _SHAPES[kind], _COLUMNS[kind]
    present = set().union(*docs)
    if not present <= shape.fields.keys():
        return None
    try:
        columns = {name: list(map(itemgetter(name), docs)) for name in shape.required}
    except KeyError:
        return None
    for name in present - shape.required_set:
        columns[name] = [d[name] for d in docs if name in d]
    valid = all(checks[name](values) for name, values in columns.items()) and (
        rule is None or rule(columns)
    )
    return columns if valid else None


def _suspects(kind: str, docs: list, start: int = 0) -> list[int]:
    """Positions (from ``start``) in a batch the column checks could not vouch for of the
    documents they cannot vouch for, found by halving: a few bad events cost a few more
    column checks, not a slow path."""
    if len(docs) <= _SMALL_BATCH:
        return list(range(start, start + len(docs)))
    mid = len(docs) // 2
    halves = ((docs[:mid], start), (docs[mid:], start + mid))
    return [
        p
        for half, at in halves
        if _batch_columns(kind, half) is None
        for p in _suspects(kind, half, at)
    ]


def _loads(kind: str, raws: list) -> tuple[list, list[int], list[tuple[int, str]]]:
    """orjson over a batch: (documents, their indices in the batch, [(index, reason)] of the
    raws that are not JSON)."""
    try:
        return list(map(orjson.loads, raws)), list(range(len(raws))), []
    except orjson.JSONDecodeError:
        pass
    docs, where, broken = [], [], []
    for i, raw in enumerate(raws):
        try:
            docs.append(orjson.loads(raw))
            where.append(i)
        except orjson.JSONDecodeError as exc:
            broken.append((i, _not_json(raw, exc, kind).reason))
    return docs, where, broken


def split_valid(
    kind: str, raws: list[bytes], known_models: set[str] | None = None
) -> tuple[list[dict], list[tuple[int, str]]]:
    """Parse a batch: (valid events in batch order, [(index in batch, reason)] for the rest, in
    batch order). With ``known_models``, an event of any other model is invalid:
    ``unknown model 'x'``."""
    docs, where, invalid = _loads(kind, raws)
    columns = _batch_columns(kind, docs)
    reasons = {}
    for pos in _suspects(kind, docs) if columns is None else ():
        try:
            validate(kind, docs[pos])
        except InvalidEvent as exc:
            reasons[pos] = exc.reason
    docs, where = _set_aside(docs, where, reasons, invalid)
    valid = Events(docs)
    valid.columns = columns if len(docs) == len(raws) else None
    if known_models is not None and not known_models.issuperset(values_of(valid, "model")):
        unknown = {
            p: f"unknown model {d['model']!r}"
            for p, d in enumerate(docs)
            if d["model"] not in known_models
        }
        valid = Events(_set_aside(docs, where, unknown, invalid)[0])
    return valid, sorted(invalid)


def _set_aside(
    docs: list, where: list[int], reasons: dict[int, str], invalid: list
) -> tuple[list, list[int]]:
    """Move the documents at the positions in ``reasons`` to ``invalid``; return the others."""
    if not reasons:
        return docs, where
    invalid += [(where[p], reason) for p, reason in reasons.items()]
    keep = [p for p in range(len(docs)) if p not in reasons]
    return [docs[p] for p in keep], [where[p] for p in keep]


def parse(kind: str, raw: bytes) -> dict:
    """The event in ``raw`` (JSON bytes), checked; raise :class:`InvalidEvent` otherwise."""
    valid, invalid = split_valid(kind, [raw])
    if invalid:
        raise InvalidEvent(invalid[0][1])
    return valid[0]


def parse_prediction(raw: bytes) -> dict:
    return parse("prediction", raw)


def parse_label(raw: bytes) -> dict:
    return parse("label", raw)


def deadletter_id(
    raw: bytes | None, source_topic: str, partition: int | None, offset: int | None
) -> str:
    """SHA-256 (hex) of ``topic/partition/offset`` (partition empty when null) when the offset
    is known, else of the bytes: a redelivered message gets the same id, so consumers can drop
    duplicates."""
    if offset is None:
        return hashlib.sha256(raw or b"").hexdigest()
    return hashlib.sha256(
        f"{source_topic}/{'' if partition is None else partition}/{offset}".encode()
    ).hexdigest()


def deadletter_record(
    raw: bytes | None,
    reason: str,
    source_topic: str,
    partition: int | None,
    offset: int | None,
    now_ms: int,
) -> dict:
    """What goes to the dead-letter topic (``schemas/deadletter.json``): the reason and the
    original bytes, untouched (a Kafka message without a value counts as empty bytes). A
    record always fits in a Kafka message: of a longer original it keeps the first
    :data:`MAX_ORIGINAL` bytes, with the whole one's size and SHA-256 (topic, partition and
    offset say where to fetch it), and reasons are cut to :data:`MAX_REASON` characters."""
    raw = bytes(raw or b"")
    kept = raw[:MAX_ORIGINAL]
    text: str | None
    try:
        text = kept.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a cut may split the last character: the text is then the prefix's whole characters
        cut_inside = len(kept) < len(raw) and exc.start >= len(kept) - 3
        text = _utf8_or_none(kept[: exc.start]) if cut_inside else None
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 1] + "…"
    return {
        "deadletter_id": deadletter_id(raw, source_topic, partition, offset),
        "ts": now_ms,
        "source_topic": source_topic,
        "partition": partition,
        "offset": offset,
        "reason": reason,
        "original_b64": base64.b64encode(kept).decode("ascii"),
        "original_text": text,
        "original_size": len(raw),
        "original_sha256": hashlib.sha256(raw).hexdigest(),
    }


def _utf8_or_none(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def encode(obj) -> bytes:
    """Bytes on the wire: orjson, numpy arrays and scalars as JSON numbers."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
