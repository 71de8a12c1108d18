"""The event contract in Python: fast checks that agree with ``schemas/*.json``.

No jsonschema call per event: hand-written checks over orjson-parsed dicts, proved equal to
the schemas on valid and invalid examples in ``tests/test_schemas.py``.

>>> parse_prediction(b'{"event_id": "e1"}')
Traceback (most recent call last):
...
coalmine.events.InvalidEvent: missing field: request_id
"""

from __future__ import annotations

import base64
import hashlib
import math
from pathlib import Path

import orjson

VARIANTS = ("champion", "canary", "shadow")
STATUSES = ("ok", "error")


class InvalidEvent(ValueError):
    """An event that breaks the contract; ``reason`` names the field."""

    @property
    def reason(self) -> str:
        return self.args[0]


def schema_path(kind: str) -> Path:
    """Path of the JSON Schema of ``kind`` (prediction, label, alert, command, deadletter)."""
    return Path(__file__).resolve().parent.parent / "schemas" / f"{kind}.json"


def _is_number(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def _number(d: dict, key: str, where: str = "") -> None:
    v = d[key]
    if not _is_number(v):
        if isinstance(v, float):
            raise InvalidEvent(f"{where}{key}: {v} is not allowed (finite numbers only)")
        raise InvalidEvent(f"{where}{key}: expected a number, got {type(v).__name__} {v!r}")


def _string(d: dict, key: str) -> None:
    v = d[key]
    if not isinstance(v, str) or not v:
        raise InvalidEvent(f"{key}: expected a non-empty string, got {v!r}")


def _scalar(v, where: str) -> None:
    """number | string (finite numbers; bools are not numbers)."""
    if isinstance(v, str) or _is_number(v):
        return
    if isinstance(v, float):
        raise InvalidEvent(f"{where}: {v} is not allowed (finite numbers only)")
    raise InvalidEvent(f"{where}: expected a number or a string, got {type(v).__name__} {v!r}")


def _timestamp(d: dict) -> None:
    ts = d["ts"]
    if type(ts) is float and ts.is_integer():  # JSON Schema's "integer" includes 5.0
        ts = d["ts"] = int(ts)
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        raise InvalidEvent(f"ts: expected event time as integer milliseconds since epoch, got {ts!r}")


def _fields(d, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    if not isinstance(d, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(d).__name__}")
    for key in required:
        if key not in d:
            raise InvalidEvent(f"missing field: {key}")
    if len(d) > len(required):
        allowed = set(required) | set(optional)
        for key in d:
            if key not in allowed:
                raise InvalidEvent(f"{key}: unknown field (allowed: {', '.join(sorted(allowed))})")


_PREDICTION_REQUIRED = ("event_id", "request_id", "model", "version", "variant", "ts", "features",
                        "prediction", "status")
_PREDICTION_OPTIONAL = ("scores", "latency_ms", "error", "unit_id")
_LABEL_REQUIRED = ("event_id", "request_id", "model", "ts", "label")
_LABEL_OPTIONAL = ("outcome",)


_SCALARS = frozenset({int, float, str})
_PREDICTION_KEYS = frozenset(_PREDICTION_REQUIRED)
_PREDICTION_ALL = _PREDICTION_KEYS | frozenset(_PREDICTION_OPTIONAL)


def _finite_scalar(x) -> bool:
    t = type(x)
    return t is str or t is int or (t is float and x - x == 0)  # NaN and inf fail x - x == 0


_FEATURE_TYPES = frozenset({int, float, str, type(None)})


def _plain_prediction(d, from_json: bool = False) -> bool:
    """The hot path: True for a valid prediction without ``scores`` or ``error``. Anything
    else goes through the detailed checks, which also produce the reason. orjson never
    yields NaN or infinity, so parsed events skip the per-value finiteness test."""
    try:
        e, r, m, v = d["event_id"], d["request_id"], d["model"], d["version"]
        ts, features, prediction = d["ts"], d["features"], d["prediction"]
        if d["variant"] not in VARIANTS or d["status"] != "ok":
            return False
    except (KeyError, TypeError):
        return False
    if not (type(e) is str and type(r) is str and type(m) is str and type(v) is str and e and r and m and v):
        return False
    if type(ts) is not int or ts < 0 or type(features) is not dict or not _finite_scalar(prediction):
        return False
    if not _FEATURE_TYPES.issuperset(map(type, features.values())):  # bool is not int here
        return False
    if not from_json and not all(x - x == 0 for x in features.values() if type(x) is float):
        return False
    if len(d) == len(_PREDICTION_REQUIRED):
        return True
    if not d.keys() <= _PREDICTION_ALL or "scores" in d or "error" in d:
        return False
    latency = d.get("latency_ms", 0)
    unit = d.get("unit_id", "u")
    return (type(latency) is int or type(latency) is float) and latency - latency == 0 \
        and latency >= 0 and type(unit) is str and bool(unit)


def check_prediction(d, from_json: bool = False) -> dict:
    """Raise :class:`InvalidEvent` unless ``d`` is a valid prediction event; return it."""
    if _plain_prediction(d, from_json):
        return d
    _fields(d, _PREDICTION_REQUIRED, _PREDICTION_OPTIONAL)
    for key in ("event_id", "request_id", "model", "version"):
        _string(d, key)
    if d["variant"] not in VARIANTS:
        raise InvalidEvent(f"variant: expected one of {', '.join(VARIANTS)}, got {d['variant']!r}")
    _timestamp(d)
    features = d["features"]
    if not isinstance(features, dict):
        raise InvalidEvent(f"features: expected an object of name -> number|string|null, got {features!r}")
    for name, v in features.items():
        if v is not None:
            _scalar(v, f"features.{name}")
    if d["status"] not in STATUSES:
        raise InvalidEvent(f"status: expected one of ok, error, got {d['status']!r}")
    if d["prediction"] is not None or d["status"] == "ok":
        _scalar(d["prediction"], "prediction")
    if "scores" in d:
        scores = d["scores"]
        if not isinstance(scores, dict):
            raise InvalidEvent(f"scores: expected an object of class -> probability, got {scores!r}")
        for name in scores:
            _number(scores, name, "scores.")
    if "latency_ms" in d:
        _number(d, "latency_ms")
        if d["latency_ms"] < 0:
            raise InvalidEvent(f"latency_ms: expected a non-negative number, got {d['latency_ms']!r}")
    if "error" in d and not isinstance(d["error"], str):
        raise InvalidEvent(f"error: expected a string, got {d['error']!r}")
    if "unit_id" in d:
        _string(d, "unit_id")
    return d


def check_label(d) -> dict:
    """Raise :class:`InvalidEvent` unless ``d`` is a valid label event; return it."""
    _fields(d, _LABEL_REQUIRED, _LABEL_OPTIONAL)
    for key in ("event_id", "request_id", "model"):
        _string(d, key)
    _timestamp(d)
    _scalar(d["label"], "label")
    if "outcome" in d:
        _number(d, "outcome")
    return d


_CHECKS = {"prediction": check_prediction, "label": check_label}


def _parse(raw: bytes, check):
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None
    return check(d, True) if check is check_prediction else check(d)


def parse_prediction(raw: bytes) -> dict:
    return _parse(raw, check_prediction)


def parse_label(raw: bytes) -> dict:
    return _parse(raw, check_label)


def split_valid(kind: str, raws: list[bytes], known_models: set[str] | None = None
                ) -> tuple[list[dict], list[tuple[int, str]]]:
    """Parse a batch: (valid events in batch order, [(index in batch, reason)] of the rest)."""
    check = _CHECKS[kind]
    valid, invalid = [], []
    for i, raw in enumerate(raws):
        try:
            d = _parse(raw, check)
        except InvalidEvent as exc:
            invalid.append((i, exc.reason))
            continue
        if known_models is not None and d["model"] not in known_models:
            invalid.append((i, f"unknown model {d['model']!r}"))
            continue
        valid.append(d)
    return valid, invalid


def deadletter_record(raw: bytes, reason: str, source_topic: str, partition: int | None,
                      offset: int | None, now_ms: int) -> dict:
    """What goes to the dead-letter topic: the reason and the original bytes, untouched."""
    origin = f"{source_topic}/{partition}/{offset}" if offset is not None else hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"deadletter_id": hashlib.sha256(f"{origin}|{reason}".encode()).hexdigest()[:32],
            "ts": now_ms, "source_topic": source_topic, "partition": partition, "offset": offset,
            "reason": reason, "original_b64": base64.b64encode(raw).decode("ascii"),
            "original_text": text}


def encode(obj) -> bytes:
    """Bytes on the wire: orjson, numpy arrays as lists."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
