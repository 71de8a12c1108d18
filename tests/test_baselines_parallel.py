"""A cold start calibrates models with references of their own on every core, and gets the
very thresholds (and errors) that calibrating them one after another gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coalmine import baselines
from coalmine.baselines import build_baselines
from coalmine.cache import FileCalibrationCache
from coalmine.config import parse_config
from coalmine.streams import calibration


def write_reference(path: Path, shape: tuple[int, int], seed: int) -> None:
    """Rows of normal features (the fewest rows calibrated: 100)."""
    values = np.random.default_rng(seed).normal(size=shape)
    lines = "".join(",".join(f"{v:.4f}" for v in row) + "\n" for row in values)
    path.write_text(",".join(f"f{j}" for j in range(shape[1])) + "\n" + lines)


def config_of(tmp_path: Path, shapes: list[tuple[int, int]]):
    """One model per entry of ``shapes`` (rows, features), each on a reference of its own."""
    for i, shape in enumerate(shapes):
        write_reference(tmp_path / f"ref{i}.csv", shape, seed=i)
    models = [{"name": f"m{i}", "reference": f"ref{i}.csv"} for i in range(len(shapes))]
    return parse_config({"models": models}, tmp_path)


@pytest.fixture
def calibrated_here(monkeypatch, count_calls) -> list[int]:
    """Counts the numeric columns this process calibrates; two cores, whatever the machine."""
    calls = count_calls(calibration, "calibrate_numeric")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    return calls


def build(config, cache_dir: Path, monkeypatch, parallel: bool):
    monkeypatch.setattr(baselines, "PARALLEL_MIN_COLUMNS", 1 if parallel else 10**9)
    return build_baselines(config, cache=FileCalibrationCache(cache_dir))


def test_parallel_calibration_gives_the_sequential_thresholds(
    tmp_path, monkeypatch, calibrated_here
):
    config = config_of(tmp_path, [(1000, 2)] * 3)
    parallel = build(config, tmp_path / "cold1", monkeypatch, parallel=True)
    assert calibrated_here[0] == 0  # the pool's processes calibrated every column
    sequential = build(config, tmp_path / "cold2", monkeypatch, parallel=False)
    assert calibrated_here[0] == 6
    for name, baseline in sequential.items():
        for ours, theirs in zip(parallel[name].columns, baseline.columns, strict=True):
            assert ours.fits.keys() == theirs.fits.keys()
            for stat, fit in theirs.fits.items():
                for part in ("a", "b", "floor", "power"):
                    assert np.array_equal(getattr(ours.fits[stat], part), getattr(fit, part))


def test_a_reference_that_fails_in_the_pool_is_reported_as_alone(
    tmp_path, monkeypatch, calibrated_here
):
    """100 rows calibrate, but leave the joint CUSUM no threshold: the pool's process fails
    after storing its fits, and the build here, reading them, reports it by model and file as
    the sequential build does."""
    config = config_of(tmp_path, [(1000, 1), (100, 3)])
    errors = []
    for parallel, cold in ((True, "cold1"), (False, "cold2")):
        with pytest.raises(ValueError, match="^model m1: reference .*ref1.csv: cannot") as exc:
            build(config, tmp_path / cold, monkeypatch, parallel)
        errors.append(str(exc.value))
        assert calibrated_here[0] == (0 if parallel else 4)
    assert errors[0] == errors[1]


def test_a_cache_that_cannot_be_written_calibrates_here(tmp_path, monkeypatch, calibrated_here):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    config = config_of(tmp_path, [(1000, 1)] * 2)
    assert set(build(config, blocked, monkeypatch, parallel=True)) == {"m0", "m1"}
    assert calibrated_here[0] == 2
