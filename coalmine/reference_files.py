"""Reference rows from files: JSONL prediction events (a slice of the topic, as a user would
export it, optionally with a ``label`` key per row), or CSV and Parquet tables with one column
per feature plus optional ``prediction``, ``scores.<class>`` and ``label`` columns."""

from __future__ import annotations

import csv
from pathlib import Path

import orjson

from coalmine.streams.reference import ReferenceData, event_rows, reference_from_rows


def _csv_value(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _rows_jsonl(path: Path) -> list[dict]:
    events = []
    for i, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not JSON: {exc}") from None
        if not isinstance(event, dict) or not isinstance(event.get("features"), dict):
            raise ValueError(f"{path}:{i}: expected a prediction event with a 'features' object")
        events.append(event)
    return event_rows(events)


def _rows_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return [
            {k: _csv_value(v) if v != "" else None for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]


def _rows_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading Parquet needs pyarrow (pip install 'coalmine[parquet]')"
        ) from None
    return pq.read_table(path).to_pylist()


_READERS = {".csv": _rows_csv, ".parquet": _rows_parquet}


def read_rows(path: str | Path) -> list[dict]:
    """The reference rows of a JSONL, CSV or Parquet file (by its suffix; JSONL otherwise)."""
    path = Path(path)
    return _READERS.get(path.suffix.lower(), _rows_jsonl)(path)


def load_reference(path: str | Path, features: tuple[str, ...] | None = None) -> ReferenceData:
    """Read reference rows from JSONL (prediction events), CSV or Parquet (a column per
    feature, optional ``prediction`` and ``label``); ``features`` picks and orders the
    monitored features (default: all)."""
    return reference_from_rows(read_rows(path), features, str(path))
