"""A corrupt reference is reported by model and file, never as a raw traceback, and before the
broker is contacted (issue 12, "Crashes and clarity")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coalmine.baselines import build_baselines
from coalmine.broker import free_port
from coalmine.config import ConfigError, load_config, parse_config
from coalmine.streams.baseline import CalibrationCache


class NoCache(CalibrationCache):
    def load(self, key: str) -> list | None:
        return None

    def store(self, key: str, fits: list) -> None:
        pass


def rows_csv(n: int) -> str:
    rng = np.random.default_rng(0)
    return "f0,f1,prediction\n" + "".join(
        f"{rng.normal():.4f},{rng.normal():.4f},{i % 2}\n" for i in range(n)
    )


def build(tmp_path: Path, ref: str):
    config = parse_config({"models": [{"name": "fraud", "reference": ref}]}, base_dir=tmp_path)
    return build_baselines(config, cache=NoCache())


@pytest.mark.parametrize(
    "name, content, expected",
    [
        # a row with a cell missing: float(None) raised a TypeError
        ("short.csv", rows_csv(300) + "1.0,2.0\n", "line 302: 2 cells, the header has 3"),
        ("one.csv", rows_csv(1), "1 reference row; at least 100"),
        ("bad.parquet", b"PAR1 not parquet", "not a readable Parquet file"),
        ("latin1.csv", rows_csv(200).encode() + "caf\xe9,1,0\n".encode("latin-1"), "not UTF-8"),
        ("dir.csv", None, "is a directory"),
    ],
)
def test_a_corrupt_reference_names_the_model_and_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError) as caught:
        build(tmp_path, name)
    message = str(caught.value)
    assert message.startswith("model fraud: ") and str(path) in message, message
    assert expected in message, message


def test_an_empty_cell_is_a_missing_value(tmp_path):
    text = rows_csv(200).splitlines()
    text[5] = "," + text[5].split(",", 1)[1]
    (tmp_path / "holes.csv").write_text("\n".join(text) + "\n")
    assert np.isnan(build(tmp_path, "holes.csv")["fraud"].reference.columns["f0"][4])


def test_the_config_says_a_directory_is_not_a_reference_file(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "m.toml").write_text('[[models]]\nname = "fraud"\nreference = "ref"\n')
    with pytest.raises(ConfigError, match=r"models\.fraud\.reference: .*ref is a directory"):
        load_config(tmp_path / "m.toml")


def test_the_worker_reports_a_bad_reference_even_with_the_broker_down(tmp_path):
    from coalmine.cli import main

    (tmp_path / "one.csv").write_text(rows_csv(1))
    (tmp_path / "m.toml").write_text('[[models]]\nname = "fraud"\nreference = "one.csv"\n')
    # in process (a subprocess costs seconds of imports): `coalmine` exits with status 1 and
    # prints the message of its SystemExit; any other exception would be a traceback
    with pytest.raises(SystemExit) as stopped:
        main(
            ["worker", "--config", str(tmp_path / "m.toml")]
            + ["--broker", f"kafka://127.0.0.1:{free_port()}"]  # nothing listens there
        )
    message = str(stopped.value.code)
    assert "model fraud: " in message and "1 reference row" in message, message
