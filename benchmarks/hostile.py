"""Hostile input against a real worker on the embedded broker (issue 12): at least 10,000
hostile messages of 30+ kinds interleaved with valid predictions. Checks that every hostile
message is dead-lettered with a reason, every valid event is counted exactly once (retries of
valid events, which are valid, are dropped as duplicates), no stage stops, and the worker's
memory stays flat; prints a table of the kinds and what became of them.

usage: python benchmarks/hostile.py [--valid N] [--hostile N] [--rounds N]

With ``--rounds N`` the mix is repeated N times with fresh event ids and times, and the
worker's resident memory is printed after each round with its slope over the second half.
The label join holds every unlabelled prediction for ``label_ttl`` of event time (1 h; a
round is 100 s) and stage 1 the last ``dedup_events`` to twice that event ids per model and
partition, so memory is flat only once those bounds are reached: ``--set label_ttl='"30s"'
--set dedup_events=5000`` reaches them within a round.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson

from coalmine import simulator
from coalmine.agents.metrics import reason_kind
from coalmine.broker import EmbeddedBroker
from coalmine.launch import Namespace, wait_until

RATE = 300
#: ceiling of the RSS slope (MB a round of 44,499 messages) that counts as flat
FLAT_MB_A_ROUND = 2.0
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


def round_stream(valid: list[dict], r: int, hostile: int) -> tuple[list[bytes], Counter]:
    """Round ``r`` of the mix: the valid events with fresh ids and times (each round after the
    last, so that nothing is late or a retry of an earlier round), hostile messages among them,
    and 499 retries of valid events; returns the messages and the hostile ones sent by kind."""
    names = list(KINDS)
    span = valid[-1]["ts"] - valid[0]["ts"] + 1000
    fresh = [
        {
            **e,
            "event_id": f"{e['event_id']}-r{r}",
            "request_id": f"{e['request_id']}-r{r}",
            "ts": e["ts"] + r * span,
        }
        for e in valid
    ]
    # after the first 2,000 valid events (a late event needs a watermark to be late by), one
    # hostile message after every few valid ones, the kinds in turn; the 600 KB ones kept few
    start = 2_000
    every = max((len(fresh) - start) // hostile, 1)
    stream = [_dump(e) for e in fresh[:start]]
    sent: Counter = Counter()
    for i, e in enumerate(fresh[start:]):
        stream.append(_dump(e))
        if 3_000 <= i < 3_499:  # a producer's retry, right after the original: valid
            stream.append(_dump(e))
        if i % every == 0:
            name = names[(i // every) % len(names)]
            if name == "600 KB not JSON" and sent[name] >= 20:
                name = "not JSON"
            # an id of its own: with its valid twin's, a message that passes would be a retry
            mine = {**e, "event_id": f"hostile-{i}-r{r}"}
            stream.append(KINDS[name](mine))
            sent[name] += 1
    return stream, sent


def rss_mb(pid: int) -> float:
    """A process's resident memory now (VmRSS), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return (
        next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        / 1024
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid", type=int, default=30_000)
    parser.add_argument("--hostile", type=int, default=10_400)
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the mix, with fresh ids and times, N times"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config default (TOML), e.g. --set label_ttl='\"30s\"' --set dedup_events=5000",
    )
    args = parser.parse_args()
    scenario = simulator.Scenario(n_events=args.valid, rate_per_s=RATE, label_fraction=0, seed=9)
    valid = [e for kind, e in simulator.generate(scenario) if kind == "prediction"]
    names = list(KINDS)
    sent: Counter = Counter()
    rss: list[float] = []

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        config = Path(tmp) / "monitor.toml"
        simulator.write_reference(Path(tmp) / "reference.jsonl", n=5000)
        simulator.write_demo_config(
            config, Path(tmp) / "reference.jsonl", bucket="1s", window="10s"
        )
        settings = "".join(f"{line}\n" for line in args.set)
        config.write_text(config.read_text().replace("[defaults]\n", "[defaults]\n" + settings))
        ns = Namespace(broker)
        worker = ns.worker(config, log=Path(tmp) / "worker.log").start().wait_ready()
        try:
            t0 = time.monotonic()
            for r in range(args.rounds):
                stream, sent_now = round_stream(valid, r, args.hostile)
                sent += sent_now
                ns.publish(("prediction", raw) for raw in stream)
                hostile, counted = sum(sent.values()), (r + 1) * len(valid)
                wait_until(
                    lambda n=counted, h=hostile: (  # -1 while /metrics is too busy to answer
                        worker.metric("coalmine_events_total", busy=-1) >= n
                        and worker.metric("coalmine_deadletters_total", busy=-1) >= h
                    ),
                    300,
                    f"round {r + 1}: every event counted or dead-lettered",
                    interval=1,
                )
                rss.append(rss_mb(worker.pid))
                print(
                    f"round {r + 1}: {len(stream):,} messages, worker RSS {rss[-1]:.0f} MB "
                    f"({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
            time.sleep(3)  # anything counted twice would show now
            elapsed = time.monotonic() - t0
            dead = ns.read("deadletter")
            counted = worker.metric("coalmine_events_total")
            duplicates = worker.metric("coalmine_duplicates_total")
            entries = worker.metric("coalmine_label_join_entries")
            alive = worker.proc.poll() is None and bool(worker.get("/health"))
            peak = worker.peak_rss_mb()
        finally:
            worker.stop()
    rounds = args.rounds
    reasons = Counter(reason_kind(d["reason"]) for d in dead)
    print(
        f"{rounds} round(s) of {len(valid):,} valid events (+499 retried), "
        f"{hostile // rounds:,} hostile messages of {len(sent)} kinds"
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
        f"valid events counted: {counted:,.0f} of {rounds * len(valid):,}; "
        f"duplicates dropped: {duplicates:,.0f}; label-join entries at the end: {entries:,.0f}"
    )
    # the second half: the bounded tables (label join, recent event ids) may fill in the first
    half = rounds // 2
    slope = np.polyfit(np.arange(half, rounds), rss[half:], 1)[0] if rounds >= 4 else float("nan")
    print(
        f"worker alive and /health answers: {alive}; RSS after each round (MB): "
        + " ".join(f"{x:.0f}" for x in rss)
        + f"; slope over rounds {half + 1}-{rounds}: {slope:+.1f} MB a round (flat: under "
        f"{FLAT_MB_A_ROUND:g}, once label_ttl and dedup_events are reached); peak {peak:.0f} MB"
    )
    print(f"{elapsed:.0f} s")
    ok = (
        len(dead) == hostile
        and counted == rounds * len(valid)
        and duplicates == rounds * 499
        and alive
    )
    print("OK" if ok else "FAILED")


if __name__ == "__main__":
    main()
