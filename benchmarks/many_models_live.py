"""Many models, little traffic each, through one live worker: M models at R events/s each (of
event time) published as a backlog to the embedded broker, then one worker started; beside
orjson parsing the same events. The live counterpart of ``many_models.py`` (file replay).

Timed from the worker's start (start-up included: every model's baseline, the consumer-group
joins) until its ``coalmine_evaluations_total`` counts every (model, step) pair evaluated (a
bucket, or a few carried together) but for the stream's last 4 s, which wait for their sources
to go idle: wall-clock time, not work. The calibration cache is warmed first, as a restarted worker finds it.

usage: python benchmarks/many_models_live.py [--models M] [--rate R] [--seconds S] [--bucket D]
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from coalmine.baselines import build_baselines
from coalmine.broker import EmbeddedBroker
from coalmine.config import load_config
from coalmine.launch import Namespace, wait_until
from coalmine.replay import bulk_gc, replay_files

try:  # run as a script from the repository root, or as benchmarks.many_models_live
    from many_models import models_arguments, models_work
    from replay_speed import orjson_rate
    from throughput import cpu_seconds
except ImportError:
    from benchmarks.many_models import models_arguments, models_work
    from benchmarks.replay_speed import orjson_rate
    from benchmarks.throughput import cpu_seconds

TAIL_MS = 4000  # the stream's last buckets wait for their sources to go idle: not counted


def evaluated_pairs(config, stream: Path, end_ms: int) -> int:
    """The (model, step) pairs file replay evaluates on ``stream`` before ``end_ms``."""
    pairs: set[tuple[str, int]] = set()
    replay_files(
        config,
        stream,
        progress=False,
        on_evaluations=lambda evaluations: pairs.update(
            (e.model, e.ts) for e in evaluations if e.ts < end_ms
        ),
    )
    return len(pairs)


def wait_for_count(workers: list, metric: str, count: float, what: str) -> None:
    """Until the workers' ``metric``, summed, reaches ``count`` (a worker reads as 0 while a
    long batch or state write holds its loop)."""
    wait_until(
        lambda: sum(w.metric(metric, busy=0) for w in workers) >= count, 1800, what, interval=0.25
    )


def stage1_batches(workers: list) -> tuple[float, float]:
    """The workers' stage-1 batches (polls) so far, and their mean events."""
    batches = sum(w.metric("coalmine_batch_events_count") for w in workers)
    events = sum(w.metric("coalmine_batch_events_sum") for w in workers)
    return batches, events / max(batches, 1)


def main() -> None:
    args = models_arguments(__doc__)
    work, n = models_work(args, "coalmine-many-models-live-")
    config = load_config(work / "monitor.toml")
    build_baselines(config)  # one calibration, cached
    with bulk_gc():
        parse = orjson_rate(work / "stream.jsonl")
    lines = (work / "stream.jsonl").read_bytes().splitlines()
    end_ms = max(orjson.loads(line)["ts"] for line in lines) - TAIL_MS
    t0 = time.perf_counter()
    pairs = evaluated_pairs(config, work / "stream.jsonl", end_ms)
    replay = time.perf_counter() - t0
    with EmbeddedBroker() as broker:
        ns = Namespace(broker)
        t0 = time.perf_counter()
        ns.publish(("prediction", line) for line in lines)
        print(f"backlog of {n:,} events published in {time.perf_counter() - t0:.1f} s")
        with ns.worker(work / "monitor.toml", log=work / "worker.log") as worker:
            t0 = time.perf_counter()
            worker.wait_ready(timeout=600)
            ready = time.perf_counter() - t0
            wait_for_count(
                [worker],
                "coalmine_evaluations_total",
                pairs,
                f"{pairs:,} (model, step) pairs evaluated",
            )
            took = time.perf_counter() - t0
            folded = worker.metric("coalmine_events_total")
            batches, per_batch = stage1_batches([worker])
            cpu = cpu_seconds(worker)
            rss = worker.peak_rss_mb()
    done = n * (1 - TAIL_MS / 1000 / args.seconds)  # events before the tail: traffic is uniform
    print(
        f"\n# {args.models:,} models at {args.rate:g} events/s each, {args.seconds:g} s of event "
        f"time: {n:,} events, {args.bucket} buckets, drift checks, one live worker"
    )
    print("| measure | value |")
    print("|---|---:|")
    print(
        f"| worker start to /health (baselines from the cache; the group joins follow) | {ready:.1f} s |"
    )
    print(f"| worker start to the {pairs:,} (model, step) pairs evaluated | {took:.1f} s |")
    print(f"| events folded by then | {folded:,.0f} of {n:,} |")
    print(f"| stage-1 batches (polls), mean events each | {batches:,.0f}, {per_batch:,.0f} |")
    print(f"| the worker's CPU by then (the rest: waiting for quiet sources) | {cpu:.1f} s |")
    print(f"| end to end, events/s (start-up included) | {done / took:,.0f} |")
    print(f"| file replay of the same events, events/s (start-up included) | {n / replay:,.0f} |")
    print(f"| orjson alone parsing the same events, events/s | {parse:,.0f} |")
    print(f"| end to end / orjson | {done / took / parse:.3f} (target >= 0.33) |")
    model_seconds = args.models * (args.seconds - TAIL_MS / 1000)
    print(f"| model-seconds of event time per second | {model_seconds / took:,.0f} |")
    print(f"| worker peak memory | {rss:.0f} MB |")


if __name__ == "__main__":
    main()
