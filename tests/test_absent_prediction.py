"""A failed request may leave ``prediction`` out (issue 13): accepted when ``status`` is error,
refused otherwise, by the schema, the exact validator and the fast decoder alike."""

from __future__ import annotations

import copy
from functools import cache

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_schemas import PREDICTION, mutated, python_accepts, schema_accepts, wire

from coalmine import events
from coalmine import simulator as sim
from coalmine.config import load_config
from coalmine.events import InvalidEvent
from coalmine.replay import replay_chunks

RATE = 300
T0 = 1_700_000_000_000


def _failed_without_answer(e: dict) -> dict:
    return {k: v for k, v in e.items() if k != "prediction"} | {"status": "error"}


def test_both_sides_accept_it_on_a_failed_request_only():
    failed = _failed_without_answer(PREDICTION)
    assert schema_accepts("prediction", wire(failed)) and python_accepts("prediction", wire(failed))
    assert events.validate("prediction", copy.deepcopy(failed))["prediction"] is None
    ok = {k: v for k, v in PREDICTION.items() if k != "prediction"}
    assert not schema_accepts("prediction", wire(ok))
    with pytest.raises(InvalidEvent, match="missing field: prediction"):
        events.validate("prediction", ok)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_schema_and_python_agree_on_random_events_without_a_prediction(data):
    event = data.draw(mutated("prediction"))
    event.pop("prediction", None)
    event["status"] = data.draw(st.sampled_from(["ok", "error"]))
    assert python_accepts("prediction", wire(event)) == schema_accepts("prediction", wire(event))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("absent")
    sim.write_reference(d / "ref.jsonl", 5000)
    (d / "m.toml").write_text(
        '[defaults]\nbucket = "1s"\nwindow = "10s"\n\n'
        '[[models]]\nname = "shuttle"\nreference = "ref.jsonl"\n'
    )
    return load_config(d / "m.toml")


@cache  # four tests read the same messages: built once
def _raws(slow: bool) -> tuple[bytes, ...]:
    """Prediction messages with 10% failed requests that leave ``prediction`` out; with
    ``slow``, each of those also holds a string with a "{" under a key the model does not
    watch, which the fast decoder cannot tell from structure: the exact validator judges it."""
    serving = sim.Serving(sim.Version("v1", error_rate=0.1))
    out = []
    for kind, e in serving.events(0, 20 * RATE, T0, RATE, seed=3):
        if kind == "prediction":
            if e["status"] == "error":
                del e["prediction"]
                if slow:
                    e["features"]["note"] = "{not an object}"
            out.append(orjson.dumps(e))
    return tuple(out)


@pytest.mark.parametrize("slow", [False, True], ids=["fast decoder", "exact validator"])
def test_a_replay_accepts_failed_requests_without_a_prediction(config, slow):
    raws = _raws(slow)
    failed = sum(b'"prediction"' not in r for r in raws)
    assert failed > 300
    run = replay_chunks(config, [list(raws)])
    assert run.dead == [] and run.counts["predictions"] == len(raws)


@pytest.mark.parametrize("slow", [False, True], ids=["fast decoder", "exact validator"])
def test_an_answered_request_still_needs_its_prediction(config, slow):
    ok = orjson.loads(next(r for r in _raws(False) if b'"prediction"' in r))
    del ok["prediction"]
    if slow:
        ok["features"]["note"] = "[x"
    run = replay_chunks(config, [[*_raws(False)[:100], orjson.dumps(ok)]])
    assert [reason for _, _, reason in run.dead] == [
        "missing field: prediction (required unless status is error)"
    ]
