"""Reference data: the rows a model's live traffic is compared with.

Rows come from prediction events (:func:`event_rows`), a data frame or a file
(:mod:`coalmine.reference_files` reads JSONL, CSV and Parquet), or the first N events of the
model's own traffic (:func:`first_events`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREDICTION = "prediction"
#: columns ``scores.<class>``: the probability a prediction event gave each class
SCORES = "scores."


def normalized(value):
    """Labels and predictions compare as the same number whatever JSON type carried them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def same_answer(prediction, label) -> bool:
    """Whether a prediction names the label's class (``1.0`` and ``1`` and ``"1"`` alike).

    >>> same_answer(1.0, 1), same_answer("1", 1), same_answer(0, 1)
    (True, True, False)
    """
    return str(normalized(prediction)) == str(normalized(label))


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


def reference_from_rows(
    rows: list[dict], features: tuple[str, ...] | None = None, source: str = "reference"
) -> ReferenceData:
    if not rows:
        raise ValueError(f"{source}: the reference holds no rows")
    present = list(dict.fromkeys(k for row in rows[:1000] for k in row))
    names = (
        list(features)
        if features
        else [k for k in present if k != "label" and not is_model_output(k)]
    )
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
