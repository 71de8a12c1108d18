"""What carrying a low-traffic model's small buckets costs in detection delay: file replay of a
model at R events/s (default 10: 2.5 events a 250 ms bucket) with 10 N(0, 1) features, feature
x3 shifted by 0.3, 0.5 and 1 standard deviation halfway through, at ``min_bucket_events`` 0
(every bucket evaluated), 30 (coalmine's default) and 100. Prints, per setting and shift, the
events from the change to the first alert (median and range over the seeds), the alerts before
the change (false alarms: 0 expected) and stage 2's steps.

usage: python benchmarks/low_traffic_delay.py [--rate R] [--seeds N] [--events N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import orjson

from coalmine.config import load_config
from coalmine.replay import replay_files

try:  # run as a script from the repository root, or as benchmarks.low_traffic_delay
    from replay_speed import FEATURES, write_stream
except ImportError:
    from benchmarks.replay_speed import FEATURES, write_stream

SETTINGS = (0, 30, 100)
SHIFTS_SD = (0.3, 0.5, 1.0)
START_MS = 1_700_000_000_000


def write_shifted_stream(path: Path, events: int, rate: float, shift_sd: float, seed: int) -> None:
    """``events`` events at ``rate`` a second; x3 shifted by ``shift_sd`` from the middle one."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((events, FEATURES))
    rows[events // 2 :, 3] += shift_sd
    with open(path, "wb") as fh:
        for i, row in enumerate(rows.round(5).tolist()):
            event = {
                "event_id": f"e{i}",
                "request_id": f"r{i}",
                "model": "bench",
                "version": "v1",
                "variant": "champion",
                "ts": START_MS + int(i * 1000 / rate),
                "features": {f"x{j}": v for j, v in enumerate(row)},
                "prediction": int(row[0] > 0),
                "status": "ok",
                "latency_ms": 3.0,
            }
            fh.write(orjson.dumps(event) + b"\n")


def replayed(config, path: Path) -> tuple[list[int], int]:
    """File replay of ``path``: the times of its firing alerts, and the steps evaluated."""
    ends: set[int] = set()
    run = replay_files(
        config, path, progress=False, on_evaluations=lambda evs: ends.update(e.ts for e in evs)
    )
    return [a.ts for a in run.alerts if a.state == "firing"], len(ends)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rate", type=float, default=10.0, help="events/s of event time")
    ap.add_argument("--seeds", type=int, default=8, help="streams per setting and shift")
    ap.add_argument("--events", type=int, default=12_000, help="events a stream")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="coalmine-low-traffic-"))
    os.environ["COALMINE_CACHE_DIR"] = str(work / "cache")
    write_stream(work / "reference.jsonl", 5000, seed=1)
    change_ts = START_MS + int(args.events // 2 * 1000 / args.rate)
    print(f"# {args.rate:g} events/s, 250 ms buckets, 60 s window, {args.seeds} streams each")
    print(
        "| min_bucket_events | shift | events to the first alert: median (range) | "
        "alerts before the change | steps a stream |"
    )
    print("|---:|---:|---|---:|---:|")
    for min_events in SETTINGS:
        config_path = work / f"monitor-{min_events}.toml"
        config_path.write_text(
            f"[defaults]\nmin_bucket_events = {min_events}\n\n"
            '[[models]]\nname = "bench"\nreference = "reference.jsonl"\n'
            'checks = ["drift", "prediction_drift", "missing_rate"]\n'
        )
        config = load_config(config_path)
        for shift in SHIFTS_SD:
            delays, early, steps = [], 0, 0
            for seed in range(args.seeds):
                write_shifted_stream(work / "s.jsonl", args.events, args.rate, shift, 100 + seed)
                firing, ends = replayed(config, work / "s.jsonl")
                early += sum(ts <= change_ts for ts in firing)
                after = [ts for ts in firing if ts > change_ts]
                delays.append(
                    (min(after) - change_ts) * args.rate / 1000 if after else float("inf")
                )
                steps += ends
            print(
                f"| {min_events} | {shift} sd | {statistics.median(delays):.0f} "
                f"({min(delays):.0f}-{max(delays):.0f}) | {early} | {steps // args.seeds:,} |"
            )


if __name__ == "__main__":
    main()
