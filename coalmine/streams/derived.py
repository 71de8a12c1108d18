"""Derived columns: numbers computed from an event's own columns before folding, watched like any
feature.

A derived column is a function of a batch's columns (one array per column, as
:meth:`~coalmine.streams.sketch.Layout.fold` takes them) to one float array, NaN where it is
undefined. The :class:`~coalmine.streams.baseline.Baseline` computes it on the reference rows,
so its bins are the reference's quantiles; stage 1 computes it on every batch just before
folding (:func:`with_derived`). From then on it is a numeric column like the others: the window
tests and the rank CUSUMs watch it under the check it names, with thresholds calibrated on its
reference values and counted in the model's false-alarm budget. Being a per-event number folded
into bins, it merges across partitions like every other column.

Derived columns are named ``derived.<what>``; stage 1 never looks for them in an event.

* :class:`ScoreMargin`, :class:`ScoreEntropy`: the model's own uncertainty, from its class
  scores (check ``uncertainty_drift``; also what ``estimated_performance`` is calibrated on);
* :class:`coalmine.streams.multivariate.ReconstructionError`: the distance of an event's
  standardised features from the reference's principal subspace (check ``multivariate_drift``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from coalmine.streams.reference import SCORES

DERIVED = "derived."


def is_derived(name: str) -> bool:
    """Whether ``name`` is a derived column (computed, never read from an event).

    >>> is_derived("derived.score_margin"), is_derived("f0")
    (True, False)
    """
    return name.startswith(DERIVED)


class DerivedColumn(Protocol):
    """A column computed from a batch's columns: its ``name``, the ``check`` that watches it,
    and its values for a batch (float, NaN where undefined)."""

    name: str
    check: str

    def __call__(self, columns: dict[str, np.ndarray]) -> np.ndarray: ...


def with_derived(
    columns: dict[str, np.ndarray], derived: list[DerivedColumn]
) -> dict[str, np.ndarray]:
    """``columns`` with each derived column added (the same dict when there are none, so a
    model without derived columns pays nothing)."""
    if not derived:
        return columns
    return {**columns, **{d.name: d(columns) for d in derived}}


def _score_matrix(columns: dict[str, np.ndarray], classes: list[str]) -> np.ndarray:
    """(events, classes) scores; a single class's score ``p`` is a binary model's, so the
    other class gets ``1 - p``."""
    scores = np.stack([columns[SCORES + c] for c in classes], axis=1)
    return np.column_stack([scores, 1 - scores]) if len(classes) == 1 else scores


def _n_classes(classes: list[str]) -> int:
    """Classes a model chooses from: a single class score is a binary model's."""
    return max(len(classes), 2)


class ScoreMargin:
    r"""The top class score's margin over the runner-up: :math:`m = s_{(1)} - s_{(2)}`, in
    :math:`[0, 1]`, 1 for a model sure of its answer, 0 for a tie. With one class score
    :math:`p` (a binary model), :math:`m = |2p - 1|`. NaN for an event without scores.

    Parameters
    ----------
    classes
        The classes whose ``scores.<class>`` columns the model's reference carries.

    Examples
    --------
    >>> margin = ScoreMargin(["0", "1"])
    >>> margin({"scores.0": np.array([0.1, 0.5, np.nan]), "scores.1": np.array([0.9, 0.5, np.nan])})
    array([0.8, 0. , nan])

    References
    ----------
    Scheffer, Decomain, Wrobel (2001), Active hidden Markov models for information extraction
    (the margin as a confidence measure).
    """

    name = DERIVED + "score_margin"
    check = "uncertainty_drift"

    def __init__(self, classes: list[str]):
        self.classes = classes

    def __call__(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        top2 = -np.partition(-_score_matrix(columns, self.classes), 1, axis=1)[:, :2]
        return top2[:, 0] - top2[:, 1]

    def top_score(self, margin: np.ndarray) -> np.ndarray:
        """The top class score a margin implies (what ``estimated_performance`` falls back
        to where the reference has no labelled rows): exact for a binary model,
        :math:`(1 + m) / 2`; with :math:`K` classes, that of the runner-ups tied,
        :math:`(1 + (K - 1) m) / K`.

        >>> ScoreMargin(["1"]).top_score(np.array([0.0, 0.6, 1.0])).tolist()
        [0.5, 0.8, 1.0]
        """
        k = _n_classes(self.classes)
        return (1 + (k - 1) * margin) / k


class ScoreEntropy:
    r"""Shannon entropy of the class scores, normalised to sum 1, in bits over
    :math:`\log_2 K`: :math:`H = -\sum_k p_k \log_2 p_k / \log_2 K`, 0 for a sure model, 1 when
    every class is as likely. NaN for an event without scores.

    Parameters
    ----------
    classes
        The classes whose ``scores.<class>`` columns the model's reference carries.

    Examples
    --------
    >>> entropy = ScoreEntropy(["1"])
    >>> entropy({"scores.1": np.array([1.0, 0.5])})
    array([0., 1.])

    References
    ----------
    Shannon (1948), A mathematical theory of communication.
    """

    name = DERIVED + "score_entropy"
    check = "uncertainty_drift"

    def __init__(self, classes: list[str]):
        self.classes = classes

    def __call__(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        p = _score_matrix(columns, self.classes)
        p = p / p.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, -p * np.log2(p), 0.0)
        # a NaN score makes the whole event's entropy NaN, as it has no scores to speak of
        terms[np.isnan(p)] = np.nan
        return terms.sum(axis=1) / np.log2(p.shape[1])

    def top_score(self, entropy: np.ndarray) -> np.ndarray:
        """The top class score an entropy implies (what ``estimated_performance`` falls back
        to where the reference has no labelled rows): exact for a binary model; with more
        classes, that of the runner-ups tied.

        >>> ScoreEntropy(["1"]).top_score(np.array([0.0, 0.469, 1.0])).round(2).tolist()
        [1.0, 0.9, 0.5]
        """
        k = _n_classes(self.classes)
        top = np.linspace(1 / k, 1, 1001)
        rest = (1 - top) / (k - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(top * np.log2(top) + np.where(rest > 0, (1 - top) * np.log2(rest), 0.0))
        # h falls as the top score rises: interpolate on the reversed table
        return np.interp(entropy, h[::-1] / np.log2(k), top[::-1])


#: the uncertainty measures by their setting (ModelSettings.uncertainty)
UNCERTAINTY: dict[str, type[ScoreMargin] | type[ScoreEntropy]] = {
    "margin": ScoreMargin,
    "entropy": ScoreEntropy,
}
