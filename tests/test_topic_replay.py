"""Replay from topics: a slice of the prediction and label topics by message time gives the same
bytes as file replay of the same events; `coalmine tail --since/--until` turns a slice back into
the file that was published; and the event-time merge of partitions, without a broker."""

from __future__ import annotations

import asyncio
import heapq
import io
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from coalmine import simulator
from coalmine.client import Publisher
from coalmine.slices import event_ts, merge_by_event_time, parse_time

COALMINE = Path(sys.executable).with_name("coalmine")


def now_ms() -> int:
    return int(time.time() * 1000)


def publish_lines(bootstrap: str, topic: str, lines: list[bytes]) -> None:
    async def run():
        async with Publisher(bootstrap) as pub:
            assert await pub.publish_many(topic, lines) == len(lines)

    asyncio.run(run())


def lines_of(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def outside(kind: str, i: int) -> bytes:
    """An event published outside the slice: were it replayed, its model is unknown and it
    would be a dead letter."""
    return orjson.dumps({"model": "outside", "request_id": f"{kind}{i}", "ts": i})


# ------------------------------------------------------------------ no broker


def test_parse_time_takes_epoch_ms_and_iso_8601():
    assert parse_time("1700000000000") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000_000  # no offset: UTC
    assert parse_time("2023-11-14T23:13:20.5+01:00") == 1_700_000_000_500
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_time("yesterday")


def test_event_ts_reads_the_top_level_ts_or_none():
    assert event_ts(b'{"ts":5,"features":{"a":1}}') == 5
    assert event_ts(b'{"features":{"ts":1},"ts":7}') == 7  # nested ts: parsed for real
    assert event_ts(b'{"ts": 9}') == 9 and event_ts(b'{"ts":-3}') == -3
    assert event_ts(b'{"a":"ts","ts":4}') == 4
    for raw in (b"{not json", b'{"a":1}', b'{"ts":1.5}', b'{"ts":"now"}', b"[1]", b""):
        assert event_ts(raw) is None, raw


def test_merge_by_event_time_is_heapq_merge_of_partitions_by_their_running_max_ts():
    rng = random.Random(3)
    for trial in range(200):
        parts = []
        for _ in range(rng.randint(1, 5)):
            ts = sorted(rng.randint(0, 60) for _ in range(rng.randint(0, 40)))
            msgs = [orjson.dumps({"ts": t, "i": rng.random()}) for t in ts]
            for _ in range(rng.randint(0, 4)):  # not JSON, no ts, late: kept in place
                bad = rng.choice([b"{oops", b'{"x":1}', orjson.dumps({"ts": rng.randint(0, 9)})])
                msgs.insert(rng.randint(0, len(msgs)), bad)
            parts.append(msgs)

        def keyed(msgs):
            top = -(2**62)
            for m in msgs:
                top = max(top, event_ts(m) if event_ts(m) is not None else top)
                yield top, m

        expected = [m for _, m in heapq.merge(*map(keyed, parts), key=lambda km: km[0])]
        pulls = []
        for msgs in parts:  # each partition delivered in batches of random sizes
            cuts = sorted(rng.sample(range(1, len(msgs)), min(3, max(0, len(msgs) - 1))))
            batches = iter([msgs[a:b] for a, b in zip([0, *cuts], [*cuts, len(msgs)])])
            pulls.append(lambda batches=batches: next(batches, None))
        got = [m for chunk in merge_by_event_time(pulls) for m in chunk]
        assert got == expected, trial


# ------------------------------------------------------------------ on the broker


def test_replay_from_topics_is_byte_identical_to_file_replay(namespace, shuttle_config, tmp_path):
    scenario = simulator.Scenario(
        n_events=45_000,  # more than two replay chunks of predictions
        drift_at=20_000,
        drift_until=32_000,
        drift_size=1.0,
        bad_event_every=997,  # malformed events of every kind: dead letters must match too
        seed=5,
    )
    preds, labels = tmp_path / "preds.jsonl", tmp_path / "labels.jsonl"
    simulator.write_streams(scenario, preds, labels)
    topic = namespace.topic
    bootstrap = namespace.broker.bootstrap
    publish_lines(bootstrap, topic["predictions"], [outside("p", i) for i in range(50)])
    publish_lines(bootstrap, topic["labels"], [outside("l", i) for i in range(50)])
    time.sleep(0.05)
    since = now_ms()
    publish_lines(bootstrap, topic["predictions"], lines_of(preds))
    publish_lines(bootstrap, topic["labels"], lines_of(labels))
    time.sleep(0.05)
    until = now_ms()
    time.sleep(0.05)
    publish_lines(bootstrap, topic["predictions"], [outside("p", i) for i in range(50, 90)])

    def replay(out: Path, *source: str) -> str:
        out.mkdir()
        done = subprocess.run(
            [COALMINE, "replay", *source, "--config", str(shuttle_config), "--quiet"]
            + [f"--{what}={out / what}.jsonl" for what in ("alerts", "evaluations", "deadletter")],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COALMINE_NAMESPACE": namespace.prefix},
        )
        assert done.returncode == 0, done.stderr
        return done.stderr

    said_file = replay(tmp_path / "file", "--predictions", str(preds), "--labels", str(labels))
    said = replay(
        tmp_path / "topics",
        "--from-topics",
        f"--broker={namespace.broker.url}",
        f"--since={datetime.fromtimestamp(since / 1000, UTC).isoformat()}",  # ISO-8601
        f"--until={until}",  # epoch ms
    )
    counts = said.split(" (")[0]
    assert counts == said_file.split(" (")[0]
    for what in ("alerts", "evaluations", "deadletter"):
        from_file = (tmp_path / "file" / f"{what}.jsonl").read_bytes()
        assert from_file, what
        assert (tmp_path / "topics" / f"{what}.jsonl").read_bytes() == from_file, what
    alerts = [orjson.loads(line) for line in lines_of(tmp_path / "file" / "alerts.jsonl")]
    assert any(a["check"] == "drift" for a in alerts)
    dead = lines_of(tmp_path / "file" / "deadletter.jsonl")
    assert len(dead) == 45_000 // 997  # the malformed ones, none of the slice's outsiders

    # the report of the same slice: its replay from the topics, drawn
    html = tmp_path / "report.html"
    done = subprocess.run(
        [COALMINE, "report", "--from-topics", f"--broker={namespace.broker.url}"]
        + [f"--since={since}", f"--until={until}", "--config", str(shuttle_config)]
        + ["--out", str(html), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COALMINE_NAMESPACE": namespace.prefix},
    )
    assert done.returncode == 0, done.stderr
    page = html.read_text()
    assert "Model shuttle" in page and page.count("<svg") > 5
    firing = [a["message"] for a in alerts if a["state"] == "firing"]
    assert firing and all(message in page for message in firing), "every alert in the report"


def test_publish_then_tail_slice_gives_the_file_back(namespace, tmp_path):
    topic = namespace.topic["predictions"]
    path = tmp_path / "events.jsonl"
    events = [
        {"event_id": f"e{i}", "request_id": f"r{i}", "ts": 1_700_000_000_000 + 3 * i, "x": i / 7}
        for i in range(5000)
    ]
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    env = {**os.environ, "COALMINE_BROKER": namespace.broker.url}
    publish_lines(namespace.broker.bootstrap, topic, [outside("p", i) for i in range(20)])
    time.sleep(0.05)
    since = now_ms()
    sent = subprocess.run(
        [COALMINE, "publish", "--topic", topic, str(path)],
        capture_output=True,
        check=True,
        timeout=60,
        env=env,
    )
    assert b"published 5000 events" in sent.stdout
    time.sleep(0.05)
    until = now_ms()
    time.sleep(0.05)
    publish_lines(namespace.broker.bootstrap, topic, [outside("p", i) for i in range(20, 40)])

    out = subprocess.run(
        [COALMINE, "tail", topic, "--since", str(since), "--until", str(until)],
        capture_output=True,
        check=True,
        timeout=60,
        env=env,
    )
    assert out.stdout == path.read_bytes()  # every partition, merged back into event-time order
    everything = subprocess.run(
        [COALMINE, "tail", topic, "--until", str(now_ms())],
        capture_output=True,
        check=True,
        timeout=60,
        env=env,
    )
    assert len(everything.stdout.splitlines()) == 5040


@pytest.fixture(params=[True, False], ids=["in-a-process", "in-this-process"])
def reading_process(request, monkeypatch):
    """Replay from topics reading in a process of its own (a core free for it), or not."""
    from coalmine import slices

    monkeypatch.setattr(slices, "_a_core_is_free", lambda: request.param)
    return request.param


def test_both_ways_of_reading_topics_replay_the_bytes_of_file_replay(
    namespace, shuttle_config, tmp_path, reading_process
):
    from coalmine.config import load_config
    from coalmine.replay import replay_files, replay_topics, write_jsonl

    scenario = simulator.Scenario(
        n_events=8_000, drift_at=3_000, drift_until=6_000, drift_size=1.0, bad_event_every=97
    )
    preds, labels = tmp_path / "preds.jsonl", tmp_path / "labels.jsonl"
    simulator.write_streams(scenario, preds, labels)
    publish_lines(namespace.broker.bootstrap, namespace.topic["predictions"], lines_of(preds))
    publish_lines(namespace.broker.bootstrap, namespace.topic["labels"], lines_of(labels))
    config = load_config(shuttle_config)

    def said(replay, *args, **kwargs) -> bytes:
        out = io.BytesIO()
        evaluations: list = []
        run = replay(config, *args, progress=False, on_evaluations=evaluations.extend, **kwargs)
        write_jsonl([*evaluations, *run.alerts, *run.commands], out)
        return out.getvalue() + repr(sorted(run.counts.items())).encode()

    from_topics = said(
        replay_topics,
        namespace.broker.bootstrap,
        predictions=namespace.topic["predictions"],
        labels=namespace.topic["labels"],
    )
    assert from_topics == said(replay_files, preds, labels)
    assert b"drift" in from_topics


def test_replay_from_a_missing_topic_says_so_and_leaves_no_reading_process(
    namespace, shuttle_config, reading_process
):
    from coalmine.config import load_config
    from coalmine.replay import replay_topics

    def children() -> set[int]:
        mine = f"PPid:\t{os.getpid()}\n"
        return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _has(p, mine)}

    before = children()
    missing = namespace.prefix + "nowhere"
    with pytest.raises(LookupError, match=f"topic {missing} does not exist"):
        replay_topics(
            load_config(shuttle_config),
            namespace.broker.bootstrap,
            predictions=namespace.topic["predictions"],
            labels=missing,
            progress=False,
        )
    assert children() == before  # the reading process (predictions read, labels failed) is gone


def _has(proc: Path, line: str) -> bool:
    try:
        return line in (proc / "status").read_text()
    except OSError:  # gone meanwhile
        return False
