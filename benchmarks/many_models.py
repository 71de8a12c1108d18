"""Many models, little traffic each: file replay of M models at R events/s each (of event time),
beside orjson parsing the same file. Stage 2 costs a fixed amount per model and bucket, so this
is where it shows. Start-up (every model's baseline: with one shared reference, the default,
calibration runs once and is cached; ``--references distinct`` calibrates every model, as a
fresh machine does for models with references of their own) is timed apart and included in the
end-to-end rate; stage 2's own CPU time (``Evaluator.add``: merging, carrying and evaluating
buckets) gives its cost per model-second of event time and per step evaluated (a bucket, or a
low-traffic model's buckets carried together: ``min_bucket_events``). The default 90 s of event
time lets the window tests run (from 200 events in a window) for most of the run, as they do in
steady state. Times are CPU seconds (this process's,
and for the start-up its children's too), for orjson as for coalmine: on a shared machine, wall
time would count the neighbours' work too.

usage: python benchmarks/many_models.py [--models M] [--rate R] [--seconds S] [--bucket D]
                                        [--min-bucket-events K] [--references shared|distinct]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from coalmine.baselines import build_baselines
from coalmine.config import load_config
from coalmine.replay import bulk_gc, replay_files
from coalmine.streams.evaluator import Evaluator

try:  # run as a script from the repository root, or as benchmarks.many_models
    from replay_speed import FEATURES, orjson_rate, write_stream
except ImportError:
    from benchmarks.replay_speed import FEATURES, orjson_rate, write_stream


def write_models_stream(path: Path, models: int, rate: float, seconds: float, seed: int) -> int:
    """Events of ``models`` models, each at ``rate`` per second of event time, interleaved in
    event-time order; returns the count."""
    rng = np.random.default_rng(seed)
    n = int(models * rate * seconds)
    ts = np.sort(rng.uniform(0, seconds * 1000, n)).astype(np.int64) + 1_700_000_000_000
    who = rng.integers(0, models, n)
    rows = rng.standard_normal((n, FEATURES)).round(5).tolist()
    names = [f"x{j}" for j in range(FEATURES)]
    with open(path, "wb") as fh:
        fh.write(
            b"".join(
                orjson.dumps(
                    {
                        "event_id": f"e{i}",
                        "request_id": f"r{i}",
                        "model": f"m{who[i]}",
                        "version": "v1",
                        "variant": "champion",
                        "ts": int(ts[i]),
                        "features": dict(zip(names, row)),
                        "prediction": int(row[0] > 0),
                        "status": "ok",
                    }
                )
                + b"\n"
                for i, row in enumerate(rows)
            )
        )
    return n


def write_models_config(
    path: Path,
    models: int,
    bucket: str = "250ms",
    references: list[str] | None = None,
    min_bucket_events: int | None = None,
) -> None:
    """A config of ``models`` models m0, m1, ... with the drift checks and buckets of
    ``bucket``; model i's reference is ``references[i]`` (default: one shared
    ``reference.jsonl``); ``min_bucket_events`` if given (else coalmine's default)."""
    references = references or ["reference.jsonl"] * models
    defaults = (
        f"[defaults]\nmin_bucket_events = {min_bucket_events}\n\n"
        if min_bucket_events is not None
        else ""
    )
    path.write_text(
        defaults
        + "".join(
            f'[[models]]\nname = "m{i}"\nreference = "{references[i]}"\nbucket = "{bucket}"\n'
            'checks = ["drift", "prediction_drift", "missing_rate"]\n\n'
            for i in range(models)
        )
    )


@contextmanager
def stage2_cpu() -> Iterator[list[float]]:
    """CPU seconds of stage 2 (``Evaluator.add``: merging partials, carrying and evaluating
    buckets; and ``finish``) and the steps evaluated (calls of ``Evaluator.evaluate``: one
    bucket of one model, or several carried together) while inside."""
    spent = [0.0, 0.0]
    originals = {name: getattr(Evaluator, name) for name in ("add", "finish", "evaluate")}
    depth = [0]  # ``add`` calls ``finish`` at each step's end: timed once, from the outer call

    def timed(method):
        def call(self, *args):
            t0 = time.process_time()
            depth[0] += 1
            try:
                return method(self, *args)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent[0] += time.process_time() - t0

        return call

    def counted(self, bucket):
        spent[1] += 1
        return originals["evaluate"](self, bucket)

    Evaluator.add = timed(originals["add"])  # type: ignore[method-assign]
    Evaluator.finish = timed(originals["finish"])  # type: ignore[method-assign]
    Evaluator.evaluate = counted  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        for name, method in originals.items():
            setattr(Evaluator, name, method)


def cpu_with_children() -> float:
    """CPU seconds of this process and of its children that ended (calibration may run in
    other processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def models_arguments(
    doc: str | None, more: Callable[[argparse.ArgumentParser], Any] | None = None
) -> argparse.Namespace:
    """--models, --rate, --seconds and --bucket of a many-models benchmark (and the arguments
    ``more`` adds)."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if more is not None:
        more(ap)
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=10.0, help="events/s of event time per model")
    ap.add_argument(
        "--seconds",
        type=float,
        default=90.0,
        help="event time of the stream (the window tests start once a window holds 200 events:"
        " after 20 s at 10/s; a shorter run measures stage 2 without them)",
    )
    ap.add_argument("--bucket", default="250ms", help="every model's bucket (default: coalmine's)")
    ap.add_argument(
        "--min-bucket-events",
        type=int,
        help="buckets with fewer events are evaluated with the next (default: coalmine's, 30)",
    )
    ap.add_argument(
        "--references",
        choices=("shared", "distinct"),
        default="shared",
        help="one reference for all models (calibrated once), or one each, as models have in"
        " production (every model calibrated: the cold start a fresh machine pays)",
    )
    return ap.parse_args()


def models_work(args: argparse.Namespace, prefix: str) -> tuple[Path, int]:
    """A directory with the reference, the stream (its event count) and the config of
    ``args``; calibration caches go there too ($COALMINE_CACHE_DIR, which workers inherit)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    if args.references == "distinct":  # a reference each, drawn alike but with its own seed
        references = [f"reference-m{i}.jsonl" for i in range(args.models)]
        for i, name in enumerate(references):
            write_stream(work / name, 5000, seed=1000 + i)
    else:
        references = ["reference.jsonl"] * args.models
        write_stream(work / references[0], 5000, seed=1)
    n = write_models_stream(work / "stream.jsonl", args.models, args.rate, args.seconds, seed=2)
    write_models_config(
        work / "monitor.toml", args.models, args.bucket, references, args.min_bucket_events
    )
    os.environ["COALMINE_CACHE_DIR"] = str(work / "cache")
    return work, n


def main() -> None:
    args = models_arguments(__doc__)
    work, n = models_work(args, "coalmine-many-models-")
    config = load_config(work / "monitor.toml")
    t0, wall0 = cpu_with_children(), time.perf_counter()
    build_baselines(config)  # start-up: calibration (once with one reference), then the cache
    startup, startup_wall = cpu_with_children() - t0, time.perf_counter() - wall0
    t0 = time.process_time()
    build_baselines(config)  # as a second run starts: the calibration cache is warm
    warm = time.process_time() - t0
    with bulk_gc():
        parse = orjson_rate(work / "stream.jsonl")
    t0 = time.process_time()
    with stage2_cpu() as spent:
        run = replay_files(config, work / "stream.jsonl", progress=False)
    replay = time.process_time() - t0
    model_seconds = args.models * args.seconds
    print(
        f"# {args.models:,} models at {args.rate:g} events/s each, {args.seconds:g} s of event "
        f"time: {n:,} events, {args.bucket} buckets, drift checks"
    )
    print("| measure | value |")
    print("|---|---:|")
    calibrated = "every model's, cold" if args.references == "distinct" else "once, cached"
    print(f"| start-up (baselines; calibration {calibrated}), CPU | {startup:.1f} s |")
    print(f"| ... wall clock (calibration may use every core) | {startup_wall:.1f} s |")
    print(f"| start-up per model | {1000 * startup / args.models:.2f} ms |")
    print(
        f"| stage 2 CPU per model-second of event time ({spent[1]:,.0f} steps evaluated) "
        f"| {1000 * spent[0] / model_seconds:.3f} ms |"
    )
    print(f"| stage 2 CPU per step evaluated | {1000 * spent[0] / max(spent[1], 1):.3f} ms |")
    print(f"| replay, events/s (start-up excluded) | {run.counts['predictions'] / replay:,.0f} |")
    print(f"| end to end, events/s (start-up included) | {n / (startup + replay):,.0f} |")
    print(f"| orjson alone parsing the same file, events/s | {parse:,.0f} |")
    print(f"| end to end / orjson | {n / (startup + replay) / parse:.3f} (target >= 0.33) |")
    print(
        f"| ... with a warm calibration cache (start-up {warm:.2f} s) | {n / (warm + replay) / parse:.3f} |"
    )
    print(f"| model-seconds of event time per second | {model_seconds / (startup + replay):,.0f} |")
    print(f"| alerts (stationary streams) | {run.counts['alerts']} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| peak memory of the process (ru_maxrss) | {peak:,.0f} MB |")


if __name__ == "__main__":
    main()
