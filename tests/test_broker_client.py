"""The embedded broker, topic creation, the client (publish, tail, variant assignment) and the
`coalmine publish` / `coalmine tail` commands."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from coalmine.broker import EmbeddedBroker, ensure_topics, free_port
from coalmine.client import Publisher, assign_variant, tail
from coalmine.launch import wait_until

COALMINE = Path(sys.executable).with_name("coalmine")  # the console script, as users run it


def unique(name: str) -> str:
    """A topic name of the given kind (`predictions`, ...) that no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}.coalmine.{name}"


async def read_all(bootstrap: str, topic: str) -> list:
    """Every message of a topic as aiokafka records (keys and partitions included)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        records = []
        while batch := await consumer.getmany(timeout_ms=1000):
            records += [m for messages in batch.values() for m in messages]
        return records
    finally:
        await consumer.stop()


async def partition_counts(bootstrap: str) -> dict[str, int]:
    """Every topic on the broker with its partition count (an all-topics request creates none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {m["topic"]: len(m["partitions"]) for m in await admin.describe_topics()}
    finally:
        await admin.close()


def prediction(i: int) -> dict:
    return {
        "event_id": f"e{i}",
        "request_id": f"r{i}",
        "model": "m",
        "version": "v1",
        "variant": "champion",
        "ts": 1_700_000_000_000 + i,
        "features": {"f0": i / 7},
        "prediction": i % 2,
        "status": "ok",
    }


# ------------------------------------------------------------------ variant assignment (no broker)


def test_assign_variant_proportions_follow_the_weights():
    weights = {"champion": 90, "canary": 7, "shadow": 3}
    n = 100_000
    counts = Counter(assign_variant(f"user-{i}", weights) for i in range(n))
    for variant, w in weights.items():
        p = w / 100
        assert abs(counts[variant] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, counts


def test_assign_variant_is_stable_across_calls_and_processes():
    ids = [f"user-{i}" for i in range(8)]
    here = [assign_variant(u, {"a": 1, "b": 1}, salt="exp-1") for u in ids]
    assert here == [
        assign_variant(u, {"a": 0.5, "b": 0.5}, salt="exp-1") for u in ids
    ]  # normalised
    # pinned: producers in other processes (or languages, from the docstring) must agree
    assert here == ["b", "a", "b", "b", "b", "b", "b", "a"]
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "from coalmine.client import assign_variant as a; "
            f"print([a(u, {{'a': 1, 'b': 1}}, salt='exp-1') for u in {ids}])",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "7"},
    )
    assert eval(other.stdout) == here


def test_assign_variant_ramp_keeps_earlier_canary_units_and_salt_reshuffles():
    ids = [f"u{i}" for i in range(20_000)]
    at5 = {u for u in ids if assign_variant(u, {"champion": 95, "canary": 5}) == "canary"}
    at25 = {u for u in ids if assign_variant(u, {"champion": 75, "canary": 25}) == "canary"}
    assert at5 < at25
    salted = {
        u for u in ids if assign_variant(u, {"champion": 95, "canary": 5}, salt="exp-2") == "canary"
    }
    assert len(salted & at5) < 0.2 * len(at5)  # independent: about 5 % overlap expected


def test_assign_variant_rejects_unusable_weights():
    for weights in ({"a": 0, "b": 0}, {"a": 2, "b": -1}, {}):
        with pytest.raises(ValueError):
            assign_variant("u", weights)
    assert {assign_variant(f"u{i}", {"off": 0, "on": 1, "never": 0}) for i in range(1000)} == {"on"}


# ------------------------------------------------------------------ embedded broker


@pytest.mark.integration
def test_embedded_broker_serves_its_address_and_stops(tmp_path):
    port = free_port()
    with EmbeddedBroker(port=port, log=tmp_path / "broker.log") as b:
        assert (b.bootstrap, b.url) == (f"127.0.0.1:{port}", f"kafka://127.0.0.1:{port}")
        proc = b.process
        asyncio.run(ensure_topics(b.url, {"x": 1}))
        assert asyncio.run(partition_counts(b.bootstrap))["x"] == 1
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):  # port taken: a clear error
            EmbeddedBroker(port=port).start()
    assert proc.poll() is not None and b.process is None
    b.stop()  # twice is fine


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_embedded_broker_dies_with_its_owner_even_on_sigkill():
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from coalmine.broker import EmbeddedBroker; "
            "b = EmbeddedBroker().start(); print(b.process.pid, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        broker_pid = int(owner.stdout.readline())
        assert _alive(broker_pid)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    try:
        wait_until(
            lambda: not _alive(broker_pid), 10, "the broker to die with its owner", interval=0.1
        )
    except TimeoutError:
        os.kill(broker_pid, signal.SIGKILL)
        raise AssertionError("the broker outlived the process that started it") from None


# ------------------------------------------------------------------ topics


@pytest.mark.integration
def test_ensure_topics_is_idempotent_and_rejects_a_partition_mismatch(broker):
    a, b = unique("predictions"), unique("labels")
    asyncio.run(ensure_topics(broker.bootstrap, {a: 3}))
    asyncio.run(ensure_topics(broker.bootstrap, {a: 3, b: 2}))  # existing and new together
    asyncio.run(ensure_topics(broker.bootstrap, {a: 3, b: 2}))
    counts = asyncio.run(partition_counts(broker.bootstrap))
    assert (counts[a], counts[b]) == (3, 2)
    with pytest.raises(ValueError, match=f"{a} has 3 partitions, coalmine expects 6"):
        asyncio.run(ensure_topics(broker.bootstrap, {a: 6, b: 2}))


# ------------------------------------------------------------------ publish and tail


@pytest.mark.integration
def test_published_events_all_come_back_keyed_for_co_partitioning(broker):
    preds, labels = unique("predictions"), unique("labels")
    asyncio.run(ensure_topics(broker.bootstrap, {preds: 6, labels: 6}))
    n = 3000
    events = [prediction(i) for i in range(n)]

    async def publish():
        async with Publisher(broker.url) as pub:
            assert await pub.publish_many(preds, events[:-1]) == n - 1
            await pub.publish(preds, orjson.dumps(events[-1]))  # bytes are keyed too
            for e in events[:50]:
                await pub.publish(
                    labels,
                    {
                        "event_id": f"l{e['request_id']}",
                        "request_id": e["request_id"],
                        "model": "m",
                        "ts": e["ts"],
                        "label": 1,
                    },
                )
            await pub.publish(labels, {"request_id": "r0"}, key="explicit")

    asyncio.run(publish())

    async def tail_all():
        return [r async for r in tail(broker.bootstrap, preds, until_idle=1.0)]

    got = asyncio.run(tail_all())
    assert sorted(r["event_id"] for r in got) == sorted(e["event_id"] for e in events)
    records = asyncio.run(read_all(broker.bootstrap, preds))
    assert all(m.key == orjson.loads(m.value)["request_id"].encode() for m in records)
    assert len({m.partition for m in records}) == 6
    partition_of = {m.key: m.partition for m in records}
    label_records = asyncio.run(read_all(broker.bootstrap, labels))
    assert sorted(m.key for m in label_records) == sorted(
        [b"explicit"] + [e["request_id"].encode() for e in events[:50]]
    )
    # a label lands where its prediction is: the join stays local to a partition
    assert all(m.partition == partition_of[m.key] for m in label_records if m.key != b"explicit")


@pytest.mark.integration
def test_tail_from_end_skips_what_was_there(broker):
    topic = unique("alerts")
    asyncio.run(ensure_topics(broker.bootstrap, {topic: 6}))

    async def run():
        async with Publisher(broker.bootstrap) as pub:
            for i in range(5):
                await pub.publish(topic, {"model": "old", "i": i})
            stream = tail(broker.bootstrap, topic, from_end=True, until_idle=1.0)
            first = asyncio.ensure_future(stream.__anext__())
            probes = 0
            while (
                not first.done()
            ):  # probes until one comes back: the tail has taken its end offsets
                await pub.publish(topic, {"model": "probe", "i": probes})
                probes += 1
                await asyncio.wait([first], timeout=0.1)
                assert probes < 300, "the tail read nothing for 30 s"
            for i in range(3):
                await pub.publish(topic, {"model": "new", "i": i})
            return [await first] + [r async for r in stream]

    got = asyncio.run(run())
    assert got[0]["model"] == "probe"
    assert sorted((r["model"], r["i"]) for r in got if r["model"] != "probe") == [
        ("new", 0),
        ("new", 1),
        ("new", 2),
    ]


@pytest.mark.integration
def test_tail_of_a_missing_topic_is_an_error_and_does_not_create_it(broker):
    topic = unique("alerts")

    async def run():
        return [r async for r in tail(broker.bootstrap, topic, until_idle=0.5)]

    with pytest.raises(LookupError, match=topic):
        asyncio.run(run())
    assert topic not in asyncio.run(partition_counts(broker.bootstrap))


@pytest.mark.integration
def test_cli_publish_then_tail_counts_every_line_including_non_json(broker, tmp_path):
    topic = unique("predictions")
    asyncio.run(ensure_topics(broker.bootstrap, {topic: 6}))
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b"\n".join(orjson.dumps(prediction(i)) for i in range(40)) + b"\nnot json {\n\n"
    )
    stdin_events = b"\n".join(orjson.dumps(prediction(i)) for i in range(40, 50)) + b"\n"

    sent = subprocess.run(
        [COALMINE, "publish", "--broker", broker.url, "--topic", topic, str(path), "-"],
        input=stdin_events,
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert b"published 51 events" in sent.stdout

    out = subprocess.run(
        [COALMINE, "tail", topic, "--until-idle", "1"],
        capture_output=True,
        check=True,
        timeout=60,
        env={**os.environ, "COALMINE_BROKER": broker.url},
    )
    lines = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 51
    assert [r for r in lines if "_raw" in r] == [{"_raw": "not json {"}]
    assert {r["event_id"] for r in lines if "_raw" not in r} == {f"e{i}" for i in range(50)}


def test_cli_reports_bad_input_without_a_traceback():
    missing = subprocess.run(
        [COALMINE, "tail", "alerts", "--broker", "localhost"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0
    assert "expected kafka://HOST:PORT" in missing.stderr and "Traceback" not in missing.stderr
