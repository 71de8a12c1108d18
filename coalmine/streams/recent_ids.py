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
        fresh = set(hashes)
        if len(fresh) == len(hashes) and self.tail.isdisjoint(fresh) and not self._any_held(hashes):
            self._add(fresh)
            return None
        # rare: a retry; keep each id's first occurrence unless it was seen before the batch
        values = np.array(hashes, dtype=np.int64)
        seen = self._held(values)
        seen |= np.fromiter(map(self.tail.__contains__, hashes), dtype=bool, count=len(hashes))
        keep = np.zeros(len(hashes), dtype=bool)
        keep[np.unique(values, return_index=True)[1]] = True
        keep &= ~seen
        self._add(set(values[keep].tolist()))
        return keep

    def _runs(self) -> list[np.ndarray]:
        """The generations' sorted arrays that hold ids."""
        return [run for run in (self.older, self.current) if len(run)]

    def _any_held(self, hashes: list[int]) -> bool:
        """Whether either generation's sorted array holds one of the ``hashes``."""
        runs = self._runs()
        if not runs:
            return False
        ordered = np.sort(np.array(hashes, dtype=np.int64))  # the binary searches stay in cache
        return any(_contains(run, ordered).any() for run in runs)

    def _held(self, values: np.ndarray) -> np.ndarray:
        """Mask of the ``values`` in either generation's sorted array."""
        held = np.zeros(len(values), dtype=bool)
        for run in self._runs():
            held |= _contains(run, values)
        return held

    def _add(self, new: set[int]) -> None:
        """Hold distinct hashes not held yet; close the generation once it is full."""
        self.tail |= new
        held = len(self.current) + len(self.tail)
        if len(self.tail) < TAIL and held < self.capacity:
            return
        tail = np.sort(np.fromiter(self.tail, dtype=np.int64, count=len(self.tail)))
        self.current = np.insert(self.current, self.current.searchsorted(tail), tail)
        self.tail = set()
        if held >= self.capacity:
            self.older, self.current = self.current, _EMPTY


def _contains(run: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mask of the ``values`` found in the sorted, non-empty ``run``."""
    at = run.searchsorted(values)
    np.minimum(at, len(run) - 1, out=at)
    return run[at] == values
