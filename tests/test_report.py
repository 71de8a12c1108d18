"""`coalmine report`: the HTML file from a replay with drift and a rollout (shadow judged,
stepped up and promoted; a failing canary rolled back), opened in a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from coalmine import simulator as sim
from coalmine.baselines import build_baselines
from coalmine.cli import main
from coalmine.config import load_config
from coalmine.replay import Replay, write_jsonl
from coalmine.report import MAX_BINS, _decimate, episodes

RATE = 300
T0 = 1_700_000_000_000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def backtest(tmp_path_factory) -> Path:
    """A replay's inputs and outputs: 80 s of traffic, a drift of f1 from 20 s to 35 s, a good
    shadow promoted through the canary steps, then a failing canary rolled back. The router
    obeys the commands after each second, as in tests/test_rollout.py. Skipped without
    matplotlib (coalmine[report]), which the report draws with; checked here, not on import,
    so that the unit tests above cost no matplotlib import."""
    pytest.importorskip("matplotlib", reason="the report draws with matplotlib (coalmine[report])")
    d = tmp_path_factory.mktemp("report")
    sim.write_reference(d / "reference.jsonl", 5000)
    (d / "monitor.toml").write_text(
        '[defaults]\nbucket = "1s"\nwindow = "10s"\nfalse_alarm_every_events = 1000000\n\n'
        '[[models]]\nname = "shuttle"\nreference = "reference.jsonl"\n'
        'checks = ["drift", "prediction_drift", "missing_rate", "performance", "shadow", '
        '"canary", "ab"]\n'
        '[models.canary]\nsteps = [10, 50, 100]\nmin_events = 100\nmin_duration = "3s"\n'
        '[models.shadow]\nmin_events = 1000\nmin_duration = "3s"\n'
    )
    evaluations: list = []
    run = Replay(build_baselines(load_config(d / "monitor.toml")), evaluations.extend)
    serving = sim.Serving(sim.Version("v1"), shadow=sim.Version("v2"))
    predictions, labels, seen = [], [], 0
    for sec in range(80):
        if sec == 50:
            serving.canary, serving.canary_weight = sim.Version("v3", 1.5, 0.05), 10
        drift = ("f1", 1.0) if 20 <= sec < 35 else None
        events = serving.events(sec * RATE, (sec + 1) * RATE, T0, RATE, seed=11, drift=drift)
        p = [e for k, e in events if k == "prediction"]
        lab = [e for k, e in events if k == "label"]
        predictions += p
        labels += lab
        run.feed(p, lab)
        for command in run.commands[seen:]:
            serving.apply(command.to_json())
        seen = len(run.commands)
    run.finish()
    sim.write_jsonl(d / "predictions.jsonl", predictions)
    sim.write_jsonl(d / "labels.jsonl", labels)
    for name, records in (
        ("evaluations", evaluations),
        ("alerts", run.alerts),
        ("commands", run.commands),
    ):
        with open(d / f"{name}.jsonl", "wb") as fh:
            write_jsonl(records, fh)
    assert {c.action for c in run.commands} >= {"set_weight", "promote", "rollback"}
    return d


def test_decimation_keeps_every_peak():
    values = np.arange(100_000) % 97.0
    values[54_321] = 1000.0
    keep = _decimate(len(values), values)
    assert len(keep) <= 2 * MAX_BINS and 54_321 in keep
    assert list(keep) == sorted(keep), "in time order"


def test_alert_episodes_pair_firing_with_the_next_resolution():
    a = {"model": "m", "variant": "champion", "check": "drift", "feature": "f1"}
    alerts = [
        {**a, "alert_id": "1", "ts": 10, "state": "firing"},
        {**a, "alert_id": "2", "ts": 20, "state": "resolved"},
        {**a, "alert_id": "3", "ts": 30, "state": "firing"},
    ]
    eps = episodes(alerts)
    assert [(ep.firing["ts"], ep.end) for ep in eps] == [(10, 20), (30, None)]


@pytest.fixture(scope="module")
def report(backtest) -> Path:
    """The report on the backtest's replay outputs, with its config and predictions."""
    d = backtest
    args = ["--evaluations", "evaluations.jsonl", "--alerts", "alerts.jsonl"]
    args += ["--commands", "commands.jsonl", "--config", "monitor.toml"]
    args += ["--predictions", "predictions.jsonl", "--out", "report.html"]
    assert main(["report", *[a if a.startswith("--") else str(d / a) for a in args]]) == 0
    return d / "report.html"


@pytest.mark.slow  # renders every plot of a backtest (matplotlib draws most of the time)
def test_report_from_outputs_has_every_section_and_no_network(report):
    text = report.read_text()
    for section in ("summary", "checks", "features", "rollout"):
        assert f"id='shuttle-{section}'" in text
    for panel in ("rollout-weights", "rollout-canary", "rollout-shadow", "dist"):
        assert panel in text
    assert "rollback" in text and "canary unhealthy" in text
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", text), "nothing fetched at view time"


@pytest.mark.slow  # a second replay and render of every plot (matplotlib draws most of the time)
def test_report_from_files_runs_the_replay(backtest, tmp_path):
    out = tmp_path / "report.html"
    d = backtest
    args = ["--config", str(d / "monitor.toml"), "--predictions", str(d / "predictions.jsonl")]
    assert main(["report", *args, "--labels", str(d / "labels.jsonl"), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("<svg") >= 10 and "id='shuttle-features'" in text


@pytest.mark.slow  # starts a browser twice
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian: apt-get install chromium)")
def test_report_opens_in_headless_chromium_without_errors(report, tmp_path):
    def chromium(*args: str) -> subprocess.CompletedProcess:
        assert CHROMIUM is not None
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--enable-logging=stderr",
                "--v=0",
                *args,
                report.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    dom = chromium("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for section in ("summary", "checks", "features", "rollout"):
        assert re.search(rf"<section class=\"{section}\" id=\"shuttle-{section}\"", html), section
    assert html.count("<svg") >= 15, "every plot is in the DOM as SVG"
    assert '<table class="features"' in html and '<table class="commands"' in html
    # console messages, CSP violations (a fetch) and uncaught errors all reach the log
    problems = [
        line
        for line in dom.stderr.splitlines()
        if "CONSOLE" in line or "Content Security Policy" in line or "Uncaught" in line
    ]
    assert not problems, problems

    shot = tmp_path / "report.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1280,2000")
    assert result.returncode == 0 and shot.stat().st_size > 50_000, result.stderr[-2000:]
    print(f"screenshot: {shot}")
