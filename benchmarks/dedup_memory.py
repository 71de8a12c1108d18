"""Memory and cost of stage 1's recent event ids (issue 12): bytes an id held, and the time
to check a batch against them, with one model's generation full (``dedup_events`` ids).

Feeds N distinct 36-character event ids (as UUIDs are) in batches of 1,000 and measures with
tracemalloc the memory held afterwards, divided by the ids held; then times batches of 1, 10 and 1,000
new ids.

usage: python benchmarks/dedup_memory.py [--ids N] [--dedup-events N]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
import uuid

from coalmine.streams.recent_ids import RecentIds

#: bytes an id may cost (an int64 hash is 8; the newest ids wait in a small set)
CEILING = 16


def bytes_an_id(ids: int, capacity: int) -> tuple[float, RecentIds]:
    """Memory held after ``ids`` distinct ids fed 1,000 a batch, divided by the ids held."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    recent = RecentIds(capacity)
    for _ in range(0, ids, 1000):
        recent.first_seen([str(uuid.uuid4()) for _ in range(1000)])
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / len(recent), recent


def us_a_batch(recent: RecentIds, size: int, batches: int) -> float:
    """Microseconds to check (and remember) a batch of ``size`` new ids."""
    work = [[str(uuid.uuid4()) for _ in range(size)] for _ in range(batches)]
    start = time.perf_counter()
    for ids in work:
        recent.first_seen(ids)
    return (time.perf_counter() - start) / batches * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=200_000)
    parser.add_argument("--dedup-events", type=int, default=100_000)
    args = parser.parse_args()
    per_id, recent = bytes_an_id(args.ids, args.dedup_events)
    print(
        f"# recent event ids: {args.ids:,} fed, {len(recent):,} held (dedup_events {args.dedup_events:,})"
    )
    print("| measure | value | ceiling |\n|---|---|---|")
    print(f"| memory held an id (tracemalloc), bytes | {per_id:.1f} | {CEILING} |")
    for size, batches in ((1, 2000), (10, 2000), (1000, 200)):
        print(f"| a batch of {size:,} new ids, us | {us_a_batch(recent, size, batches):.0f} | |")


if __name__ == "__main__":
    main()
