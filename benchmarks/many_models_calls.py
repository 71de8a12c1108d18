"""Many models, little traffic each: the fixed cost a call of stage 1's fold and of the summary
merges, which ``many_models.py``'s end-to-end rate is too noisy to resolve. Its stream is
decoded in chunks of 20 events a model (20,000 at 1,000 models) and each model's batch of a
chunk folded by ``Sketcher.add_batch``, as stage 1 does (``--bucket 5s`` by default here);
then ``Summary`` ``+``, ``-`` and ``from_dict`` are timed on the summaries of its buckets. CPU
times (``time.process_time``), the best of 5 rounds.

usage: python benchmarks/many_models_calls.py [--models M] [--rate R] [--seconds S] [--bucket D]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

from coalmine.baselines import build_baselines
from coalmine.config import load_config
from coalmine.decode import PredictionDecoder
from coalmine.streams.sketch import Summary
from coalmine.streams.sketcher import Sketcher

try:  # run as a script from the repository root, or as benchmarks.many_models_calls
    from many_models import models_arguments, models_work
except ImportError:
    from benchmarks.many_models import models_arguments, models_work

#: events of a model in a chunk
PER_MODEL = 20
#: ceilings, us a call (2-core shared machine, --seconds 10: 226-232, 17.5-19.5, 17.5-18.8 and
#: 6.3-7.2; before issue 11's work, 31d3657: 502-509, 21.4-22.4, 22.1-23.0 and 12.2)
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
    baselines = build_baselines(load_config(work / "monitor.toml"))
    decoder, lines = PredictionDecoder(baselines), (work / "stream.jsonl").read_bytes().splitlines()
    batches = []  # (a model's batch of a chunk, the chunk's sorted event times)
    for start in range(0, len(lines), PER_MODEL * args.models):
        decoded, _ = decoder.decode(lines[start : start + PER_MODEL * args.models])
        stream = np.sort(np.concatenate([b.ts for b in decoded]))
        batches += [(batch, stream) for batch in decoded]

    def fold_all() -> Sketcher:
        sketcher = Sketcher(baselines)
        for batch, stream in batches:
            sketcher.add_batch(batch, stream)
        return sketcher

    dicts = [
        {k: v for k, v in d.items() if k != "version"}
        for partial in fold_all().flush()
        for variants in partial["buckets"].values()
        for d in variants.values()
    ]
    summaries = [Summary.from_dict(d) for d in dicts]
    pairs = list(zip(summaries, summaries[1:]))
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
