"""Calibration draws the null windows once per reference bin counts: columns (of one model or
of many) with the same counts share them, and a column's thresholds do not depend on the
columns calibrated before it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from coalmine.streams import Baseline, ModelSettings, ReferenceData, calibration

SETTINGS = ModelSettings(name="m", checks=("drift",))


@pytest.fixture
def windows_drawn(count_calls) -> list[int]:
    """Counts the stacks of null windows drawn, from no shared draws."""
    calls = count_calls(calibration, "simulate_windows")
    calibration.forget_draws()
    yield calls
    calibration.forget_draws()


def assert_same_fit(ours: calibration.TailFit, theirs: calibration.TailFit) -> None:
    for part in ("a", "b", "floor", "power"):
        assert np.array_equal(getattr(ours, part), getattr(theirs, part))


def test_columns_with_the_same_bin_counts_share_one_draw_of_windows(windows_drawn):
    """Two models whose references differ but bin alike (positive values squared or negated
    keep or reverse their order): the windows are drawn once, the KS fits are the same, each
    column's Wasserstein fit is its own but for the column both models have."""
    x = np.random.default_rng(1).lognormal(size=500)
    models = [
        Baseline(SETTINGS, ReferenceData({"a": x, "b": -x}, None)),
        Baseline(SETTINGS, ReferenceData({"a": x**2, "b": x}, None)),
    ]
    columns = [c for b in models for c in b.columns]
    assert all(np.array_equal(c.ref_counts, columns[0].ref_counts) for c in columns)
    assert windows_drawn[0] == len(calibration.GRID_N)
    for c in columns[1:]:
        assert_same_fit(c.fits["ks"], columns[0].fits["ks"])
    wasserstein = {c.fits["wasserstein"].a.tobytes() for c in columns[:3]}
    assert len(wasserstein) == 3
    assert_same_fit(columns[3].fits["wasserstein"], columns[0].fits["wasserstein"])


def test_a_columns_thresholds_do_not_depend_on_the_other_columns():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=400), rng.exponential(size=400)
    alone = Baseline(SETTINGS, ReferenceData({"x": x}, None)).columns[0]
    after_y = Baseline(SETTINGS, ReferenceData({"y": y, "x": x}, None)).columns[1]
    assert alone.name == after_y.name == "x"
    for stat, fit in alone.fits.items():
        assert_same_fit(after_y.fits[stat], fit)


def test_the_simulated_wasserstein_is_the_live_statistic():
    """The calibration's sort-free distance equals scipy's, on windows whose bin means
    cross their neighbours' (few events in a bin) as on those that do not."""
    rng = np.random.default_rng(3)
    ref = np.array([40, 90, 120, 60, 3, 25])
    pos = np.array([-3.0, -1.0, 0.0, 0.5, 0.6, 2.0])
    spread = np.array([0.0, 0.4, 0.3, 0.2, 0.5, 0.0])
    for n in (10, 10_000):
        win = calibration.simulate_windows(ref, n, 500, rng)
        ours = calibration.simulated_wasserstein(pos, spread, ref, win, np.random.default_rng(4))
        noise = np.random.default_rng(4).standard_normal(win.shape) * spread
        means = pos + noise * np.sqrt(1 / np.maximum(win, 1) + 1 / ref)
        exact = [stats.wasserstein_distance(pos, m, ref, w) for m, w in zip(means, win)]
        assert np.allclose(ours, exact, rtol=1e-9, atol=1e-12)
