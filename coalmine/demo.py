"""`coalmine demo`: the whole loop on this machine, no Docker, no JVM.

Starts the embedded broker on a free loopback port, creates the topics, starts a worker
process (its /metrics on a free port), and a traffic simulator serving the Shuttle data
through a trained champion, with a drift injected part-way and delayed labels. Alerts,
commands and dead letters are printed as they arrive; a summary closes the run, and
everything the demo started is stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from coalmine import simulator, topics
from coalmine.broker import EmbeddedBroker, ensure_topics
from coalmine.client import tail

_COLORS = {"firing": "\033[31m", "resolved": "\033[32m", "command": "\033[36m", "dead": "\033[33m"}


def _paint(kind: str, text: str) -> str:
    return f"{_COLORS[kind]}{text}\033[0m" if sys.stdout.isatty() else text


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(topic: str, record: dict, t0: float) -> str:
    clock = f"[{time.monotonic() - t0:6.1f}s]"
    if topic == topics.ALERTS:
        what = f"{record['check']}" + (f" on {record['feature']}" if record.get("feature") else "")
        text = (f"{clock} ALERT {record['state'].upper():8} {record['model']}/{record['variant']} "
                f"{what}: {record['statistic']}={record['value']:.4g} "
                f"(threshold {record['threshold']:.4g}, {record['window']['n']} events)")
        return _paint(record["state"], text)
    if topic == topics.COMMANDS:
        weight = f" weight={record['weight']}" if record.get("weight") is not None else ""
        return _paint("command", f"{clock} COMMAND {record['action'].upper()} {record['model']} "
                                 f"{record.get('version', '')}{weight}: {record.get('reason', '')}")
    return _paint("dead", f"{clock} DEAD-LETTER from {record.get('source_topic')}: {record.get('reason')}")


async def _watch(bootstrap: str, topic: str, seen: Counter, firing: list, t0: float, stop: asyncio.Event):
    async for record in tail(bootstrap, topic, from_end=False, until_idle=None, stop=stop):
        seen[topic] += 1
        if topic == topics.ALERTS:
            firing.append((time.monotonic() - t0, record))
        if topic != topics.DEADLETTER or seen[topic] <= 5:
            print(_describe(topic, record, t0), flush=True)
        elif seen[topic] == 6:
            print(_paint("dead", "        (further dead letters counted, not shown)"), flush=True)


def _metric(web_port: int, name: str) -> float:
    """Sum of a metric's samples from the worker's /metrics (0 if unreachable)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _wait_healthy(web_port: int, worker: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with code {worker.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{web_port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the worker did not come up in time")


async def _run(bootstrap: str, workdir: Path, web_port: int, duration: float, rate: float) -> int:
    t0 = time.monotonic()
    n = int(duration * rate)
    drift_at = int(n * 0.4)
    scenario = simulator.Scenario(n_events=n, rate_per_s=rate, start_ts_ms=int(time.time() * 1000),
                                  drift_at=drift_at, drift_until=int(n * 0.65), drift_feature="f1",
                                  drift_kind="shift", drift_size=1.0, label_delay_ms=3000,
                                  label_fraction=0.5, bad_event_every=997, seed=7)
    print(f"simulator: {n} predictions at {rate:.0f}/s over {duration:.0f}s; drift in f1 "
          f"(+1 sd) from {drift_at / rate:.0f}s to {n * 0.65 / rate:.0f}s; labels 3s late; "
          f"1 in 997 events malformed", flush=True)
    seen: Counter = Counter()
    firing: list = []
    stop = asyncio.Event()
    watchers = [asyncio.create_task(_watch(bootstrap, t, seen, firing, t0, stop))
                for t in (topics.ALERTS, topics.COMMANDS, topics.DEADLETTER)]

    async def progress():
        while not stop.is_set():
            await asyncio.sleep(10)
            print(f"[{time.monotonic() - t0:6.1f}s] worker has folded "
                  f"{_metric(web_port, 'coalmine_events_total'):,.0f} events; "
                  f"{seen[topics.ALERTS]} alert changes so far", flush=True)

    ticker = asyncio.create_task(progress())
    sent = await simulator.publish(bootstrap, simulator.generate(scenario), realtime=True)
    await asyncio.sleep(6)  # the last buckets close after the allowed lateness
    stop.set()
    ticker.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    folded = _metric(web_port, "coalmine_events_total")
    states = Counter(r["state"] for _, r in firing)
    print("\nsummary")
    print(f"  sent: {dict(sent)}; folded by the worker: {folded:,.0f}")
    print(f"  alerts: {states['firing']} firing, {states['resolved']} resolved; "
          f"commands: {seen[topics.COMMANDS]}; dead letters: {seen[topics.DEADLETTER]}")
    first = next(((t, r) for t, r in firing if r["state"] == "firing"), None)
    if first:
        delay_s = (first[1]["ts"] - scenario.start_ts_ms) / 1000 - drift_at / rate
        print(f"  first alert: {first[1]['check']} on {first[1].get('feature')} "
              f"{delay_s:.1f}s of event time after the drift began")
    print(f"  metrics were served at http://127.0.0.1:{web_port}/metrics")
    return 0


def run_demo(duration: float = 60.0, rate: float = 300.0, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="coalmine-demo-"))
    reference = workdir / "reference.jsonl"
    simulator.write_reference(reference, n=5000)
    config = workdir / "monitor.toml"
    simulator.write_demo_config(config, reference, bucket="1s", window="10s")
    web_port = _free_port()
    with EmbeddedBroker() as broker:
        print(f"broker: embedded Kafka-compatible broker at {broker.url}", flush=True)
        asyncio.run(ensure_topics(broker.bootstrap, topics.all_topics()))
        log = open(workdir / "worker.log", "wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "coalmine", "worker", "--broker", broker.url, "--config", str(config),
             "--web-port", str(web_port)], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            print(f"worker: started (log {workdir / 'worker.log'}), /metrics on port {web_port}", flush=True)
            _wait_healthy(web_port, worker)
            return asyncio.run(_run(broker.bootstrap, workdir, web_port, duration, rate))
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            log.close()
            print(f"stopped the worker and the broker; files in {workdir}")
