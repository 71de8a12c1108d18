"""Calibrated thresholds kept between runs, so that a restart skips the Monte Carlo.

The fits depend only on their key (a hash of the reference's bins and counts, the seed and
the calibration version: :meth:`coalmine.streams.baseline.Baseline`), so a stale entry cannot
be read for another reference.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path


class FileCalibrationCache:
    """One pickle per key under ``root`` (default ``$COALMINE_CACHE_DIR``, else
    ``~/.cache/coalmine``), in ``calibration/``."""

    def __init__(self, root: str | Path | None = None):
        root = root or os.environ.get("COALMINE_CACHE_DIR") or Path.home() / ".cache" / "coalmine"
        self.dir = Path(root) / "calibration"

    def load(self, key: str) -> list | None:
        """Thresholds calibrated before for the same reference and settings, if any."""
        try:
            with open(self.dir / f"{key}.pkl", "rb") as fh:
                return pickle.load(fh)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            return None

    def store(self, key: str, fits: list) -> None:
        """Best effort: a read-only home only costs the next start-up its calibration time."""
        path = self.dir / f"{key}.pkl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                pickle.dump(fits, fh)
            tmp.replace(path)
        except OSError:
            pass
