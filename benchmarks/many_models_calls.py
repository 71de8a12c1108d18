"""Many models, little traffic each: the fixed cost a call of stage 1's fold and of the summary
merges, which ``many_models.py``'s end-to-end rate is too noisy to resolve. The file replay of
its stream (``--bucket 5s`` by default here) runs once with ``Sketcher.add_batch``'s batches
captured (one model's events of a chunk a call: ~20 at 1,000 models x 10 events/s); then
``add_batch`` is timed again on them in a fresh sketcher, and ``Summary`` ``+``, ``-`` and
``from_dict`` on the summaries of the replay's partials. CPU times (``time.process_time``),
the best of 5 rounds.

usage: python benchmarks/many_models_calls.py [--models M] [--rate R] [--seconds S] [--bucket D]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from coalmine.baselines import build_baselines
from coalmine.config import load_config
from coalmine.replay import replay_files
from coalmine.streams.sketch import Summary
from coalmine.streams.sketcher import Sketcher

try:  # run as a script from the repository root, or as benchmarks.many_models_calls
    from many_models import models_arguments, models_work
except ImportError:
    from benchmarks.many_models import models_arguments, models_work

#: ceilings, microseconds a call (2-core shared machine, --seconds 10: 224, 16.5, 16.8 and 7.2;
#: before issue 11's work 479, 22.8, 21.6 and 10.8)
CEILINGS = {"add_batch": 300, "Summary +": 20, "Summary -": 20, "Summary.from_dict": 9}


def best_us(work: Callable[[], object], calls: int, rounds: int = 5) -> float:
    """The fastest of ``rounds`` rounds of ``work`` (``calls`` calls a round), in us a call."""
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        work()
        times.append(time.process_time() - t0)
    return 1e6 * min(times) / calls


def main() -> None:
    if "--bucket" not in sys.argv:
        sys.argv += ["--bucket", "5s"]  # stage 2 small: stage 1's per-model fold shows
    args = models_arguments(__doc__)
    work, n = models_work(args, "coalmine-many-models-calls-")
    config = load_config(work / "monitor.toml")
    baselines = build_baselines(config)
    batches: list[tuple] = []
    partials: list[dict] = []
    add_batch, close = Sketcher.add_batch, Sketcher.close

    def capture(self, batch, stream=None):
        batches.append((batch, stream))
        return add_batch(self, batch, stream)

    def keep(self):
        partials.extend(out := close(self))
        return out

    Sketcher.add_batch, Sketcher.close = capture, keep  # type: ignore[method-assign]
    try:
        replay_files(config, work / "stream.jsonl", progress=False)
    finally:
        Sketcher.add_batch, Sketcher.close = add_batch, close  # type: ignore[method-assign]
    dicts = [
        {k: v for k, v in d.items() if k != "version"}
        for p in partials
        for variants in p["buckets"].values()
        for d in variants.values()
    ]
    summaries = [Summary.from_dict(d) for d in dicts]
    pairs = list(zip(summaries, summaries[1:]))

    def fold_all() -> None:
        sketcher = Sketcher(baselines)
        for batch, stream in batches:
            sketcher.add_batch(batch, stream)

    measured = {
        "add_batch": best_us(fold_all, len(batches)),
        "Summary +": best_us(lambda: [a + b for a, b in pairs], len(pairs)),
        "Summary -": best_us(lambda: [a - b for a, b in pairs], len(pairs)),
        "Summary.from_dict": best_us(lambda: list(map(Summary.from_dict, dicts)), len(dicts)),
    }
    print(
        f"# {args.models:,} models at {args.rate:g} events/s each, {args.seconds:g} s of event "
        f"time: {n:,} events, {args.bucket} buckets; {len(batches):,} batches of "
        f"{n / len(batches):.0f} events, {len(summaries):,} summaries"
    )
    print("| call | us a call | ceiling |\n|---|---:|---:|")
    for name, us in measured.items():
        print(f"| {name} | {us:.1f} | {CEILINGS[name]} |")


if __name__ == "__main__":
    main()
