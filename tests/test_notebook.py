"""The notebook front door: coalmine.Monitor on data frames gives the same alerts as
`coalmine replay` on the same rows as event files, stays silent on a stationary stream, names
the drifted feature, refuses bad settings as the TOML config does, and keeps pandas out of
`import coalmine`."""

import subprocess
import sys

import numpy as np
import orjson
import pytest

pd = pytest.importorskip("pandas")

from coalmine import Monitor  # noqa: E402
from coalmine.config import ConfigError, load_config  # noqa: E402
from coalmine.replay import replay_files  # noqa: E402

SETTINGS = {"bucket": "1s", "window": "20s", "allowed_lateness": "2s", "min_window_events": 200}
RATE = 100  # rows per second: row i at i * 10 ms


def rows(n, seed, shift=0.0, flip=0.1):
    """Features x0 (normal), x1 (exponential), color (category), a classifier's prediction
    and class scores, and a label that disagrees with the prediction with probability ``flip``
    (missing on every fourth row)."""
    rng = np.random.default_rng(seed)
    x0 = rng.normal(shift, 1.0, n)
    p1 = 1 / (1 + np.exp(-2 * x0))
    prediction = (p1 > 0.5).astype(int)
    label = np.where(rng.random(n) < flip, 1 - prediction, prediction).astype(float)
    label[::4] = np.nan
    return pd.DataFrame(
        {
            "x0": x0,
            "x1": rng.exponential(1.0, n),
            "color": rng.choice(["red", "green", "blue"], n),
            "prediction": prediction,
            "scores.0": 1 - p1,
            "scores.1": p1,
            "label": label,
        }
    )


@pytest.fixture(scope="module")
def reference():
    return rows(3000, seed=1)


@pytest.fixture(scope="module")
def drifted():
    """40 s stationary, then 30 s with x0 shifted by one SD and the error rate tripled."""
    return pd.concat(
        [rows(4000, seed=2), rows(3000, seed=3, shift=1.0, flip=0.3)], ignore_index=True
    )


@pytest.fixture(scope="module")
def by_rows(reference, drifted):
    """The drifted rows' alerts from a Monitor on the row clock (two tests compare with it)."""
    return run(Monitor(reference, rows_per_second=RATE, **SETTINGS), drifted)


def run(monitor, frame, batch=1000):
    """Feed ``frame`` in batches, then flush; every alert, as one data frame."""
    outs = [monitor.update(frame.iloc[i : i + batch]).alerts for i in range(0, len(frame), batch)]
    outs.append(monitor.flush().alerts)
    return pd.concat(outs, ignore_index=True)


def records(frame):
    """(row number, row dict) of a frame, fast."""
    return enumerate(frame.to_dict("records"))


def event(i, row, ts, model="model"):
    return {
        "event_id": str(i),
        "request_id": str(i),
        "model": model,
        "version": "notebook",
        "variant": "champion",
        "ts": ts,
        "features": {"x0": row["x0"], "x1": row["x1"], "color": row["color"]},
        "prediction": int(row["prediction"]),
        "scores": {"0": row["scores.0"], "1": row["scores.1"]},
        "status": "ok",
    }


def write_jsonl(path, records):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def test_same_alerts_as_replay_of_the_same_rows(tmp_path, reference, drifted, by_rows):
    # the reference as exported prediction events (with their labels), the stream as the
    # prediction and label topics would carry it, and the equivalent [[models]] table
    ref_events = []
    for i, row in records(reference):
        e = event(f"ref-{i}", row, 0)
        if row["label"] == row["label"]:
            e["label"] = int(row["label"])
        ref_events.append(e)
    write_jsonl(tmp_path / "reference.jsonl", ref_events)
    write_jsonl(
        tmp_path / "predictions.jsonl",
        [event(i, row, i * 1000 // RATE) for i, row in records(drifted)],
    )
    write_jsonl(
        tmp_path / "labels.jsonl",
        [
            {
                "event_id": f"label-{i}",
                "request_id": str(i),
                "model": "model",
                "ts": i * 1000 // RATE,
                "label": int(row["label"]),
            }
            for i, row in records(drifted)
            if row["label"] == row["label"]
        ],
    )
    toml = "".join(
        f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n" for k, v in SETTINGS.items()
    )
    (tmp_path / "monitor.toml").write_text(
        f'[[models]]\nname = "model"\nreference = "reference.jsonl"\n{toml}'
    )

    replayed = replay_files(
        load_config(tmp_path / "monitor.toml"),
        tmp_path / "predictions.jsonl",
        tmp_path / "labels.jsonl",
        progress=False,
    )
    assert not replayed.dead
    expected = [(a.alert_id, a.state) for a in replayed.alerts]
    assert {a.check for a in replayed.alerts} >= {"drift", "prediction_drift", "performance"}

    assert list(zip(by_rows.alert_id, by_rows.state, strict=True)) == expected
    # the same reference read from its file, fed in other batch sizes: the same alerts again
    from_file = run(Monitor(tmp_path / "reference.jsonl", **SETTINGS), drifted, batch=777)
    assert list(zip(from_file.alert_id, from_file.state, strict=True)) == expected


def test_stationary_stream_is_silent(reference):
    monitor = Monitor(reference)  # the defaults: 250 ms buckets, 60 s windows, 100 rows a second
    alerts = run(monitor, rows(12_000, seed=4))
    assert alerts.empty and list(alerts.columns)[:3] == ["ts", "alert_id", "model"]
    report = monitor.report()
    assert set(report.check) == {"drift", "prediction_drift", "missing_rate", "performance"}
    assert (report.fired == 0).all() and not report.firing_now.any()
    assert (report.worst_ratio.dropna() < 1).all()
    assert len(monitor.evaluations) == report.evaluations.sum()


def test_shift_fires_on_the_drifted_feature(reference):
    monitor = Monitor(reference, **SETTINGS)
    shifted = rows(3000, seed=6).assign(x1=lambda d: d.x1 + 1.0)  # x1 alone moves
    quiet = monitor.update(rows(3000, seed=5))
    assert quiet.alerts.empty and not quiet.evaluations.empty
    assert {"window_start_ts", "window_end_ts", "window_n"} <= set(quiet.evaluations.columns)
    alerts = pd.concat([monitor.update(shifted).alerts, monitor.flush().alerts])
    firing = alerts[alerts.state == "firing"]
    first = firing.iloc[0]
    assert (first.check, first.feature) == ("drift", "x1")
    assert 30_000 < first.ts <= 35_000  # within 5 s (500 rows) of the shift at row 3000
    assert set(firing.feature.dropna()) == {"x1"}
    report = monitor.report().set_index(["check", "feature"])
    assert report.loc[("drift", "x1"), "fired"] >= 1
    assert report.loc[("drift", "x1"), "first_fired_ts"] == first.ts
    assert report.loc[("drift", "x1"), "worst_ratio"] > 1
    assert report.loc[("drift", "x0"), "fired"] == 0
    assert len(monitor.alerts) == len(alerts)


@pytest.mark.parametrize(
    "setting, field",
    [
        ({"bucket": "5 parsecs"}, "bucket"),
        ({"bucket": "1s", "window": "1500ms"}, "window"),  # not a whole number of buckets
        ({"bins": 2}, "bins"),
        ({"false_alarm_every_events": 0}, "false_alarm_every_events"),
        ({"checks": ["drift", "vibes"]}, "checks"),
        ({"features": []}, "features"),
        ({"model": ""}, "model"),
        ({"rows_per_second": 0}, "rows_per_second"),
    ],
)
def test_bad_setting_raises_config_error_naming_the_field(reference, setting, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        Monitor(reference, **setting)


def test_timestamp_column_is_the_clock(reference, drifted, by_rows):
    """Datetime timestamps, rows shuffled within each batch (within the allowed lateness):
    the same alerts as the row clock, moved by the start time."""
    start = pd.Timestamp("2024-03-01 12:00:00")
    stamped = drifted.assign(when=start + pd.to_timedelta(np.arange(len(drifted)) * 10, unit="ms"))
    shuffled = pd.concat(
        [
            stamped.iloc[i : i + 100].sample(frac=1, random_state=i)
            for i in range(0, len(stamped), 100)
        ]
    )
    by_time = run(Monitor(reference.assign(when=start), timestamp="when", **SETTINGS), shuffled)
    assert not by_rows.empty
    offset = start.value // 1_000_000
    assert list(by_time.ts - offset) == list(by_rows.ts)
    assert list(by_time.window_end_ts - offset) == list(by_rows.window_end_ts)
    assert list(by_time.feature) == list(by_rows.feature) and list(by_time.state) == list(
        by_rows.state
    )

    # integer milliseconds work too; a row older than the closed buckets is refused, with a warning
    monitor = Monitor(reference, timestamp="t", **SETTINGS)
    monitor.update(rows(1000, seed=7).assign(t=np.arange(1000) * 10))
    with pytest.warns(UserWarning, match="late event"):
        monitor.update(rows(2, seed=8).assign(t=[10_000, 0]))
    assert len(monitor.dead) == 1 and "late event" in monitor.dead[0][2]


def test_import_coalmine_leaves_pandas_out():
    def python(code):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    # one interpreter for both cases (each start costs seconds of imports): pandas first
    # hidden, as if not installed, then found
    out = python(
        "import sys, coalmine; coalmine.__version__; import coalmine.worker\n"
        "assert 'pandas' not in sys.modules, 'pandas imported'\n"
        "sys.modules['pandas'] = None  # as if not installed\n"
        "try:\n    from coalmine import Monitor\nexcept ImportError as e:\n    print(e)\n"
        "del sys.modules['pandas']\n"
        "from coalmine import Monitor; assert 'pandas' in sys.modules"
    )
    assert "pip install 'coalmine[notebook]'" in out
