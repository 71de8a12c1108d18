"""`coalmine validate`: the first rollout stage. A new version's answers on a labelled holdout
go through file replay; it passes when no performance check fires and its error rate is not
confidently above the reference's. Passing can publish ``promote`` to the shadow stage."""

from __future__ import annotations

from pathlib import Path

from coalmine.config import Config
from coalmine.replay import replay_files
from coalmine.streams.alerts import stable_id
from coalmine.streams.records import Command, Evaluation


def validate(config: Config, model: str, version: str, predictions: Path, labels: Path) -> Command:
    """A ``promote`` (to shadow) or ``rollback`` command for ``version``, with the evidence."""
    perf: list[Evaluation] = []
    run = replay_files(
        config,
        predictions,
        labels,
        progress=False,
        on_evaluations=lambda batch: perf.extend(
            e for e in batch if e.model == model and e.check == "performance"
        ),
    )
    failing = [
        a
        for a in run.alerts
        if a.model == model and a.check == "performance" and a.state == "firing"
    ]
    last = perf[-1].evidence if perf else None
    evidence = {
        "labelled": run.counts["labels"],
        "evaluations": len(perf),
        "error_rate": last and last.get("error_rate"),
        "reference_error_rate": last and last.get("reference_error_rate"),
    }
    ts = max((e.ts for e in perf), default=0)
    passed = bool(perf) and not failing
    action = "promote" if passed else "rollback"
    reason = (
        "validation passed: no performance check fired on the holdout"
        if passed
        else "validation failed: "
        + ("performance check fired" if failing else "no labelled evaluation")
    )
    return Command(
        stable_id(model, version, "validation", action, ts),
        ts,
        model,
        version,
        action,
        reason,
        [a.alert_id for a in failing],
        evidence,
        stage="shadow" if passed else None,
    )
