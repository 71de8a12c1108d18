"""Mergeable window summaries: per-column histograms on reference-quantile bins.

A :class:`Layout` fixes, from the reference, how every monitored column is binned: numeric
columns on the reference's quantiles (plus a bin below the smallest and above the largest
reference value, so nothing falls outside), categorical columns on the reference's
vocabulary plus one bin for categories never seen there. All columns share one flat array,
so a batch of events is folded with a single :func:`numpy.bincount`.

A :class:`Summary` holds, for one (model, variant, event-time bucket), the bin counts, the
sum of the values in each bin (so the Wasserstein distance can use the bins' means, not their
mid-points), missing-value counts, serving errors and labelled-error counts. Summaries add:
the summary of the union of two event sets is the sum of their summaries, whatever the order
or the number of partitions they were folded in.

>>> import numpy as np
>>> layout = Layout.from_columns({"x": np.arange(100.0)}, bins=4)
>>> layout.edges["x"]
array([24.75, 49.5 , 74.25])
>>> a = layout.fold({"x": np.array([1.0, 60.0, np.nan])})
>>> b = layout.fold({"x": np.array([99.0])})
>>> (a + b).counts.tolist(), (a + b).missing.tolist()
([1, 0, 1, 1], [1])
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property, partial, reduce
from itertools import chain
from operator import itemgetter
from typing import Any, overload

import numpy as np

from coalmine.streams.derived import is_derived
from coalmine.streams.latency import LATENCY_BINS
from coalmine.streams.reference import PREDICTION, SCORES, ReferenceData, is_model_output

NUMERIC, CATEGORICAL = "numeric", "categorical"
#: numeric values are clipped this many reference spreads beyond the reference (Layout.limits)
CLIP_SPREADS = 1e6


@dataclass(frozen=True)
class Layout:
    """How each column maps to a slice of the flat bin array."""

    names: tuple[str, ...]
    kinds: dict[str, str]
    edges: dict[str, np.ndarray] = field(default_factory=dict)  # numeric: inner edges
    vocab: dict[str, dict[str, int]] = field(default_factory=dict)  # categorical
    offsets: dict[str, int] = field(default_factory=dict)
    size: int = 0

    @classmethod
    def from_columns(
        cls,
        columns: dict[str, np.ndarray],
        bins: int = 32,
        fixed_edges: dict[str, np.ndarray] | None = None,
    ) -> Layout:
        """Bins on each numeric column's quantiles (and on its ``fixed_edges``, if given)."""
        kinds, edges, vocab, offsets, size = {}, {}, {}, {}, 0
        for name, values in columns.items():
            offsets[name] = size
            if values.dtype == object:
                kinds[name] = CATEGORICAL
                cats = sorted({v for v in values if v is not None})
                vocab[name] = {c: i for i, c in enumerate(cats)}
                size += len(cats) + 1  # last bin: categories unseen in the reference
            else:
                kinds[name] = NUMERIC
                edges[name] = quantile_edges(values[~np.isnan(values)], bins)
                if fixed_edges and name in fixed_edges:
                    edges[name] = np.union1d(edges[name], fixed_edges[name])
                size += len(edges[name]) + 1
        return cls(tuple(columns), kinds, edges, vocab, offsets, size)

    @classmethod
    def from_reference(
        cls, ref: ReferenceData, bins: int = 32, fixed_edges: dict[str, np.ndarray] | None = None
    ) -> Layout:
        return cls.from_columns(ref.columns, bins, fixed_edges)

    def bins_of(self, name: str) -> slice:
        """The slice of the flat arrays that holds ``name``'s bins."""
        start = self.offsets[name]
        width = (
            len(self.edges[name]) + 1 if self.kinds[name] == NUMERIC else len(self.vocab[name]) + 1
        )
        return slice(start, start + width)

    def bin_index(self, name: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat bin index of each present value, mask of present values)."""
        if self.kinds[name] == NUMERIC:
            present = ~np.isnan(values)
            idx = np.searchsorted(self.edges[name], values[present], side="right")
        else:
            present = np.array([v is not None for v in values], dtype=bool)
            vocab, unseen = self.vocab[name], len(self.vocab[name])
            idx = np.fromiter(
                (vocab.get(v, unseen) for v in values[present]),
                dtype=np.int64,
                count=int(present.sum()),
            )
        return idx + self.offsets[name], present

    def limits(self, name: str) -> tuple[float, float]:
        """The finite range a numeric column's values are clipped to before folding: the
        reference's outer edges widened by a million times their spread. No valid value comes
        near it, so its bins and sums are untouched; an extreme one (1e308) counts in its outer
        bin with a finite value, so sums never overflow to inf (and NaN), and a window less
        that bucket keeps all but ~6 of its 16 significant digits."""
        edges = self.edges[name]
        low, high = float(edges[0]), float(edges[-1])
        reach = CLIP_SPREADS * max(high - low, abs(low), abs(high), 1.0)
        return low - reach, high + reach

    def clipped(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``columns`` with each numeric column of the layout clipped to :meth:`limits` (NaN,
        a missing value, stays NaN), all at once (a batch of a few events costs numpy calls,
        not values)."""
        names, low, high = self._limits
        mine = [name for name in names if name in columns]
        if not mine:
            return dict(columns)
        if len(mine) < len(names):  # some absent (derived columns, added after clipping)
            rows = [names.index(name) for name in mine]
            low, high = low[rows], high[rows]
        values = np.array([columns[name] for name in mine], dtype=float)
        # np.minimum(np.maximum()): np.clip without its dispatch cost
        return {**columns, **dict(zip(mine, np.minimum(np.maximum(values, low), high)))}

    @cached_property
    def _limits(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The numeric columns and their :meth:`limits`, low and high as column vectors."""
        names = self._numeric
        low, high = np.array([self.limits(name) for name in names]).reshape(-1, 2).T
        return names, low[:, None], high[:, None]

    def empty(self) -> Summary:
        return Summary.zeros(self.size, len(self.names))

    @overload
    def fold(
        self, columns: dict[str, np.ndarray], groups: None = None, n_groups: int = 1
    ) -> Summary: ...

    @overload
    def fold(
        self, columns: dict[str, np.ndarray], groups: np.ndarray, n_groups: int = 1
    ) -> list[Summary]: ...

    def fold(
        self, columns: dict[str, np.ndarray], groups: np.ndarray | None = None, n_groups: int = 1
    ) -> Summary | list[Summary]:
        """Fold a batch into summaries: one, or one per group when ``groups`` (ints in
        ``[0, n_groups)``, one per event) is given. Column arrays come from
        :func:`column_arrays`."""
        n = len(next(iter(columns.values())))
        g = np.zeros(n, dtype=np.int64) if groups is None else groups
        flat, weights = self._fold_numeric(columns, g)
        for name in self._categorical:
            idx, present = self.bin_index(name, columns[name])
            flat.append(g[present] * self.size + idx)
            weights.append(np.zeros(len(idx)))
        flat_all = flat[0] if len(flat) == 1 else np.concatenate(flat)
        w_all = weights[0] if len(weights) == 1 else np.concatenate(weights)
        total = n_groups * self.size
        counts = np.bincount(flat_all, minlength=total).reshape(n_groups, self.size)
        sums = np.bincount(flat_all, weights=w_all, minlength=total).reshape(n_groups, self.size)
        events = np.bincount(g, minlength=n_groups)
        # every present value counts in one of its column's bins: the rest are missing
        missing = events[:, None] - np.add.reduceat(counts, self._starts, axis=1)
        out = [Summary(int(events[i]), counts[i], sums[i], missing[i]) for i in range(n_groups)]
        return out[0] if groups is None else out

    @cached_property
    def _starts(self) -> np.ndarray:
        """Where each column's bins start in the flat arrays, in column order (they tile the
        arrays in that order: :meth:`from_columns`)."""
        return np.array([self.offsets[name] for name in self.names])

    def _fold_numeric(
        self, columns: dict[str, np.ndarray], g: np.ndarray
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The numeric columns' flat bin indices and values of the present (not NaN) values
        (column by column, events in order: each bin's sum adds up in the same order as one
        column at a time would), all columns at once with one binary search (a batch of a
        few events costs numpy calls, not values)."""
        names = self._numeric
        if not names:
            return [], []
        values = np.array([columns[name] for name in names], dtype=float)
        present = values == values  # not NaN
        edges, table, rows = self._numeric_bins
        bins = table[edges.searchsorted(values, side="right") + rows]
        return [(g * self.size + bins)[present]], [values[present]]

    @cached_property
    def _numeric_bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every numeric column's inner edges merged into one sorted array, and a table of
        flat bins: a value of numeric column ``j`` with ``p`` merged edges at or below it
        falls in flat bin ``table[rows[j] + p]``, as its own column's binary search puts it
        (the column's edges at or below it are exactly those among the ``p``)."""
        names = self._numeric
        merged = np.sort(np.concatenate([self.edges[name] for name in names]))
        table = np.concatenate(
            [
                self.offsets[name]
                + np.concatenate([[0], np.searchsorted(self.edges[name], merged, side="right")])
                for name in names
            ]
        )
        rows = np.arange(len(names))[:, None] * (len(merged) + 1)
        return merged, table, rows

    @cached_property
    def _numeric(self) -> list[str]:
        """The numeric columns, in column order."""
        return [name for name in self.names if self.kinds[name] == NUMERIC]

    @cached_property
    def _categorical(self) -> list[str]:
        """The categorical columns, in column order."""
        return [name for name in self.names if self.kinds[name] == CATEGORICAL]


def quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles, duplicates dropped (ties and discrete
    features give fewer, wider bins rather than empty ones).

    >>> quantile_edges(np.array([0.0, 0, 0, 1, 2, 3]), 3).tolist()
    [0.0, 1.333333333333333]
    """
    if len(values) == 0:
        return np.array([0.0])
    qs = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


@dataclass
class Summary:
    """Sufficient statistics of a set of events; ``+`` merges two sets exactly (counts) or to
    floating-point rounding (sums). Besides the column histograms: serving errors, a latency
    histogram (:data:`coalmine.streams.latency.LATENCY_EDGES_MS`), labelled errors (and a
    binary model's confusion counts and labels per positive-score bin when it estimates its
    performance), outcome
    moments for A/B tests, and, on the shadow variant, its pairing with the champion: paired
    requests, agreements, and the discordant cells of the paired correctness table (b:
    champion right, shadow wrong; c: the reverse)."""

    n: int
    counts: np.ndarray
    sums: np.ndarray
    missing: np.ndarray
    latency: np.ndarray = field(default_factory=lambda: np.zeros(LATENCY_BINS, dtype=np.int64))
    errors: int = 0
    labelled: int = 0
    label_errors: int = 0
    # a binary model's labelled events (estimated_performance only): positive label, positive
    # answer, both
    label_positives: int = 0
    answer_positives: int = 0
    true_positives: int = 0
    # and per bin of its positive score, its labelled events' positive and negative labels
    # (empty for other models, and left out of the wire form)
    score_positives: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    score_negatives: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    abs_error_sum: float = 0.0
    abs_error_sumsq: float = 0.0
    outcome_n: int = 0
    outcome_sum: float = 0.0
    outcome_sumsq: float = 0.0
    paired: int = 0
    agree: int = 0
    paired_labelled: int = 0
    b: int = 0
    c: int = 0
    latency_overhead_sum: float = 0.0
    shadow_missing: int = 0

    @classmethod
    def zeros(cls, size: int, n_columns: int) -> Summary:
        return cls(
            0, np.zeros(size, dtype=np.int64), np.zeros(size), np.zeros(n_columns, dtype=np.int64)
        )

    def __add__(self, other: Summary) -> Summary:
        return self._combine(other, operator.add)

    def __sub__(self, other: Summary) -> Summary:
        """The summary of a set less a subset of it (a sliding window's oldest bucket)."""
        return self._combine(other, operator.sub)

    @classmethod
    def total(cls, summaries: Sequence[Summary]) -> Summary:
        """The merge of ``summaries`` (one or more), bit for bit what adding them one after
        the other gives, in one pass a field: a low-traffic model's step merges a dozen
        buckets, and a merge costs more in calls than in arithmetic.

        >>> layout = Layout.from_columns({"x": np.arange(100.0)}, bins=4)
        >>> parts = [layout.fold({"x": np.array([v])}) for v in (1.0, 60.0, 61.0)]
        >>> Summary.total(parts).counts.tolist(), Summary.total(parts).n
        ([1, 0, 2, 0], 3)
        """
        if len(summaries) == 1:
            return summaries[0]
        dicts = [s.__dict__ for s in summaries]
        out = object.__new__(cls)
        combined = out.__dict__ = dict(dicts[0])
        columns = zip(*map(_always_of, dicts))
        combined.update(zip(_ALWAYS, map(operator.call, _ALWAYS_REDUCERS, columns)))
        for name in _SCORE_BINS:  # an empty one is all zeros (integers: any order is exact)
            if counted := [d[name] for d in dicts if len(d[name])]:
                combined[name] = np.add.reduce(counted)
        return out

    def _combine(self, other: Summary, op: Callable[[Any, Any], Any]) -> Summary:
        a, b = self.__dict__, other.__dict__
        # the fields set at once, in their order (a's): stage 2 merges every bucket
        out = object.__new__(Summary)
        combined = out.__dict__ = dict(a)
        combined.update(zip(_ALWAYS, map(op, _always_of(a), _always_of(b))))
        _combine_score_bins(combined, a, b, op)
        return out

    def count_label(self, score_bin: int, positive: bool, bins: int) -> None:
        """Count a labelled event of a binary model in its positive score's bin (of ``bins``)."""
        if not len(self.score_positives):
            self.score_positives, self.score_negatives = np.zeros((2, bins), dtype=np.int64)
        (self.score_positives if positive else self.score_negatives)[score_bin] += 1

    def to_dict(self) -> dict:
        """Plain form for the wire (orjson serialises the arrays); the score bins only where
        counted."""
        d = dict(self.__dict__)
        for name in _SCORE_BINS:
            if not len(d[name]):
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        """From :meth:`to_dict`'s form (its zero scalars may be left out), with arrays as
        arrays, lists or little-endian bytes."""
        values = {**_TEMPLATE, **d}  # in field order
        for name in _ARRAYS.keys() & d.keys():
            values[name] = _array(name, d[name])
        if len(values) == len(_TEMPLATE) and _GIVEN <= d.keys():  # the fields set at once
            out = object.__new__(cls)
            out.__dict__ = values
            return out
        return cls(**{name: values[name] for name in d})  # fills defaults, or says what is wrong


#: the array fields and their dtype (little-endian on the wire)
_ARRAYS = {
    name: np.dtype(dtype)
    for name, dtype in {
        "counts": "<i8",
        "sums": "<f8",
        "missing": "<i8",
        "latency": "<i8",
        "score_positives": "<i8",
        "score_negatives": "<i8",
    }.items()
}
#: the array fields a summary holds only for a binary model that estimates its performance
_SCORE_BINS = ("score_positives", "score_negatives")


def _combine_score_bins(out: dict, a: dict, b: dict, op: Callable[[Any, Any], Any]) -> None:
    """``out``'s score bins as ``op`` of ``a``'s and ``b``'s. Mostly empty in both, and then
    left shared (an empty array never changes)."""
    for name in _SCORE_BINS:
        if len(a[name]) or len(b[name]):
            out[name] = op(*_same_length(a[name], b[name]))


def _same_length(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two bin-count arrays, an empty one (a summary without those bins) as zeros like the
    other."""
    if len(a) == len(b):
        return a, b
    return (np.zeros_like(b), b) if not len(a) else (a, np.zeros_like(a))


def _array(name: str, value) -> np.ndarray:
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype=_ARRAYS[name])
    return np.asarray(value, dtype=_ARRAYS[name])


#: the fields every summary holds (all but the score bins), and a function reading them all
#: off a summary's ``__dict__``
_ALWAYS = tuple(f.name for f in fields(Summary) if f.name not in _SCORE_BINS)
_always_of = itemgetter(*_ALWAYS)
#: how :meth:`Summary.total` adds up each of :data:`_ALWAYS` over its summaries, first to last:
#: numpy's reduction of a list along its first axis adds row after row, as ``+`` one at a time;
#: a float one from -0.0, the one zero that leaves any first row as it is (numpy's own start,
#: 0.0, turned a bin whose sums are all -0.0 into 0.0, which ``+`` keeps)
_ALWAYS_REDUCERS = tuple(
    (
        partial(reduce, operator.add)
        if name not in _ARRAYS
        else partial(np.add.reduce, initial=-0.0)
        if _ARRAYS[name].kind == "f"
        else np.add.reduce
    )
    for name in _ALWAYS
)
#: every field in order, with its default where :meth:`Summary.from_dict` may fill it in: a
#: scalar's, and no score bins (an empty array, never changed in place, may be shared)
_TEMPLATE = {
    f.name: np.zeros(0, dtype=np.int64) if f.name in _SCORE_BINS else f.default
    for f in fields(Summary)
}
#: the fields :meth:`Summary.from_dict` needs to skip ``__init__``: those without a default, and
#: the latency histogram (each summary's own array)
_GIVEN = {"n", "counts", "sums", "missing", "latency"}


class Packed:
    """A :class:`Summary` in little memory, for the sliding window's ring: its bin counts and
    sums, and its latency histogram, as their occupied bins when most are empty. A low-traffic
    model's bucket holds a few events in a few of its hundreds of bins: 1,000 models at 10
    events/s keep 240 buckets each in a one-minute window, 1.7 GB of arrays dense with 355
    bins a bucket. :meth:`unpack` gives the summary back exactly (a bin's sum is 0 where its
    count is, in every sum of stage 1's summaries).

    >>> layout = Layout.from_columns({"x": np.arange(1000.0)}, bins=100)
    >>> summary = layout.fold({"x": np.array([3.0, 4.0, 500.0])})
    >>> packed = Packed(summary)
    >>> packed.n, packed.nbytes < summary.counts.nbytes   # 2 occupied bins of 100
    (3, True)
    >>> back = packed.unpack()
    >>> back.counts.nonzero()[0].tolist(), back.sums[[0, 50]].tolist()
    ([0, 50], [7.0, 500.0])
    """

    __slots__ = ("n", "_fields", "_scores", "_bins", "_latency")

    def __init__(self, summary: Summary):
        d = summary.__dict__
        self.n: int = d["n"]
        self._fields = _kept_of(d)
        self._scores = _scores_of(d)
        self._bins = _occupied(d["counts"], d["sums"])
        self._latency = _occupied(d["latency"])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays' data."""
        arrays = (*self._bins, *self._latency)
        return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))

    def unpack(self) -> Summary:
        """The summary, its bins and latency histogram dense again, in arrays of its own."""
        values = dict(zip(_KEPT, self._fields))
        values.update(zip(_SCORE_BINS, self._scores))
        values["counts"], values["sums"] = _dense(*self._bins)
        (values["latency"],) = _dense(*self._latency)
        out = object.__new__(Summary)
        out.__dict__ = values
        return out

    def add_to(self, total: Summary) -> None:
        """``total`` plus this summary, in place (:meth:`subtract_from`)."""
        self._merge_into(total, operator.add)

    def subtract_from(self, total: Summary) -> None:
        """``total`` less this summary, in place: for a summary no one else holds (the
        window's sum, just made), so that a slide makes no dense copy of the bucket leaving.
        The same values, bit for bit, as ``total - self.unpack()``."""
        self._merge_into(total, operator.sub)

    def _merge_into(self, total: Summary, op: Callable[[Any, Any], Any]) -> None:
        d = total.__dict__
        d.update(zip(_KEPT, map(op, _kept_of(d), self._fields)))
        if len(self._scores[0]) or len(d[_SCORE_BINS[0]]):  # both score bins, or neither
            _combine_score_bins(d, d, dict(zip(_SCORE_BINS, self._scores)), op)
        for names, packed in zip(_PACKED, (self._bins, self._latency)):
            if isinstance(packed[0], int):
                _, at, *values = packed
                for name, occupied in zip(names, values):
                    d[name][at] = op(d[name][at], occupied)
            else:
                for name, dense in zip(names, packed):
                    _IN_PLACE[op](d[name], dense, out=d[name])

    def sparse_dict(self) -> dict:
        """:meth:`Summary.to_dict`'s form without a dense array made: each packed array as ``[size,
        positions, values]`` (the form :func:`coalmine.partials.encode_summaries` sends a
        mostly empty array in)."""
        d = dict(zip(_KEPT, self._fields))
        d.update((name, v) for name, v in zip(_SCORE_BINS, self._scores) if len(v))
        for names, packed in zip(_PACKED, (self._bins, self._latency)):
            if isinstance(packed[0], int):
                size, at, *values = packed
                d.update((name, [size, at, v]) for name, v in zip(names, values))
            else:
                d.update(zip(names, packed))
        return d


#: the fields :class:`Packed` keeps as they are: the scalars and the missing counts, and the
#: score bins
_KEPT = tuple(
    f.name for f in fields(Summary) if f.name not in ("counts", "sums", "latency", *_SCORE_BINS)
)
_kept_of = itemgetter(*_KEPT)
_scores_of = itemgetter(*_SCORE_BINS)
#: the arrays :class:`Packed` packs, by the occupied bins they share
_PACKED = (("counts", "sums"), ("latency",))
_IN_PLACE = {operator.add: np.add, operator.sub: np.subtract}


def _occupied(first: np.ndarray, *more: np.ndarray) -> tuple:
    """Arrays of one length as (size, positions where ``first`` is not 0, their values in
    each) when few are: 16 bytes an occupied bin, against 8 a bin dense; else as they are."""
    (at,) = first.nonzero()
    if 2 * len(at) >= len(first):
        return (first, *more)
    return (len(first), at, first[at], *(a[at] for a in more))


def _dense(*packed) -> tuple[np.ndarray, ...]:
    """:func:`_occupied`'s arrays back, each a new one (its summary may be changed in place)."""
    if not isinstance(packed[0], int):  # kept as they were
        return tuple(a.copy() for a in packed)
    size, at, *values = packed
    out = []
    for occupied in values:
        dense = np.zeros(size, occupied.dtype)
        dense[at] = occupied
        out.append(dense)
    return tuple(out)


def values_of(events: list[dict], name: str) -> list:
    """Every event's ``name``; ``KeyError`` if one lacks it. A batch that carries its columns
    already (``events.columns``, as :func:`coalmine.events.split_valid` returns it) hands them
    over instead of extracting them again."""
    columns = getattr(events, "columns", None)
    values = columns.get(name) if columns is not None else None
    if values is not None and len(values) == len(events):
        return values
    return list(map(itemgetter(name), events))


def column_arrays(
    layout: Layout, rows: list[dict], predictions: list, scores: list[dict | None] | None = None
) -> dict[str, np.ndarray]:
    """Feature dicts, predictions and class-score dicts (one each per event; ``scores`` only
    when the layout has ``scores.<class>`` columns) -> one array per column, ready for
    :meth:`Layout.fold`.

    Numeric columns become float arrays with NaN for missing values; a value of the wrong
    type raises ``TypeError`` naming the column (the caller dead-letters that event): a string,
    a numeric one ("1.23") too, as the fast decoder (:mod:`coalmine.decode`) refuses it. Derived
    columns are left out: :meth:`~coalmine.streams.baseline.Baseline.with_derived` adds them.
    """
    numeric = [
        n
        for n in layout.names
        if layout.kinds[n] == NUMERIC and not is_model_output(n) and not is_derived(n)
    ]
    out: dict[str, np.ndarray] = {}
    if len(numeric) > 1:
        try:  # the common case, every feature present: one C-level lookup per event
            grab = itemgetter(*numeric)
            cells = list(chain.from_iterable(map(grab, rows)))
            if str in set(map(type, cells)):  # numpy would parse "1.23"
                raise TypeError
            matrix = np.array(cells, dtype=float).reshape(len(rows), len(numeric))
            out = {name: matrix[:, j] for j, name in enumerate(numeric)}
        except (KeyError, TypeError, ValueError):
            out = {}  # a missing key or a bad value: the per-column path below says which
    for name in layout.names:
        if name in out or is_derived(name):  # computed from the others before folding
            continue
        if name == PREDICTION:
            values = predictions
        elif name.startswith(SCORES):
            values = [(s or {}).get(name[len(SCORES) :]) for s in scores or [None] * len(rows)]
        else:
            values = [r.get(name) for r in rows]
        if layout.kinds[name] == NUMERIC:
            if str in set(map(type, values)):
                raise TypeError(name)
            out[name] = np.array(values, dtype=float)
        else:
            out[name] = np.array([None if v is None else str(v) for v in values], dtype=object)
    return out
