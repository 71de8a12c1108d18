"""The notebook front door: coalmine's statistics on data frames, without Kafka.

:class:`Monitor` runs the same stage-1 and stage-2 code as a worker and ``coalmine replay``
(through :class:`coalmine.replay.Replay`), with the same settings and the same calibrated
thresholds; rows go in as pandas data frames, evaluations and alerts come out as data frames.

pandas is an optional extra (``pip install 'coalmine[notebook]'``): this module imports it
only when a :class:`Monitor` is built.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from coalmine.cache import FileCalibrationCache
from coalmine.config import ConfigError, parse_config
from coalmine.reference_files import read_rows
from coalmine.replay import Replay
from coalmine.streams.baseline import Baseline, CalibrationCache
from coalmine.streams.records import Alert, Evaluation
from coalmine.streams.reference import PREDICTION, SCORES, reference_from_rows

if TYPE_CHECKING:
    import pandas as pd

#: the version every notebook event carries (one version: one window history)
VERSION = "notebook"
#: the default clock when rows carry no timestamp: row ``i`` happens at ``i * 1000 / 100`` ms
ROWS_PER_SECOND = 100.0

ALERT_COLUMNS = [
    "ts",
    "alert_id",
    "model",
    "variant",
    "check",
    "feature",
    "state",
    "statistic",
    "value",
    "threshold",
    "p_value",
    "window_start_ts",
    "window_end_ts",
    "window_n",
    "message",
]
EVALUATION_COLUMNS = [
    "ts",
    "model",
    "variant",
    "check",
    "feature",
    "statistic",
    "value",
    "threshold",
    "p_value",
    "window_start_ts",
    "window_end_ts",
    "window_n",
]
REPORT_COLUMNS = [
    "variant",
    "check",
    "feature",
    "evaluations",
    "fired",
    "first_fired_ts",
    "firing_now",
    "worst_statistic",
    "worst_value",
    "worst_threshold",
    "worst_ratio",
]

_UNSET: Any = object()
_WHERE = re.compile(r"^models\[0\]\.")


def require_pandas():
    """The pandas module, or an ImportError that says how to install it."""
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(
            "coalmine.Monitor needs pandas: pip install 'coalmine[notebook]'"
        ) from exc
    return pandas


class Results(NamedTuple):
    """What one :meth:`Monitor.update` (or :meth:`Monitor.flush`) produced: the evaluations
    (one row per statistic per check per closed bucket) and the alert state changes
    (``firing`` / ``resolved``), as data frames; times are milliseconds of event time."""

    evaluations: pd.DataFrame
    alerts: pd.DataFrame


def _flat(record: dict) -> dict:
    """A record's ``to_json()`` with its ``window`` spread into ``window_*`` columns."""
    out = {k: v for k, v in record.items() if k != "window"}
    for k, v in record["window"].items():
        out[f"window_{k}"] = v
    return out


def _frame(records: list[dict], columns: list[str]) -> pd.DataFrame:
    pd = require_pandas()
    rows = [_flat(r) for r in records]
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in columns))
    frame = pd.DataFrame(rows, columns=columns + extra)
    if "feature" in frame:  # a model-wide record (the joint CUSUM) has no feature: None, not NaN
        frame["feature"] = frame["feature"].astype(object).where(frame["feature"].notna(), None)
    return frame


def _values(series) -> list:
    """A column as plain Python values, None where missing (NaN, None, NA, NaT)."""
    values = series.astype(object)
    return values.where(series.notna(), None).tolist()


def _frame_rows(frame) -> list[dict]:
    columns = {str(name): _values(frame[name]) for name in frame.columns}
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


class Monitor:
    """coalmine's drift, missing-value and performance checks on data frames, without Kafka.

    Build it from reference rows (what "normal" looks like); feed it the rows that follow,
    batch by batch, with :meth:`update`; each call returns the evaluations and alert state
    changes of the event-time buckets that closed. Thresholds are calibrated on the reference
    for the false-alarm budget, exactly as for a worker: the same rows and settings raise the
    same alerts (same ids, same states) as ``coalmine replay`` on the equivalent event files.

    Rows are one per prediction: a column per feature (numbers, or strings for categories;
    missing values are NaN or None), optionally ``prediction``, ``scores.<class>`` (the
    probability the model gave each class) and ``label`` (the true answer, when known: it
    feeds the ``performance`` check), and optionally a timestamp column.

    Parameters
    ----------
    reference : pandas.DataFrame, list of dict, str or pathlib.Path
        The reference rows: a data frame, a list of row dicts, or a path to a JSONL (prediction
        events), CSV or Parquet file, as the ``reference`` key of a ``[[models]]`` table.
    model : str, default "model"
        The model's name (it appears in every record).
    timestamp : str, optional
        The column holding each row's event time: datetimes (naive ones are UTC) or integer
        milliseconds since the Unix epoch. Without it, row order is the clock (see
        ``rows_per_second``), continuing across updates.
    rows_per_second : float, default 100
        With no ``timestamp`` column, row ``i`` (counted from the first row of the first
        update) happens at ``i * 1000 / rows_per_second`` milliseconds. At the default, a
        250 ms bucket holds 25 rows and a 60 s window 6000.
    features, checks, bucket, window, allowed_lateness, label_ttl, false_alarm_every_events, \
bins, min_window_events, min_bucket_events, baseline_error_rate, shift_to_detect_sd
        The settings of a ``[[models]]`` table of the TOML configuration, with the same
        meanings, defaults and checks (durations are strings such as ``"250ms"``, ``"1s"``,
        ``"5m"``): by default ``bucket="250ms"``, ``window="60s"``, ``allowed_lateness="2s"``,
        ``label_ttl="1h"``, ``false_alarm_every_events=10_000_000``, ``bins=32``,
        ``min_window_events=200``, ``min_bucket_events=30`` (at the default 25 rows a bucket,
        two buckets are evaluated together), ``shift_to_detect_sd=0.3``,
        ``checks=["drift", "prediction_drift", "missing_rate", "performance"]``, and every
        reference column but the timestamp, ``prediction``, ``scores.*`` and ``label`` as
        ``features``.
    cache : CalibrationCache or None, optional
        Where calibrated thresholds outlive the process: by default the file cache under
        ``$COALMINE_CACHE_DIR`` (else ``~/.cache/coalmine``), as the worker's; ``None``
        calibrates afresh (about a second) and writes nothing.

    Raises
    ------
    coalmine.config.ConfigError
        A setting the TOML configuration would refuse; the message names the field.
    ImportError
        pandas is not installed.

    Attributes
    ----------
    settings : coalmine.config.ModelConfig
        The validated settings.
    baseline : coalmine.streams.Baseline
        The reference's bins and calibrated thresholds.
    dead : list of tuple
        Rows refused, as ``(kind, event JSON, reason)``: e.g. later than the allowed lateness
        behind the newest timestamp, or a string in a numeric feature.

    See Also
    --------
    coalmine.replay.replay_files : the same pipeline over prediction and label files.

    Examples
    --------
    A reference of two numeric features and a category, then a stationary stream, then the
    same stream with ``x0`` shifted by one standard deviation:

    >>> import numpy as np, pandas as pd
    >>> from coalmine import Monitor
    >>> rng = np.random.default_rng(7)
    >>> def rows(n, shift=0.0):
    ...     return pd.DataFrame({"x0": rng.normal(shift, 1, n), "x1": rng.exponential(1, n),
    ...                          "color": rng.choice(["red", "blue"], n)})
    >>> monitor = Monitor(rows(3000), bucket="1s", window="20s")

    Row order is the clock (100 rows a second by default). A stationary batch raises nothing:

    >>> out = monitor.update(rows(3000))
    >>> len(out.evaluations) > 0, len(out.alerts)
    (True, 0)

    A shifted batch: the alert names the feature (and the joint CUSUM over all numeric
    features, which has none, sees it too):

    >>> out = monitor.update(rows(2000, shift=1.0))
    >>> firing = out.alerts[out.alerts.state == "firing"]
    >>> firing.feature.iloc[0], firing.check.iloc[0]
    ('x0', 'drift')
    >>> sorted(set(firing.feature.dropna()))
    ['x0']

    At the end of the data, :meth:`flush` closes the buckets still open; :meth:`report`
    summarises each (variant, check, feature):

    >>> _ = monitor.flush()
    >>> report = monitor.report()
    >>> report.loc[report.fired > 0, ["check", "feature", "firing_now"]].to_dict("records")
    [{'check': 'drift', 'feature': 'x0', 'firing_now': True}, {'check': 'drift', 'feature': None, 'firing_now': True}]
    """

    def __init__(
        self,
        reference,
        *,
        model: str = "model",
        timestamp: str | None = None,
        rows_per_second: float = ROWS_PER_SECOND,
        features: list[str] | None = None,
        checks: list[str] | None = None,
        bucket: str | None = None,
        window: str | None = None,
        allowed_lateness: str | None = None,
        label_ttl: str | None = None,
        false_alarm_every_events: int | None = None,
        bins: int | None = None,
        min_window_events: int | None = None,
        min_bucket_events: int | None = None,
        baseline_error_rate: float | None = None,
        shift_to_detect_sd: float | None = None,
        cache: CalibrationCache | None = _UNSET,
    ):
        pd = require_pandas()
        if not (
            isinstance(rows_per_second, (int, float))
            and not isinstance(rows_per_second, bool)
            and math.isfinite(rows_per_second)
            and rows_per_second > 0
        ):
            raise ConfigError(
                f"rows_per_second: expected a positive number, got {rows_per_second!r}"
            )
        if timestamp is not None and (not isinstance(timestamp, str) or not timestamp):
            raise ConfigError(f"timestamp: expected a column name, got {timestamp!r}")
        self.timestamp, self.rows_per_second = timestamp, rows_per_second
        path = reference if isinstance(reference, (str, Path)) else None
        table: dict[str, Any] = {
            "name": model,
            "reference": str(path) if path is not None else "<rows>",
        }
        given = {
            "features": features,
            "checks": checks,
            "bucket": bucket,
            "window": window,
            "allowed_lateness": allowed_lateness,
            "label_ttl": label_ttl,
            "false_alarm_every_events": false_alarm_every_events,
            "bins": bins,
            "min_window_events": min_window_events,
            "min_bucket_events": min_bucket_events,
            "baseline_error_rate": baseline_error_rate,
            "shift_to_detect_sd": shift_to_detect_sd,
        }
        for key, value in given.items():
            if value is not None:
                table[key] = list(value) if isinstance(value, tuple) else value
        try:
            config = parse_config({"models": [table]}, base_dir=Path.cwd())
        except ConfigError as exc:
            message = _WHERE.sub("", str(exc))
            raise ConfigError(
                "model" + message[4:] if message.startswith("name:") else message
            ) from None
        settings = config.models[model]

        if path is not None:
            rows = read_rows(path)
        elif isinstance(reference, pd.DataFrame):
            rows = _frame_rows(reference)
        elif isinstance(reference, list) and all(isinstance(r, dict) for r in reference):
            rows = [dict(r) for r in reference]
        else:
            raise TypeError(
                f"reference: expected a DataFrame, a list of row dicts or a path, "
                f"got {type(reference).__name__}"
            )
        if timestamp is not None:
            for row in rows:
                row.pop(timestamp, None)
        source = str(path) if path is not None else "reference"
        self.settings = settings
        self.baseline = Baseline(
            settings,
            reference_from_rows(rows, settings.features, source),
            cache=FileCalibrationCache() if cache is _UNSET else cache,
        )
        self._features = self.baseline.feature_names
        self._replay = Replay({model: self.baseline}, on_evaluations=self._collect)
        self._rows = 0  # rows fed so far: the row clock
        self._new: list[Evaluation] = []
        self._evaluations: list[Evaluation] = []
        self._alerts_seen = 0
        # (variant, check, feature) -> the report's figures
        self._summary: dict[tuple, dict[str, Any]] = {}

    @property
    def model(self) -> str:
        return self.settings.name

    @property
    def dead(self) -> list[tuple[str, bytes, str]]:
        return self._replay.dead

    # -- input ---------------------------------------------------------------------------

    def _timestamps(self, batch) -> np.ndarray:
        """Each row's event time in integer milliseconds."""
        pd = require_pandas()
        n = len(batch)
        if self.timestamp is None:
            i = np.arange(self._rows, self._rows + n, dtype=np.float64)
            return np.floor(i * 1000.0 / self.rows_per_second).astype(np.int64)
        if self.timestamp not in batch:
            raise KeyError(f"timestamp column {self.timestamp!r} is not in the batch")
        col = batch[self.timestamp]
        if col.isna().any():
            raise ValueError(f"timestamp column {self.timestamp!r} has missing values")
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            ms = col.to_numpy(dtype=np.float64)
            if not np.all(ms == np.floor(ms)):
                raise ValueError(
                    f"timestamp column {self.timestamp!r}: expected whole milliseconds"
                )
            ms = ms.astype(np.int64)
        else:
            times = pd.to_datetime(col, utc=True)
            ms = ((times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")).to_numpy(
                dtype=np.int64
            )
        if (ms < 0).any():
            raise ValueError(
                f"timestamp column {self.timestamp!r}: times before 1970 are not supported"
            )
        return ms

    def _events(self, batch) -> tuple[list[dict], list[dict]]:
        """The batch's rows as prediction events, and label events for the rows with a label."""
        missing = [f for f in self._features if f not in batch]
        if missing:
            raise KeyError(f"feature column {missing[0]!r} is not in the batch")
        ts = self._timestamps(batch).tolist()
        n = len(batch)
        ids = [str(i) for i in range(self._rows, self._rows + n)]
        columns = {f: _values(batch[f]) for f in self._features}
        features = [
            dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)
        ]
        predictions = _values(batch[PREDICTION]) if PREDICTION in batch else [None] * n
        score_cols = {
            str(c)[len(SCORES) :]: _values(batch[c])
            for c in batch.columns
            if str(c).startswith(SCORES)
        }
        scores = [
            {c: v for c, v in zip(score_cols, row, strict=True) if v is not None}
            for row in zip(*score_cols.values(), strict=True)
        ]
        preds = []
        for j in range(n):
            event = {
                "event_id": ids[j],
                "request_id": ids[j],
                "model": self.model,
                "version": VERSION,
                "variant": "champion",
                "ts": ts[j],
                "features": features[j],
                "prediction": predictions[j],
                "status": "ok",
            }
            if score_cols and scores[j]:
                event["scores"] = scores[j]
            preds.append(event)
        labels = []
        if "label" in batch:
            for j, label in enumerate(_values(batch["label"])):
                if label is not None:
                    labels.append(
                        {
                            "event_id": f"label-{ids[j]}",
                            "request_id": ids[j],
                            "model": self.model,
                            "ts": ts[j],
                            "label": label,
                        }
                    )
        self._rows += n
        return preds, labels

    def update(self, batch) -> Results:
        """Feed the next rows; return the evaluations and alert state changes of the buckets
        that closed (the buckets the newest time has left behind by more than
        ``allowed_lateness``).

        Parameters
        ----------
        batch : pandas.DataFrame or list of dict
            Rows with the reference's columns (the features; optionally ``prediction``,
            ``scores.<class>``, ``label`` and the timestamp column). Other columns are ignored.

        Returns
        -------
        Results
            ``(evaluations, alerts)``: two data frames, one row per record's ``to_json()``
            with its window as ``window_start_ts``, ``window_end_ts``, ``window_n``.
        """
        pd = require_pandas()
        if not isinstance(batch, pd.DataFrame):
            batch = pd.DataFrame(batch)
        predictions, labels = self._events(batch)
        dead_before = len(self.dead)
        self._replay.feed(predictions, labels)
        if len(self.dead) > dead_before:
            reasons = sorted({reason for _, _, reason in self.dead[dead_before:]})
            warnings.warn(
                f"{len(self.dead) - dead_before} rows refused (see Monitor.dead), e.g. {reasons[0]}",
                stacklevel=2,
            )
        return self._results()

    def flush(self) -> Results:
        """End of the data: close every open bucket; return what they produced. Later
        updates continue the clock (with a timestamp column, rows older than the last
        bucket closed are refused)."""
        self._replay.finish()
        return self._results()

    finish = flush

    # -- output --------------------------------------------------------------------------

    def _collect(self, evaluations: list[Evaluation]) -> None:
        self._new += evaluations
        for ev in evaluations:
            s = self._entry(ev.key)
            s["evaluations"] += 1
            if ev.threshold is not None and ev.threshold > 0:
                ratio = ev.value / ev.threshold
                if not ratio <= s["worst_ratio"]:  # NaN at first
                    s.update(
                        worst_statistic=ev.statistic,
                        worst_value=ev.value,
                        worst_threshold=ev.threshold,
                        worst_ratio=ratio,
                    )

    def _entry(self, key: tuple) -> dict[str, Any]:
        s = self._summary.get(key)
        if s is None:
            s = self._summary[key] = {
                "variant": key[0],
                "check": key[1],
                "feature": key[2],
                "evaluations": 0,
                "fired": 0,
                "first_fired_ts": None,
                "firing_now": False,
                "worst_statistic": None,
                "worst_value": math.nan,
                "worst_threshold": math.nan,
                "worst_ratio": math.nan,
            }
        return s

    def _results(self) -> Results:
        alerts: list[Alert] = self._replay.alerts[self._alerts_seen :]
        self._alerts_seen = len(self._replay.alerts)
        for a in alerts:
            s = self._entry((a.variant, a.check, a.feature))
            s["firing_now"] = a.state == "firing"
            if a.state == "firing":
                s["fired"] += 1
                if s["first_fired_ts"] is None:
                    s["first_fired_ts"] = a.ts
        evaluations, self._new = self._new, []
        self._evaluations += evaluations
        return Results(
            _frame([e.to_json() for e in evaluations], EVALUATION_COLUMNS),
            _frame([a.to_json() for a in alerts], ALERT_COLUMNS),
        )

    @property
    def evaluations(self) -> pd.DataFrame:
        """Every evaluation so far, as :meth:`update` returned them."""
        return _frame([e.to_json() for e in self._evaluations], EVALUATION_COLUMNS)

    @property
    def alerts(self) -> pd.DataFrame:
        """Every alert state change so far, as :meth:`update` returned them."""
        return _frame(
            [a.to_json() for a in self._replay.alerts[: self._alerts_seen]], ALERT_COLUMNS
        )

    def report(self) -> pd.DataFrame:
        """One row per (variant, check, feature) evaluated so far.

        Returns
        -------
        pandas.DataFrame
            ``evaluations`` (how many), ``fired`` (how many times its alert fired),
            ``first_fired_ts`` (event time of the first firing, ms; None if never),
            ``firing_now``, and the worst statistic seen relative to its threshold
            (``worst_statistic``, ``worst_value``, ``worst_threshold``, ``worst_ratio`` =
            value / threshold: above 1 fires; NaN for statistics only reported). Firing checks
            come first, then those that fired, then by ``worst_ratio``, highest first.
        """
        pd = require_pandas()

        def order(s: dict) -> tuple:
            ratio = (
                s["worst_ratio"] if s["worst_ratio"] == s["worst_ratio"] else -math.inf
            )  # NaN last
            return (
                not s["firing_now"],
                -s["fired"],
                -ratio,
                s["variant"],
                s["check"],
                str(s["feature"]),
            )

        rows = sorted(self._summary.values(), key=order)
        frame = pd.DataFrame(rows, columns=REPORT_COLUMNS)
        frame["first_fired_ts"] = frame["first_fired_ts"].astype(object)
        frame["feature"] = frame["feature"].astype(object).where(frame["feature"].notna(), None)
        return frame

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"Monitor(model={s.name!r}, features={list(self._features)!r}, bucket={s.bucket_ms}ms, "
            f"window={s.window_ms}ms, rows={self._rows})"
        )


__all__ = ["Monitor", "Results", "require_pandas"]
