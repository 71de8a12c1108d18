"""Live worker throughput on a backlog, beside its ceiling: a plain aiokafka consumer reading the
same topic on the same broker, in the same run.

A backlog of prediction events of a 10-numeric-feature model (default checks) is published,
to fresh topics for every run; then the raw consumer and 1 (or 2) workers read it from the
start, in turn. Both are timed in steady state: from the moment 10% of the backlog has been
consumed to 90%, so neither the consumer-group join nor start-up counts. Runs are repeated;
each prints both rates and their ratio, the CPU time an event of each (the raw consumer's
process, the workers' processes: on a shared machine the rates swing with the load from run
to run, the CPU time less) and the windows stage 2 evaluated meanwhile. Then the best of each,
with the workers' peak memory. ``--profile DIR`` samples each worker with py-spy in steady
state (collapsed stacks, DIR/<app>-<i>.txt).

usage: python benchmarks/throughput.py [--events N] [--workers 1 2] [--repeat K] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from coalmine.broker import EmbeddedBroker
from coalmine.launch import Namespace, metric_total, wait_until

try:  # run as a script from the repository root, or as benchmarks.throughput
    from replay_speed import BENCH_MODEL, bench_work
except ImportError:
    from benchmarks.replay_speed import BENCH_MODEL, bench_work

STEADY = (0.1, 0.9)  # the share of the backlog between which rates are timed
#: how often the workers' /metrics are read: each read costs a busy worker 3-20 ms of its
#: event loop (read every 20 ms, a sixth of its time went there; every 250 ms, 6-9%); the
#: moment a share was crossed is interpolated between reads
POLL_S = 1.0
#: read at each poll: events folded (stage 1), windows evaluated (stage 2, which evaluates
#: none while a source says it is behind: whether it does within the timed span varies)
METRICS = ("coalmine_events_total", "coalmine_evaluations_total")


async def raw_rate(bootstrap: str, topic: str, n: int) -> dict:
    """Steady-state messages/s of a plain aiokafka consumer reading ``n`` messages, and its CPU
    time a message (this process's)."""
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
                    marks[share] = time.perf_counter(), time.process_time()
    finally:
        await consumer.stop()
    (t0, cpu0), (t1, cpu1) = marks[STEADY[0]], marks[STEADY[1]]
    steady = (STEADY[1] - STEADY[0]) * n
    return {"rate": steady / (t1 - t0), "cpu_us": (cpu1 - cpu0) / steady * 1e6}


def worker_rate(
    ns: Namespace, config: Path, n: int, k: int, log_dir: Path, profile: Path | None = None
) -> dict:
    """Steady-state events/s of ``k`` workers (one app id) folding the ``n``-event backlog,
    their CPU time an event and peak memory; with ``profile``, py-spy samples each worker in
    steady state into a file there."""
    app_id = f"{ns.prefix}bench{time.time_ns()}"
    workers = [
        ns.worker(config, app_id=app_id, log=log_dir / f"{app_id}-{i}.log") for i in range(k)
    ]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()

        last: list[tuple[float, ...]] = [(0.0, 0.0)] * k  # per worker: folded, evaluated
        seen: list[tuple[float, float, float, float]] = []  # (time, folded, CPU s, evaluated)

        def folded() -> float:
            for i, w in enumerate(workers):
                try:  # a busy worker may not answer within the timeout: ask again later
                    text = w.get("/metrics")
                    last[i] = tuple(metric_total(text, m) for m in METRICS)
                except OSError:
                    pass
            events, evaluated = (sum(c) for c in zip(*last))
            seen.append((time.perf_counter(), events, sum(map(cpu_seconds, workers)), evaluated))
            return events

        spies = []
        for share in STEADY:
            wait_until(
                lambda s=share: folded() >= s * n, 900, f"{share:.0%} folded", interval=POLL_S
            )
            if profile is not None and share == STEADY[0]:
                spies = [_spy(w.pid, profile / f"{app_id}-{i}") for i, w in enumerate(workers)]
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled
            spy.wait()
        wait_until(lambda: folded() >= n, 900, "everything folded", interval=POLL_S)
        (t0, cpu0, ev0), (t1, cpu1, ev1) = (_crossed(seen, share * n) for share in STEADY)
        steady = (STEADY[1] - STEADY[0]) * n
        return {
            "rate": steady / (t1 - t0),
            "cpu_us": (cpu1 - cpu0) / steady * 1e6,
            "evaluated": ev1 - ev0,
            "rss": [w.peak_rss_mb() for w in workers],
        }
    finally:
        for w in workers:
            w.stop()


def cpu_seconds(worker) -> float:
    """CPU seconds the worker's process has used (user and system, every thread)."""
    fields = Path(f"/proc/{worker.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _crossed(seen: list[tuple[float, ...]], count: float) -> tuple[float, ...]:
    """When the events folded polled in ``seen`` reached ``count``, with the CPU time and the
    windows evaluated then, interpolated between polls."""
    i = next(i for i, (_, c, *_) in enumerate(seen) if c >= count)
    if i == 0:
        return seen[0][0], seen[0][2], seen[0][3]
    before, after = seen[i - 1], seen[i]
    share = (count - before[1]) / (after[1] - before[1])
    return tuple(b + (a - b) * share for j, (b, a) in enumerate(zip(before, after)) if j != 1)


def _spy(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling ``pid`` until interrupted, into ``out``.txt (collapsed stacks: one line
    a stack, then its samples)."""
    spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "100"]
        + ["--output", f"{out}.txt"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=300_000, help="backlog size (default 300,000)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    ap.add_argument("--profile", type=Path, help="py-spy each worker in steady state, to here")
    args = ap.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    n = args.events
    work = bench_work("coalmine-throughput-", n, BENCH_MODEL)  # the default checks
    events = [("prediction", line) for line in (work / "stream.jsonl").read_bytes().splitlines()]
    with EmbeddedBroker() as broker:
        raw: dict = {"rate": 0.0}
        best: dict[int, dict] = {k: {"rate": 0.0} for k in args.workers}
        for i in range(args.repeat):
            for k in args.workers:
                # topics of its own for every run: a run in the topics of another would find
                # its state (stage 2's evaluators, stage 1's label join) and partials there
                ns = Namespace(broker)
                t0 = time.perf_counter()
                ns.publish(events)
                print(f"backlog of {n:,} events published in {time.perf_counter() - t0:.1f} s")
                this = asyncio.run(raw_rate(broker.bootstrap, ns.topic["predictions"], n))
                raw = max(raw, this, key=lambda r: r["rate"])
                run = worker_rate(ns, work / "monitor.toml", n, k, work, args.profile)
                print(
                    f"run {i + 1}: raw {this['rate']:,.0f}/s ({this['cpu_us']:.1f} us CPU an "
                    f"event), {k} worker(s) {run['rate']:,.0f}/s ({run['cpu_us']:.1f} us): "
                    f"{run['rate'] / this['rate']:.0%} of raw's rate, "
                    f"{this['cpu_us'] / run['cpu_us']:.0%} of its CPU efficiency; stage 2 "
                    f"evaluated {run['evaluated']:.0f} windows meanwhile",
                    flush=True,
                )
                best[k] = max(best[k], run, key=lambda r: r["rate"])
    size = sum(len(e) for _, e in events) / n
    print(
        f"\n# steady state on a backlog of {n:,} events ({size:.0f} B, 10 numeric features, "
        f"default checks, 6 partitions), best of {args.repeat}"
    )
    print("| reader | events/s | share of raw | CPU an event | peak memory per process |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| raw aiokafka consumer (the ceiling) | {raw['rate']:,.0f} | 100% "
        f"| {raw['cpu_us']:.1f} us | |"
    )
    for k, run in best.items():
        rss = " / ".join(f"{r:.0f} MB" for r in run["rss"])
        print(
            f"| coalmine, {k} worker{'s' if k > 1 else ''} | {run['rate']:,.0f} "
            f"| {run['rate'] / raw['rate']:.0%} | {run['cpu_us']:.1f} us | {rss} |"
        )


if __name__ == "__main__":
    main()
