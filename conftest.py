"""Fixtures for every test and doctest (tests/ and coalmine/): nothing is written to the
user's home."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """Calibration caches (and anything else under $COALMINE_CACHE_DIR) go to a temporary
    directory, never the user's home; worker subprocesses inherit it. One directory for the
    whole session, shared by the xdist workers (their base temporary directories sit in the
    session's): calibrations are keyed by everything they depend on, so a test reads the one
    another test stored instead of repeating seconds of Monte Carlo. Tests of the cache itself
    pass their own."""
    base = tmp_path_factory.getbasetemp()
    session = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    before = os.environ.get("COALMINE_CACHE_DIR")
    os.environ["COALMINE_CACHE_DIR"] = str(session / "cache")
    yield Path(os.environ["COALMINE_CACHE_DIR"])
    if before is None:
        os.environ.pop("COALMINE_CACHE_DIR", None)
    else:
        os.environ["COALMINE_CACHE_DIR"] = before
