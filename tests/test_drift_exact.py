"""Binned drift statistics against the exact ones (scipy) on the same samples.

The tolerances are the bounds proved in :mod:`coalmine.streams.drift`: KS may under-read by
at most the largest bin mass; Wasserstein (of the samples winsorized at the outer bin edges)
is off by at most the mass-weighted within-bin ranges of the two samples.
"""

import numpy as np
import pytest
from scipy import stats

from coalmine.simulator import load_shuttle
from coalmine.streams import drift
from coalmine.streams.sketch import Layout


def _binned(ref: np.ndarray, win: np.ndarray, bins: int):
    layout = Layout.from_columns({"x": ref}, bins=bins)
    r, w = layout.fold({"x": ref}), layout.fold({"x": win})
    return layout, r, w


def _ks_bound(layout, r, w):
    p = r.counts / r.counts.sum()
    q = w.counts / w.counts.sum()
    return float(np.maximum(p, q).max())


def _within_bin_range(layout, values):
    idx = np.searchsorted(layout.edges["x"], values, side="right")
    width = np.zeros(len(layout.edges["x"]) + 1)
    for k in np.unique(idx):
        v = values[idx == k]
        width[k] = v.max() - v.min()
    counts = np.bincount(idx, minlength=len(width))
    return float((counts / len(values)) @ width)


def _winsorized(layout, values):
    return np.clip(values, layout.edges["x"][0], layout.edges["x"][-1])


def _binned_wasserstein(layout, r, w):
    e = layout.edges["x"]
    return drift.wasserstein_statistic(
        drift.bin_positions(r.counts, r.sums, e),
        r.counts,
        drift.bin_positions(w.counts, w.sums, e),
        w.counts,
    )


def _cases():
    rng = np.random.default_rng(7)
    X, _, _ = load_shuttle()
    yield "normal-shift", rng.normal(0, 1, 5000), rng.normal(0.3, 1, 3000)
    yield "lognormal-scale", rng.lognormal(0, 1, 5000), rng.lognormal(0, 1.4, 2000)
    yield "uniform-same", rng.uniform(0, 1, 4000), rng.uniform(0, 1, 4000)
    yield "shuttle-f0", X[:5000, 0], X[5000:8000, 0] + 0.5 * X[:, 0].std()
    yield "shuttle-f4-ties", X[:5000, 4], X[20000:22000, 4]


@pytest.mark.parametrize("bins", [16, 32, 64])
@pytest.mark.parametrize("name,ref,win", list(_cases()))
def test_ks_within_bin_mass_of_scipy(name, ref, win, bins):
    layout, r, w = _binned(ref, win, bins)
    exact = stats.ks_2samp(ref, win).statistic
    binned = float(drift.ks_statistic(r.counts, w.counts))
    assert binned <= exact + 1e-12
    assert exact - binned <= _ks_bound(layout, r, w) + 1e-12


@pytest.mark.parametrize("bins", [16, 32, 64])
@pytest.mark.parametrize("name,ref,win", list(_cases()))
def test_wasserstein_within_bin_range_of_scipy(name, ref, win, bins):
    layout, r, w = _binned(ref, win, bins)
    ref, win = _winsorized(layout, ref), _winsorized(layout, win)
    exact = stats.wasserstein_distance(ref, win)
    binned = _binned_wasserstein(layout, r, w)
    bound = _within_bin_range(layout, ref) + _within_bin_range(layout, win)
    assert abs(exact - binned) <= bound + 1e-9


def test_wasserstein_practical_accuracy_on_smooth_data():
    """On a continuous feature with 32 quantile bins, the binned distance is within 2% of
    the exact one on the same (winsorized) samples: the number the README quotes."""
    rng = np.random.default_rng(3)
    ref, win = rng.normal(0, 1, 20000), rng.normal(0.5, 1.2, 20000)
    layout, r, w = _binned(ref, win, 32)
    exact = stats.wasserstein_distance(_winsorized(layout, ref), _winsorized(layout, win))
    assert _binned_wasserstein(layout, r, w) == pytest.approx(exact, rel=0.02)


def test_chi2_matches_scipy_contingency():
    ref = np.array([120, 80, 40, 0])
    win = np.array([100, 110, 20, 7])
    stat, dof = drift.chi2_statistic(ref, win)
    expected = stats.chi2_contingency(np.stack([ref, win]), correction=False)
    assert float(stat) == pytest.approx(expected.statistic)
    assert int(dof) == expected.dof


def test_psi_and_js_match_direct_formulas():
    ref, win = np.array([30, 50, 20]), np.array([10, 60, 30])
    p, q = ref / ref.sum(), win / win.sum()
    assert float(drift.psi_statistic(ref, win)) == pytest.approx(((q - p) * np.log(q / p)).sum())
    from scipy.spatial.distance import jensenshannon

    assert float(drift.js_statistic(ref, win)) == pytest.approx(jensenshannon(p, q, base=2) ** 2)


def test_summaries_merge_exactly_across_partitions():
    """Folding a batch whole or split over partitions gives the same counts."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=2000)
    layout = Layout.from_columns({"x": ref}, bins=32)
    win = np.concatenate([rng.normal(size=999), [np.nan]])
    whole = layout.fold({"x": win})
    parts = [layout.fold({"x": chunk}) for chunk in np.array_split(win, 7)]
    merged = sum(parts[1:], parts[0])
    assert np.array_equal(whole.counts, merged.counts)
    assert np.allclose(whole.sums, merged.sums)
    assert merged.missing.tolist() == [1] and merged.n == 1000
