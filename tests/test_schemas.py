"""The schemas (coalmine/schemas/*.json, copied to the top-level schemas/) and coalmine.events
agree: the contract producers in any language rely on.

Both sides judge the same bytes. The schema side is what a strict consumer in another language
does: parse standard JSON (no NaN or Infinity literals), then apply the schema with jsonschema.
"""

from __future__ import annotations

import copy
import json
import math

import orjson
import pytest
from examples import ALERT, COMMAND, LABEL
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from coalmine import events
from coalmine.events import KINDS, InvalidEvent

SCHEMAS = {kind: events.load_schema(kind) for kind in KINDS}
VALIDATORS = {kind: Draft202012Validator(schema) for kind, schema in SCHEMAS.items()}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _strict_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} is out of range")
    return x


def schema_accepts(kind: str, raw: bytes) -> bool:
    try:
        doc = json.loads(raw, parse_constant=_reject_constant, parse_float=_strict_float)
    except ValueError:
        return False
    return VALIDATORS[kind].is_valid(doc)


def python_accepts(kind: str, raw: bytes) -> bool:
    try:
        events.parse(kind, raw)
        return True
    except InvalidEvent:
        return False


def wire(event) -> bytes:
    """What a careless Python producer sends: json.dumps writes NaN and Infinity literals."""
    return json.dumps(event).encode()


PREDICTION = {
    "event_id": "e1",
    "request_id": "r1",
    "model": "m",
    "version": "v1",
    "variant": "champion",
    "ts": 1700000000000,
    "features": {"a": 1.5, "b": "red", "c": None, "d": 2},
    "prediction": 1,
    "status": "ok",
}
DEADLETTER = {
    "deadletter_id": "0" * 64,
    "ts": 1700000010000,
    "source_topic": "coalmine.predictions",
    "partition": 3,
    "offset": 42,
    "reason": "missing field: ts",
    "original_b64": "e30=",
    "original_text": "{}",
}
BASE = {
    "prediction": PREDICTION,
    "label": LABEL,
    "alert": ALERT,
    "command": COMMAND,
    "deadletter": DEADLETTER,
}

VALID = {
    "prediction": [
        {},
        {"scores": {"0": 0.2, "1": 0.8}, "latency_ms": 3.5, "unit_id": "u1"},
        {"status": "error", "prediction": None, "error": "timeout"},
        {"status": "error", "prediction": "cat", "error": ""},
        {"prediction": "cat", "features": {}},
        {"prediction": -2.5, "latency_ms": 0},
        {"ts": 1700000000000.0},
        {"variant": "shadow"},
        {"variant": "canary"},
    ],
    "label": [{}, {"outcome": 12.5}, {"label": "cat"}, {"label": 0.25, "outcome": -3}, {"ts": 0}],
    "alert": [
        {},
        {"feature": "f1", "p_value": 0.0},
        {"p_value": 1},
        {"state": "resolved", "value": -1},
        {"variant": "champion", "check": "srm", "message": ""},
        {"window": {"start_ts": 0, "end_ts": 0, "n": 0}},
    ],
    "command": [
        {},
        {"action": "set_weight", "weight": 25},
        {"action": "set_weight", "weight": 0.5},
        {"action": "promote", "alert_ids": []},
        {"action": "pause", "evidence": {"p99": 12.0}},
        {"action": "promote", "stage": "shadow"},
        {"signature": "ab" * 32},
        {"weight": 100},
    ],
    "deadletter": [
        {},
        {"partition": None, "offset": None},
        {"original_text": None, "original_b64": ""},
        {"deadletter_id": "9f" * 32, "partition": 0, "offset": 0},
    ],
}


SPECIFIC_DEFECTS = {
    "prediction": [
        ("bad variant", {**PREDICTION, "variant": "blue"}),
        ("bad status", {**PREDICTION, "status": "fine"}),
        ("null variant", {**PREDICTION, "variant": None}),
        ("features a list", {**PREDICTION, "features": [1, 2]}),
        ("bool feature", {**PREDICTION, "features": {"a": True}}),
        ("object feature", {**PREDICTION, "features": {"a": {"x": 1}}}),
        ("NaN feature", {**PREDICTION, "features": {"a": float("nan")}}),
        ("Infinity feature", {**PREDICTION, "features": {"a": 1.0, "b": float("inf")}}),
        ("-Infinity feature", {**PREDICTION, "features": {"a": float("-inf")}}),
        ("null prediction when ok", {**PREDICTION, "prediction": None}),
        ("bool prediction", {**PREDICTION, "prediction": False}),
        ("NaN prediction", {**PREDICTION, "prediction": float("nan")}),
        ("negative latency", {**PREDICTION, "latency_ms": -3}),
        ("string latency", {**PREDICTION, "latency_ms": "3"}),
        ("NaN latency", {**PREDICTION, "latency_ms": float("nan")}),
        ("score not a number", {**PREDICTION, "scores": {"1": "high"}}),
        ("bool score", {**PREDICTION, "scores": {"1": True}}),
        ("Infinity score", {**PREDICTION, "scores": {"1": float("inf")}}),
        ("scores a list", {**PREDICTION, "scores": [0.2, 0.8]}),
        ("empty unit", {**PREDICTION, "unit_id": ""}),
        ("numeric error", {**PREDICTION, "status": "error", "error": 500}),
    ],
    "label": [
        ("object label", {**LABEL, "label": {"x": 1}}),
        ("bool label", {**LABEL, "label": False}),
        ("null label", {**LABEL, "label": None}),
        ("NaN label", {**LABEL, "label": float("nan")}),
        ("string outcome", {**LABEL, "outcome": "3"}),
        ("bool outcome", {**LABEL, "outcome": True}),
        ("Infinity outcome", {**LABEL, "outcome": float("inf")}),
    ],
    "alert": [
        ("bad variant", {**ALERT, "variant": "blue"}),
        ("bad state", {**ALERT, "state": "on"}),
        ("empty check", {**ALERT, "check": ""}),
        ("empty feature", {**ALERT, "feature": ""}),
        ("null feature", {**ALERT, "feature": None}),
        ("NaN value", {**ALERT, "value": float("nan")}),
        ("bool threshold", {**ALERT, "threshold": True}),
        ("null threshold", {**ALERT, "threshold": None}),
        ("p-value over 1", {**ALERT, "p_value": 1.5}),
        ("negative p-value", {**ALERT, "p_value": -0.1}),
        ("window without n", {**ALERT, "window": {"start_ts": 0, "end_ts": 1}}),
        ("window with an extra key", {**ALERT, "window": {**ALERT["window"], "width": 1}}),
        ("negative window n", {**ALERT, "window": {**ALERT["window"], "n": -1}}),
        ("fractional window n", {**ALERT, "window": {**ALERT["window"], "n": 2.5}}),
        ("window a list", {**ALERT, "window": [0, 1, 2]}),
        ("numeric message", {**ALERT, "message": 3}),
    ],
    "command": [
        ("bad action", {**COMMAND, "action": "rollout"}),
        ("set_weight without weight", {**COMMAND, "action": "set_weight"}),
        ("weight over 100", {**COMMAND, "action": "set_weight", "weight": 101}),
        ("negative weight", {**COMMAND, "action": "set_weight", "weight": -5}),
        ("bool weight", {**COMMAND, "action": "set_weight", "weight": True}),
        ("NaN weight", {**COMMAND, "action": "set_weight", "weight": float("nan")}),
        ("alert_ids a string", {**COMMAND, "alert_ids": "a1"}),
        ("empty alert id", {**COMMAND, "alert_ids": ["a1", ""]}),
        ("numeric alert id", {**COMMAND, "alert_ids": [1]}),
        ("uppercase signature", {**COMMAND, "signature": "AB" * 32}),
        ("short signature", {**COMMAND, "signature": "ab" * 31}),
        ("evidence a list", {**COMMAND, "evidence": [1]}),
        ("null reason", {**COMMAND, "reason": None}),
        ("bad stage", {**COMMAND, "action": "promote", "stage": "staging"}),
    ],
    "deadletter": [
        ("id not hex", {**DEADLETTER, "deadletter_id": "z" * 64}),
        ("negative partition", {**DEADLETTER, "partition": -1}),
        ("string offset", {**DEADLETTER, "offset": "42"}),
        ("fractional offset", {**DEADLETTER, "offset": 4.5}),
        ("bool partition", {**DEADLETTER, "partition": False}),
        ("not base64", {**DEADLETTER, "original_b64": "not base64!"}),
        ("numeric original_text", {**DEADLETTER, "original_text": 5}),
        ("empty reason", {**DEADLETTER, "reason": ""}),
    ],
}


def _defects(kind: str):
    """(what, event): one defect each, the ways producers get it wrong."""
    base = BASE[kind]
    for key in base:
        yield f"missing {key}", {k: v for k, v in base.items() if k != key}
    yield "unknown key (a typo)", {**base, "colour": "x"}
    yield "not an object", [base]
    yield "negative ts", {**base, "ts": -1}
    yield "fractional ts", {**base, "ts": 1.5}
    yield "bool ts", {**base, "ts": True}
    yield "string ts", {**base, "ts": "1700000000000"}
    yield "NaN ts", {**base, "ts": float("nan")}
    yield (
        "numeric model" if "model" in base else "numeric source_topic",
        {**base, "model" if "model" in base else "source_topic": 7},
    )
    first_id = next(iter(base))
    yield f"empty {first_id}", {**base, first_id: ""}
    yield from SPECIFIC_DEFECTS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_every_schema_is_valid_2020_12_and_documents_every_field(kind):
    schema = SCHEMAS[kind]
    Draft202012Validator.check_schema(schema)
    assert schema["$id"] == f"https://coalmine.dev/schemas/{kind}.json"
    assert schema["additionalProperties"] is False
    for name, prop in schema["properties"].items():
        assert prop.get("title") and prop.get("description"), f"{kind}.{name} is undocumented"


@pytest.mark.parametrize("kind", KINDS)
def test_valid_examples_pass_both(kind):
    for extra in VALID[kind]:
        event = {**BASE[kind], **extra}
        assert schema_accepts(kind, wire(event)), extra
        assert python_accepts(kind, wire(event)), extra
        assert events.validate(kind, copy.deepcopy(event)) == event


@pytest.mark.parametrize("kind", KINDS)
def test_each_defect_fails_both(kind):
    for what, event in _defects(kind):
        assert not schema_accepts(kind, wire(event)), what
        assert not python_accepts(kind, wire(event)), what
        with pytest.raises(InvalidEvent):
            events.validate(kind, copy.deepcopy(event))


def test_numbers_orjson_reads_as_floats_stay_valid():
    """Integers beyond 64 bits come out of orjson as floats; an integral float is a JSON Schema
    integer (and becomes an int); unicode names and -0.0 are fine."""
    event = {**PREDICTION, "ts": 1700000000000.0, "features": {"é": 2**70, "b": 1e300, "c": -0.0}}
    raw = wire(event)
    assert schema_accepts("prediction", raw) and python_accepts("prediction", raw)
    ts = events.parse_prediction(raw)["ts"]
    assert ts == 1700000000000 and type(ts) is int
    # such a number is not an event time: the contract bounds ts by 2^53 (both agree)
    too_far = wire({**LABEL, "ts": 2**70})
    assert not python_accepts("label", too_far) and not schema_accepts("label", too_far)


# ---- hypothesis: random events, valid and broken, judged the same by both -----------------------

NAN, INF = float("nan"), float("inf")
#: values at the edges of the contract: types confused, bounds, enums, patterns, nested objects
EDGES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    5.0,
    0.5,
    1.5,
    -0.0,
    100,
    100.5,
    101,
    2**70,
    NAN,
    INF,
    -INF,
    "",
    "x",
    "e30=",
    "ab" * 32,
    "AB" * 32,
    "not base64!",
    *events.VARIANTS,
    *events.STATUSES,
    *events.STATES,
    *events.ACTIONS,
    *events.STAGES,
    [],
    [""],
    ["a"],
    [1],
    {},
    {"a": 1},
    {"a": "x"},
    {"a": None},
    {"a": True},
    {"a": NAN},
    {"a": [1]},
    {"start_ts": 0, "end_ts": 1, "n": 1},
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
values = st.one_of(st.sampled_from(EDGES).map(copy.deepcopy), json_values)


def _keys(kind: str) -> list[str]:
    return sorted(set(SCHEMAS[kind]["properties"]) | set(events._SHAPES[kind].fields))


@st.composite
def mutated(draw, kind: str):
    """A valid event of ``kind`` with up to two random edits (more would mostly hide each
    other): set or delete a field or an entry of a nested object, or append to an array."""
    event = copy.deepcopy({**BASE[kind], **draw(st.sampled_from(VALID[kind]))})
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.one_of(st.sampled_from(_keys(kind)), st.text(min_size=1, max_size=4)))
        target = event.get(key)
        if isinstance(target, list) and draw(st.booleans()):
            target.append(draw(values))
        elif isinstance(target, dict) and draw(st.booleans()):
            name = draw(st.one_of(st.sampled_from(sorted(target) or ["a"]), st.text(max_size=3)))
            if draw(st.integers(0, 3)):
                target[name] = draw(values)
            else:
                target.pop(name, None)
        elif draw(st.integers(0, 3)):
            event[key] = draw(values)
        else:
            event.pop(key, None)
    return event


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_schema_and_python_agree_on_random_events(kind, data):
    event = data.draw(mutated(kind))
    raw = wire(event)
    expected = schema_accepts(kind, raw)
    assert python_accepts(kind, raw) == expected, event
    try:
        events.validate(kind, copy.deepcopy(event))
        assert expected, event
    except InvalidEvent:
        assert not expected, event


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)  # up to 80 events each: ~1000 events a kind
@given(data=st.data())
def test_each_event_of_a_mixed_batch_is_judged_as_alone(kind, data):
    """split_valid vouches for clean batches column by column and halves failed ones: in a
    batch of valid and broken events, each is judged as the schema judges it alone."""
    known = [{**BASE[kind], **extra} for extra in VALID[kind]] + [
        event for _, event in _defects(kind)
    ]
    one = st.one_of(mutated(kind), st.sampled_from(known))
    raws = [wire(e) for e in data.draw(st.lists(one, min_size=1, max_size=80))]
    expected = [schema_accepts(kind, raw) for raw in raws]
    valid, invalid = events.split_valid(kind, raws)
    assert [i for i, _ in invalid] == [i for i, ok in enumerate(expected) if not ok]
    assert valid == [_as_read(kind, orjson.loads(raw)) for raw, ok in zip(raws, expected) if ok]


def _as_read(kind: str, event: dict) -> dict:
    """A valid event as the validator hands it on: a failed request's absent prediction reads
    as null."""
    if kind == "prediction" and event["status"] == "error":
        return {"prediction": None, **event}
    return event


# ---- what coalmine itself publishes follows the contract ----------------------------------------


def test_published_alerts_and_dead_letters_follow_their_schemas(tmp_path):
    from coalmine import simulator
    from coalmine.config import load_config
    from coalmine.replay import replay_files

    # the reference of the other replay tests: its calibration is cached for the session
    simulator.write_reference(tmp_path / "ref.jsonl", n=5000)
    simulator.write_demo_config(tmp_path / "m.toml", tmp_path / "ref.jsonl", window="10s")
    s = simulator.Scenario(
        n_events=12_000, rate_per_s=300, drift_at=6000, drift_size=1.0, bad_event_every=500
    )
    simulator.write_streams(s, tmp_path / "p.jsonl", tmp_path / "l.jsonl")
    run = replay_files(
        load_config(tmp_path / "m.toml"), tmp_path / "p.jsonl", tmp_path / "l.jsonl", progress=False
    )
    assert run.alerts and run.dead
    for alert in run.alerts:
        raw = events.encode(alert.to_json())
        assert schema_accepts("alert", raw), alert
        events.validate_alert(orjson.loads(raw))
    for offset, (_, raw, reason) in enumerate(run.dead):
        record = events.encode(
            events.deadletter_record(raw, reason, "coalmine.predictions", 3, offset, 1)
        )
        assert schema_accepts("deadletter", record)
        events.parse("deadletter", record)


def test_rollout_commands_follow_their_schema():
    from coalmine.signing import sign_command
    from coalmine.streams.rollout import RolloutController, RolloutPolicy

    ctl = RolloutController(
        "m", RolloutPolicy(steps=(10, 50, 100), min_events=10, min_duration_ms=0)
    )
    commands = [
        ctl.on_canary(1000 * i, "v2", healthy=True, events=20).to_json() for i in range(1, 4)
    ]
    commands.append(
        RolloutController("m")
        .on_canary(5000, "v3", healthy=False, events=20, alert_ids=["a1"])
        .to_json()
    )
    assert [c["action"] for c in commands] == ["set_weight", "set_weight", "promote", "rollback"]
    for command in commands + [sign_command(commands[-1], b"key")]:
        raw = events.encode(command)
        assert schema_accepts("command", raw), command
        events.validate_command(orjson.loads(raw))
