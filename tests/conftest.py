"""Shared fixtures: one embedded broker per test session, workers as real subprocesses.
coalmine is imported in the fixtures: the xdist controller, which loads this file too, runs no
test."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from coalmine.launch import Namespace, WorkerProcess


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: starts the embedded broker and real workers")
    config.addinivalue_line(
        "markers",
        "slow: needs seconds of work outside coalmine (a wheel build, a browser, a second report"
        " render) or a long stream; `make unit` leaves it out, `make test` runs it",
    )


def pytest_collection_modifyitems(config, items):
    """Every test that uses the broker, directly or through another fixture, is an integration
    test (`make unit` leaves them out)."""
    for item in items:
        if "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(owner, name)``: a list whose one item counts the calls of ``owner.name``
    from then on (the calls still happen)."""

    def count(owner, name: str) -> list[int]:
        calls, original = [0], getattr(owner, name)

        def counted(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return count


@pytest.fixture(scope="session")
def broker():
    from coalmine import topics
    from coalmine.broker import EmbeddedBroker, ensure_topics

    with EmbeddedBroker() as b:
        asyncio.run(ensure_topics(b.bootstrap, topics.all_topics()))
        yield b


@pytest.fixture
def namespace(broker) -> Namespace:
    """A test's own set of coalmine topics on the shared broker ($COALMINE_NAMESPACE)."""
    from coalmine.launch import Namespace

    return Namespace(broker)


@pytest.fixture
def start_worker(namespace, tmp_path):
    """start_worker(config) -> a ready WorkerProcess in the test's namespace; all stopped after
    the test."""
    started: list[WorkerProcess] = []

    def start(
        config: Path, ready: bool = True, env: dict | None = None, args: tuple[str, ...] = ()
    ) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        w = namespace.worker(config, log=log, env=env, args=args)
        started.append(w.start())
        return w.wait_ready() if ready else w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def shuttle_config(tmp_path_factory):
    """A monitor config for the simulator's model, 1 s buckets, 10 s windows."""
    from coalmine import simulator

    d = tmp_path_factory.mktemp("config")
    simulator.write_reference(d / "reference.jsonl", n=5000)
    simulator.write_demo_config(
        d / "monitor.toml", d / "reference.jsonl", bucket="1s", window="10s"
    )
    return d / "monitor.toml"
