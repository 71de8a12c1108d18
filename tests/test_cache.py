"""The calibration cache never hands fits of other statistics' code to a baseline."""

from coalmine import cache as calibration_cache
from coalmine.cache import FileCalibrationCache


def test_fits_stored_by_other_code_are_not_read(tmp_path, monkeypatch):
    FileCalibrationCache(tmp_path).store("key", [1.5])
    assert FileCalibrationCache(tmp_path).load("key") == [1.5]
    monkeypatch.setattr(calibration_cache, "code_fingerprint", lambda: "changed")
    assert FileCalibrationCache(tmp_path).load("key") is None


def test_an_unwritable_cache_costs_only_the_calibration(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    cache = FileCalibrationCache(blocked)
    cache.store("key", [1.5])
    assert cache.load("key") is None
