"""Multivariate drift: how far each event lies from the principal subspace of the reference's
features, as a derived column (:mod:`coalmine.streams.derived`) that check
``multivariate_drift`` watches with the window tests and rank CUSUMs of any numeric feature.

Two features that keep their marginals but stop moving together give nothing to a per-feature
test; their events leave the reference's principal subspace, and their reconstruction error
grows.
"""

from __future__ import annotations

import numpy as np

from coalmine.streams.derived import DERIVED

#: reference rows with every feature present needed to fit the principal components
MIN_ROWS = 100


class ReconstructionError:
    r"""PCA reconstruction error of an event's standardised numeric features.

    Fitted on the reference: each feature is standardised with the reference's mean and
    standard deviation, :math:`z_j = (x_j - \mu_j) / \sigma_j`; the SVD of the standardised
    complete rows :math:`Z = U S V^\top` gives principal axes; the first :math:`k` are kept,
    the fewest whose share of variance :math:`\sum_{i \le k} s_i^2 / \sum_i s_i^2` reaches
    ``variance_share``, and never all :math:`d` (the error would be 0 everywhere). An event's
    error is the norm of what those axes leave out,

    .. math:: e = \lVert z - V_k V_k^\top z \rVert_2 .

    A missing feature is taken at the reference mean (:math:`z_j = 0`), so the other features
    still speak.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.standard_normal(1000)
    >>> reference = {"a": a, "b": a + 0.1 * rng.standard_normal(1000)}
    >>> pca = ReconstructionError.fit(reference, ["a", "b"], 0.9)
    >>> pca.components.shape
    (2, 1)
    >>> together = pca({"a": np.array([1.0]), "b": np.array([1.0])})
    >>> apart = pca({"a": np.array([1.0]), "b": np.array([-1.0])})
    >>> bool(together[0] < 0.1 < 1 < apart[0])
    True

    References
    ----------
    Jolliffe (2002), Principal Component Analysis, 2nd ed., section 10.1 (detecting outliers
    by the residual of the last components); NannyML's data reconstruction drift detector.
    """

    name = DERIVED + "pca_reconstruction_error"
    check = "multivariate_drift"

    def __init__(self, names: list[str], mean: np.ndarray, sd: np.ndarray, components: np.ndarray):
        self.names, self.mean, self.sd, self.components = names, mean, sd, components

    @classmethod
    def fit(
        cls, columns: dict[str, np.ndarray], names: list[str], variance_share: float
    ) -> ReconstructionError | None:
        """Fit on the reference's ``columns``; None with fewer than two non-constant
        features or fewer than :data:`MIN_ROWS` complete rows."""
        if len(names) < 2:
            return None
        values = np.stack([columns[n] for n in names], axis=1)
        rows = values[~np.isnan(values).any(axis=1)]
        if len(rows) < MIN_ROWS:
            return None
        sd = rows.std(axis=0)
        varying = sd > 0
        if varying.sum() < 2:
            return None
        rows, sd = rows[:, varying], sd[varying]
        mean = rows.mean(axis=0)
        _, s, vt = np.linalg.svd((rows - mean) / sd, full_matrices=False)
        share = np.cumsum(s**2) / (s**2).sum()
        k = min(int(np.searchsorted(share, variance_share)) + 1, len(s) - 1)
        kept = [n for n, v in zip(names, varying) if v]
        return cls(kept, mean, sd, vt[:k].T)

    def __call__(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        z = (np.stack([columns[n] for n in self.names], axis=1) - self.mean) / self.sd
        z[np.isnan(z)] = 0.0
        residual = z - (z @ self.components) @ self.components.T
        return np.sqrt(np.einsum("ij,ij->i", residual, residual))
