"""How fast C-speed decoders turn prediction messages into columns: the floor under stage 1's
decoding, and so under one worker's share of raw aiokafka's rate (issue 11 asks >= 50 %).

Each decoder reads the events of ``benchmarks/replay_speed.py`` (10 numeric features, scores,
latency) in batches (a live fetch of a partition holds ~3,000; a replay chunk 20,000) and gives
what stage 1 folds: the numeric columns as arrays, the ids as lists. Times are this process's
CPU seconds an event, best of ``--repeat``, with the worker's garbage-collector setting.

- ``coalmine``: :class:`coalmine.decode.PredictionDecoder` as stage 1 runs it: msgspec's parse
  into the model's struct, the columns, the checks the types leave to the schema.
- ``msgspec parse only``: the same parse, no columns (what building columns adds is the gap).
- ``orjson to dicts``: one dict per event, no columns.
- ``pyarrow.json`` / ``polars.read_ndjson``: columnar readers in C++ / Rust with the schema given
  (run when installed: ``pip install pyarrow polars``).

The budget printed beside them: at 50 % of raw, a worker may spend twice the raw consumer's CPU
an event (``--raw-us``, ``benchmarks/throughput.py``'s figure), of which its own fetching and
reading of records take ``--fetch-us`` (the README's breakdown); the rest is all of stage 1
and stage 2, against ``benchmarks/stage1_parts.py``'s total.

usage: python benchmarks/decoders.py [--events N] [--batch B ...] [--repeat K]
                                     [--raw-us US] [--fetch-us US]
"""

from __future__ import annotations

import argparse
import gc
import io
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import orjson

from coalmine.baselines import build_baselines
from coalmine.config import load_config
from coalmine.decode import PredictionDecoder

try:  # run as a script from the repository root, or as benchmarks.decoders
    from replay_speed import BENCH_MODEL, FEATURES, bench_work
except ImportError:
    from benchmarks.replay_speed import BENCH_MODEL, FEATURES, bench_work

Decode = Callable[[list[bytes]], object]
NAMES = [f"x{j}" for j in range(FEATURES)]
IDS = ("event_id", "request_id")


def coalmine_decoder(decoder: PredictionDecoder) -> Decode:
    return decoder.decode


def msgspec_parse(decoder: PredictionDecoder) -> Decode:
    (model,) = decoder.models.values()
    parse = msgspec.json.Decoder(model.struct)
    return lambda raws: parse.decode_lines(b"\n".join(raws))


def orjson_dicts(_: PredictionDecoder) -> Decode:
    return lambda raws: [orjson.loads(raw) for raw in raws]


def pyarrow_columns(_: PredictionDecoder) -> Decode | None:
    try:
        import pyarrow as pa
        import pyarrow.json as pj
    except ImportError:
        return None
    schema = pa.schema(
        [(name, pa.string()) for name in ("model", "version", "variant", "status", *IDS)]
        + [("ts", pa.int64()), ("prediction", pa.int64()), ("latency_ms", pa.float64())]
        + [("features", pa.struct([(n, pa.float64()) for n in NAMES]))]
        + [("scores", pa.struct([("1", pa.float64())]))]
    )
    read = pj.ReadOptions(use_threads=False, block_size=1 << 26)
    parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")

    def decode(raws: list[bytes]) -> object:
        table = pj.read_json(io.BytesIO(b"\n".join(raws)), read_options=read, parse_options=parse)
        features = table.column("features").combine_chunks().flatten()
        return (
            [np.asarray(c) for c in features],
            [table.column(name).to_pylist() for name in IDS],
            table.column("ts").to_numpy(),
        )

    return decode


def polars_columns(_: PredictionDecoder) -> Decode | None:
    try:
        import polars as pl
    except ImportError:
        return None
    schema = {name: pl.String for name in ("model", "version", "variant", "status", *IDS)}
    schema |= {"ts": pl.Int64, "prediction": pl.Int64, "latency_ms": pl.Float64}
    schema["features"] = pl.Struct({n: pl.Float64 for n in NAMES})
    schema["scores"] = pl.Struct({"1": pl.Float64})

    def decode(raws: list[bytes]) -> object:
        frame = pl.read_ndjson(io.BytesIO(b"\n".join(raws)), schema=schema)
        return (
            frame["features"].struct.unnest().to_numpy(),
            [frame[name].to_list() for name in IDS],
            frame["ts"].to_numpy(),
        )

    return decode


DECODERS = {
    "coalmine (msgspec + columns + checks)": coalmine_decoder,
    "msgspec parse only (no columns)": msgspec_parse,
    "orjson to dicts (no columns)": orjson_dicts,
    "pyarrow.json (columns)": pyarrow_columns,
    "polars.read_ndjson (columns)": polars_columns,
}


def us_an_event(decode: Decode, lines: list[bytes], batch: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for start in range(0, len(lines), batch):
            decode(lines[start : start + batch])
        best = min(best, time.process_time() - t0)
    return 1e6 * best / len(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, nargs="+", default=[3000, 20_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--raw-us", type=float, default=4.3, help="raw consumer's CPU an event")
    ap.add_argument("--fetch-us", type=float, default=1.7, help="worker's fetching an event")
    args = ap.parse_args()
    work: Path = bench_work("coalmine-decoders-", args.events, BENCH_MODEL)
    decoder = PredictionDecoder(build_baselines(load_config(work / "monitor.toml")))
    lines = (work / "stream.jsonl").read_bytes().splitlines()
    gc.freeze()  # as the worker (coalmine.agents.stage1)
    gc.set_threshold(100_000, *gc.get_threshold()[1:])
    print(f"# {args.events:,} events, 10 numeric features; CPU us an event, best of {args.repeat}")
    print("| decoder | " + " | ".join(f"batch {b:,}" for b in args.batch) + " |")
    print("|---|" + "---:|" * len(args.batch))
    for name, make in DECODERS.items():
        decode = make(decoder)
        if decode is None:
            print(f"| {name} | " + " | ".join("not installed" for _ in args.batch) + " |")
            continue
        rates = [us_an_event(decode, lines, b, args.repeat) for b in args.batch]
        print(f"| {name} | " + " | ".join(f"{r:.2f}" for r in rates) + " |")
    budget = 2 * args.raw_us - args.fetch_us
    print(
        f"\nbudget at 50 % of raw: 2 x {args.raw_us} us - {args.fetch_us} us of fetching = "
        f"{budget:.1f} us an event for decoding, folding, the label join and stage 2 together"
        " (benchmarks/stage1_parts.py gives their sum now)"
    )


if __name__ == "__main__":
    main()
