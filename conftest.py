"""Fixtures for every test and doctest (tests/ and coalmine/): nothing is written to the
user's home."""

import os
import shutil
from pathlib import Path

import pytest


def _calibration_root(config: pytest.Config, tmp_path_factory) -> Path:
    """``.pytest_cache/coalmine`` in the checkout (git ignores it), kept between runs: the fits
    are keyed by everything they depend on and filed under the statistics' code fingerprint,
    so a test reads the one an earlier test or run stored instead of repeating seconds of
    Monte Carlo, and never one of other code. In a read-only checkout, a temporary folder for
    the session, shared by the xdist workers."""
    root = config.rootpath / ".pytest_cache" / "coalmine"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        base = tmp_path_factory.getbasetemp()
        return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "coalmine"


@pytest.fixture(scope="session", autouse=True)
def cache_dir(request, tmp_path_factory):
    """Calibration caches go under the test cache (above), never the user's home; worker
    subprocesses inherit it. Fits of older code are removed. Tests of the cache itself pass
    their own folder."""
    from coalmine.cache import code_fingerprint  # here: the xdist controller needs no scipy

    root = _calibration_root(request.config, tmp_path_factory)
    for stale in (root / "calibration").glob("*"):
        if stale.name != code_fingerprint():
            shutil.rmtree(stale, ignore_errors=True)
    before = os.environ.get("COALMINE_CACHE_DIR")
    os.environ["COALMINE_CACHE_DIR"] = str(root)
    yield root
    if before is None:
        os.environ.pop("COALMINE_CACHE_DIR", None)
    else:
        os.environ["COALMINE_CACHE_DIR"] = before
