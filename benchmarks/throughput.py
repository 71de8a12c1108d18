"""Live worker throughput on a backlog, beside its ceiling: a plain aiokafka consumer reading the
same topic on the same broker, in the same run.

A backlog of prediction events of a 10-numeric-feature model (default checks) is published
first; then, in turn, the raw consumer and 1 (and 2) workers read it from the start. Both are
timed in steady state: from the moment 10% of the backlog has been consumed to 90%, so neither
the consumer-group join nor start-up counts. Runs are interleaved and repeated; the best of
each counts (the machine is shared). Prints events/s, the ratio, batch latency and the
workers' peak memory.

usage: python benchmarks/throughput.py [--events N] [--workers 1 2] [--repeat K]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from coalmine.broker import EmbeddedBroker
from coalmine.launch import Namespace, wait_until

try:  # run as a script from the repository root, or as benchmarks.throughput
    from replay_speed import write_stream
except ImportError:
    from benchmarks.replay_speed import write_stream

STEADY = (0.1, 0.9)  # the share of the backlog between which rates are timed


async def raw_rate(bootstrap: str, topic: str, n: int) -> float:
    """Steady-state messages/s of a plain aiokafka consumer reading ``n`` messages."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"raw-{time.time()}",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    got, marks = 0, {}
    try:
        while got < n:
            batch = await consumer.getmany(timeout_ms=5000, max_records=10_000)
            if not batch:
                break
            got += sum(len(v) for v in batch.values())
            for share in STEADY:
                if got >= share * n and share not in marks:
                    marks[share] = time.perf_counter()
    finally:
        await consumer.stop()
    return (STEADY[1] - STEADY[0]) * n / (marks[STEADY[1]] - marks[STEADY[0]])


def worker_rate(ns: Namespace, config: Path, n: int, k: int, log_dir: Path) -> dict:
    """Steady-state events/s of ``k`` workers (one app id) folding the ``n``-event backlog."""
    app_id = f"{ns.prefix}bench{time.time_ns()}"
    workers = [
        ns.worker(config, app_id=app_id, log=log_dir / f"{app_id}-{i}.log") for i in range(k)
    ]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()

        last = [0.0] * k

        def folded() -> float:
            for i, w in enumerate(workers):
                try:  # a busy worker may not answer within the timeout: ask again later
                    last[i] = w.metric("coalmine_events_total")
                except OSError:
                    pass
            return sum(last)

        marks = {}
        for share in STEADY:
            wait_until(lambda s=share: folded() >= s * n, 900, f"{share:.0%} folded", interval=0.02)
            marks[share] = time.perf_counter()
        wait_until(lambda: folded() >= n, 900, "everything folded", interval=0.1)
        rate = (STEADY[1] - STEADY[0]) * n / (marks[STEADY[1]] - marks[STEADY[0]])
        return {"rate": rate, "rss": [w.peak_rss_mb() for w in workers]}
    finally:
        for w in workers:
            w.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=300_000, help="backlog size (default 300,000)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    args = ap.parse_args()
    n = args.events
    work = Path(tempfile.mkdtemp(prefix="coalmine-throughput-"))
    write_stream(work / "reference.jsonl", 5000, seed=1)
    write_stream(work / "stream.jsonl", n, seed=2)
    (work / "monitor.toml").write_text(
        '[[models]]\nname = "bench"\nreference = "reference.jsonl"\n'  # the default checks
    )
    events = [("prediction", line) for line in (work / "stream.jsonl").read_bytes().splitlines()]
    with EmbeddedBroker() as broker:
        ns = Namespace(broker)
        t0 = time.perf_counter()
        ns.publish(events)
        print(f"backlog of {n:,} events published in {time.perf_counter() - t0:.1f} s")
        raw, best = 0.0, {k: {"rate": 0.0, "rss": []} for k in args.workers}
        for _ in range(args.repeat):
            raw = max(raw, asyncio.run(raw_rate(broker.bootstrap, ns.topic["predictions"], n)))
            for k in args.workers:
                run = worker_rate(ns, work / "monitor.toml", n, k, work)
                if run["rate"] > best[k]["rate"]:
                    best[k] = run
    size = sum(len(e) for _, e in events) / n
    print(
        f"\n# steady state on a backlog of {n:,} events ({size:.0f} B, 10 numeric features, "
        f"default checks, 6 partitions), best of {args.repeat}"
    )
    print("| reader | events/s | share of raw | peak memory per process |")
    print("|---|---:|---:|---:|")
    print(f"| raw aiokafka consumer (the ceiling) | {raw:,.0f} | 100% | |")
    for k, run in best.items():
        rss = " / ".join(f"{r:.0f} MB" for r in run["rss"])
        print(
            f"| coalmine, {k} worker{'s' if k > 1 else ''} | {run['rate']:,.0f} "
            f"| {run['rate'] / raw:.0%} | {rss} |"
        )


if __name__ == "__main__":
    main()
