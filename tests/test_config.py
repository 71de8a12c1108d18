"""A wrong config stops start-up with a message naming the field; references load from every
supported source."""

from __future__ import annotations

import numpy as np
import pytest

from coalmine import simulator
from coalmine.config import ConfigError, load_config, parse_config
from coalmine.reference_files import load_reference

BASE = {"name": "m", "reference": "ref.jsonl"}


@pytest.mark.parametrize(
    "doc,message",
    [
        ({"models": [{**BASE, "bucket": "5 parsecs"}]}, "models[0].bucket: expected a duration"),
        ({"models": [{**BASE, "windw": "10s"}]}, "models[0].windw: unknown key"),
        (
            {"defaults": {"window": "10s", "bucket": "3s"}, "models": [BASE]},
            "models[0].window: must be a whole number of buckets",
        ),
        (
            {"models": [{**BASE, "checks": ["drift", "vibes"]}]},
            "models[0].checks: unknown check 'vibes'",
        ),
        ({"models": [{"name": "m"}]}, "models[0].reference: give exactly one of reference"),
        (
            {"models": [{**BASE, "reference_first_events": 500}]},
            "models[0].reference: give exactly one of",
        ),
        (
            {"models": [{"name": "m", "reference_first_events": 5}]},
            "models[0].reference_first_events: expected an integer >= 100",
        ),
        (
            {"models": [{**BASE, "canary": {"steps": [5, 50]}}]},
            "models[0].canary.steps: expected increasing percentages",
        ),
        (
            {"models": [{**BASE, "shadow": {"min_agreement": 2}}]},
            "models[0].shadow.min_agreement: expected a number in [0, 1)",
        ),
        ({"models": [BASE, BASE]}, "models[1].name: duplicate model name 'm'"),
        (
            {"defaults": {"false_alarm_every_events": -1}, "models": [BASE]},
            "defaults.false_alarm_every_events: expected a positive integer",
        ),
        ({"models": []}, "models: expected at least one [[models]] table"),
    ],
)
def test_bad_config_names_the_field(doc, message):
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert message in str(err.value)


def test_missing_reference_file_is_named(tmp_path):
    (tmp_path / "m.toml").write_text('[[models]]\nname = "m"\nreference = "nowhere.jsonl"\n')
    with pytest.raises(ConfigError, match=r"models.m.reference: file not found: .*nowhere.jsonl"):
        load_config(tmp_path / "m.toml")


def test_worker_refuses_a_bad_config_with_the_field_in_the_message(tmp_path):
    from coalmine.cli import main

    (tmp_path / "m.toml").write_text('[[models]]\nname = "m"\nreference = "r.jsonl"\nbucket = 5\n')
    # in process (a subprocess costs seconds of imports): `coalmine` exits with status 1 and
    # prints the message of its SystemExit; any other exception would be a traceback
    with pytest.raises(SystemExit) as stopped:
        main(["worker", "--config", str(tmp_path / "m.toml")])
    assert "models[0].bucket: expected a duration" in str(stopped.value.code)


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--config", "m.toml", "--web-port", "0"],
        ["worker", "--config", "m.toml", "--partitions", "0"],
        ["broker", "--port", "70000"],
        ["topics", "create", "--partitions", "six"],
        ["demo", "--rate", "0"],
        ["demo", "--duration", "-5"],
        ["tail", "alerts", "--until-idle", "nan"],
    ],
)
def test_a_number_out_of_range_on_the_command_line_is_refused_naming_its_option(argv, capsys):
    """Before: a Faust or socket traceback, a division by zero, or a demo of no traffic."""
    from coalmine.cli import main

    with pytest.raises(SystemExit) as stopped:  # argparse: before anything starts
        main(argv)
    option = next(a for a in argv if a.startswith("--") and a != "--config")
    assert stopped.value.code == 2
    assert f"argument {option}: {argv[argv.index(option) + 1]!r} is not" in capsys.readouterr().err


@pytest.mark.parametrize("every", ["soon", "0", "-1", "inf", "nan"])
def test_worker_refuses_a_state_write_interval_that_is_not_a_positive_number(
    tmp_path, monkeypatch, every
):
    from coalmine.cli import main

    simulator.write_reference(tmp_path / "r.jsonl", n=500)
    (tmp_path / "m.toml").write_text('[[models]]\nname = "m"\nreference = "r.jsonl"\n')
    monkeypatch.setenv("COALMINE_STATE_EVERY_S", every)
    with pytest.raises(SystemExit) as stopped:  # before the broker is asked for: none runs
        main(["worker", "--config", str(tmp_path / "m.toml"), "--broker", "kafka://127.0.0.1:1"])
    assert f"COALMINE_STATE_EVERY_S={every!r}: not a positive number" in str(stopped.value.code)


def test_reference_from_jsonl_csv_and_parquet_agree(tmp_path):
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    simulator.write_reference(tmp_path / "ref.jsonl", n=500)
    rows = [
        {
            **e["features"],
            "prediction": e["prediction"],
            "label": e["label"],
            **{f"scores.{c}": p for c, p in e["scores"].items()},
        }
        for e in map(orjson.loads, (tmp_path / "ref.jsonl").read_bytes().splitlines())
    ]
    names = list(rows[0])
    (tmp_path / "ref.csv").write_text(
        ",".join(names) + "\n" + "\n".join(",".join(str(r[k]) for k in names) for r in rows) + "\n"
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ref.parquet")
    refs = [load_reference(tmp_path / f"ref.{ext}") for ext in ("jsonl", "csv", "parquet")]
    assert [n for n in refs[0].columns if n.startswith("scores.")] == ["scores.0", "scores.1"]
    for ref in refs[1:]:
        assert list(ref.columns) == list(refs[0].columns)
        for name in ref.columns:
            assert np.allclose(ref.columns[name], refs[0].columns[name])
        assert [float(x) for x in ref.labels] == [float(x) for x in refs[0].labels]


def test_reference_from_the_first_events_of_a_replayed_file(tmp_path):
    from coalmine.replay import replay_files

    (tmp_path / "m.toml").write_text(
        '[defaults]\nwindow = "10s"\n[[models]]\nname = "shuttle"\n'
        'reference_first_events = 3000\nchecks = ["drift"]\n'
    )
    s = simulator.Scenario(
        n_events=18_000, rate_per_s=300, drift_at=12_000, drift_size=1.0, seed=21
    )
    simulator.write_streams(s, tmp_path / "p.jsonl", tmp_path / "l.jsonl")
    run = replay_files(load_config(tmp_path / "m.toml"), tmp_path / "p.jsonl", progress=False)
    change = s.start_ts_ms + 12_000 * 1000 // 300
    assert run.alerts and all(a.ts > change for a in run.alerts)
    assert run.alerts[0].feature == "f1"


INF, NAN = float("inf"), float("nan")
# (table, key, a refused value, the range its message names): each range's ends, outside and in
REFUSED = [
    (None, "false_alarm_every_events", 0, "a positive integer"),
    (None, "false_alarm_every_events", 1.5, "a positive integer"),
    (None, "false_alarm_every_events", True, "a positive integer"),
    (None, "bins", 3, "an integer from 4 to 1024"),
    (None, "bins", 1025, "an integer from 4 to 1024"),
    (None, "min_window_events", 0, "a positive integer"),
    (None, "min_bucket_events", -1, "a non-negative integer"),
    (None, "min_bucket_events", False, "a non-negative integer"),
    (None, "dedup_events", 0, "a positive integer"),
    (None, "label_join_max", 0, "a positive integer"),
    (None, "baseline_error_rate", -0.01, "a number in [0, 1)"),
    (None, "baseline_error_rate", 1, "a number in [0, 1)"),
    (None, "baseline_error_rate", NAN, "a number in [0, 1)"),
    (None, "shift_to_detect_sd", 0, "a positive number"),
    (None, "shift_to_detect_sd", INF, "a positive number"),
    (None, "pca_variance", 0, "a number in (0, 1)"),
    (None, "pca_variance", 1, "a number in (0, 1)"),
    (None, "estimated_accuracy_tolerance", -0.01, "a number in [0, 1)"),
    (None, "estimated_accuracy_tolerance", 1, "a number in [0, 1)"),
    ("canary", "steps", [0, 100], "increasing percentages in (0, 100] ending at 100"),
    ("canary", "steps", [50, 101], "increasing percentages in (0, 100] ending at 100"),
    ("canary", "steps", [5, 50], "increasing percentages in (0, 100] ending at 100"),
    ("canary", "steps", [50, 5, 100], "increasing percentages in (0, 100] ending at 100"),
    ("canary", "steps", [5, 5, 100], "increasing percentages in (0, 100] ending at 100"),
    ("canary", "steps", [], "increasing percentages in (0, 100] ending at 100"),
    ("canary", "min_events", 0, "a positive integer"),
    ("canary", "max_error_rate", 0, "a number in (0, 1)"),
    ("canary", "max_error_rate", 1, "a number in (0, 1)"),
    ("canary", "max_p99_latency_ms", 0, "a positive number of milliseconds"),
    ("canary", "max_p99_latency_ms", INF, "a positive number of milliseconds"),
    ("shadow", "min_agreement", -0.01, "a number in [0, 1)"),
    ("shadow", "min_agreement", 1, "a number in [0, 1)"),
    ("shadow", "min_events", 0, "a positive integer"),
    ("shadow", "min_labelled_pairs", 0, "a positive integer"),
    ("shadow", "tolerance", -0.01, "a number >= 0"),
    ("shadow", "tolerance", INF, "a number >= 0"),
    ("ab", "alpha", 0, "a number in (0, 1)"),
    ("ab", "alpha", 1, "a number in (0, 1)"),
    ("ab", "alpha", True, "a number in (0, 1)"),
    ("ab", "mde_sd", 0, "a positive number"),
    ("ab", "srm_alpha", 0, "a number in (0, 1)"),
    ("ab", "srm_alpha", 1.0, "a number in (0, 1)"),
    ("ab", "canary_weight", 0, "a percentage in (0, 100)"),
    ("ab", "canary_weight", 100, "a percentage in (0, 100)"),
]
# values just inside each range
ACCEPTED = [
    (None, "false_alarm_every_events", 1),
    (None, "bins", 4),
    (None, "bins", 1024),
    (None, "min_window_events", 1),
    (None, "min_bucket_events", 0),
    (None, "dedup_events", 1),
    (None, "label_join_max", 1),
    (None, "baseline_error_rate", 0),
    (None, "baseline_error_rate", 0.999),
    (None, "shift_to_detect_sd", 1e-9),
    (None, "pca_variance", 1e-9),
    (None, "pca_variance", 0.999),
    (None, "estimated_accuracy_tolerance", 0),
    (None, "estimated_accuracy_tolerance", 0.999),
    ("canary", "steps", [100]),
    ("canary", "steps", [0.5, 99.5, 100]),
    ("canary", "min_events", 1),
    ("canary", "max_error_rate", 1e-9),
    ("canary", "max_error_rate", 0.999),
    ("canary", "max_p99_latency_ms", 0.5),
    ("shadow", "min_agreement", 0),
    ("shadow", "min_agreement", 0.999),
    ("shadow", "min_events", 1),
    ("shadow", "min_labelled_pairs", 1),
    ("shadow", "tolerance", 0),
    ("shadow", "tolerance", 2.5),
    ("ab", "alpha", 1e-9),
    ("ab", "alpha", 0.999),
    ("ab", "mde_sd", 1e-9),
    ("ab", "srm_alpha", 1e-9),
    ("ab", "srm_alpha", 0.999),
    ("ab", "canary_weight", 0.1),
    ("ab", "canary_weight", 99.9),
]


def _doc(table, key, value):
    return {"models": [{**BASE, **({key: value} if table is None else {table: {key: value}})}]}


@pytest.mark.parametrize("table,key,value,expected", REFUSED)
def test_each_range_refuses_its_ends_naming_the_field_and_the_range(table, key, value, expected):
    field = key if table is None else f"{table}.{key}"
    with pytest.raises(ConfigError) as err:
        parse_config(_doc(table, key, value))
    assert str(err.value).startswith(f"models[0].{field}: expected {expected}"), str(err.value)
    if table is None:  # [defaults] takes the same keys and names them so
        with pytest.raises(ConfigError, match=rf"^defaults\.{key}: expected "):
            parse_config({"defaults": {key: value}, "models": [BASE]})


@pytest.mark.parametrize("table,key,value", ACCEPTED)
def test_values_just_inside_each_range_are_accepted(table, key, value):
    model = parse_config(_doc(table, key, value)).models["m"]
    if table is None:
        assert getattr(model, key) == value


def test_every_numeric_setting_has_its_ends_tested():
    from coalmine.config import _NUMBER_KEYS, _ROLLOUT_KEYS

    keys = {(None, k) for k in _NUMBER_KEYS} | {
        (t, k)
        for t, keys in _ROLLOUT_KEYS.items()
        for k, spec in keys.items()
        if spec[0] is not None
    }
    assert {(t, k) for t, k, *_ in REFUSED} == keys
    assert {(t, k) for t, k, _ in ACCEPTED} == keys
    for table, key, _, expected in REFUSED:  # the message in the table is the one tested
        spec = _NUMBER_KEYS[key] if table is None else _ROLLOUT_KEYS[table][key]
        assert spec[1].startswith(expected)


def test_an_ab_alpha_of_zero_stops_start_up_instead_of_crashing_later(tmp_path):
    (tmp_path / "m.toml").write_text(
        '[[models]]\nname = "m"\nreference = "r.jsonl"\n[models.ab]\nalpha = 0\n'
    )
    with pytest.raises(
        ConfigError, match=r"models\[0\]\.ab\.alpha: expected a number in \(0, 1\), got 0"
    ):
        load_config(tmp_path / "m.toml")
