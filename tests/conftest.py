"""Shared fixtures: one embedded broker per test session, workers as real subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from coalmine import simulator, topics
from coalmine.broker import EmbeddedBroker, ensure_topics, free_port
from coalmine.client import Publisher, tail


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: starts the embedded broker and real workers")


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as b:
        asyncio.run(ensure_topics(b.bootstrap, topics.all_topics()))
        yield b


class Worker:
    """A `coalmine worker` subprocess with its own web port; stopped by its test."""

    def __init__(self, broker: EmbeddedBroker, config: Path, namespace: str, log: Path, env: dict | None = None):
        self.web_port = free_port()
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coalmine", "worker", "--broker", broker.url, "--config", str(config),
             "--web-port", str(self.web_port), "--app-id", f"{namespace}coalmine"],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COALMINE_NAMESPACE": namespace, **(env or {})})

    def get(self, path: str) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=2).read().decode()

    def wait_ready(self, timeout: float = 60) -> "Worker":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}"
            try:
                self.get("/health")
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("worker did not come up")

    def metric(self, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.get("/metrics").splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Namespace:
    """A test's own set of coalmine topics on the shared broker ($COALMINE_NAMESPACE)."""

    def __init__(self, broker: EmbeddedBroker):
        self.prefix = f"t{uuid.uuid4().hex[:10]}."
        self.broker = broker
        self.topic = {short: self.prefix + name for short, name in topics.SHORT_NAMES.items()}
        asyncio.run(ensure_topics(broker.bootstrap, {t: topics.DEFAULT_PARTITIONS for t in self.topic.values()}))

    def publish(self, events) -> None:
        """(kind, event) pairs as the simulator yields them, to this namespace's topics."""
        async def run():
            async with Publisher(self.broker.bootstrap) as pub:
                for kind, event in events:
                    await pub.send(self.topic["predictions" if kind == "prediction" else "labels"], event)
                await pub.flush()
        asyncio.run(run())

    def read(self, short: str, idle: float = 1.0) -> list[dict]:
        async def run():
            return [r async for r in tail(self.broker.bootstrap, self.topic[short], until_idle=idle)]
        return asyncio.run(run())


@pytest.fixture
def namespace(broker) -> Namespace:
    return Namespace(broker)


@pytest.fixture
def start_worker(broker, namespace, tmp_path):
    """start_worker(config) -> a ready Worker in the test's namespace; all stopped after the test."""
    started: list[Worker] = []

    def start(config: Path, ready: bool = True, env: dict | None = None) -> Worker:
        w = Worker(broker, config, namespace.prefix, tmp_path / f"worker-{len(started)}.log", env)
        started.append(w)
        return w.wait_ready() if ready else w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def shuttle_config(tmp_path_factory):
    """A monitor config for the simulator's model, 1 s buckets, 10 s windows."""
    d = tmp_path_factory.mktemp("config")
    simulator.write_reference(d / "reference.jsonl", n=5000)
    simulator.write_demo_config(d / "monitor.toml", d / "reference.jsonl", bucket="1s", window="10s")
    return d / "monitor.toml"
