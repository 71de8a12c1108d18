"""Many models, little traffic each, published in real time to live workers (one, or
``--workers K`` sharing the partitions): do they keep up? M models at R events/s each (of
event time) are published at that pace (event time runs as fast as the wall clock) while the
workers fold and evaluate them; then they are left to catch up. ``many_models_live.py`` times
a backlog instead: there a worker takes the biggest batches it can, here those that the pace
gives it.

They keep up when the events not yet folded do not grow: when publishing ends, they are at most
one second of traffic more than half-way through (or at most two of their batches: a worker
folds a poll's fetches whole, so it is always up to a batch behind). The sustained rate
divides the events by the time until all were folded. Workers, broker and publisher share
this machine's cores: a worker with a core of its own does better.

usage: python benchmarks/many_models_paced.py [--models M] [--rate R] [--seconds S] [--bucket D]
                                             [--workers K]
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from bisect import bisect_right

import orjson

from coalmine.baselines import build_baselines
from coalmine.broker import EmbeddedBroker
from coalmine.client import Publisher
from coalmine.config import load_config
from coalmine.launch import Namespace, group_members, wait_until

try:  # run as a script from the repository root, or as benchmarks.many_models_paced
    from many_models import models_arguments, models_work
    from many_models_live import stage1_batches, wait_for_count
    from throughput import cpu_seconds
except ImportError:
    from benchmarks.many_models import models_arguments, models_work
    from benchmarks.many_models_live import stage1_batches, wait_for_count
    from benchmarks.throughput import cpu_seconds

#: the publisher sends what is due this often, and waits for the broker every this many events
TICK_S, ACK_EVERY = 0.05, 5000


async def publish_paced(bootstrap: str, topic: str, lines: list[bytes], ts: list[int]) -> None:
    """Send each event once the wall clock, run from the first event's time, reaches its
    ``ts``."""
    async with Publisher(bootstrap) as pub:
        start, first = time.perf_counter(), ts[0]
        i, unacked = 0, []
        while i < len(lines):
            due = first + (time.perf_counter() - start) * 1000
            while i < len(lines) and ts[i] <= due:
                unacked.append(await pub.send(topic, lines[i]))
                i += 1
            if len(unacked) >= ACK_EVERY:
                await asyncio.gather(*unacked)
                unacked = []
            await asyncio.sleep(TICK_S)
        await asyncio.gather(*unacked)


def folded_now(workers: list) -> float:
    """The events the workers have folded, each asked until it answers."""
    total = 0.0
    for w in workers:
        while (folded := w.metric("coalmine_events_total", busy=-1)) < 0:
            time.sleep(0.1)
        total += folded
    return total


def lag_at(workers: list, ts: list[int], delay_s: float, out: list[float]) -> threading.Thread:
    """A thread that, ``delay_s`` after it starts (with publishing), appends to ``out`` the
    events published by then that the workers have not folded."""

    def measure() -> None:
        start = time.perf_counter()
        time.sleep(delay_s)
        due = ts[0] + (time.perf_counter() - start) * 1000
        out.append(bisect_right(ts, due) - folded_now(workers))

    thread = threading.Thread(target=measure, daemon=True)
    thread.start()
    return thread


def main() -> None:
    args = models_arguments(
        __doc__, more=lambda ap: ap.add_argument("--workers", type=int, default=1)
    )
    work, n = models_work(args, "coalmine-many-models-paced-")
    build_baselines(load_config(work / "monitor.toml"))  # one calibration, cached
    lines = (work / "stream.jsonl").read_bytes().splitlines()
    ts = [orjson.loads(line)["ts"] for line in lines]
    per_second = args.models * args.rate
    with EmbeddedBroker() as broker, contextlib.ExitStack() as running:
        ns = Namespace(broker)
        workers = [
            running.enter_context(ns.worker(work / "monitor.toml", log=work / f"worker-{i}.log"))
            for i in range(args.workers)
        ]
        for worker in workers:
            worker.wait_ready(timeout=600)
        for group in (workers[0].app_id, f"{workers[0].app_id}-stage1"):  # every partition owned
            wait_until(
                lambda g=group: group_members(broker.bootstrap, g) == len(workers),
                300,
                f"a stable group {group} of {len(workers)}",
                interval=0.5,
            )
        cpu0, t0 = sum(map(cpu_seconds, workers)), time.perf_counter()
        halfway: list[float] = []
        measuring = lag_at(workers, ts, args.seconds / 2, halfway)
        asyncio.run(publish_paced(broker.bootstrap, ns.topic["predictions"], lines, ts))
        measuring.join()
        publishing = time.perf_counter() - t0
        cpu = sum(map(cpu_seconds, workers)) - cpu0
        folded = folded_now(workers)
        t1 = time.perf_counter()
        wait_for_count(workers, "coalmine_events_total", n, f"{n:,} events folded")
        behind = time.perf_counter() - t1
        total_cpu = sum(map(cpu_seconds, workers)) - cpu0
        batches, per_batch = stage1_batches(workers)
        rss = max(w.peak_rss_mb() for w in workers)
    lag = n - folded
    # not growing; a poll's fetches are folded whole: a batch or two behind whatever the pace
    keeps_up = lag <= max(halfway[0] + per_second, 2 * per_batch)
    print(
        f"\n# {args.models:,} models at {args.rate:g} events/s each ({per_second:,.0f} events/s),"
        f" {args.seconds:g} s published in real time to {args.workers} live worker(s),"
        f" {args.bucket} buckets"
    )
    print("| measure | value |")
    print("|---|---:|")
    print(f"| events published, in | {n:,}, {publishing:.1f} s |")
    print(f"| the workers' CPU while publishing | {cpu:.1f} s ({cpu / publishing:.2f} cores) |")
    print(
        f"| events not yet folded half-way | {halfway[0]:,.0f} ({halfway[0] / per_second:.1f} s) |"
    )
    print(
        f"| events not yet folded when publishing ended | {lag:,.0f} ({lag / per_second:.1f} s) |"
    )
    print(f"| caught up after publishing ended | {behind:.1f} s |")
    sustained = n / (publishing + behind)
    print(f"| sustained, events/s (published / until all were folded) | {sustained:,.0f} |")
    print(f"| stage-1 batches (polls), mean events each | {batches:,.0f}, {per_batch:,.0f} |")
    print(f"| the workers' CPU an event (all of it) | {total_cpu / n * 1e6:,.0f} us |")
    verdict = "yes" if keeps_up else "no"
    print(f"| keeps up (no more behind at the end than half-way, give or take 1 s) | {verdict} |")
    print(f"| peak memory of a worker | {rss:.0f} MB |")


if __name__ == "__main__":
    main()
