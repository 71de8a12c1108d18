"""`coalmine demo`: the whole loop on this machine, no Docker, no JVM.

Starts the embedded broker on a free loopback port, creates the topics, starts a worker
process (its /metrics on a free port), and a traffic simulator serving the Shuttle data
through a trained champion, with a drift injected part-way and delayed labels. Alerts,
commands and dead letters are printed as they arrive; a summary closes the run, and
everything the demo started is stopped.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from coalmine import simulator, topics
from coalmine.broker import EmbeddedBroker, ensure_topics
from coalmine.client import Publisher, tail
from coalmine.launch import WorkerProcess, wait_until
from coalmine.signing import Verifier, generate_ed25519

_COLORS = {"firing": "\033[31m", "resolved": "\033[32m", "command": "\033[36m", "dead": "\033[33m"}


def _paint(kind: str, text: str) -> str:
    return f"{_COLORS[kind]}{text}\033[0m" if sys.stdout.isatty() else text


def _describe(topic: str, record: dict, t0: float) -> str:
    clock = f"[{time.monotonic() - t0:6.1f}s]"
    if topic == topics.ALERTS and "_rejected" in record:  # not believed, so not described
        alert = record["record"]
        return _paint(
            "dead",
            f"{clock} ALERT REJECTED, not believed ({record['_rejected']}): "
            f"{alert.get('state')} {alert.get('model')}/{alert.get('variant')} "
            f"{alert.get('check')}",
        )
    if topic == topics.ALERTS:
        what = f"{record['check']}" + (f" on {record['feature']}" if record.get("feature") else "")
        text = (
            f"{clock} ALERT {record['state'].upper():8} {record['model']}/{record['variant']} "
            f"{what}: {record['statistic']}={record['value']:.4g} "
            f"(threshold {record['threshold']:.4g}, {record['window']['n']} events)"
        )
        if not record["window"]["n"]:  # resolved because the variant's traffic is gone
            text = (
                f"{clock} ALERT {record['state'].upper():8} {record['model']}/{record['variant']} "
                f"{what}: no traffic left"
            )
        return _paint(record["state"], text)
    if topic == topics.COMMANDS:
        record = record.get("record", record)  # a rejected one is described all the same
        weight = f" weight={record.get('weight')}" if record.get("weight") is not None else ""
        return _paint(
            "command",
            f"{clock} COMMAND {str(record.get('action')).upper()} {record.get('model')} "
            f"{record.get('version', '')}{weight}: {record.get('reason', '')}",
        )
    return _paint(
        "dead", f"{clock} DEAD-LETTER from {record.get('source_topic')}: {record.get('reason')}"
    )


async def _watch(
    bootstrap: str,
    topic: str,
    seen: Counter,
    log: list,
    t0: float,
    stop: asyncio.Event,
    serving: simulator.Serving,
    verifier: Verifier | None = None,
):
    async for record in tail(
        bootstrap, topic, from_end=False, until_idle=None, stop=stop, verifier=verifier
    ):
        seen[topic] += 1
        log.append((topic, record))
        if topic != topics.DEADLETTER or seen[topic] <= 5:
            print(_describe(topic, record, t0), flush=True)
        elif seen[topic] == 6:
            print(_paint("dead", "        (further dead letters counted, not shown)"), flush=True)
        if topic == topics.COMMANDS:
            print(_paint("command", f"          router: {route(record, serving)}"), flush=True)


def route(record: dict, serving: simulator.Serving) -> str:
    """The demo router: obeys a command only if its verifier (in :func:`tail`) believed it."""
    if "_rejected" in record:
        return f"REJECTED, not obeyed ({record['_rejected']})"
    return serving.apply(record)


async def _attack(bootstrap: str, log: list) -> None:
    """What anyone who can write to the commands and alerts topics could try: a forged,
    unsigned promote, a replay of the first genuine command, a forged alert and a replay of
    the first genuine alert. The router and the alert display must reject them all."""
    genuine = next((r for t, r in log if t == topics.COMMANDS and "_rejected" not in r), None)
    first_alert = next((r for t, r in log if t == topics.ALERTS and "_rejected" not in r), None)
    forged: dict = {
        "command_id": "forged-promote",
        "ts": max((r.get("ts", 0) for t, r in log if t == topics.COMMANDS), default=0) + 1,
        "model": "shuttle",
        "version": BAD_CANARY.name,
        "action": "promote",
        "reason": "not from coalmine",
        "alert_ids": [],
    }
    async with Publisher(bootstrap) as pub:
        print("simulator: publishing a forged promote (unsigned)", flush=True)
        await pub.publish(topics.COMMANDS, forged)
        if genuine is not None:
            print(
                f"simulator: re-publishing genuine command {genuine['command_id'][:12]}", flush=True
            )
            await pub.publish(topics.COMMANDS, genuine)
        print(
            "simulator: publishing a forged alert (unsigned), replaying the first one", flush=True
        )
        await pub.publish(topics.ALERTS, _forged_alert(forged["ts"]))
        if first_alert is not None:
            await pub.publish(topics.ALERTS, first_alert)


def _forged_alert(ts: int) -> dict:
    """An alert that says all is well, from someone without the key."""
    return {
        "alert_id": "forged-resolved",
        "ts": ts,
        "model": "shuttle",
        "variant": "canary",
        "check": "canary_health",
        "state": "resolved",
        "statistic": "surprise",
        "value": 0.0,
        "threshold": 5.0,
        "window": {"start_ts": ts - 10_000, "end_ts": ts, "n": 0},
        "message": "not from coalmine",
    }


def _metric(worker: WorkerProcess, name: str) -> float:
    """Sum of a metric's samples from the worker's /metrics (0 if unreachable)."""
    try:
        return worker.metric(name)
    except OSError:
        return 0.0


async def _settle(worker: WorkerProcess, sent: dict[str, int], timeout: float = 30) -> None:
    """Until the worker has taken every event sent (folded or dead-lettered) and, the traffic
    over, its last buckets are evaluated: the count of evaluations stops moving for longer than
    the worker's idle-partition release period (2 s), at most ``timeout`` seconds in all."""

    def taken() -> bool:
        return (
            _metric(worker, "coalmine_events_total") + _metric(worker, "coalmine_deadletters_total")
            >= sent["prediction"] + sent["label"]
        )

    last: list[float] = []

    def evaluations_still() -> bool:
        last.append(_metric(worker, "coalmine_evaluations_total"))
        return len(last) >= 2 and last[-1] == last[-2]

    deadline = time.monotonic() + timeout
    try:
        await asyncio.to_thread(wait_until, taken, timeout, "the worker to take every event", 0.5)
        await asyncio.to_thread(
            wait_until,
            evaluations_still,
            max(0.0, deadline - time.monotonic()),
            "the worker's evaluations to settle",
            2.5,
        )
    except TimeoutError as exc:
        print(f"(summary without waiting longer: {exc})", flush=True)


def _plan(duration: float):
    """The story: a shadow judged and promoted through the canary steps; a bad canary once
    that is done (at 40% of the run at the earliest, 58% at the latest: the shadow waits for
    its labelled pairs, and a canary deployed earlier would replace v2 before its promotion),
    rolled back; a drift in f1 from 60% to 75% of the run."""

    def plan(t: float, serving: simulator.Serving):
        v2_done = serving.champion.name == "v2" or t >= 0.58 * duration
        if t >= 0.4 * duration and v2_done and "v3" not in serving.candidates:
            serving.candidates["v3"] = serving.canary = BAD_CANARY
            serving.canary_weight = 10.0
            print(
                f"[{t:6.1f}s] simulator: deploying canary v3 (a degraded model, 10% failed requests) "
                "at 10%",
                flush=True,
            )
        return ("f1", 1.0) if 0.6 * duration <= t < 0.75 * duration else None

    return plan


BAD_CANARY = simulator.Version("v3", noise=1.5, error_rate=0.10, latency_scale=1.5)


async def _run(
    bootstrap: str, worker: WorkerProcess, duration: float, rate: float, verify_key: str
) -> int:
    t0 = time.monotonic()
    serving = simulator.Serving(
        simulator.Version("v1"), shadow=simulator.Version("v2", latency_scale=1.2)
    )
    print(
        f"simulator: {rate:.0f} requests/s for {duration:.0f}s; champion v1, shadow v2; a bad canary v3 "
        f"at {0.4 * duration:.0f}s; drift in f1 (+1 sd) from {0.6 * duration:.0f}s to {0.75 * duration:.0f}s; "
        f"labels 2s late; 1 in 997 predictions malformed",
        flush=True,
    )
    seen: Counter = Counter()
    log: list = []
    stop = asyncio.Event()
    # the router and the alert display each hold the public key, with a sequence of their own
    verifiers = {
        topics.ALERTS: Verifier.parse(verify_key, kind="alert"),
        topics.COMMANDS: Verifier.parse(verify_key),
        topics.DEADLETTER: None,
    }
    watchers = [
        asyncio.create_task(_watch(bootstrap, t, seen, log, t0, stop, serving, verifier))
        for t, verifier in verifiers.items()
    ]

    async def progress():
        while not stop.is_set():
            await asyncio.sleep(10)  # pacing: a progress line every 10 s
            print(
                f"[{time.monotonic() - t0:6.1f}s] worker has folded "
                f"{_metric(worker, 'coalmine_events_total'):,.0f} events; "
                f"{seen[topics.ALERTS]} alert changes, {seen[topics.COMMANDS]} commands so far",
                flush=True,
            )

    ticker = asyncio.create_task(progress())
    sent = await simulator.run_live(
        bootstrap,
        serving,
        seconds=duration,
        rate_per_s=rate,
        plan=_plan(duration),
        bad_event_every=997,
    )
    await _attack(bootstrap, log)
    await _settle(worker, sent)  # the last buckets close after the allowed lateness
    stop.set()
    ticker.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    alerts = Counter(r["state"] for t, r in log if t == topics.ALERTS and "_rejected" not in r)
    print("\nsummary")
    print(f"  sent: {sent}; folded by the worker: {_metric(worker, 'coalmine_events_total'):,.0f}")
    print(
        f"  alerts: {alerts['firing']} firing, {alerts['resolved']} resolved; dead letters: "
        f"{seen[topics.DEADLETTER]}"
    )
    commands = [
        f"{r['action']} {r['version']}" + (f" {r['weight']:g}%" if r.get("weight") else "")
        for t, r in log
        if t == topics.COMMANDS and "_rejected" not in r
    ]
    rejected = [r["_rejected"] for t, r in log if t == topics.COMMANDS and "_rejected" in r]
    fake_alerts = [r["_rejected"] for t, r in log if t == topics.ALERTS and "_rejected" in r]
    print(
        "  commands (signed with Ed25519, verified by the router): "
        + (", ".join(commands) or "none")
    )
    print(f"  rejected by the router: {len(rejected)}" + "".join(f"\n    {r}" for r in rejected))
    print(
        f"  alerts rejected (signed alerts verified): {len(fake_alerts)}"
        + "".join(f"\n    {r}" for r in fake_alerts)
    )
    print(
        f"  serving now: champion {serving.champion.name}, canary "
        f"{serving.canary.name if serving.canary else 'none'}"
    )
    print(f"  metrics were served at http://127.0.0.1:{worker.web_port}/metrics")
    return 0


def run_demo(duration: float = 60.0, rate: float = 300.0) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="coalmine-demo-"))
    reference = workdir / "reference.jsonl"
    simulator.write_reference(reference, n=5000)
    config = workdir / "monitor.toml"
    simulator.write_demo_config(config, reference, bucket="1s", window="10s", rollout=True)
    # the worker signs, the router holds only the public key
    signing_key, verify_key = generate_ed25519()
    with EmbeddedBroker() as broker:
        print(f"broker: embedded Kafka-compatible broker at {broker.url}", flush=True)
        asyncio.run(ensure_topics(broker.bootstrap, topics.all_topics()))
        worker = WorkerProcess(
            broker.url,
            config,
            namespace=topics.NAMESPACE,
            log=workdir / "worker.log",
            env={"COALMINE_SIGNING_KEY": signing_key},
        )
        try:
            with worker:
                print(
                    f"worker: started (log {worker.log_path}), /metrics on port {worker.web_port}",
                    flush=True,
                )
                worker.wait_ready(timeout=90)
                return asyncio.run(_run(broker.bootstrap, worker, duration, rate, verify_key))
        finally:
            print(f"stopped the worker and the broker; files in {workdir}")
