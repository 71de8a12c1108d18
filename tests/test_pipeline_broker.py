"""The whole pipeline on the embedded broker: real workers, real topics, real /metrics."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from coalmine import simulator
from coalmine.config import load_config
from coalmine.launch import group_members, wait_until
from coalmine.replay import replay_files

pytestmark = pytest.mark.integration
RATE = 300  # events per second of event time: 300 per 1 s bucket


def wait_for(worker, name: str, target: float, timeout: float = 180) -> None:
    """Until the worker's metric ``name`` reaches ``target``."""
    try:
        wait_until(
            lambda: worker.metric(name) >= target, timeout, f"{name} >= {target}", interval=0.5
        )
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: it stayed at {worker.metric(name)}") from None


def test_drift_alerts_on_the_drifted_feature_and_replay_agrees(
    namespace, start_worker, shuttle_config, tmp_path
):
    scenario = simulator.Scenario(
        n_events=24_000,
        rate_per_s=RATE,
        drift_at=12_000,
        drift_feature="f1",
        drift_size=1.0,
        seed=3,
    )
    events = list(simulator.generate(scenario))
    worker = start_worker(shuttle_config)
    namespace.publish(events)
    # every bucket but the last few (allowed lateness) gets evaluated
    wait_for(worker, "coalmine_evaluations_total", 24_000 / RATE - 4)
    alerts = namespace.read("alerts")
    change_ts = scenario.start_ts_ms + 12_000 * 1000 // RATE
    firing = [a for a in alerts if a["state"] == "firing"]
    assert firing, "a 1 sd shift in f1 must raise an alert"
    assert all(a["ts"] > change_ts for a in alerts), "no alert before the change"
    assert firing[0]["feature"] == "f1" and firing[0]["check"] == "drift"
    assert firing[0]["ts"] <= change_ts + 5_000, "within 5 buckets of the change"

    # the same events from files give the same alerts (file replay also closes the last buckets)
    preds, labels = tmp_path / "p.jsonl", tmp_path / "l.jsonl"
    simulator.write_streams(scenario, preds, labels)
    replayed = replay_files(load_config(shuttle_config), preds, labels, progress=False).alerts
    replayed = [a.to_json() for a in replayed]
    last_live = worker.metric("coalmine_evaluations_total")
    assert [(a["ts"], a.get("feature"), a["state"]) for a in alerts] == [
        (a["ts"], a.get("feature"), a["state"]) for a in replayed
    ][: len(alerts)]
    assert [a["alert_id"] for a in alerts] == [a["alert_id"] for a in replayed][: len(alerts)]
    assert len(replayed) - len(alerts) <= 2, f"live evaluated {last_live} buckets"


def test_stationary_stream_stays_silent(namespace, start_worker, shuttle_config):
    worker = start_worker(shuttle_config)
    namespace.publish(
        simulator.generate(simulator.Scenario(n_events=30_000, rate_per_s=RATE, seed=4))
    )
    wait_for(worker, "coalmine_evaluations_total", 30_000 / RATE - 4)
    assert namespace.read("alerts") == []


def test_bad_events_are_dead_lettered_with_reasons_and_the_worker_goes_on(
    namespace, start_worker, shuttle_config
):
    worker = start_worker(shuttle_config)
    scenario = simulator.Scenario(n_events=6_000, rate_per_s=RATE, bad_event_every=100, seed=5)
    namespace.publish(simulator.generate(scenario))
    valid = 6_000 - 60
    wait_for(worker, "coalmine_events_total", valid, timeout=60)
    dead = namespace.read("deadletter")
    reasons = [d["reason"] for d in dead]
    assert len(dead) == 60
    assert sum(r.startswith("not JSON") for r in reasons) == 15
    assert sum(r == "missing field: ts" for r in reasons) == 15
    assert sum(r.startswith("variant: expected one of") for r in reasons) == 15
    assert (
        sum(r.startswith("features.f2: expected a number, a string or null") for r in reasons) == 15
    )
    assert all(
        d["original_b64"] and d["source_topic"].endswith("coalmine.predictions") for d in dead
    )
    assert worker.proc.poll() is None
    assert worker.metric("coalmine_deadletters_total") == 60


def test_nothing_lost_or_double_counted_when_a_worker_is_killed(
    namespace, start_worker, shuttle_config
):
    """Two workers share the partitions; one is SIGKILLed mid-stream with buckets open. Every
    event must still be counted exactly once in the merged bucket summaries (the broker is
    at-least-once: re-read events and re-sent partials are merged once)."""
    scenario = simulator.Scenario(n_events=18_000, rate_per_s=RATE, label_fraction=0, seed=6)
    events = list(simulator.generate(scenario))
    main_end = (
        scenario.start_ts_ms + 15_000 * 1000 // RATE
    )  # the last 3,000 events only close buckets
    first, second = start_worker(shuttle_config), start_worker(shuttle_config)
    # both members in the group, partitions split, before any event: the second gets a share
    wait_until(
        lambda: group_members(namespace.broker.bootstrap, first.app_id) == 2,
        60,
        "a stable consumer group of both workers",
        interval=0.5,
    )
    namespace.publish(events[:9_000])
    wait_for(second, "coalmine_events_total", 1, timeout=60)
    wait_until(
        lambda: (
            first.metric("coalmine_events_total") + second.metric("coalmine_events_total") >= 9_000
        ),
        60,
        "both workers together to fold the first 9,000 events",
    )
    second.kill()
    namespace.publish(events[9_000:])
    counted = 0

    def all_counted() -> bool:
        nonlocal counted
        counted = _counted_once(namespace.read("partials", idle=0.5), main_end)
        return counted >= 15_000

    try:
        wait_until(
            all_counted, 120, "the partials to count the 15,000 events before the end", interval=1
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {counted:,} counted") from None
    assert counted == 15_000


def _counted_once(partials: list[dict], end_ts: int) -> int:
    """Events in buckets before ``end_ts``, each (source, bucket) taken once, first come
    (heartbeats hold no buckets)."""
    seen, total = set(), 0
    for p in partials:
        for start, variants in p.get("buckets", {}).items():
            if int(start) < end_ts and (p["source"], start) not in seen:
                seen.add((p["source"], start))
                total += sum(v["n"] for v in variants.values())
    return total


def test_bad_canary_is_rolled_back_with_a_signed_command_and_status_shows_it(
    namespace, start_worker, tmp_path
):
    from coalmine.signing import verify_command

    simulator.write_reference(tmp_path / "reference.jsonl", n=5000)
    simulator.write_demo_config(
        tmp_path / "monitor.toml", tmp_path / "reference.jsonl", window="10s", rollout=True
    )
    worker = start_worker(tmp_path / "monitor.toml", env={"COALMINE_SIGNING_KEY": "k3y"})
    serving = simulator.Serving(
        simulator.Version("v1"),
        canary=simulator.Version("v3", noise=1.5, error_rate=0.10),
        canary_weight=10,
    )
    namespace.publish(serving.events(0, 30 * RATE, simulator.Scenario().start_ts_ms, RATE, seed=8))
    wait_for(worker, "coalmine_commands_total", 1)
    commands = namespace.read("commands")
    assert [(c["action"], c["version"]) for c in commands] == [("rollback", "v3")]
    assert verify_command(commands[0], b"k3y") and not verify_command(
        {**commands[0], "version": "v1"}, b"k3y"
    )

    status = subprocess.run(
        [sys.executable, "-m", "coalmine", "status", "--broker", namespace.broker.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COALMINE_NAMESPACE": namespace.prefix},
    )
    text = status.stdout
    assert "version v3     rolled back" in text and "canary canary_health" in text, text
    assert "v3 rolled back at ts" in text

    # the gate Argo Rollouts (GET, JSON body) and Flagger (POST, status) read: held
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{worker.web_port}/verdicts/shuttle/"
    for request in (urllib.request.Request(url), urllib.request.Request(url, b"{}", method="POST")):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=5)
        assert answer.value.code == 409
        body = orjson.loads(answer.value.read())
        assert (body["version"], body["healthy"], body["decision"]) == ("v3", False, "rollback")


def test_worker_takes_its_reference_from_the_first_events_of_the_topic(
    namespace, start_worker, tmp_path
):
    (tmp_path / "m.toml").write_text(
        '[defaults]\nwindow = "10s"\n[[models]]\nname = "shuttle"\n'
        'reference_first_events = 3000\nchecks = ["drift"]\n'
    )
    scenario = simulator.Scenario(
        n_events=18_000, rate_per_s=RATE, drift_at=12_000, drift_size=1.0, label_fraction=0, seed=22
    )
    namespace.publish(simulator.generate(scenario))
    worker = start_worker(tmp_path / "m.toml")
    wait_for(worker, "coalmine_evaluations_total", 18_000 / RATE - 4)
    alerts = namespace.read("alerts")
    change = scenario.start_ts_ms + 12_000 * 1000 // RATE
    assert alerts and all(a["ts"] > change for a in alerts) and alerts[0]["feature"] == "f1"


def test_closed_loop_on_the_broker_shadow_judged_canary_stepped_and_promoted(
    namespace, start_worker, tmp_path
):
    """The router obeys the commands the worker publishes, in real time: the healthy shadow
    v2 is judged, stepped 10 -> 50 -> 100 and promoted, and never rolled back."""
    import asyncio

    from coalmine.client import tail

    simulator.write_reference(tmp_path / "reference.jsonl", n=5000)
    simulator.write_demo_config(
        tmp_path / "monitor.toml", tmp_path / "reference.jsonl", window="10s", rollout=True
    )
    start_worker(tmp_path / "monitor.toml")
    serving = simulator.Serving(simulator.Version("v1"), shadow=simulator.Version("v2"))

    async def loop():
        stop = asyncio.Event()

        async def obey():
            async for command in tail(
                namespace.broker.bootstrap, namespace.topic["commands"], stop=stop
            ):
                serving.apply(command)
                if command["action"] in ("promote", "rollback"):
                    stop.set()

        router = asyncio.create_task(obey())
        traffic = asyncio.create_task(
            simulator.run_live(
                namespace.broker.bootstrap,
                serving,
                seconds=60,
                rate_per_s=RATE,
                targets={
                    "prediction": namespace.topic["predictions"],
                    "label": namespace.topic["labels"],
                },
            )
        )
        await asyncio.wait_for(router, timeout=90)
        traffic.cancel()

    asyncio.run(loop())
    commands = [(c["action"], c.get("weight")) for c in namespace.read("commands")]
    assert commands == [
        ("set_weight", 10),
        ("set_weight", 50),
        ("set_weight", 100),
        ("promote", None),
    ]
    assert serving.champion.name == "v2"


def test_sample_ratio_mismatch_on_the_broker_alerts_and_pauses(namespace, start_worker, tmp_path):
    """The router sends 25% to the canary while the rollout holds it at 10%."""
    simulator.write_reference(tmp_path / "reference.jsonl", n=5000)
    simulator.write_demo_config(
        tmp_path / "monitor.toml", tmp_path / "reference.jsonl", window="10s", rollout=True
    )
    worker = start_worker(tmp_path / "monitor.toml")
    serving = simulator.Serving(
        simulator.Version("v1"), canary=simulator.Version("v2"), canary_weight=25
    )
    namespace.publish(serving.events(0, 20 * RATE, simulator.Scenario().start_ts_ms, RATE, seed=9))
    wait_for(worker, "coalmine_commands_total", 1)
    assert [c["action"] for c in namespace.read("commands")][:1] == ["pause"]
    srm = [a for a in namespace.read("alerts") if a["check"] == "srm"]
    assert srm and srm[0]["state"] == "firing"
