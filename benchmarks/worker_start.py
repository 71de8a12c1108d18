"""How soon a fresh worker folds and evaluates: M models with a backlog of a few seconds of
events, one worker started, ``/metrics`` polled every 0.1 s for its first folded event
(``coalmine_events_total``) and its first evaluated step (``coalmine_evaluations_total``);
beside the floor, one consumer-group join of a bare aiokafka consumer with the worker's
session timeout on the same broker (the embedded broker holds a join for half of it).

A worker joins two groups, stage 1's consumer's and Faust's, and stage 2 then reads its
partitions' state: the calibration cache is warmed first, as a restarted worker finds it. Then
the same for a restart: once the worker has folded the backlog it is stopped (SIGTERM: it
writes stage 2's state), the next 5 s of events are published, and a new worker, which reads
every model's state back, is timed alike.

usage: python benchmarks/worker_start.py [--models M [M ...]] [--repeat K]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from types import SimpleNamespace

import orjson
from aiokafka import AIOKafkaConsumer

from coalmine.baselines import build_baselines
from coalmine.broker import EmbeddedBroker
from coalmine.config import load_config
from coalmine.launch import Namespace, wait_until

try:  # run as a script from the repository root, or as benchmarks.worker_start
    from many_models import models_work
except ImportError:
    from benchmarks.many_models import models_work

#: seconds of event time published before the worker starts, 10,000 events/s in all (at
#: least 10 a model): enough to close buckets on every partition
BACKLOG_S, EVENTS_PER_S = 5, 10_000


async def one_join(bootstrap: str, topic: str) -> float:
    """Seconds from a bare consumer's start to its first assignment (a group of its own)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"join-{uuid.uuid4().hex[:8]}",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=2_000,
    )
    t0 = time.perf_counter()
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=50)
        return time.perf_counter() - t0
    finally:
        await consumer.stop()


def first_time(worker, t0: float, metric: str) -> float:
    """Seconds from ``t0`` until the worker's ``metric`` is above 0."""
    wait_until(lambda: worker.metric(metric, busy=0) > 0, 120, metric, interval=0.1)
    return time.perf_counter() - t0


def later(lines: list[bytes], ms: int) -> list[bytes]:
    """The events ``ms`` later, with ids of their own (not duplicates of the first ones)."""
    out = []
    for line in lines:
        event = orjson.loads(line)
        event["ts"] += ms
        event["event_id"] += "-later"
        event["request_id"] += "-later"
        out.append(orjson.dumps(event))
    return out


def timed_start(ns: Namespace, config, log) -> tuple[float, float, float]:
    """A worker started and stopped: seconds to /health, to its first event folded and to its
    first step evaluated, once it has folded everything on the topic."""
    with ns.worker(config, log=log) as worker:
        t0 = time.perf_counter()
        worker.wait_ready(timeout=600)
        health = time.perf_counter() - t0
        folded = first_time(worker, t0, "coalmine_events_total")
        evaluated = first_time(worker, t0, "coalmine_evaluations_total")
    return health, folded, evaluated


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", type=int, nargs="+", default=[1, 1000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(
        "| models | start | worker start to /health | first event folded | first step evaluated |"
    )
    print("|---:|---|---:|---:|---:|")
    for models in args.models:
        work, _ = models_work(
            SimpleNamespace(
                models=models,
                rate=max(10.0, EVENTS_PER_S / models),
                seconds=BACKLOG_S,
                bucket="250ms",
                references="shared",
                min_bucket_events=None,
            ),
            "coalmine-worker-start-",
        )
        config = work / "monitor.toml"
        build_baselines(load_config(config))  # the calibration cache, warm
        lines = (work / "stream.jsonl").read_bytes().splitlines()
        more = later(lines, BACKLOG_S * 1000)
        fresh, restarted, joins = [], [], []
        for _ in range(args.repeat):
            with EmbeddedBroker() as broker:  # a fresh one each: no state, no groups
                ns = Namespace(broker)
                ns.publish(("prediction", line) for line in lines)
                joins.append(asyncio.run(one_join(broker.bootstrap, ns.topic["predictions"])))
                fresh.append(timed_start(ns, config, work / "worker.log"))
                ns.publish(("prediction", line) for line in more)
                restarted.append(timed_start(ns, config, work / "restarted.log"))
        for start, runs in (("fresh", fresh), ("restarted", restarted)):
            health, folded, evaluated = (statistics.median(r) for r in zip(*runs))
            print(f"| {models:,} | {start} | {health:.1f} s | {folded:.1f} s | {evaluated:.1f} s |")
    print(f"\none group join (the floor for the first fold): {statistics.median(joins):.1f} s")
    print(f"(medians of {args.repeat} runs each, a fresh broker each)")


if __name__ == "__main__":
    main()
