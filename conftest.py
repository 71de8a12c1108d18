"""Fixtures for every test and doctest (tests/ and coalmine/): nothing is written to the
user's home."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """Calibration caches (and anything else under $COALMINE_CACHE_DIR) go to a temporary
    directory, never the user's home; worker subprocesses inherit it."""
    before = os.environ.get("COALMINE_CACHE_DIR")
    os.environ["COALMINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["COALMINE_CACHE_DIR"])
    if before is None:
        os.environ.pop("COALMINE_CACHE_DIR", None)
    else:
        os.environ["COALMINE_CACHE_DIR"] = before
