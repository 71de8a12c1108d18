"""Issue 12 on the embedded broker: an oversized message and retried events cost nothing."""

from __future__ import annotations

import pytest

from coalmine import simulator
from coalmine.launch import wait_until

pytestmark = pytest.mark.integration
RATE = 300


def test_a_600_kb_message_is_dead_lettered_and_duplicates_count_once(
    namespace, start_worker, shuttle_config
):
    worker = start_worker(shuttle_config)
    scenario = simulator.Scenario(n_events=6_000, rate_per_s=RATE, label_fraction=0, seed=12)
    events = [e for e in simulator.generate(scenario) if e[0] == "prediction"]
    retried = events[1000:1499]  # 499 events sent twice, as a producer's retries
    stream = events[:3000] + [("prediction", b"\x00not json" + b"x" * 600_000)] + events[3000:]
    namespace.publish(stream[:4000] + retried + stream[4000:])
    valid = len(events)
    wait_until(
        lambda: worker.metric("coalmine_events_total") >= valid,
        90,
        f"{valid} events counted",
        interval=0.5,
    )
    wait_until(lambda: worker.metric("coalmine_duplicates_total") >= 499, 30, "499 duplicates", 0.5)
    dead = namespace.read("deadletter")
    assert [d["reason"][:8] for d in dead] == ["not JSON"]
    assert dead[0]["original_size"] == 600_009 and len(dead[0]["original_b64"]) < 100_000
    assert worker.metric("coalmine_events_total") == valid
    assert worker.metric("coalmine_duplicates_total") == 499
    assert worker.proc.poll() is None and worker.get("/health")


def test_damaged_partials_are_dead_lettered_and_stage_2_goes_on(
    namespace, start_worker, shuttle_config
):
    """The internal partials topic gets bytes that are not a partial, a forged sparse array that
    does not fit, a well-formed summary of 3 bins (not the model's layout), and a message whose
    second partial is of a model no one monitors: each goes to the dead letters, naming why
    (and whose), and stage 2 evaluates the real traffic after them."""
    import asyncio

    import msgspec

    from coalmine.client import Publisher

    worker = start_worker(shuttle_config)
    forged = {"n": 1, "counts": [3, b"\x07\x00\x00\x00", bytes(8)], "sums": bytes(24)}
    heard = {"model": "shuttle", "source": 0, "behind": False}  # a heartbeat: nothing to merge
    ghost = {"model": "ghost", "source": 0, "closed_through": 0, "buckets": {"0": {}}}
    small = {"n": 1, "counts": (1).to_bytes(8, "little") + bytes(16), "sums": bytes(24)}
    bad = [
        b"\xc1 not MessagePack",
        msgspec.msgpack.encode({**ghost, "model": "shuttle", "buckets": {"0": {"a": forged}}}),
        msgspec.msgpack.encode([heard, ghost]),
        msgspec.msgpack.encode(
            {**ghost, "model": "shuttle", "buckets": {"0": {"champion": {**small, "missing": b""}}}}
        ),
    ]

    async def send() -> None:
        async with Publisher(namespace.broker.bootstrap) as pub:
            for value in bad:
                await pub.publish(namespace.topic["partials"], value, key="shuttle")

    asyncio.run(send())
    scenario = simulator.Scenario(n_events=3_000, rate_per_s=RATE, label_fraction=0, seed=13)
    namespace.publish(e for e in simulator.generate(scenario) if e[0] == "prediction")
    wait_until(
        lambda: worker.metric("coalmine_evaluations_total") > 0, 90, "an evaluation", interval=0.5
    )
    reasons = sorted(d["reason"] for d in namespace.read("deadletter"))
    assert len(reasons) == 4, reasons
    assert reasons[0].startswith("a partial of 'shuttle' that does not fit: a summary of 3 bins")
    assert reasons[1].startswith("internal error on the partial of 'ghost'")
    assert reasons[2].startswith("not a partial: DecodeError")
    assert reasons[3].startswith("not a partial: ValueError") and "does not fit" in reasons[3]
    assert worker.proc.poll() is None and worker.get("/health")


def test_a_damaged_state_record_is_dead_lettered_and_the_model_starts_afresh(
    namespace, start_worker, shuttle_config
):
    """A state head that does not read (damaged, or forged by whoever may write the internal
    topic) goes to the dead letters with the reason, and its model starts afresh: the worker,
    and every next owner of the partition, would otherwise die on it at each start."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    from coalmine import topics
    from coalmine.agents.state import key, partition_of

    async def write_damaged_head() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=namespace.broker.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(
                namespace.topic["state"],
                b"\x80\x04damaged",
                key=key("shuttle", b"head"),
                partition=partition_of("shuttle", topics.DEFAULT_PARTITIONS),
            )
        finally:
            await producer.stop()

    asyncio.run(write_damaged_head())
    worker = start_worker(shuttle_config)
    scenario = simulator.Scenario(n_events=3_000, rate_per_s=RATE, label_fraction=0, seed=14)
    namespace.publish(e for e in simulator.generate(scenario) if e[0] == "prediction")
    wait_until(
        lambda: worker.metric("coalmine_evaluations_total") > 0, 90, "an evaluation", interval=0.5
    )
    [letter] = namespace.read("deadletter")
    assert letter["source_topic"] == namespace.topic["state"]
    assert letter["reason"].startswith("state of 'shuttle' unreadable, started afresh")
    assert worker.proc.poll() is None and worker.get("/health")
