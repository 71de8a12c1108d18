"""The worker's web port: where it binds, and what /health says (issue 12)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from coalmine.agents.stage1 import Stage1
from coalmine.broker import EmbeddedBroker, free_port
from coalmine.health import BrokerWatch, RepeatFilter, report
from coalmine.launch import WorkerProcess, wait_until


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_web_port_binds_to_the_web_host_only(start_worker, shuttle_config):
    worker = start_worker(shuttle_config)  # --web-host defaults to 127.0.0.1
    assert listening_addresses(worker.web_port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0


# ------------------------------------------------------------------ /health and the log


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, (), None)


def test_repeated_client_lines_are_counted_not_written():
    clock = Clock()
    repeats = RepeatFilter(quiet_s=60, clock=clock)
    lines = [record("aiokafka.conn", "Unable connect to node with id %s: %s") for _ in range(500)]
    assert sum(map(repeats.filter, lines)) == 1
    assert repeats.filter(record("coalmine.stage1", "x")) and repeats.filter(
        record("coalmine.stage1", "x")
    )
    assert repeats.take_suppressed() == {"aiokafka.conn": 499}
    clock.now += 61
    assert repeats.filter(lines[0])  # once a minute at most


def test_broker_watch_says_unreachable_once_and_summarises(caplog):
    clock = Clock()
    repeats = RepeatFilter(clock=clock)
    watch = BrokerWatch(f"127.0.0.1:{free_port()}", repeats, summary_s=30, clock=clock)
    caplog.set_level(logging.INFO, logger="coalmine.health")
    for _ in range(20):  # 40 s of probes every 2 s, the client failing all along
        for _ in range(100):
            repeats.filter(record("aiokafka.client", "Unable to update metadata from [%s]"))
        asyncio.run(watch.probe())
        clock.now += 2
    status, body = report({"models": ["m"]}, None, watch)
    assert status == 503 and body["problems"][0].startswith("broker unreachable for 40 s")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # the change, one summary
    assert messages[0].startswith("broker unreachable (127.0.0.1:")
    # 1,600 lines by then, of which the first and the first after the change were written
    assert messages[1].startswith("1598 repeated client log lines suppressed in the last 30 s")


def test_stage1_that_stops_sets_its_failure():
    class Broken:
        async def getmany(self, **kwargs):
            raise KeyError("ts")

    stage1 = Stage1({}, "127.0.0.1:1", group_id="g")
    stage1.consumer = Broken()  # type: ignore[assignment]
    with pytest.raises(KeyError):
        asyncio.run(Stage1._consume(stage1))  # the task, as the service runs it
    status, body = report({}, stage1.failure, None)
    assert status == 503 and body["problems"] == ["stage 1 stopped: KeyError: 'ts'"]


@pytest.mark.integration  # a broker of its own, a worker process and a 12 s outage
def test_health_is_503_while_the_broker_is_down(tmp_path, shuttle_config):
    """A worker of its own broker; the broker stops for 12 s, then comes back on its port."""
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    worker = WorkerProcess(broker.url, shuttle_config, log=tmp_path / "worker.log")
    try:
        with worker:
            worker.wait_ready()
            assert health(worker) == (200, [])
            broker.stop()
            status, problems = wait_until(
                lambda: (h := health(worker))[0] == 503 and h, 20, "/health to say 503"
            )
            assert problems[0].startswith("broker unreachable"), problems
            time.sleep(10)
            errors_down = error_lines(worker.log_path)
            broker = EmbeddedBroker(port=port).start()
            wait_until(lambda: health(worker)[0] == 200, 60, "/health to say 200 again")
    finally:
        broker.stop()
    assert errors_down <= 10, worker.log_path.read_text()[-3000:]


def health(worker: WorkerProcess) -> tuple[int, list[str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/health", timeout=5) as r:
            return r.status, json.loads(r.read())["problems"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["problems"]


def error_lines(log: Path) -> int:
    return sum(" ERROR " in line for line in log.read_text(errors="replace").splitlines())
