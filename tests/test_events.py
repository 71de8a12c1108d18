"""coalmine.events: reasons a producer can act on, batch bookkeeping, dead letters."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import orjson
import pytest
from examples import ALERT, COMMAND, LABEL
from jsonschema import Draft202012Validator

from coalmine import events
from coalmine.events import InvalidEvent

PREDICTION = {
    "event_id": "e1",
    "request_id": "r1",
    "model": "m",
    "version": "v1",
    "variant": "champion",
    "ts": 1700000000000,
    "features": {"f1": 0.5, "f2": "red"},
    "prediction": 1,
    "status": "ok",
}


def wire(event) -> bytes:
    return json.dumps(event).encode()  # writes NaN and Infinity literals, as Python's json does


def reason(parse, raw) -> str:
    with pytest.raises(InvalidEvent) as exc:
        parse(raw)
    return exc.value.reason


@pytest.mark.parametrize(
    "raw,expected",
    [
        (wire({k: v for k, v in PREDICTION.items() if k != "ts"}), "missing field: ts"),
        (
            wire({**PREDICTION, "variant": "blue"}),
            "variant: expected one of champion, canary, shadow, got 'blue'",
        ),
        (
            wire({**PREDICTION, "features": {"f1": 0.5, "f2": float("nan")}}),
            "features.f2: NaN is not allowed (JSON numbers are finite)",
        ),
        (
            wire({**PREDICTION, "latency_ms": float("inf")}),
            "latency_ms: Infinity is not allowed (JSON numbers are finite)",
        ),
        (
            wire({**PREDICTION, "features": {"f1": True}}),
            "features.f1: expected a number, a string or null, got true",
        ),
        (
            wire({**PREDICTION, "ts": True}),
            "ts: expected integer milliseconds since the epoch (>= 0), got true",
        ),
        (
            wire({**PREDICTION, "ts": -5}),
            "ts: expected integer milliseconds since the epoch (>= 0), got -5",
        ),
        (wire({**PREDICTION, "model": ""}), "model: expected a non-empty string, got ''"),
        (
            wire({**PREDICTION, "prediction": None}),
            "prediction: null is allowed only when status is error",
        ),
        (
            wire({**PREDICTION, "prediction": [1]}),
            "prediction: expected a number or a string, got an array",
        ),
        (
            wire({**PREDICTION, "scores": {"0": 0.5, "1": "high"}}),
            "scores.1: expected a number, got 'high'",
        ),
        (
            wire({**PREDICTION, "features": None}),
            "features: expected an object of name -> number, string or null, got null",
        ),
        (wire([PREDICTION]), "event: expected a JSON object, got an array"),
    ],
)
def test_prediction_reasons_name_the_field_and_the_defect(raw, expected):
    assert reason(events.parse_prediction, raw) == expected


def test_unknown_keys_are_named_with_what_is_allowed():
    got = reason(events.parse_prediction, wire({**PREDICTION, "lantency_ms": 3}))
    assert got.startswith("unknown field: lantency_ms (allowed: event_id, request_id,")
    assert "latency_ms" in got


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"\xff\xfe{}", None, wire({**PREDICTION, "event_id": "\ud800"})]
)  # a lone surrogate
def test_bytes_that_are_not_json_say_so(raw):
    assert reason(events.parse_prediction, raw).startswith("not JSON: ")


def test_label_reasons():
    assert (
        reason(events.parse_label, wire({**LABEL, "label": False}))
        == "label: expected a number or a string, got false"
    )
    assert (
        reason(events.parse_label, wire({**LABEL, "outcome": float("-inf")}))
        == "outcome: -Infinity is not allowed (JSON numbers are finite)"
    )
    assert reason(events.parse_label, wire({**LABEL, "variant": "canary"})).startswith(
        "unknown field: variant"
    )


def test_outgoing_event_reasons():
    window = {"start_ts": 0, "end_ts": 1}
    assert reason(events.validate_alert, {**ALERT, "window": window}) == "missing field: window.n"
    assert (
        reason(events.validate_alert, {**ALERT, "value": float("nan")})
        == "value: NaN is not allowed (JSON numbers are finite)"
    )
    assert (
        reason(events.validate_alert, {**ALERT, "p_value": 1.5})
        == "p_value: expected a number from 0 to 1, got 1.5"
    )
    assert (
        reason(events.validate_command, {**COMMAND, "action": "set_weight"})
        == "missing field: weight (required when action is set_weight)"
    )
    assert (
        reason(events.validate_command, {**COMMAND, "alert_ids": ["a1", ""]})
        == "alert_ids[1]: expected a non-empty string, got ''"
    )


def test_python_dicts_with_numpy_scalars_validate_as_they_encode():
    alert = {
        **ALERT,
        "value": np.float64(0.3),
        "threshold": np.float32(0.2),
        "window": {**ALERT["window"], "n": np.int64(500)},
    }
    assert events.validate_alert(alert) is alert
    assert events.validate_alert(orjson.loads(events.encode(alert)))["window"]["n"] == 500
    assert (
        reason(events.validate_alert, {**ALERT, "value": np.bool_(True)})
        == "value: expected a number, got true"
    )
    assert reason(events.validate_alert, {**ALERT, "value": np.float64("nan")}).startswith(
        "value: NaN is not allowed"
    )


def test_integral_float_ts_becomes_an_int():
    event = events.parse_prediction(wire({**PREDICTION, "ts": 1700000000000.0}))
    assert event["ts"] == 1700000000000 and type(event["ts"]) is int


def test_valid_events_come_back_unchanged():
    for kind, event in [
        ("prediction", PREDICTION),
        ("label", LABEL),
        ("alert", ALERT),
        ("command", COMMAND),
    ]:
        assert events.parse(kind, events.encode(event)) == event


def test_split_valid_keeps_batch_indices():
    raws = [
        wire(PREDICTION),
        b"nope",
        wire({**PREDICTION, "model": "other", "event_id": "e2"}),
        wire({**PREDICTION, "event_id": "e3", "features": {"f1": float("nan")}}),
        wire({**PREDICTION, "event_id": "e4"}),
        wire({**PREDICTION, "event_id": "e5", "ts": "soon"}),
    ]
    valid, invalid = events.split_valid("prediction", raws, known_models={"m"})
    assert [e["event_id"] for e in valid] == ["e1", "e4"]
    assert [i for i, _ in invalid] == [1, 2, 3, 5]
    reasons = dict(invalid)
    assert reasons[1].startswith("not JSON")
    assert reasons[2] == "unknown model 'other'"
    assert reasons[3].startswith("features.f1: NaN")
    assert reasons[5].startswith("ts: ")


def test_split_valid_without_known_models_accepts_any_model():
    valid, invalid = events.split_valid(
        "label", [wire({**LABEL, "model": "anything"}), wire(LABEL)], None
    )
    assert len(valid) == 2 and invalid == []
    assert events.split_valid("label", [], {"m"}) == ([], [])


DEADLETTER_SCHEMA = Draft202012Validator(json.loads(events.schema_path("deadletter").read_text()))


@pytest.mark.parametrize(
    "raw,text",
    [(b'{"ts": NaN}', '{"ts": NaN}'), (b"\xff\x00binary", None), (b"", ""), ("é".encode(), "é")],
)
def test_dead_letters_keep_the_original_bytes_and_follow_the_schema(raw, text):
    record = events.deadletter_record(
        raw, "not JSON: x", "coalmine.predictions", 2, 17, 1700000000000
    )
    on_wire = orjson.loads(events.encode(record))
    assert base64.b64decode(on_wire["original_b64"], validate=True) == raw
    assert on_wire["original_text"] == text
    assert DEADLETTER_SCHEMA.is_valid(on_wire), list(DEADLETTER_SCHEMA.iter_errors(on_wire))
    assert events.parse("deadletter", events.encode(record)) == record


def test_a_message_without_a_value_is_dead_lettered_as_empty_bytes():
    record = events.deadletter_record(
        None, "not JSON: expected bytes, got no value", "coalmine.labels", 0, 5, 0
    )
    assert record["original_b64"] == "" and record["original_text"] == ""
    assert DEADLETTER_SCHEMA.is_valid(record)


def test_dead_letter_ids_are_deterministic_per_source_position():
    def record(raw, reason, partition, offset):
        return events.deadletter_record(raw, reason, "coalmine.predictions", partition, offset, 1)[
            "deadletter_id"
        ]

    # a redelivered message (same position) gets the same id, whatever the reason or the clock
    assert record(b"x", "a", 1, 7) == record(b"x", "b", 1, 7)
    assert len({record(b"x", "a", 1, 7), record(b"x", "a", 1, 8), record(b"x", "a", 2, 7)}) == 3
    assert record(b"x", "a", 1, 7) == hashlib.sha256(b"coalmine.predictions/1/7").hexdigest()
    # without a position (a file replay), the bytes decide
    assert (
        record(b"x", "a", None, None)
        == hashlib.sha256(b"x").hexdigest()
        != record(b"y", "a", None, None)
    )


def test_encode_writes_numpy_as_json_numbers():
    assert orjson.loads(
        events.encode({"a": np.arange(3), "b": np.float64(0.5), "c": np.int64(2)})
    ) == {"a": [0, 1, 2], "b": 0.5, "c": 2}


def test_schema_path():
    assert all(events.schema_path(kind).is_file() for kind in events.KINDS)
    with pytest.raises(ValueError, match="unknown event kind 'alerts'"):
        events.schema_path("alerts")
