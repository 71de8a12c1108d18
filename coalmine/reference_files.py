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
    rows = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            # DictReader pads a short row with None and files a long row's rest under None
            if None in row or None in row.values():
                fields = len(reader.fieldnames or ())
                got = fields + len(row.get(None) or ()) - list(row.values()).count(None)
                raise ValueError(
                    f"line {reader.line_num}: {got} cells, the header has {fields} "
                    "(an empty value is an empty cell between commas, not a missing one)"
                )
            rows.append({k: _csv_value(v) if v != "" else None for k, v in row.items()})
    return rows


def _rows_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading Parquet needs pyarrow (pip install 'coalmine[parquet]')"
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise ValueError(f"not a readable Parquet file: {exc}") from None


_READERS = {".csv": _rows_csv, ".parquet": _rows_parquet}


#: fewer rows cannot calibrate a threshold (the same floor as ``reference_first_events``)
MIN_ROWS = 100


class ReferenceFileError(ValueError):
    """A reference file that cannot be used; the message names the file and what is wrong."""


def read_rows(path: str | Path) -> list[dict]:
    """The reference rows of a JSONL, CSV or Parquet file (by its suffix; JSONL otherwise).

    Every failure is a :class:`ReferenceFileError` naming the file, never a raw ``OSError``.
    """
    path = Path(path)
    if path.is_dir():
        raise ReferenceFileError(f"{path}: is a directory; expected a JSONL, CSV or Parquet file")
    try:
        return _READERS.get(path.suffix.lower(), _rows_jsonl)(path)
    except UnicodeDecodeError as exc:
        raise ReferenceFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ReferenceFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        message = str(exc)
        raise ReferenceFileError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None


def load_reference(path: str | Path, features: tuple[str, ...] | None = None) -> ReferenceData:
    """Read reference rows from JSONL (prediction events), CSV or Parquet (a column per
    feature, optional ``prediction`` and ``label``); ``features`` picks and orders the
    monitored features (default: all). At least :data:`MIN_ROWS` rows."""
    rows = read_rows(path)
    if len(rows) < MIN_ROWS:
        raise ReferenceFileError(
            f"{path}: {len(rows)} reference row{'s' * (len(rows) != 1)}; at least {MIN_ROWS} "
            "are needed to calibrate thresholds"
        )
    try:
        return reference_from_rows(rows, features, str(path))
    except (TypeError, ValueError) as exc:
        raise ReferenceFileError(str(exc)) from None
