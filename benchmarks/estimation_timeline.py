"""estimated_performance before the labels come, window by window, beside the accuracy, F1 and
ROC AUC the labels later show, and when it alerts against the label-based performance check.

    python benchmarks/estimation_timeline.py [--out benchmarks/results/estimation_timeline.md]

Two streams of 60,000 events at 300/s (labels for half of them a minute late), change at event
30,000, checks and window as in ``detection.py --estimation`` (10 s windows):

* Bananas, covariate shift (``detection.build_bananas``): river's bundled Bananas data, a
  k-nearest-neighbours model; from the change on, production rows are drawn only where x2 lies
  above its 80th percentile, where the classes overlap. The rows keep their labels, so
  P(y | x) is unchanged: the covariate shift CBPE assumes.
* Shuttle f1 +2 SD, as in ``detection.py --estimation`` (stream 8): the rows' f1 moved, their
  labels kept, so P(y | x) changes too; the model turns unsure, and more wrong than its scores say.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import detection as D  # noqa: E402

N, CHANGE = 60_000, 30_000
#: seconds after the change at which a window is shown (negative: before it)
SHOWN = (-10, 1, 3, 5, 10, 20, 40, 60, 80)


def _cell(value, interval=None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def timeline(path: Path) -> tuple[list[str], dict]:
    """The table of shown windows and the numbers of the summary line for one stream."""
    r = D.run_estimation(path)
    z = D._load(path)
    ts = D._ts(int(z["n"]))
    change_ts = int(ts[int(z["change"])])
    y, pred, p = z["y"].astype(int), z["pred"].astype(int), z["proba"]
    rows = [
        "| s after the change | estimated accuracy [95%] | realised (all the window's events) "
        "| labelled so far (monitor) | estimated F1 [95%] | realised F1 | estimated ROC AUC [95%] "
        "| realised ROC AUC |",
        "|---:|---|---:|---:|---|---:|---|---:|",
    ]
    inside, errors = [], []
    by_ts = {e.ts: e for e in r["estimates"]}
    for e in r["estimates"]:
        i, j = np.searchsorted(ts, e.window.start_ts), np.searchsorted(ts, e.window.end_ts)
        if e.window.start_ts < change_ts or j <= i:
            continue
        realised = float((pred[i:j] == y[i:j]).mean())
        low, high = e.evidence["interval"]
        inside.append(low <= realised <= high)
        errors.append(abs(e.evidence["estimated_accuracy"] - realised))
    for second in SHOWN:
        e = by_ts.get(change_ts + second * 1000)
        if e is None:
            continue
        ev = e.evidence
        i, j = np.searchsorted(ts, e.window.start_ts), np.searchsorted(ts, e.window.end_ts)
        rows.append(
            f"| {second:+d} | {_cell(ev['estimated_accuracy'], ev['interval'])} "
            f"| {(pred[i:j] == y[i:j]).mean():.3f} | {_cell(ev['realised_accuracy'])} "
            f"| {_cell(ev.get('estimated_f1'), ev.get('f1_interval'))} "
            f"| {D.realised_f1(y[i:j], pred[i:j]):.3f} "
            f"| {_cell(ev.get('estimated_roc_auc'), ev.get('roc_auc_interval'))} "
            f"| {D.realised_roc_auc(y[i:j], p[i:j]):.3f} |"
        )
    checks = r["by_check"]
    return rows, {
        "estimated": checks["estimated_performance"]["delay"],
        "performance": checks["performance"]["delay"],
        "false_alarms": checks["estimated_performance"]["false_alarms"],
        "inside": float(np.mean(inside)),
        "mae": float(np.mean(errors)),
        "windows": len(inside),
    }


def _delay(events: float | None) -> str:
    return "missed" if events is None else f"{events / D.RATE:.1f} s ({events:,.0f} events)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "estimation_timeline.md")
    args = ap.parse_args()
    from coalmine.baselines import build_baselines
    from coalmine.config import load_config

    work = Path(tempfile.mkdtemp(prefix="coalmine-timeline-"))
    plan = [
        (
            D.Spec("bananas", "Bananas, covariate shift (x2 above its 80th percentile)", N, CHANGE),
            D.build_bananas,
            {},
        ),
        (
            D.Spec("shift-2", "Shuttle f1 +2 SD (labels kept)", N, CHANGE),
            D.build_shuttle,
            {"kind": "shift", "size": 2.0, "seed": 8},
        ),
    ]
    text = [
        "# estimated_performance before the labels come",
        "",
        "Rebuild: `python benchmarks/estimation_timeline.py` "
        f"(what the streams are: its docstring). {N:,} events at {D.RATE:.0f}/s, change at "
        f"event {CHANGE:,}; labels for half the events {D.ESTIMATION_LABEL_DELAY_MS // 1000} s "
        "late; windows of 10 s (3,000 events), tested once a second; default budget.",
    ]
    for spec, build, kw in plan:
        path = build(work, spec, **kw)
        build_baselines(load_config(D.estimation_config(work, spec)))
        rows, s = timeline(path)
        text += [
            "",
            f"## {spec.title}",
            "",
            *rows,
            "",
            f"First alert after the change: `estimated_performance` {_delay(s['estimated'])}, "
            f"label-based `performance` {_delay(s['performance'])}; `estimated_performance` "
            f"false alarms before the change: {s['false_alarms']}. Over the {s['windows']} "
            "windows wholly after the change, the realised accuracy lies inside the estimate's "
            f"interval in {s['inside']:.0%}, mean absolute error {s['mae']:.3f}.",
        ]
    out = "\n".join(text) + "\n"
    print(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
