"""Canary detection delay against the information bound (issue 13.3).

A canary failing more often than the champion, deployed after 30 s of the champion alone at
10% of 300 requests/s, 1 s buckets, a 10 s window, a false-alarm budget of one per 10^6 events (the demo's config); the
router obeys coalmine's commands. For each case and seed: the canary events served until the
rollback. Beside them, the information bound log(1/alpha) / KL(p1 || p0): no test that raises
false alarms at most at rate alpha per evaluation detects sooner on average (Lorden 1971), with
alpha = q, the tail each rollout check gets from the budget. And the delay the CUSUM itself
expects, h / drift: its null is the champion's rate at its upper 95% bound after the warm-up (it
cannot know the true rate, and a null set below it would spend more than the budget), so it
climbs slower than KL(p1 || p0) per event; one 1 s bucket (30 canary events) comes on top.

usage: python benchmarks/canary_delay.py [--seeds 10]
       PYTHONPATH=/path/to/older/checkout python benchmarks/canary_delay.py  (an older version)
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

from coalmine import simulator as sim
from coalmine.baselines import build_baselines
from coalmine.config import load_config
from coalmine.replay import Replay
from coalmine.streams.rollout import wilson_interval

RATE, T0, WEIGHT, SECONDS = 300, 1_700_000_000_000, 10, 80
#: seconds of the champion alone before the canary is deployed, as in production
WARMUP = 30
CONFIG = (
    '[defaults]\nbucket = "1s"\nwindow = "10s"\nfalse_alarm_every_events = 1000000\n\n'
    '[[models]]\nname = "shuttle"\nreference = "ref.jsonl"\n'
    'checks = ["drift", "prediction_drift", "performance", "canary"]\n'
    '[models.canary]\nsteps = [10, 50, 100]\nmin_events = 100\nmin_duration = "3s"\n'
)
#: (name, champion, canary)
CASES = [
    ("fails 6% vs 0.5%", sim.Version("v1", error_rate=0.005), sim.Version("v2", error_rate=0.06)),
    ("fails 3% vs 0.5%", sim.Version("v1", error_rate=0.005), sim.Version("v2", error_rate=0.03)),
    ("fails 10% vs 0%", sim.Version("v1"), sim.Version("v2", error_rate=0.10)),
]


def delay(config, champion: sim.Version, canary: sim.Version, seed: int) -> int | None:
    """Canary events before the rollback's event time (None: not rolled back). The router
    learns of it later (once the bucket closed, allowed lateness after its end): the events
    served meanwhile are the pipeline's latency, not the test's delay."""
    serving = sim.Serving(champion)
    run, canary_ts = Replay(build_baselines(config)), []
    for sec in range(SECONDS):
        if sec == WARMUP:
            serving.canary, serving.canary_weight = canary, WEIGHT
        events = serving.events(sec * RATE, (sec + 1) * RATE, T0, RATE, seed=seed)
        predictions = [e for k, e in events if k == "prediction"]
        canary_ts += [e["ts"] for e in predictions if e["variant"] == "canary"]
        run.feed(predictions, [e for k, e in events if k == "label"])
        rollback = [c for c in run.commands if c.action == "rollback"]
        if rollback:
            return sum(ts < rollback[0].ts for ts in canary_ts)
        for command in run.commands:
            serving.apply(command.to_json())
    return None


def kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def cusum_delay(h: float, champion: float, canary: float, max_error_rate: float) -> float:
    """h over the CUSUM's expected climb per canary event at the canary's rate, with the null
    it uses: the champion's upper 95% bound after the warm-up, and the alternative above it."""
    warm = WARMUP * RATE
    p0 = wilson_interval(round(champion * warm), warm, 0.1)[1]
    p1 = min(p0 + max_error_rate, (1 + p0) / 2)
    climb = canary * math.log(p1 / p0) + (1 - canary) * math.log((1 - p1) / (1 - p0))
    return h / climb if climb > 0 else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        sim.write_reference(Path(d) / "ref.jsonl", 5000)
        (Path(d) / "m.toml").write_text(CONFIG)
        config = load_config(Path(d) / "m.toml")
        q = build_baselines(config)["shuttle"].tail(RATE * 10)
        print(f"alpha = q = {q:.3g} per evaluation; log(1/alpha) = {math.log(1 / q):.2f}")
        print(
            "| canary | median delay (canary events) | min-max | rolled back | bound "
            "| CUSUM's expected delay |"
        )
        print("|---|---|---|---|---|---|")
        limit = build_baselines(config)["shuttle"].settings.rollout.max_error_rate
        for name, champion, canary in CASES:
            got = [delay(config, champion, canary, seed) for seed in range(args.seeds)]
            hit = sorted(g for g in got if g is not None)
            bound = math.log(1 / q) / kl(canary.error_rate, max(champion.error_rate, 1e-6))
            print(
                f"| {name} | {statistics.median(hit) if hit else '-'} | "
                f"{hit[0] if hit else '-'}-{hit[-1] if hit else '-'} | {len(hit)}/{len(got)} | "
                f"{bound:.0f} | "
                f"{cusum_delay(math.log(1 / q), champion.error_rate, canary.error_rate, limit):.0f} |"
            )


if __name__ == "__main__":
    main()
