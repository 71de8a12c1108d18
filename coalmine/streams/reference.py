"""Reference data: the rows a model's live traffic is compared with, read from JSONL or CSV.

A JSONL reference holds prediction events (a slice of the topic, as a user would export it),
optionally with a ``label`` key per row; a CSV reference holds one column per feature plus
optional ``prediction`` and ``label`` columns.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

PREDICTION = "prediction"


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


def _rows_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not JSON: {exc}") from None
        if not isinstance(event, dict) or not isinstance(event.get("features"), dict):
            raise ValueError(f"{path}:{i}: expected a prediction event with a 'features' object")
        if event.get("status", "ok") != "ok":
            continue
        row = dict(event["features"])
        row[PREDICTION] = event.get("prediction")
        if "label" in event:
            row["label"] = event["label"]
        rows.append(row)
    return rows


def _rows_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return [{k: _csv_value(v) if v != "" else None for k, v in row.items()}
                for row in csv.DictReader(fh)]


def load_reference(path: str | Path, features: tuple[str, ...] | None = None) -> ReferenceData:
    """Read reference rows; ``features`` picks and orders the monitored features (default: all)."""
    path = Path(path)
    rows = _rows_csv(path) if path.suffix.lower() == ".csv" else _rows_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: the reference holds no rows")
    present = list(dict.fromkeys(k for row in rows[:1000] for k in row))
    names = list(features) if features else [k for k in present if k not in (PREDICTION, "label")]
    missing = [f for f in names if f not in present]
    if missing:
        raise ValueError(f"{path}: feature {missing[0]!r} is not in the reference")
    columns = {name: _column([row.get(name) for row in rows]) for name in names}
    if any(row.get(PREDICTION) is not None for row in rows):
        columns[PREDICTION] = _column([row.get(PREDICTION) for row in rows])
    has_labels = any(row.get("label") is not None for row in rows)
    labels = np.array([row.get("label") for row in rows], dtype=object) if has_labels else None
    return ReferenceData(columns=columns, labels=labels)
