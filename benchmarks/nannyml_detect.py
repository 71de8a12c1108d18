"""NannyML's CBPE (estimated accuracy) and PCA data-reconstruction drift on one stream of
benchmarks/detection.py, run in NannyML's own environment (never coalmine's dependencies):

    python -m venv /tmp/nannyml-venv && /tmp/nannyml-venv/bin/pip install nannyml==0.13.1 statsmodels
    /tmp/nannyml-venv/bin/python benchmarks/nannyml_detect.py STREAM.npz CHUNK

STREAM.npz and STREAM/reference.jsonl are what detection.py builds. Prints one JSON object:
per method, the chunks NannyML alerted on before the change (false alarms), the delay in events
from the change to the end of the first alerting chunk at or after it (a chunk's alert is
known once it is complete), the estimates per chunk (CBPE: accuracy, whose alert counts, F1
and ROC AUC) and the wall time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nannyml as nml
import numpy as np
import pandas as pd


def reference_frame(path: Path, names: list[str]) -> pd.DataFrame:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return pd.DataFrame(
        {
            **{n: [r["features"][n] for r in rows] for n in names},
            "proba": [r["scores"]["1"] for r in rows],
            "pred": [int(r["prediction"]) for r in rows],
            "y": [int(r["label"]) for r in rows],
        }
    )


def chunk_column(table: pd.DataFrame, name: str) -> np.ndarray:
    """A chunk column of a result frame (two header levels for CBPE, three for drift)."""
    return table[next(c for c in table.columns if c[0] == "chunk" and c[-1] == name)].to_numpy()


def alarms(table: pd.DataFrame, column: tuple, change: int, n: int) -> dict:
    """False alarms and delay from a NannyML result frame's alert column."""
    start = chunk_column(table, "start_index")
    end = chunk_column(table, "end_index") + 1
    alert = table[column].to_numpy().astype(bool)
    before = alert & (end <= change) if change >= 0 else alert
    after = np.flatnonzero(alert & (end > change)) if change >= 0 else []
    return {
        "false_alarms": int(before.sum()),
        "chunks": len(alert),
        "delay": int(end[after[0]] - change) if len(after) else None,
        "fa_events": change if change >= 0 else n,
        "first_start": int(start[after[0]]) if len(after) else None,
    }


def main() -> None:
    path, chunk = Path(sys.argv[1]), int(sys.argv[2])
    z = np.load(path)
    names = [str(s) for s in z["names"]]
    change, n = int(z["change"]), int(z["n"])
    ref = reference_frame(path.parent / path.stem / "reference.jsonl", names)
    analysis = pd.DataFrame(z["X"], columns=names)
    analysis["proba"], analysis["pred"] = z["proba"], z["pred"]
    out = {}

    t0 = time.perf_counter()
    cbpe = nml.CBPE(
        y_pred_proba="proba",
        y_pred="pred",
        y_true="y",
        metrics=["accuracy", "f1", "roc_auc"],
        problem_type="classification_binary",
        chunk_size=chunk,
    )
    cbpe.fit(ref)
    est = cbpe.estimate(analysis).filter(period="analysis").to_df()
    out["nannyml_cbpe"] = {
        **alarms(est, ("accuracy", "alert"), change, n),
        "seconds": time.perf_counter() - t0,
        "estimate": est[("accuracy", "value")].round(4).tolist(),
        "lower": est[("accuracy", "lower_confidence_boundary")].round(4).tolist(),
        "upper": est[("accuracy", "upper_confidence_boundary")].round(4).tolist(),
        "threshold": float(est[("accuracy", "lower_threshold")].iloc[0]),
        **{
            metric: {
                "estimate": est[(metric, "value")].round(4).tolist(),
                "lower": est[(metric, "lower_confidence_boundary")].round(4).tolist(),
                "upper": est[(metric, "upper_confidence_boundary")].round(4).tolist(),
            }
            for metric in ("f1", "roc_auc")
        },
        "ends": (chunk_column(est, "end_index") + 1).tolist(),
    }

    t0 = time.perf_counter()
    pca = nml.DataReconstructionDriftCalculator(column_names=names, chunk_size=chunk)
    pca.fit(ref[names])
    res = pca.calculate(analysis[names]).filter(period="analysis").to_df()
    out["nannyml_pca"] = {
        **alarms(res, ("reconstruction_error", "alert"), change, n),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
