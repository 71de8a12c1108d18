"""Stage 1 of one source partition, from raw messages: decode and validate a batch, fold the
valid events (:class:`~coalmine.streams.sketcher.Sketcher`), hand out closed-bucket partials,
and say up to which offset the input may be committed.

The worker's consumer, topic replay and file replay all feed raw bytes through this one class,
so the three give the same partials for the same messages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import repeat
from typing import NamedTuple

import numpy as np

from coalmine import events as contract
from coalmine.decode import PredictionDecoder
from coalmine.streams.baseline import Baseline
from coalmine.streams.sketch import values_of
from coalmine.streams.sketcher import PredictionBatch, Sketcher, batches_from_events, without

KINDS = ("prediction", "label")


class Fed(NamedTuple):
    """What one batch of messages gave: ``(position in the batch, reason)`` of the messages
    that go to the dead-letter topic (invalid, unknown model, a value of the wrong type, late),
    events folded per ``(model, variant)`` (labels have no variant: ``""``), and the largest
    event time among them (None when none was folded), duplicates dropped per model."""

    dead: list[tuple[int, str]]
    counts: Counter
    horizon: int | None
    late: int = 0  # of the dead, those refused as late (valid, but behind the watermark)
    duplicates: Counter = Counter()  # never mutated: a fresh one per Fed that has any


class PartitionIngest:
    """Stage 1 for one source: raw prediction and label messages in, partials out.

    Offsets (optional) are the messages' positions in their topic partition: an event's offset
    may be committed once the bucket it went into has left in a partial (or it was dead-lettered
    and that letter was sent); :meth:`committable` gives, per kind, the offset to commit.
    """

    def __init__(
        self,
        baselines: dict[str, Baseline],
        source: int = 0,
        clock: Callable[[], int] | None = None,
        wait_for_labels: bool = False,
        decoder: PredictionDecoder | None = None,
    ):
        self.models = set(baselines)
        # clock: a worker's wall clock, ms; replays have none; wait_for_labels: a worker's
        # (see Sketcher); decoder: one the worker's partitions share (1,000 models: ~0.2 s
        # to build)
        self.sketcher = Sketcher(
            baselines, source=source, clock=clock, wait_for_labels=wait_for_labels
        )
        self.predictions = decoder or PredictionDecoder(baselines)
        # kind -> [(event times, offsets)] of folded events whose bucket may still be open
        self._held: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in KINDS}
        self._next: dict[str, int | None] = {k: None for k in KINDS}  # after the last offset seen

    def feed(self, kind: str, raws: list[bytes], offsets: list[int] | None = None) -> Fed:
        """Decode, validate and fold one batch of ``kind`` messages of one partition, in its
        order; ``offsets`` are the messages' offsets."""
        if kind == "label":
            labels, invalid = self.decode_labels(raws)
            at = _valid_positions(len(raws), invalid)
            fed = self.fold_labels(labels, [offsets[i] for i in at] if offsets else None)
            dead = invalid + [(at[i], reason) for i, reason in fed.dead]
        else:
            batches, dead = self.predictions.decode(raws)
            fed = self._fold_batches(batches, offsets)
            dead = dead + fed.dead
        if offsets:
            self._next[kind] = offsets[-1] + 1
        return Fed(sorted(dead), fed.counts, fed.horizon, fed.late, fed.duplicates)

    def decode_labels(self, raws: list[bytes]) -> tuple[list[dict], list[tuple[int, str]]]:
        """Valid label events of a batch of raw messages, and ``(position, reason)`` of the
        others (not JSON, against the schema, of an unknown model)."""
        return contract.split_valid("label", raws, self.models)

    def fold_labels(self, labels: list[dict], offsets: list[int] | None = None) -> Fed:
        """Fold valid label events (``dead`` positions index ``labels``)."""
        rejected, counted = self.sketcher.join_labels(labels)
        kept = without(labels, rejected)
        if offsets is not None:  # held by the bucket each counted in, not its own ts
            self._hold("label", counted, without(offsets, rejected))
        counts = Counter(zip(values_of(kept, "model"), repeat("")))
        return Fed(rejected, counts, max(values_of(kept, "ts"), default=None), len(rejected))

    def fold_predictions(self, events: list[dict]) -> Fed:
        """Fold valid prediction events given as dicts (``dead`` positions index ``events``)."""
        batches, rejected = batches_from_events(events, self.sketcher.baselines)
        fed = self._fold_batches(batches, None)
        return Fed(sorted(rejected + fed.dead), fed.counts, fed.horizon, fed.late, fed.duplicates)

    def _fold_batches(self, batches: list[PredictionBatch], offsets: list[int] | None) -> Fed:
        dead: list[tuple[int, str]] = []
        counts: Counter = Counter()
        horizon = None
        if not batches:
            return Fed(dead, counts, horizon)
        # every model's events are the stream an event's time is judged against
        stream = np.sort(np.concatenate([b.ts for b in batches]))
        before = Counter(self.sketcher.duplicates)
        for batch in batches:
            refused, batch = self.sketcher.add_batch(batch, stream)
            dead += refused
            if not len(batch):
                continue
            if offsets is not None:
                self._hold("prediction", batch.ts, [offsets[p] for p in batch.positions])
            counts.update(zip(repeat(batch.model), batch.variant))
            top = int(batch.ts.max())
            horizon = top if horizon is None else max(horizon, top)
        late = sum(reason.startswith("late event") for _, reason in dead)
        return Fed(dead, counts, horizon, late, self.sketcher.duplicates - before)

    def _hold(self, kind: str, ts, offsets) -> None:
        self._held[kind].append(
            (np.asarray(ts, dtype=np.int64), np.asarray(offsets, dtype=np.int64))
        )

    def close(self) -> list[dict]:
        """Partials of every bucket the watermark has passed (see :meth:`Sketcher.close`)."""
        return self.sketcher.close()

    def flush(self) -> list[dict]:
        """End of input: partials of every open bucket."""
        return self.sketcher.flush()

    def committable(self) -> dict[str, int]:
        """Per kind, the offset to commit: the first offset of an event whose bucket may still
        be open, or just past the last message fed when there is none. Call it after the
        partials of :meth:`close` (and the dead letters) were acknowledged by the broker."""
        safe = min(self.sketcher.closed_through.values(), default=-1)
        out: dict[str, int] = {}
        for kind, held in self._held.items():
            if held:  # each model's batches since the last commit: one pair of arrays
                ts, off = (np.concatenate(arrays) for arrays in zip(*held, strict=True))
                open_ = ts >= safe
                held[:] = [(ts[open_], off[open_])] if open_.any() else []
            if held:
                out[kind] = int(held[0][1].min())
            elif (after := self._next[kind]) is not None:
                out[kind] = after
        return out


def _valid_positions(n: int, invalid: list[tuple[int, str]]) -> list[int]:
    """Positions in a batch of ``n`` of the messages not in ``invalid``, in order."""
    bad = {i for i, _ in invalid}
    return [i for i in range(n) if i not in bad]
