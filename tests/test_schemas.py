"""schemas/*.json and coalmine.events agree: the contract producers in any language rely on."""

from __future__ import annotations

import copy
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from coalmine import events
from coalmine.events import InvalidEvent

KINDS = ("prediction", "label", "alert", "command", "deadletter")


def validator(kind: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(events.schema_path(kind).read_text()))


@pytest.mark.parametrize("kind", KINDS)
def test_every_schema_is_valid_2020_12(kind):
    Draft202012Validator.check_schema(json.loads(events.schema_path(kind).read_text()))


PREDICTION = {"event_id": "e1", "request_id": "r1", "model": "m", "version": "v1", "variant": "champion",
              "ts": 1700000000000, "features": {"a": 1.5, "b": "red", "c": None}, "prediction": 1,
              "status": "ok"}
LABEL = {"event_id": "l1", "request_id": "r1", "model": "m", "ts": 1700000002000, "label": 1}


def _mutations(valid: dict, kind: str):
    """One defect at a time, each a way producers get it wrong."""
    for key in valid:
        yield f"missing {key}", {k: v for k, v in valid.items() if k != key}
    yield "unknown key", {**valid, "colour": "x"}
    yield "negative ts", {**valid, "ts": -1}
    yield "float ts", {**valid, "ts": 1.5}
    yield "bool ts", {**valid, "ts": True}
    yield "empty id", {**valid, "event_id": ""}
    yield "numeric model", {**valid, "model": 7}
    if kind == "prediction":
        yield "bad variant", {**valid, "variant": "blue"}
        yield "bad status", {**valid, "status": "fine"}
        yield "features list", {**valid, "features": [1, 2]}
        yield "bool feature", {**valid, "features": {"a": True}}
        yield "object feature", {**valid, "features": {"a": {"x": 1}}}
        yield "null prediction when ok", {**valid, "prediction": None}
        yield "negative latency", {**valid, "latency_ms": -3}
        yield "string latency", {**valid, "latency_ms": "3"}
        yield "score not a number", {**valid, "scores": {"1": "high"}}
        yield "empty unit", {**valid, "unit_id": ""}
    else:
        yield "object label", {**valid, "label": {"x": 1}}
        yield "bool label", {**valid, "label": False}
        yield "string outcome", {**valid, "outcome": "3"}


VALID_EXTRAS = {
    "prediction": [{}, {"scores": {"0": 0.2, "1": 0.8}, "latency_ms": 3.5, "unit_id": "u1"},
                   {"status": "error", "prediction": None, "error": "timeout"},
                   {"prediction": "cat", "features": {}}],
    "label": [{}, {"outcome": 12.5}, {"label": "cat"}],
}


def _python_accepts(kind: str, event) -> bool:
    try:
        (events.parse_prediction if kind == "prediction" else events.parse_label)(orjson.dumps(event))
        return True
    except InvalidEvent:
        return False


@pytest.mark.parametrize("kind,base", [("prediction", PREDICTION), ("label", LABEL)])
def test_valid_examples_pass_both(kind, base):
    for extra in VALID_EXTRAS[kind]:
        event = {**base, **extra}
        assert validator(kind).is_valid(event), extra
        assert _python_accepts(kind, event), extra


@pytest.mark.parametrize("kind,base", [("prediction", PREDICTION), ("label", LABEL)])
def test_each_defect_fails_both(kind, base):
    for what, event in _mutations(base, kind):
        assert not validator(kind).is_valid(event), what
        assert not _python_accepts(kind, event), what


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**13), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=3))
field_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=2),
                         st.dictionaries(st.text(max_size=2), json_scalars, max_size=3))


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(["prediction", "label"]),
       field=st.one_of(st.sampled_from(sorted(set(PREDICTION) | set(LABEL) | {
           "scores", "latency_ms", "unit_id", "error", "outcome"})), st.text(min_size=1, max_size=5)),
       value=field_values, drop=st.booleans())
def test_schema_and_python_agree_on_random_mutations(kind, field, value, drop):
    event = copy.deepcopy(PREDICTION if kind == "prediction" else LABEL)
    if drop:
        event.pop(field, None)
    else:
        event[field] = value
    assert validator(kind).is_valid(event) == _python_accepts(kind, event), event


def test_published_alerts_and_dead_letters_follow_their_schemas(tmp_path):
    from coalmine import simulator
    from coalmine.config import load_config
    from coalmine.replay import replay_files

    simulator.write_reference(tmp_path / "ref.jsonl", n=3000)
    simulator.write_demo_config(tmp_path / "m.toml", tmp_path / "ref.jsonl", window="10s")
    s = simulator.Scenario(n_events=12_000, rate_per_s=300, drift_at=6000, drift_size=1.0, bad_event_every=500)
    simulator.write_streams(s, tmp_path / "p.jsonl", tmp_path / "l.jsonl")
    run = replay_files(load_config(tmp_path / "m.toml"), tmp_path / "p.jsonl", tmp_path / "l.jsonl", progress=False)
    assert run.alerts and run.dead
    for alert in run.alerts:
        validator("alert").validate(json.loads(orjson.dumps(alert)))
    for kind, raw, reason in run.dead:
        record = events.deadletter_record(raw, reason, "coalmine.predictions", 3, 42, 1)
        validator("deadletter").validate(record)
