"""Stage 2's sliding window: a ring of event-time buckets and, per variant, their merged
summary, kept up to date by adding the bucket that comes in and subtracting the one that
drops out."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from coalmine.streams.sketch import Packed, Summary


def accumulate(table: dict, key, summary: Summary) -> None:
    """Merge ``summary`` into ``table[key]``."""
    table[key] = table[key] + summary if key in table else summary


@dataclass
class Bucket:
    """What stage 2 evaluates: the merged summaries of the event-time span [start, end), one
    bucket, or several of a low-traffic model carried together."""

    start: int
    variants: dict[str, Summary]
    end: int


@dataclass
class PackedBucket:
    """A bucket of the window's ring: its summaries packed (:class:`Packed`). The ring's
    buckets are contiguous: each ends where the next starts."""

    start: int
    variants: dict[str, Packed]


class SlidingWindow:
    """The buckets of the last ``window_ms`` of event time and, per variant, the sum of their
    summaries, kept by adding the bucket that comes in and subtracting those that drop out:
    two merges a slide, not a window's worth. Counts stay exact. Float sums are re-added from
    the buckets whenever a bucket spans the start of a multiple of the window length in event
    time, so rounding cannot build up, and live runs, replays and restarted workers re-add at
    the same buckets. The ring holds its buckets packed
    (:class:`~coalmine.streams.sketch.Packed`): a thousand low-traffic models' rings would
    take gigabytes dense."""

    def __init__(self, window_ms: int):
        self.window_ms = window_ms
        self.buckets: deque[PackedBucket] = deque()
        self.sums: dict[str, Summary] = {}
        #: variant -> buckets of the ring it has traffic in (its sum goes when none is left)
        self.present: Counter[str] = Counter()

    def __setstate__(self, state: dict) -> None:
        """A ring pickled by an earlier version (a state record): ``size`` buckets of
        ``bucket_ms``."""
        if "size" in state:
            state["window_ms"] = state.pop("size") * state.pop("bucket_ms")
            state["buckets"] = deque(state["buckets"])
        self.__dict__.update(state)

    def append(self, bucket: Bucket) -> dict[str, Summary]:
        """Slide by ``bucket``; return the window of every variant present, by variant name."""
        packed = {variant: Packed(s) for variant, s in bucket.variants.items()}
        self.buckets.append(PackedBucket(bucket.start, packed))
        gone = []
        while self.buckets[0].start < bucket.end - self.window_ms:
            gone.append(self.buckets.popleft())
        for variant in bucket.variants:  # a loop: Counter.update costs more for a few keys
            self.present[variant] += 1
        for out in gone:
            for variant in out.variants:
                self.present[variant] -= 1
        if -(-bucket.start // self.window_ms) * self.window_ms < bucket.end:
            self._add_up()
        else:
            fresh = bucket.variants.keys() & self.sums.keys()  # sums made anew here
            for variant, s in bucket.variants.items():
                accumulate(self.sums, variant, s)
            for out in gone:
                for variant, packed_gone in out.variants.items():
                    if variant in fresh:
                        packed_gone.subtract_from(self.sums[variant])
                    elif self.present[variant]:
                        self.sums[variant] = self.sums[variant] - packed_gone.unpack()
                        fresh.add(variant)
                    else:
                        self.sums.pop(variant, None)
                        self.present.pop(variant, None)
        return {v: self.sums[v] for v in sorted(self.sums)}

    def forget(self, variant: str) -> None:
        """Drop ``variant`` from every bucket: it starts a fresh window."""
        for b in self.buckets:
            b.variants.pop(variant, None)
        self.sums.pop(variant, None)
        self.present.pop(variant, None)

    def clear(self) -> None:
        self.buckets.clear()
        self.sums.clear()
        self.present.clear()

    def _add_up(self) -> None:
        self.sums = {}
        for b in self.buckets:
            for variant, s in b.variants.items():
                if variant in self.sums:
                    s.add_to(self.sums[variant])  # made here: no one else holds it yet
                else:
                    self.sums[variant] = s.unpack()
