"""Stage 1 of one source partition, from raw messages: decode and validate a batch, fold the
valid events (:class:`~coalmine.streams.sketcher.Sketcher`), hand out closed-bucket partials,
and say up to which offset the input may be committed.

The worker's consumer, topic replay and file replay all feed raw bytes through this one class,
so the three give the same partials for the same messages.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np

from coalmine import events as contract
from coalmine.streams.baseline import Baseline
from coalmine.streams.sketch import values_of
from coalmine.streams.sketcher import Sketcher

KINDS = ("prediction", "label")


class Folded(NamedTuple):
    """What folding a batch of valid events gave: ``(index in the batch, reason)`` of the events
    refused (late, or a value of the wrong type for its column: they go to the dead-letter
    topic), and events folded per ``(model, variant)`` (labels have no variant: ``""``)."""

    rejected: list[tuple[int, str]]
    counts: Counter


class PartitionIngest:
    """Stage 1 for one source: raw prediction and label messages in, partials out.

    Offsets (optional) are the messages' positions in their topic partition: an event's offset
    may be committed once the bucket it went into has left in a partial (or it was dead-lettered
    and that letter was sent); :meth:`committable` gives, per kind, the offset to commit.
    """

    def __init__(self, baselines: dict[str, Baseline], source: int = 0):
        self.models = set(baselines)
        self.sketcher = Sketcher(baselines, source=source)
        # kind -> [(event times, offsets)] of folded events whose bucket may still be open
        self._held: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in KINDS}
        self._next: dict[str, int | None] = {k: None for k in KINDS}  # after the last offset seen

    def decode(self, kind: str, raws: list[bytes]) -> tuple[list[dict], list[tuple[int, str]]]:
        """Valid events of a batch of raw ``kind`` messages, and ``(position, reason)`` of the
        others (not JSON, against the schema, of an unknown model)."""
        return contract.split_valid(kind, raws, self.models)

    def fold(
        self,
        kind: str,
        valid: list[dict],
        offsets: list[int] | None = None,
        last_offset: int | None = None,
    ) -> Folded:
        """Fold valid events of one partition, in its order; ``offsets`` are theirs,
        ``last_offset`` the batch's last (valid or not)."""
        add = self.sketcher.add_labels if kind == "label" else self.sketcher.add_predictions
        rejected = add(valid)
        kept = valid
        if rejected:
            refused = {i for i, _ in rejected}
            keep = [i for i in range(len(valid)) if i not in refused]
            kept = [valid[i] for i in keep]
            offsets = [offsets[i] for i in keep] if offsets is not None else None
        if offsets is not None:
            self._held[kind].append(
                (np.array(values_of(kept, "ts"), dtype=np.int64), np.array(offsets, dtype=np.int64))
            )
        if last_offset is not None:
            self._next[kind] = last_offset + 1
        variants = values_of(kept, "variant") if kind == "prediction" else [""] * len(kept)
        return Folded(rejected, Counter(zip(values_of(kept, "model"), variants)))

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
        out = {}
        for kind, held in self._held.items():
            kept = [(ts[ts >= safe], off[ts >= safe]) for ts, off in held]
            held[:] = [(ts, off) for ts, off in kept if len(ts)]
            if held:
                out[kind] = int(min(off.min() for _, off in held))
            elif self._next[kind] is not None:
                out[kind] = self._next[kind]
        return out
