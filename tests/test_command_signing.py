"""Commands and alerts are believed only when signed, unaltered, in sequence and (live) not
expired: the verifier, `coalmine status`, `coalmine tail`, the client's `tail` and the demo
router (issue 12, "Security")."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import orjson
import pytest

from coalmine import events, simulator
from coalmine.client import Publisher, tail
from coalmine.demo import route
from coalmine.signing import Signer, Verifier, generate_ed25519
from coalmine.status import render, summarize

SCHEMA = json.loads((Path(__file__).parents[1] / "schemas" / "command.json").read_text())
T0 = 1_700_000_000_000


def command(i: int, action: str = "set_weight", ts: int | None = None, **extra) -> dict:
    out = {
        "command_id": f"c{i}",
        "ts": T0 + i * 1000 if ts is None else ts,
        "model": "shuttle",
        "version": "v2",
        "action": action,
        "reason": "test",
        "alert_ids": [],
        **extra,
    }
    if action == "set_weight":
        out.setdefault("weight", 10.0)
    return out


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return generate_ed25519()


def test_ed25519_commands_follow_the_schema_and_verify_with_the_public_key_only(keys):
    private, public = keys
    signed = Signer.parse(private)(command(1))
    assert len(signed["signature"]) == 128
    jsonschema.validate(signed, SCHEMA)
    events.validate_command(dict(signed))
    verifier = Verifier.parse(public, clock=None)
    assert not hasattr(verifier.key, "sign")  # a subscriber cannot sign with what it holds
    assert verifier.check(signed) is None


@pytest.mark.parametrize("algorithm", ["ed25519", "hmac"])
def test_unsigned_altered_foreign_and_replayed_commands_are_rejected(keys, algorithm):
    signer = Signer.parse(keys[0] if algorithm == "ed25519" else "hmac:s3cret")
    verifier = signer.verifier(clock=None)
    other = Signer.parse(generate_ed25519()[0] if algorithm == "ed25519" else "hmac:other")
    first, second = signer(command(1)), signer(command(2, "rollback"))
    assert verifier.check(command(1)) == "unsigned"
    assert verifier.check({**first, "weight": 100.0}).startswith("bad signature")
    assert verifier.check(other(command(1))).startswith("bad signature")
    assert verifier.check(first) is None
    assert verifier.check(second) is None
    assert verifier.check(second).startswith("replayed")  # the same genuine rollback again
    assert verifier.check(first).startswith("replayed")  # an older genuine command
    # another command at the same ts is no replay
    assert verifier.check(signer(command(3, "pause", ts=second["ts"]))) is None


def test_a_live_verifier_rejects_an_expired_command():
    signer = Signer(b"k")
    now = (T0 + 10_000) / 1000
    live = signer.verifier(clock=lambda: now, validity_s=5)
    assert live.check(signer(command(1))).startswith("expired")  # ts T0 + 1 s, now T0 + 10 s
    assert live.check(signer(command(6))) is None  # ts T0 + 6 s


def test_status_skips_a_malformed_command_and_says_so():
    commands = [command(1), {"command_id": "x", "model": "shuttle"}, command(2, "promote")]
    notes: list[str] = []
    status = summarize(commands, [{"alert_id": "a"}], [], notes=notes)  # was KeyError: 'ts'
    assert status["shuttle"].stages["v2"] == "production (promoted)"
    assert any("skipped 1 malformed command" in n for n in notes), notes
    assert any("skipped 1 malformed alert" in n for n in notes), notes


def test_status_leaves_out_forged_and_replayed_commands(keys):
    signer = Signer.parse(keys[0])
    genuine = [signer(command(1)), signer(command(2, "rollback"))]
    forged = command(3, "promote")  # unsigned
    notes: list[str] = []
    status = summarize(
        [*genuine, forged, genuine[1]], [], [], Verifier.parse(keys[1], clock=None), notes
    )
    assert status["shuttle"].stages["v2"] == "rolled back"
    assert [n.split(": ", 1)[1] for n in notes] == [
        "unsigned",
        "replayed: command c2 of model shuttle at ts 1700000002000 was already accepted",
    ]
    assert "note: rejected command c3 (shuttle): unsigned" in render(status, notes)


def test_the_demo_router_does_not_obey_a_rejected_command():
    serving = simulator.Serving(simulator.Version("v1"), shadow=simulator.Version("v2"))
    forged = {"_rejected": "unsigned", "record": command(1, "promote")}
    assert route(forged, serving).startswith("REJECTED")
    assert serving.champion.name == "v1"


def test_tail_and_the_cli_verify_commands(namespace, keys):
    private, public = keys
    signer = Signer.parse(private)
    topic = namespace.topic["commands"]
    now = int(time.time() * 1000)
    genuine = signer(command(1, ts=now))
    published = [genuine, command(2, "promote", ts=now + 1), genuine, b"{not json"]

    async def publish_and_read() -> list[dict]:
        async with Publisher(namespace.broker.bootstrap) as pub:
            for record in published:
                await pub.publish(topic, record, key="shuttle")
        verifier = Verifier.parse(public)
        return [
            r async for r in tail(namespace.broker.url, topic, until_idle=1.0, verifier=verifier)
        ]

    got = asyncio.run(publish_and_read())
    assert got[0] == genuine
    assert [r.get("_rejected", "").split(" ")[0] for r in got[1:]] == [
        "unsigned",
        "replayed:",
        "unsigned",
    ]

    env = {
        **os.environ,
        "COALMINE_NAMESPACE": namespace.prefix,
        "COALMINE_VERIFY_KEY": public,
    }
    env.pop("COALMINE_SIGNING_KEY", None)
    cli = [sys.executable, "-m", "coalmine"]
    done = subprocess.run(
        cli + ["tail", "commands", "--until-idle", "1", "--broker", namespace.broker.url],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [orjson.loads(line) for line in done.stdout.splitlines()] == [genuine]
    assert done.stderr.decode().count("coalmine tail: rejected") == 3

    done = subprocess.run(
        cli + ["status", "--broker", namespace.broker.url],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr  # the malformed record made it exit 1
    out = done.stdout.decode()
    assert "canary at 10%" in out and "rejected command c2 (shuttle): unsigned" in out, out


# ------------------------------------------------------------------ alerts


def alert(i: int, state: str = "firing", ts: int | None = None, **extra) -> dict:
    ts = T0 + i * 1000 if ts is None else ts
    return {
        "alert_id": f"a{i}",
        "ts": ts,
        "model": "shuttle",
        "variant": "canary",
        "check": "canary_health",
        "state": state,
        "statistic": "surprise",
        "value": 7.5,
        "threshold": 5.0,
        "window": {"start_ts": ts - 10_000, "end_ts": ts, "n": 300},
        "message": "test",
        **extra,
    }


@pytest.mark.parametrize("algorithm", ["ed25519", "hmac"])
def test_unsigned_altered_and_replayed_alerts_are_rejected(keys, algorithm):
    signer = Signer.parse(keys[0] if algorithm == "ed25519" else "hmac:s3cret")
    verifier = signer.verifier(clock=None, kind="alert")
    fired, resolved, again = signer(alert(1)), signer(alert(2, "resolved")), signer(alert(3))
    assert verifier.check(alert(1)) == "unsigned"
    assert verifier.check({**resolved, "state": "firing"}).startswith("bad signature")
    assert verifier.check(fired) is None
    assert verifier.check(resolved) is None
    assert verifier.check(fired).startswith("replayed")  # an old firing, to page again
    assert verifier.check(resolved).startswith("replayed")  # the same resolve twice
    assert verifier.check(again) is None  # firing again, later: a new alert
    # a genuine command is no alert, and a genuine alert no command
    assert signer.verifier(clock=None, kind="alert").check(signer(command(1))).startswith("signed,")
    assert signer.verifier(clock=None).check(signer(alert(1))).startswith("signed,")


def test_a_live_verifier_rejects_an_expired_alert():
    signer = Signer(b"k")
    live = signer.verifier(clock=lambda: (T0 + 10_000) / 1000, validity_s=5, kind="alert")
    assert live.check(signer(alert(1))).startswith("expired")
    assert live.check(signer(alert(6))) is None


def test_stage_2_signs_alerts_as_an_envelope_that_verifies_on_the_wire(keys, tmp_path, monkeypatch):
    """The alerts of a signed run are those of an unsigned one (same ids, same fields) plus a
    signature that verifies, in sequence, after the wire's JSON round trip."""
    from coalmine.baselines import build_baselines
    from coalmine.config import load_config
    from coalmine.replay import Replay

    simulator.write_reference(tmp_path / "ref.jsonl", 5000)
    simulator.write_demo_config(
        tmp_path / "m.toml", tmp_path / "ref.jsonl", window="10s", rollout=True
    )
    baselines = build_baselines(load_config(tmp_path / "m.toml"))
    serving = simulator.Serving(
        simulator.Version("v1"),
        canary=simulator.Version("v3", noise=1.5, error_rate=0.10),
        canary_weight=10,
    )
    events_ = serving.events(0, 8 * 300, T0, 300, seed=8)
    predictions = [e for k, e in events_ if k == "prediction"]

    def run() -> list[dict]:
        replay = Replay(baselines)
        replay.feed(predictions, [e for k, e in events_ if k == "label"])
        replay.close()
        return [orjson.loads(events.encode(a.to_json())) for a in replay.alerts]

    monkeypatch.delenv("COALMINE_SIGNING_KEY", raising=False)
    plain = run()
    monkeypatch.setenv("COALMINE_SIGNING_KEY", keys[0])
    signed = run()
    assert plain and "signature" not in plain[0]
    assert [{k: v for k, v in a.items() if k != "signature"} for a in signed] == plain
    verifier = Verifier.parse(keys[1], clock=None, kind="alert")
    assert [verifier.check(a) for a in signed] == [None] * len(signed)
    schema = json.loads((Path(__file__).parents[1] / "schemas" / "alert.json").read_text())
    for a in signed:
        jsonschema.validate(a, schema)
        events.validate("alert", dict(a))


def test_status_leaves_out_forged_altered_and_replayed_alerts(keys):
    signer = Signer.parse(keys[0])
    fired, resolved, again = signer(alert(1)), signer(alert(2, "resolved")), signer(alert(5))
    forged = alert(6, "resolved")  # unsigned: would hide the firing alert
    altered = {**signer(alert(7, "resolved")), "variant": "champion"}
    alerts = [fired, resolved, again, fired, forged, altered]
    notes: list[str] = []
    verifier = Verifier.parse(keys[1], clock=None, kind="alert")
    status = summarize([], alerts, [], notes=notes, alert_verifier=verifier)
    assert len(status["shuttle"].firing) == 1  # a5 fires
    assert [n.split(": ", 1)[1].split(" ")[0] for n in notes] == ["replayed:", "unsigned", "bad"]
    assert "note: rejected alert a6 (shuttle): unsigned" in render(status, notes)
    # believed unverified, the forged resolve hides it (nothing fires, nothing to show)
    assert "shuttle" not in summarize([], alerts, [])


def test_tail_and_the_cli_verify_alerts(namespace, keys, monkeypatch):
    private, public = keys
    signer = Signer.parse(private)
    topic = namespace.topic["alerts"]
    now = int(time.time() * 1000)
    genuine = signer(alert(1, ts=now))
    published = [genuine, alert(2, "resolved", ts=now + 1), genuine]

    async def publish() -> None:
        async with Publisher(namespace.broker.bootstrap) as pub:
            for record in published:
                await pub.publish(topic, record)

    async def read(**kwargs) -> list[dict]:
        return [r async for r in tail(namespace.broker.url, topic, until_idle=1.0, **kwargs)]

    asyncio.run(publish())
    monkeypatch.delenv("COALMINE_SIGNING_KEY", raising=False)
    monkeypatch.setenv("COALMINE_VERIFY_KEY", public)
    by_key = asyncio.run(read())  # the configured key verifies, unasked
    assert by_key == asyncio.run(read(verifier=Verifier.parse(public, kind="alert")))
    assert by_key[0] == genuine
    assert [r["_rejected"].split(" ")[0] for r in by_key[1:]] == ["unsigned", "replayed:"]
    assert asyncio.run(read(verifier=None)) == published

    env = {**os.environ, "COALMINE_NAMESPACE": namespace.prefix, "COALMINE_VERIFY_KEY": public}
    env.pop("COALMINE_SIGNING_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "coalmine", "tail", "alerts", "--until-idle", "1"]
        + ["--broker", namespace.broker.url],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [orjson.loads(line) for line in done.stdout.splitlines()] == [genuine]
    stderr = done.stderr.decode()
    assert "rejected alert resolved shuttle canary canary_health a2: unsigned" in stderr, stderr
    assert stderr.count("coalmine tail: rejected") == 2
