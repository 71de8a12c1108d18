"""The hashes of a model's recent event ids, for stage 1 to drop duplicates, at 8 bytes an id.

Two generations: the current one takes every new id and, once it holds ``capacity`` ids,
becomes the older one (the older one is forgotten), so the last ``capacity`` to twice that ids
are remembered. A generation is a sorted int64 array; the newest ids wait in a small set
(:data:`TAIL` at most) and are merged into the array when it fills. A batch so costs a set
look-up and two binary searches, whatever the number of ids held, and :data:`TAIL` ids a merge
of the generation (a few array copies an id).
"""

from __future__ import annotations

import numpy as np

#: the newest ids held in a set before they are merged into their generation's sorted array
TAIL = 4096
_EMPTY = np.empty(0, dtype=np.int64)


class RecentIds:
    """The hashes of the last ``capacity`` to ``2 * capacity`` distinct event ids.

    Parameters
    ----------
    capacity : int
        Ids a generation holds before it becomes the older one.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.older = _EMPTY  # sorted
        self.current = _EMPTY  # sorted, less the tail
        self.tail: set[int] = set()
        self.tail_chunks: list[np.ndarray] = []  # the tail as arrays, for the merge

    def __len__(self) -> int:
        return len(self.older) + len(self.current) + len(self.tail)

    def first_seen(self, event_ids: list[str]) -> np.ndarray | None:
        """Remember the ids; return the mask of the first occurrence of each id not seen
        lately (None when all are such).

        Parameters
        ----------
        event_ids : list of str
            A batch's event ids, in order.

        Returns
        -------
        numpy.ndarray of bool or None
            True at the events to keep; None when every event is kept.
        """
        if not event_ids:
            return None
        hashes = list(map(hash, event_ids))
        values = np.array(hashes, dtype=np.int64)
        fresh = set(hashes)
        if len(fresh) == len(hashes) and self.tail.isdisjoint(fresh):
            ordered = np.sort(values)  # sorted needles: the binary searches stay in cache
            if not self._held(ordered).any():
                self._add(ordered, fresh)
                return None
        # rare: a retry; keep each id's first occurrence unless it was seen before the batch
        seen = self._held(values)
        seen |= np.fromiter(map(self.tail.__contains__, hashes), dtype=bool, count=len(hashes))
        keep = np.zeros(len(hashes), dtype=bool)
        keep[np.unique(values, return_index=True)[1]] = True
        keep &= ~seen
        new = values[keep]
        self._add(new, set(new.tolist()))
        return keep

    def _held(self, values: np.ndarray) -> np.ndarray:
        """Mask of the ``values`` in either generation's sorted array."""
        return _contains(self.older, values) | _contains(self.current, values)

    def _add(self, new: np.ndarray, new_set: set[int]) -> None:
        """Hold distinct hashes not held yet (as an array and a set); close the generation
        once it is full."""
        self.tail |= new_set
        self.tail_chunks.append(new)
        held = len(self.current) + len(self.tail)
        if len(self.tail) < TAIL and held < self.capacity:
            return
        tail = np.sort(np.concatenate(self.tail_chunks))
        self.current = np.insert(self.current, self.current.searchsorted(tail), tail)
        self.tail, self.tail_chunks = set(), []
        if held >= self.capacity:
            self.older, self.current = self.current, _EMPTY


def _contains(run: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mask of the ``values`` found in the sorted ``run``."""
    if not len(run):
        return np.zeros(len(values), dtype=bool)
    at = run.searchsorted(values)
    np.minimum(at, len(run) - 1, out=at)
    return run[at] == values
