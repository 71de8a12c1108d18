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
        distinct, first = np.unique(np.array(hashes, dtype=np.int64), return_index=True)
        seen = _contains(self.older, distinct) | _contains(self.current, distinct)
        if not self.tail.isdisjoint(hashes):
            in_tail = map(self.tail.__contains__, distinct.tolist())
            seen |= np.fromiter(in_tail, dtype=bool, count=len(distinct))
        self._add(distinct[~seen])
        if len(distinct) == len(hashes) and not seen.any():
            return None
        keep = np.zeros(len(hashes), dtype=bool)
        keep[first[~seen]] = True  # each id's first occurrence, unless seen before the batch
        return keep

    def _add(self, new: np.ndarray) -> None:
        """Hold sorted hashes not held yet; close the generation once it is full."""
        held = len(self.current) + len(self.tail) + len(new)
        if len(self.tail) + len(new) < TAIL and held < self.capacity:
            self.tail.update(new.tolist())
            return
        tail = np.fromiter(self.tail, dtype=np.int64, count=len(self.tail))
        new = np.sort(np.concatenate((new, tail)))
        self.current = np.insert(self.current, self.current.searchsorted(new), new)
        self.tail = set()
        if held >= self.capacity:
            self.older, self.current = self.current, _EMPTY


def _contains(run: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mask of the ``values`` found in the sorted ``run``."""
    if not len(run):
        return np.zeros(len(values), dtype=bool)
    at = run.searchsorted(values)
    np.minimum(at, len(run) - 1, out=at)
    return run[at] == values
