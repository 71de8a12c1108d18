"""``coalmine replay --commands`` writes the rollout commands the monitor would have issued
(issue 13.4): the same commands a worker publishes for the same events."""

from __future__ import annotations

import orjson
import pytest
from test_pipeline_broker import wait_for
from test_rollout import closed_loop

from coalmine import simulator as sim
from coalmine.cli import main
from coalmine.config import load_config


def _recorded_closed_loop(config, tmp_path):
    """A shadow stepped up and promoted, then a failing canary rolled back, with the router
    obeying each command: the events as served, and the replay that issued the commands."""
    serving = sim.Serving(sim.Version("v1"), shadow=sim.Version("v2"))
    served: list[tuple[str, dict]] = []
    original = serving.events

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        served.extend(out)
        return out

    serving.events = record

    def deploy_v3(s):
        s.canary, s.canary_weight = sim.Version("v3", noise=1.5, error_rate=0.05), 10

    run = closed_loop(config, serving, 50, changes={30: deploy_v3})
    sim.write_jsonl(tmp_path / "p.jsonl", (e for k, e in served if k == "prediction"))
    sim.write_jsonl(tmp_path / "l.jsonl", (e for k, e in served if k == "label"))
    return run


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("commands")
    sim.write_reference(d / "ref.jsonl", 5000)
    sim.write_demo_config(d / "m.toml", d / "ref.jsonl", window="10s", rollout=True)
    return load_config(d / "m.toml")


def _replay_commands(config, tmp_path) -> list[dict]:
    code = main(
        [
            "replay",
            "--predictions",
            str(tmp_path / "p.jsonl"),
            "--labels",
            str(tmp_path / "l.jsonl"),
            "--config",
            str(config.source),
            "--alerts",
            str(tmp_path / "alerts.jsonl"),
            "--commands",
            str(tmp_path / "commands.jsonl"),
            "--quiet",
        ]
    )
    assert code == 0
    return [orjson.loads(line) for line in (tmp_path / "commands.jsonl").read_bytes().splitlines()]


def test_replay_writes_the_commands_the_closed_loop_issued(config, tmp_path):
    """Replay-only: the file backtest of the served events lists the very commands (ids,
    times, evidence) that drove the router while they were served."""
    run = _recorded_closed_loop(config, tmp_path)
    assert [(c.action, c.version) for c in run.commands] == [
        ("set_weight", "v2"),
        ("set_weight", "v2"),
        ("set_weight", "v2"),
        ("promote", "v2"),
        ("rollback", "v3"),
    ]
    assert _replay_commands(config, tmp_path) == [
        orjson.loads(orjson.dumps(c.to_json())) for c in run.commands
    ]


def test_replay_writes_the_commands_a_worker_publishes(namespace, start_worker, tmp_path, config):
    """On the broker: the same served events published to a worker's topics; the commands it
    publishes are those the replay writes."""
    _recorded_closed_loop(config, tmp_path)
    served = [
        ("prediction", orjson.loads(line))
        for line in (tmp_path / "p.jsonl").read_bytes().splitlines()
    ] + [("label", orjson.loads(line)) for line in (tmp_path / "l.jsonl").read_bytes().splitlines()]
    served.sort(key=lambda ke: (ke[1]["ts"], ke[0] == "label"))
    worker = start_worker(config.source)
    namespace.publish(served)
    expected = _replay_commands(config, tmp_path)
    # live, the last buckets stay open (nothing comes after them to close them); file replay
    # closes them at the end of the file: every bucket but those is evaluated
    bucket_ms = config.models["shuttle"].bucket_ms
    span = (served[-1][1]["ts"] - served[0][1]["ts"]) // bucket_ms
    wait_for(worker, "coalmine_evaluations_total", span - 4)
    published = namespace.read("commands")
    assert len(published) >= len(expected) - 1

    # labels count in the bucket of their event time however late the labels topic is read:
    # the label-based figures behind each decision are replay's too. Not the count of paired
    # answers: a champion answer waits for its shadow only once the shadow has answered on
    # its partition, and a worker has a few partitions where replay has one
    def decision(c: dict) -> dict:
        return {**c, "evidence": {k: v for k, v in c["evidence"].items() if k != "paired"}}

    assert [decision(c) for c in published] == [decision(c) for c in expected[: len(published)]]
