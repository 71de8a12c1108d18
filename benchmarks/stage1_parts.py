"""Where a live worker's CPU time goes, an event at a time, part by part: the work of
``benchmarks/throughput.py``'s worker (the same stream: 10 numeric features, default checks,
no labels, so every prediction waits in the label join), done here in one process without
Kafka, with the worker's garbage-collector settings. The stream is split over 6 partitions
and fed a fetch (1 MB, ~3,000 events) at a time per partition; the label join is written as
stage 1 writes it at a commit, every ``--commit-every`` events; stage 2 takes every partial.

What the worker does beyond these parts (the Kafka clients: fetching and reading records,
producing; the event loop; the web server) is its CPU time an event
(``throughput.py``) less their sum.

usage: python benchmarks/stage1_parts.py [--events N] [--commit-every N]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import Counter

from coalmine.agents import state
from coalmine.agents.state import ModelState
from coalmine.baselines import build_baselines
from coalmine.config import load_config
from coalmine.ingest import PartitionIngest
from coalmine.partials import encode_partial
from coalmine.streams import Evaluator
from coalmine.streams.sketcher import Sketcher

try:  # run as a script from the repository root, or as benchmarks.stage1_parts
    from replay_speed import BENCH_MODEL, bench_work
except ImportError:
    from benchmarks.replay_speed import BENCH_MODEL, bench_work

PARTITIONS = 6
FETCH_EVENTS = 3000  # stage 1's FETCH_BYTES of ~330-byte events
T0 = 1_700_000_000_000


class Clock:
    """CPU seconds per part; a part timed inside another is taken out of it."""

    def __init__(self) -> None:
        self.spent: Counter = Counter()
        self.stack: list[str] = []

    def wrap(self, owner, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            self.stack.append(part)
            t0 = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent = time.process_time() - t0
                self.stack.pop()
                self.spent[part] += spent
                if self.stack:
                    self.spent[self.stack[-1]] -= spent

        setattr(owner, name, timed)

    def time(self, part: str):
        clock = self

        class Span:
            def __enter__(self):
                clock.stack.append(part)
                self.t0 = time.process_time()

            def __exit__(self, *exc):
                spent = time.process_time() - self.t0
                clock.stack.pop()
                clock.spent[part] += spent

        return Span()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument(
        "--commit-every", type=int, default=40_000, help="events between label-join writes"
    )
    args = ap.parse_args()
    work = bench_work("coalmine-parts-", args.events, BENCH_MODEL)
    baselines = build_baselines(load_config(work / "monitor.toml"))
    lines = (work / "stream.jsonl").read_bytes().splitlines()
    clock = Clock()
    clock.wrap(PartitionIngest, "feed", "stage 1: other")
    clock.wrap(Sketcher, "add_batch", "stage 1: fold (sketches, dedup, watermark)")
    clock.wrap(Sketcher, "_join_predictions", "stage 1: label join insert")
    clock.wrap(PartitionIngest, "close", "stage 1: close buckets")
    import coalmine.decode as decode

    clock.wrap(decode.PredictionDecoder, "decode", "stage 1: decode (JSON to columns)")

    gc.freeze()  # as the worker (coalmine.agents.stage1)
    gc.set_threshold(100_000, *gc.get_threshold()[1:])
    ingests = [
        PartitionIngest(baselines, source=p, clock=lambda: T0 + 10**9, wait_for_labels=True)
        for p in range(PARTITIONS)
    ]
    evaluator, saved = Evaluator(baselines["bench"], PARTITIONS, None), ModelState()
    split = [lines[p::PARTITIONS] for p in range(PARTITIONS)]
    hashes: dict[int, list[int]] = {}
    since_commit, written = 0, 0
    t0 = time.process_time()
    for start in range(0, len(split[0]), FETCH_EVENTS):
        for p, ingest in enumerate(ingests):
            raws = split[p][start : start + FETCH_EVENTS]
            ingest.feed("prediction", raws, list(range(start, start + len(raws))))
            ingest.sketcher.labels_caught_up()
            for partial in ingest.close():
                with clock.time("stage 1: encode partials"):
                    encode_partial(partial)
                with clock.time("stage 2: merge and evaluate"):
                    out = evaluator.add(partial)
                if out.evaluations:
                    with clock.time("stage 2: write its state"):
                        saved.records("bench", evaluator)
            since_commit += len(raws)
        if since_commit >= args.commit_every:
            since_commit = 0
            with clock.time("stage 1: write the label join"):
                for p, ingest in enumerate(ingests):
                    sketcher = ingest.sketcher
                    rest, hashes[p] = state.join_state(
                        p, sketcher.join_records(waiting=False), hashes.get(p, [])
                    )
                    records = state.join_chunks(p, sketcher.joins) + rest
                    written += sum(len(v or b"") for _, v in records)
                    for table in sketcher.joins.values():
                        table.saved()
    total = time.process_time() - t0
    n = len(lines)
    print(f"# {n:,} events, 6 partitions, label join written every {args.commit_every:,} events")
    print("| part | CPU an event |")
    print("|---|---:|")
    for part, spent in sorted(clock.spent.items()):
        print(f"| {part} | {spent / n * 1e6:.2f} us |")
    print(f"| all | {total / n * 1e6:.2f} us |")
    print(f"\nlabel join written: {written / n:.0f} bytes an event")


if __name__ == "__main__":
    main()
