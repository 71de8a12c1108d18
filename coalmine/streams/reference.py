"""Reference data: the rows a model's live traffic is compared with.

A JSONL reference holds prediction events (a slice of the topic, as a user would export it),
optionally with a ``label`` key per row; a CSV or Parquet reference holds one column per
feature plus optional ``prediction``, ``scores.<class>`` and ``label`` columns. A model may instead take "the
first N events" of its own traffic (``reference_first_events``): see :func:`first_events`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

PREDICTION = "prediction"
#: columns ``scores.<class>``: the probability a prediction event gave each class
SCORES = "scores."


def is_model_output(name: str) -> bool:
    """The prediction or a class score: watched by ``prediction_drift``, not ``drift``."""
    return name == PREDICTION or name.startswith(SCORES)


@dataclass(frozen=True)
class ReferenceData:
    """Column-wise reference rows: ``columns[name]`` is a float array (NaN = missing) for a
    numeric column or an object array (None = missing) for a categorical one."""

    columns: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def n(self) -> int:
        return len(next(iter(self.columns.values())))


def _column(values: list) -> np.ndarray:
    """Numeric when every present value is a number (bools are not), else categorical."""
    present = [v for v in values if v is not None and v != ""]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None or v == "" else v for v in values], dtype=float)
    return np.array([None if v == "" else str(v) for v in values], dtype=object)


def _csv_value(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def event_rows(events: list[dict]) -> list[dict]:
    """Reference rows from prediction events (failed requests left out): features, the
    prediction, the class scores (``scores.<class>``), and ``label`` where the event carries
    one."""
    rows = []
    for event in events:
        if event.get("status", "ok") != "ok":
            continue
        row = dict(event["features"])
        row[PREDICTION] = event.get("prediction")
        row.update((SCORES + c, p) for c, p in (event.get("scores") or {}).items())
        if "label" in event:
            row["label"] = event["label"]
        rows.append(row)
    return rows


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
        return [{k: _csv_value(v) if v != "" else None for k, v in row.items()}
                for row in csv.DictReader(fh)]


def _rows_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'coalmine[parquet]')") from None
    return pq.read_table(path).to_pylist()


_READERS = {".csv": _rows_csv, ".parquet": _rows_parquet}


def load_reference(path: str | Path, features: tuple[str, ...] | None = None) -> ReferenceData:
    """Read reference rows from JSONL (prediction events), CSV or Parquet (a column per
    feature, optional ``prediction`` and ``label``); ``features`` picks and orders the
    monitored features (default: all)."""
    path = Path(path)
    return reference_from_rows(_READERS.get(path.suffix.lower(), _rows_jsonl)(path), features, str(path))


def reference_from_rows(rows: list[dict], features: tuple[str, ...] | None = None,
                        source: str = "reference") -> ReferenceData:
    if not rows:
        raise ValueError(f"{source}: the reference holds no rows")
    present = list(dict.fromkeys(k for row in rows[:1000] for k in row))
    names = list(features) if features else [k for k in present if k != "label" and not is_model_output(k)]
    missing = [f for f in names if f not in present]
    if missing:
        raise ValueError(f"{source}: feature {missing[0]!r} is not in the reference")
    columns = {name: _column([row.get(name) for row in rows]) for name in names}
    for name in [PREDICTION, *sorted(k for k in present if k.startswith(SCORES))]:
        if any(row.get(name) is not None for row in rows):
            columns[name] = _column([row.get(name) for row in rows])
    has_labels = any(row.get("label") is not None for row in rows)
    labels = np.array([row.get("label") for row in rows], dtype=object) if has_labels else None
    return ReferenceData(columns=columns, labels=labels)


def first_events(events, model: str, n: int) -> list[dict]:
    """The first ``n`` valid prediction events of ``model`` in event-time order (ties broken by
    event id, so every reader picks the same ones), from any iterable of events."""
    mine = [e for e in events if e.get("model") == model and e.get("status", "ok") == "ok"]
    mine.sort(key=lambda e: (e["ts"], e["event_id"]))
    return mine[:n]
