"""File replay throughput on one core against orjson alone parsing the same file, and the
replay's peak memory. Target (issue 4): >= 100,000 events/s and >= 1/3 of orjson's rate.
Times are this process's CPU seconds (``time.process_time``), for orjson as for the replay:
on a shared machine, wall time would count the neighbours' work too.

usage: python benchmarks/replay_speed.py [--events N] [--repeat K] [--bucket DURATION]
                                        [--rate R] [--checks drift,...]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from coalmine.baselines import build_baselines
from coalmine.config import load_config
from coalmine.replay import bulk_gc, replay_files

FEATURES = 10
EVENTS_PER_S = 1000
CHECKS = ("drift", "prediction_drift", "missing_rate")
#: monitor.toml's one model, reading write_stream's events with the default checks; a benchmark
#: appends its own options (checks = ...) and may put [defaults] before it
BENCH_MODEL = '[[models]]\nname = "bench"\nreference = "reference.jsonl"\n'


def write_stream(path: Path, n: int, seed: int, rate: float = EVENTS_PER_S) -> None:
    """``n`` prediction events of a 10-numeric-feature model, ``rate`` per second of event
    time."""
    rng = np.random.default_rng(seed)
    names = [f"x{j}" for j in range(FEATURES)]
    with open(path, "wb") as fh:
        for start in range(0, n, 50_000):
            rows = rng.standard_normal((min(50_000, n - start), FEATURES)).round(5).tolist()
            fh.write(
                b"".join(
                    orjson.dumps(
                        {
                            "event_id": f"e{start + i}",
                            "request_id": f"r{start + i}",
                            "model": "bench",
                            "version": "v1",
                            "variant": "champion",
                            "ts": 1_700_000_000_000 + int((start + i) * 1000 / rate),
                            "features": dict(zip(names, row)),
                            "prediction": int(row[0] > 0),
                            # a confidence that follows the evidence, for the uncertainty check
                            "scores": {"1": round(1 / (1 + math.exp(-2 * row[0])), 5)},
                            "status": "ok",
                            "latency_ms": 3.0,
                        }
                    )
                    + b"\n"
                    for i, row in enumerate(rows)
                )
            )


def bench_work(
    prefix: str, events: int, config: str, rate: float = EVENTS_PER_S, own_cache: bool = False
) -> Path:
    """A fresh directory (``prefix``) holding ``reference.jsonl`` (5,000 events, seed 1),
    ``stream.jsonl`` (``events`` at ``rate`` a second of event time, seed 2) and
    ``monitor.toml`` (``config``); with ``own_cache``, calibration caches go there too
    ($COALMINE_CACHE_DIR, which child processes inherit): a cold start."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    write_stream(work / "reference.jsonl", 5000, seed=1)
    write_stream(work / "stream.jsonl", events, seed=2, rate=rate)
    (work / "monitor.toml").write_text(config)
    if own_cache:
        os.environ["COALMINE_CACHE_DIR"] = str(work / "cache")
    return work


def orjson_rate(path: Path) -> float:
    """Events/s for reading the file and orjson-parsing every line, in the same chunks and with
    the same garbage-collector setting as the replay (orjson is faster with it too)."""
    with bulk_gc():
        return _orjson_rate(path)


def _orjson_rate(path: Path) -> float:
    t0 = time.process_time()
    n = 0
    with open(path, "rb") as fh:
        while chunk := [line for _, line in zip(range(20_000), fh)]:
            n += len([orjson.loads(line) for line in chunk])
    return n / (time.process_time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of each; the best counts (default 3)"
    )
    ap.add_argument(
        "--bucket", help="event-time bucket, e.g. 1s (default: coalmine's default bucket)"
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=EVENTS_PER_S,
        help="events per second of event time (default %(default)s): stage 2's work is per "
        "bucket, so low rates cost more per event",
    )
    ap.add_argument(
        "--checks",
        default=",".join(CHECKS),
        help="the model's checks (default %(default)s); e.g. add multivariate_drift and "
        "uncertainty_drift to measure the label-free checks",
    )
    args = ap.parse_args()
    work = bench_work(
        "coalmine-replay-bench-",
        args.events,
        "[defaults]\n"
        + (f'bucket = "{args.bucket}"\n' if args.bucket else "")
        + 'window = "60s"\n\n'
        + BENCH_MODEL
        + f"checks = {orjson.dumps(args.checks.split(',')).decode()}\n",
        rate=args.rate,
        own_cache=True,  # a cold start: calibration measured
    )
    config = load_config(work / "monitor.toml")
    t0 = time.process_time()
    build_baselines(config)  # calibrates and caches; the replays below read the cache
    calibration = time.process_time() - t0
    parse, replay = 0.0, 0.0
    for _ in range(args.repeat):  # best of each, interleaved: both see the same machine state
        parse = max(parse, orjson_rate(work / "stream.jsonl"))
        t0 = time.process_time()
        run = replay_files(config, work / "stream.jsonl", progress=False)
        replay = max(replay, run.counts["predictions"] / (time.process_time() - t0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"# file replay, {args.events:,} events ({args.rate:,.0f}/s of event time), {FEATURES} numeric features, "
        f"bucket {config.models['bench'].bucket_ms} ms, checks {args.checks}, one core, "
        f"best of {args.repeat}"
    )
    print("| measure | value | target |")
    print("|---|---|---|")
    print(
        f"| coalmine replay (parse + validate + sketch + evaluate), events/s | {replay:,.0f} | >= 100,000 |"
    )
    print(f"| orjson alone parsing the same file, events/s | {parse:,.0f} | |")
    print(f"| replay / orjson | {replay / parse:.2f} | >= 0.33 |")
    print(f"| calibration at a cold start (cached for the next), s | {calibration:.1f} | seconds |")
    print(f"| alerts on this stationary stream | {run.counts['alerts']} | 0 |")
    print(f"| peak memory of the process (ru_maxrss) | {peak:.0f} MB | |")


if __name__ == "__main__":
    main()
