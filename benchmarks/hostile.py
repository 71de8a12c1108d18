"""Hostile input against a real worker on the embedded broker (issue 12): at least 10,000
hostile messages of 30+ kinds interleaved with valid predictions. Checks that every hostile
message is dead-lettered with a reason, every valid event is counted exactly once (retries of
valid events, which are valid, are dropped as duplicates), no stage stops, and the worker's
memory stays flat; prints a table of the kinds and what became of them.

usage: python benchmarks/hostile.py [--valid N] [--hostile N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from coalmine import simulator
from coalmine.agents.metrics import reason_kind
from coalmine.broker import EmbeddedBroker
from coalmine.launch import Namespace, wait_until

RATE = 300
#: kind -> how a valid prediction (a dict) becomes a hostile message (bytes)
KINDS = {
    "not JSON": lambda e: b"{not json",
    "empty value": lambda e: b"",
    "JSON array": lambda e: b"[1, 2]",
    "JSON string": lambda e: b'"hello"',
    "JSON null": lambda e: b"null",
    "missing ts": lambda e: _dump({k: v for k, v in e.items() if k != "ts"}),
    "missing event_id": lambda e: _dump({k: v for k, v in e.items() if k != "event_id"}),
    "missing features": lambda e: _dump({k: v for k, v in e.items() if k != "features"}),
    "missing status": lambda e: _dump({k: v for k, v in e.items() if k != "status"}),
    "unknown variant": lambda e: _dump({**e, "variant": "blue"}),
    "unknown status": lambda e: _dump({**e, "status": "meh"}),
    "negative ts": lambda e: _dump({**e, "ts": -5}),
    "fractional ts": lambda e: _dump({**e, "ts": e["ts"] + 0.5}),
    "ts 1e30": lambda e: _dump(e).replace(b'"ts":%d' % e["ts"], b'"ts":1e30'),
    "ts as a string": lambda e: _dump({**e, "ts": str(e["ts"])}),
    "ts in 2100": lambda e: _dump({**e, "ts": 4_102_444_800_000}),
    "ts 0 (1970)": lambda e: _dump({**e, "ts": 0}),
    "late by two hours": lambda e: _dump({**e, "ts": e["ts"] - 7_200_000}),
    "feature NaN": lambda e: _dump(e).replace(b'"f1":', b'"f1":NaN,"x":', 1),
    "feature Infinity": lambda e: _dump(e).replace(b'"f1":', b'"f1":Infinity,"x":', 1),
    "feature an object": lambda e: _feature(e, {"a": 1}),
    "feature an array": lambda e: _feature(e, [1, 2]),
    "feature a numeric string": lambda e: _feature(e, "1.23"),
    "feature a bool": lambda e: _feature(e, True),
    "unknown field": lambda e: _dump({**e, "extra": 1}),
    "unknown model": lambda e: _dump({**e, "model": "nobody"}),
    "200 KB model name": lambda e: _dump({**e, "model": "m" * 200_000}),
    "empty event_id": lambda e: _dump({**e, "event_id": ""}),
    "empty request_id": lambda e: _dump({**e, "request_id": ""}),
    "negative latency": lambda e: _dump({**e, "latency_ms": -1}),
    "latency a string": lambda e: _dump({**e, "latency_ms": "fast"}),
    "null prediction, status ok": lambda e: _dump({**e, "prediction": None, "status": "ok"}),
    "prediction an object": lambda e: _dump({**e, "prediction": {"a": 1}}),
    "scores not an object": lambda e: _dump({**e, "scores": [0.1]}),
    "empty unit_id": lambda e: _dump({**e, "unit_id": ""}),
    "not UTF-8": lambda e: b"\xff\xfe" + _dump(e)[2:],
    "deeply nested": lambda e: b"[" * 5000 + b"]" * 5000,
    "pretty-printed, bad": lambda e: orjson.dumps({**e, "variant": 7}, option=orjson.OPT_INDENT_2),
    "600 KB not JSON": lambda e: b"\x00" + b"x" * 600_000,
}


def _dump(e: dict) -> bytes:
    return orjson.dumps(e)


def _feature(e: dict, value) -> bytes:
    return _dump({**e, "features": {**e["features"], "f1": value}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid", type=int, default=30_000)
    parser.add_argument("--hostile", type=int, default=10_400)
    args = parser.parse_args()
    scenario = simulator.Scenario(n_events=args.valid, rate_per_s=RATE, label_fraction=0, seed=9)
    valid = [e for kind, e in simulator.generate(scenario) if kind == "prediction"]
    names = list(KINDS)
    # after the first 2,000 valid events (a late event needs a watermark to be late by), one
    # hostile message after every few valid ones, the kinds in turn; the 600 KB ones kept few
    start = 2_000
    every = max((len(valid) - start) // args.hostile, 1)
    stream: list[tuple[str, bytes]] = [("prediction", _dump(e)) for e in valid[:start]]
    sent: Counter = Counter()
    for i, e in enumerate(valid[start:]):
        stream.append(("prediction", _dump(e)))
        if 3_000 <= i < 3_499:  # a producer's retry, right after the original: valid
            stream.append(("prediction", _dump(e)))
        if i % every == 0:
            name = names[(i // every) % len(names)]
            if name == "600 KB not JSON" and sent[name] >= 20:
                name = "not JSON"
            # an id of its own: with its valid twin's, a message that passes would be a retry
            mine = {**e, "event_id": f"hostile-{i}"}
            stream.append(("hostile", KINDS[name](mine)))
            sent[name] += 1
    hostile = sum(sent.values())

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        config = Path(tmp) / "monitor.toml"
        simulator.write_reference(Path(tmp) / "reference.jsonl", n=5000)
        simulator.write_demo_config(
            config, Path(tmp) / "reference.jsonl", bucket="1s", window="10s"
        )
        ns = Namespace(broker)
        worker = ns.worker(config, log=Path(tmp) / "worker.log").start().wait_ready()
        try:
            t0 = time.monotonic()
            half = len(stream) // 2
            first = sum(kind == "hostile" for kind, _ in stream[:half])
            ns.publish(("prediction", raw) for _, raw in stream[:half])
            wait_until(
                lambda: worker.metric("coalmine_deadletters_total") >= first, 300, "the first half"
            )
            rss_half = worker.peak_rss_mb()
            ns.publish(("prediction", raw) for _, raw in stream[half:])
            wait_until(
                lambda: (
                    worker.metric("coalmine_events_total") >= len(valid)
                    and worker.metric("coalmine_deadletters_total") >= hostile
                ),
                300,
                "every event counted or dead-lettered",
                interval=1,
            )
            time.sleep(3)  # anything counted twice would show now
            elapsed = time.monotonic() - t0
            dead = ns.read("deadletter")
            counted = worker.metric("coalmine_events_total")
            duplicates = worker.metric("coalmine_duplicates_total")
            alive = worker.proc.poll() is None and bool(worker.get("/health"))
            rss_end = worker.peak_rss_mb()
        finally:
            worker.stop()
    reasons = Counter(reason_kind(d["reason"]) for d in dead)
    print(
        f"{len(valid):,} valid events (+499 retried), {hostile:,} hostile messages of {len(sent)} kinds"
    )
    print(f"{'kind':<28} {'sent':>6}")
    for name in names:
        print(f"{name:<28} {sent[name]:>6}")
    print(
        "\ndead letters by reason kind: " + ", ".join(f"{r} {n}" for r, n in reasons.most_common())
    )
    print(
        f"dead-lettered: {len(dead):,} of {hostile:,} hostile, all with a reason: {all(d['reason'] for d in dead)}"
    )
    print(
        f"valid events counted: {counted:,.0f} of {len(valid):,}; duplicates dropped: {duplicates:,.0f}"
    )
    print(
        f"worker alive and /health answers: {alive}; peak RSS {rss_half:.0f} MB at half, {rss_end:.0f} MB at the end"
    )
    print(f"{elapsed:.0f} s")
    ok = len(dead) == hostile and counted == len(valid) and duplicates == 499 and alive
    print("OK" if ok else "FAILED")


if __name__ == "__main__":
    main()
