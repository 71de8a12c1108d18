"""A model's reference columns as the checks see them: bins, reference counts, rank scores and
tail fits per column (:class:`ColumnModel`), and every numeric column stacked into one block so
that each statistic is one numpy pass over all of them (:class:`NumericBlock`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from scipy import special

from coalmine.streams import calibration, drift
from coalmine.streams.sequential import CUSUM
from coalmine.streams.sketch import Summary


@dataclass
class ColumnModel:
    """What the checks know of one reference column."""

    name: str
    kind: str
    bins: slice
    ref_counts: np.ndarray
    ref_pos: np.ndarray
    edges: np.ndarray | None = None
    sd: float = 1.0
    missing_rate: float = 0.0
    #: the rank CUSUM's per-event score is ``rank_intercepts[b] + rank_slopes[b] * x`` for a value
    #: ``x`` in bin ``b`` (see :func:`coalmine.streams.drift.smoothed_rank_coefficients`)
    rank_intercepts: np.ndarray | None = None
    rank_slopes: np.ndarray | None = None
    #: mean and standard deviation of that score over the reference's own values
    rank_mean: float = 0.5
    rank_sd: float = 0.0
    fits: dict[str, calibration.TailFit] = field(default_factory=dict)

    def smoothed_ranks(self, values: np.ndarray) -> np.ndarray:
        """Each value's smoothed reference rank (:func:`coalmine.streams.drift.smoothed_ranks`);
        numeric columns only, once their rank coefficients are set."""
        edges, intercepts, slopes = self.edges, self.rank_intercepts, self.rank_slopes
        assert edges is not None and intercepts is not None and slopes is not None, (
            f"{self.name}: no rank coefficients (not a numeric column)"
        )
        return drift.smoothed_ranks(values, edges, intercepts, slopes)


@dataclass
class NumericBlock:
    """All numeric columns stacked one row each, so that one numpy pass per statistic
    evaluates them all (per-column calls cost more in overhead than in work). Columns with
    fewer bins (ties merge quantile edges) are padded at the top with empty bins, which
    change no statistic: KS and PSI terms of two empty bins are 0, an empty bin adds no
    Wasserstein mass and no CUSUM score."""

    columns: list[ColumnModel]
    bins: np.ndarray  # (columns, bins): indices into the flat summary arrays; -1 for padding
    edges: np.ndarray  # (columns, bins - 1), the last edge repeated over the padding
    top_bin: np.ndarray  # (columns,): each column's last real bin, the upper outer one
    rank_intercepts: np.ndarray  # (columns, bins)
    rank_slopes: np.ndarray  # (columns, bins)
    #: (bin mid-rank - 1/2)^2 per bin: the spread CUSUM's per-event score (Mood's scale score)
    spread_scores: np.ndarray  # (columns, bins)
    ref_counts: np.ndarray  # (columns, bins)
    #: (columns, bins): each bin's reference mean, and the bin's lower edge where the reference
    #: has no value (no mass: any point inside the bin pairs with the window's there)
    ref_pos: np.ndarray
    sd: np.ndarray  # (columns,): the winsorized reference's SD (1 where 0), Wasserstein's unit
    #: KS's fits stacked one row per column, then Wasserstein's: one pass thresholds both
    window_fits: calibration.TailFit

    @classmethod
    def stack(cls, columns: list[ColumnModel]) -> NumericBlock:
        width = max(c.bins.stop - c.bins.start for c in columns)

        def rows(arrays, size=width, **pad):
            return np.stack([np.pad(a, (0, size - len(a)), **pad) for a in arrays])

        ref = rows([c.ref_counts for c in columns])
        p = ref / np.maximum(ref.sum(axis=1, keepdims=True), 1)
        sd = np.array([c.sd for c in columns])
        return cls(
            columns,
            rows([np.arange(c.bins.start, c.bins.stop) for c in columns], constant_values=-1),
            rows([c.edges for c in columns], width - 1, mode="edge"),
            np.array([c.bins.stop - c.bins.start - 1 for c in columns]),
            rows([c.rank_intercepts for c in columns]),
            rows([c.rank_slopes for c in columns]),
            (np.cumsum(p, axis=1) - p / 2 - 0.5) ** 2,
            ref,
            rows([_positions_inside(c) for c in columns], mode="edge"),
            np.where(sd > 0, sd, 1.0),
            calibration.TailFit.stack(
                [c.fits["ks"] for c in columns] + [c.fits["wasserstein"] for c in columns]
            ),
        )

    def _gather(self, flat: np.ndarray) -> np.ndarray:
        """(columns, bins) from a summary's flat array; padding reads the appended 0."""
        return np.concatenate((flat, _ZERO[flat.dtype.kind]))[self.bins]

    def statistics(self, window: Summary, q: float) -> dict[str, tuple]:
        """Column name -> (events with a value, KS, its p-value, its threshold, Wasserstein-1 /
        reference SD, its threshold, PSI) on ``window``, thresholds at tail probability ``q``.
        One pass: KS is the largest difference of the CDFs that Wasserstein integrates
        (:func:`~coalmine.streams.drift.paired_wasserstein`); the reference's side is
        computed once (:attr:`_reference`)."""
        ref_n, ref_p, ref_p_floored = self._reference
        counts = self._gather(window.counts)
        n = counts.sum(axis=1)
        win_p = counts / np.maximum(n, 1)[:, None]
        # an empty bin (no mass) sits on the reference's position, inside the bin
        positions = drift.bin_positions(counts, self._gather(window.sums), self.edges, self.ref_pos)
        positions[self._rows, self.top_bin] = self.edges[:, -1]  # winsorized, as unpadded
        w1, after = drift.paired_wasserstein(self.ref_pos, ref_p, positions, win_p)
        ks = np.abs(after).max(axis=1)
        n_eff = drift.effective_n(ref_n, n)
        psi = drift.psi_of_proportions(ref_p_floored, np.maximum(win_p, drift.EPS))
        # the fits are of sqrt(n_eff) x statistic: back to the statistic's own scale
        scale = np.sqrt(np.maximum(n_eff, 1e-12))
        ks_threshold, w_threshold = (
            self.window_fits.threshold(np.tile(n, 2), q).reshape(2, -1) / scale
        ).tolist()
        rows = zip(
            n.tolist(),
            ks.tolist(),
            special.kolmogorov(ks * np.sqrt(n_eff)).tolist(),
            ks_threshold,
            (w1 / self.sd).tolist(),
            w_threshold,
            psi.tolist(),
        )
        return dict(zip((c.name for c in self.columns), rows))

    @cached_property
    def _reference(self) -> tuple[np.ndarray, ...]:
        """The reference's events per column, its bin proportions, and those floored at
        :data:`~coalmine.streams.drift.EPS` (PSI's)."""
        n = self.ref_counts.sum(axis=1)
        p = self.ref_counts / np.maximum(n, 1)[:, None]
        return n, p, np.maximum(p, drift.EPS)

    @cached_property
    def _rows(self) -> np.ndarray:
        return np.arange(len(self.columns))

    def new_cusums(self, k: float) -> CUSUM:
        """The location and spread CUSUMs of the block's columns, as one CUSUM whose first
        rows are each column's location and the next its spread (:meth:`update_cusums`): on
        the events' smoothed reference ranks and on their squared distance from the median
        rank. Ranks bound each event's weight, so heavy tails do not page anyone; a location
        shift of d standard deviations moves the mean rank by about d rank standard deviations
        on normal data, and by more on features with many ties, where a small shift moves
        values past whole steps of the reference CDF. One CUSUM for both: one numpy pass a
        bucket, not two."""
        p = self._reference[1]
        spread_mean = (p * self.spread_scores).sum(axis=1)
        spread_sd = np.sqrt((p * (self.spread_scores - spread_mean[:, None]) ** 2).sum(axis=1))
        return CUSUM(
            np.concatenate(([c.rank_mean for c in self.columns], spread_mean)),
            np.concatenate(([c.rank_sd for c in self.columns], spread_sd)),
            k,
            math.inf,
        )

    def update_cusums(
        self, cusums: CUSUM, bucket: Summary, threshold: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Feed a bucket to the rank CUSUMs (:meth:`new_cusums`): the location rows take each
        event's smoothed reference rank (linear in the value within a bin, so the bin counts
        and sums give the exact sum), the spread rows its bin's squared distance from the
        median rank. Returns each column's events and sum of ranks."""
        at, count_weights, sum_weights = self._bucket_weights
        # events twice (location and spread rows), then sums of ranks and of spread scores
        totals = bucket.counts[at] @ count_weights + bucket.sums[at] @ sum_weights
        k = len(self.columns)
        cusums.threshold = threshold
        cusums.update(totals[: 2 * k], totals[2 * k :])
        return totals[:k], totals[2 * k : 3 * k]

    @cached_property
    def _bucket_weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The numeric columns' bins in a summary's flat arrays, and the weights that turn a
        bucket's counts and sums there into, per column, its events (twice), its sum of ranks
        and its sum of spread scores (:meth:`update_cusums`): two matrix-vector products a
        bucket, not a pass per statistic over padded rows."""
        real = self.bins >= 0
        column = np.nonzero(real)[0]  # of each real bin, row by row
        k, at = len(self.columns), np.arange(len(column))
        count_weights, sum_weights = np.zeros((2, len(column), 4 * k))
        count_weights[at, column] = count_weights[at, k + column] = 1.0
        count_weights[at, 2 * k + column] = self.rank_intercepts[real]
        sum_weights[at, 2 * k + column] = self.rank_slopes[real]
        count_weights[at, 3 * k + column] = self.spread_scores[real]
        return self.bins[real], count_weights, sum_weights


def _positions_inside(col: ColumnModel) -> np.ndarray:
    """A numeric column's reference bin means, each empty bin's at its lower edge: a point of
    no mass inside its bin, where :func:`~coalmine.streams.drift.paired_wasserstein` pairs it
    with the window's (an empty bin's mean is 0, which may lie in another bin)."""
    assert col.edges is not None, f"numeric column {col.name} without bin edges"
    return np.where(col.ref_counts > 0, col.ref_pos, np.append(col.ref_pos[0], col.edges))


#: a 0 of a summary's integer or float arrays' type, to pad them (np.append costs twice as much)
_ZERO = {"i": np.zeros(1, dtype=np.int64), "f": np.zeros(1)}
