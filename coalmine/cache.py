"""Calibrated thresholds kept between runs, so that a restart skips the Monte Carlo.

The fits depend only on their key (a hash of the reference's bins and counts, the seed and
the calibration version: :meth:`coalmine.streams.baseline.Baseline`), so a stale entry cannot
be read for another reference; and they sit in a folder named after the statistics' code, so a
changed (or upgraded) coalmine never reads the fits of another one, even if nobody bumped
the calibration version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from pathlib import Path

import coalmine.streams


@functools.cache
def code_fingerprint() -> str:
    """A hash of the statistics' source (``coalmine/streams``), which the fits follow from."""
    h = hashlib.sha256()
    for path in sorted(Path(coalmine.streams.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


class FileCalibrationCache:
    """One pickle per key under ``root`` (default ``$COALMINE_CACHE_DIR``, else
    ``~/.cache/coalmine``), in ``calibration/<code fingerprint>/``."""

    def __init__(self, root: str | Path | None = None):
        root = root or os.environ.get("COALMINE_CACHE_DIR") or Path.home() / ".cache" / "coalmine"
        self.dir = Path(root) / "calibration" / code_fingerprint()

    def load(self, key: str) -> list | None:
        """Thresholds calibrated before for the same reference and settings, if any."""
        try:
            with open(self.dir / f"{key}.pkl", "rb") as fh:
                return pickle.load(fh)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            return None

    def writable(self) -> bool:
        """Whether fits stored here (by this or another process) can be read back."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.dir, os.W_OK)

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
