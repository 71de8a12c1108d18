"""Worker throughput on the embedded broker, beside its ceiling: raw aiokafka consumption of the
same messages on the same broker. Also batch latency and the worker's peak memory.

usage: python benchmarks/throughput.py [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import orjson

from coalmine import simulator
from coalmine.broker import EmbeddedBroker
from coalmine.launch import Namespace, WorkerProcess, group_members, wait_until


async def raw_consume(bootstrap: str, topic: str, n: int) -> float:
    """Messages per second for a plain aiokafka consumer reading ``n`` messages."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"raw-{time.time()}",
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    got, t0 = 0, time.perf_counter()
    while got < n:
        batch = await consumer.getmany(timeout_ms=2000, max_records=10_000)
        if not batch:
            break
        got += sum(len(v) for v in batch.values())
    rate = got / (time.perf_counter() - t0)
    await consumer.stop()
    return rate


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def histogram_quantile(worker: WorkerProcess, name: str, stage: str, q: float) -> float:
    """Upper bucket bound holding the q-quantile of a Prometheus histogram."""
    rows = [
        line
        for line in worker.get("/metrics").splitlines()
        if line.startswith(f"{name}_bucket") and f'stage="{stage}"' in line
    ]
    buckets = [(float(r.split('le="')[1].split('"')[0]), float(r.rsplit(" ", 1)[1])) for r in rows]
    total = buckets[-1][1] if buckets else 0
    return next((le for le, c in buckets if c >= q * total), float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=200_000)
    args = ap.parse_args()
    n = args.events
    work = Path(tempfile.mkdtemp(prefix="coalmine-bench-"))
    simulator.write_reference(work / "reference.jsonl", n=5000)
    simulator.write_demo_config(work / "monitor.toml", work / "reference.jsonl", window="60s")
    events = [
        ("prediction", orjson.dumps(e))
        for e in simulator.predictions(simulator.Scenario(n_events=n, rate_per_s=1000, seed=1))[0]
    ]
    with EmbeddedBroker() as broker:
        ns = Namespace(broker)
        with ns.worker(work / "monitor.toml", log=work / "worker.log") as worker:
            worker.wait_ready()
            # the worker has joined its group and holds the partitions: the clock starts with the work
            wait_until(
                lambda: group_members(broker.bootstrap, worker.app_id) == 1,
                60,
                "the worker's consumer group to settle",
                interval=0.2,
            )
            t0 = time.perf_counter()
            ns.publish(events)
            published = time.perf_counter() - t0
            wait_until(
                lambda: worker.metric("coalmine_events_total") >= n,
                600,
                f"the worker to fold {n:,} events",
                interval=0.05,
            )
            elapsed = time.perf_counter() - t0
            p50 = histogram_quantile(worker, "coalmine_batch_processing_seconds", "sketch", 0.5)
            p99 = histogram_quantile(worker, "coalmine_batch_processing_seconds", "sketch", 0.99)
            rss = peak_rss_mb(worker.pid)
        ceiling = asyncio.run(raw_consume(broker.bootstrap, ns.topic["predictions"], n))
    size = sum(len(e) for _, e in events) / n
    print(f"# worker throughput, {n:,} prediction events of {size:.0f} B, 9 features, 6 partitions")
    print("| measure | coalmine worker | ceiling: raw aiokafka consumer |")
    print("|---|---|---|")
    print(f"| events/s (publish start to all folded) | {n / elapsed:,.0f} | {ceiling:,.0f} |")
    print(f"| share of ceiling | {n / elapsed / ceiling:.0%} | 100% |")
    print(f"| publishing alone took | {published:.1f} s | |")
    print(
        f"| batch processing time, stage 1, p50 / p99 (histogram bucket) "
        f"| <= {p50 * 1000:.0f} ms / <= {p99 * 1000:.0f} ms | |"
    )
    print(f"| worker peak memory (VmHWM) | {rss:.0f} MB | |")


if __name__ == "__main__":
    main()
