"""Start `coalmine worker` processes and wait for them: the one harness the demo, the tests and
the benchmarks share.

A :class:`WorkerProcess` runs ``python -m coalmine worker`` with its own web port, and answers
for its ``/health`` and ``/metrics``; a :class:`Namespace` is a private set of coalmine topics on
a shared broker (``$COALMINE_NAMESPACE``), so that several runs never read each other's events.

>>> with WorkerProcess(broker.url, "monitor.toml") as worker:     # doctest: +SKIP
...     worker.wait_ready()
...     print(worker.metric("coalmine_events_total"))
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from coalmine import topics
from coalmine.broker import ensure_topics, free_port, parse_broker_url


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2
) -> object:
    """Poll ``condition()`` until it returns something true (which is returned), at most
    ``timeout`` seconds; then a ``TimeoutError`` naming ``what`` was awaited.

    >>> wait_until(lambda: 42, timeout=1, what="the answer")
    42
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout:g}s for {what}")
        time.sleep(interval)


def metric_total(text: str, name: str) -> float:
    """Sum of the samples of metric ``name`` (every label set) in Prometheus text ``text``.

    >>> metric_total('# HELP x_total\\nx_total{a="1"} 2.0\\nx_total{a="2"} 3.0\\nx_created 9\\n', "x_total")
    5.0
    """
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def group_members(bootstrap: str, group_id: str) -> int:
    """Members of consumer group ``group_id`` once it is stable (every member has its
    partitions), else 0."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def describe() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=parse_broker_url(bootstrap))
        await admin.start()
        try:
            response = (await admin.describe_consumer_groups([group_id]))[0]
        finally:
            await admin.close()
        # DescribeGroupsResponse.groups: (error_code, group_id, state, protocol_type, protocol, members, ...)
        group = response.groups[0]
        return len(group[5]) if group[0] == 0 and group[2] == "Stable" else 0

    return asyncio.run(describe())


class WorkerProcess:
    """A ``coalmine worker`` subprocess with its own web port (``/health``, ``/metrics``).

    ``namespace`` is the worker's ``$COALMINE_NAMESPACE`` (topic prefix) and, unless
    ``app_id`` is given, the prefix of its app id (consumer group): ``{namespace}coalmine``.
    Its output goes to ``log`` (default: a file in a new temporary directory). ``start()``
    returns at once; ``wait_ready()`` waits for ``/health``. As a context manager it is started
    on entry and stopped on exit.
    """

    def __init__(
        self,
        broker_url: str,
        config: str | Path,
        *,
        namespace: str = "",
        app_id: str | None = None,
        web_port: int | None = None,
        log: str | Path | None = None,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ):
        self.broker_url, self.config, self.namespace = broker_url, Path(config), namespace
        self.args = args  # more `coalmine worker` options
        self.app_id = app_id or f"{namespace}coalmine"
        self.web_port = web_port or free_port()
        self.log_path = (
            Path(log) if log else Path(tempfile.mkdtemp(prefix="coalmine-worker-")) / "worker.log"
        )
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        if self.proc is not None:
            return self
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "coalmine",
                    "worker",
                    "--broker",
                    self.broker_url,
                    "--config",
                    str(self.config),
                    "--web-port",
                    str(self.web_port),
                    "--app-id",
                    self.app_id,
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "COALMINE_NAMESPACE": self.namespace,
                    **self.env,
                },
            )
        return self

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory (VmHWM), in MB; NaN once it has exited."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return float("nan")
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return kb / 1024

    @property
    def pid(self) -> int:
        return self._running().pid

    def _running(self) -> subprocess.Popen:
        if self.proc is None:
            raise RuntimeError("the worker was not started (call start())")
        return self.proc

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 2) -> str:
        """The body of ``GET path`` on the worker's web port (``OSError`` if it does not answer)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.web_port}{path}", timeout=timeout
        ) as response:
            return response.read().decode()

    def wait_ready(self, timeout: float = 90) -> WorkerProcess:
        """Wait until ``/health`` answers; a ``RuntimeError`` (with the log's end) if the process
        exits first, a ``TimeoutError`` if it does not answer within ``timeout`` seconds."""
        proc = self._running()

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with code {proc.returncode} before it was ready; "
                    f"the end of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                self.get("/health", timeout=1)
                return True
            except OSError:
                return False

        try:
            wait_until(
                healthy, timeout, f"the worker's /health on port {self.web_port}", interval=0.3
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; the end of {self.log_path}:\n{self.log_tail()}") from None
        return self

    def metric(self, name: str, busy: float | None = None) -> float:
        """Sum of the samples of a Prometheus metric on ``/metrics`` (every label set); ``busy``
        (when given) instead of an ``OSError`` while the worker is too busy to answer."""
        query = urllib.parse.urlencode({"name[]": name})
        try:
            return metric_total(self.get(f"/metrics?{query}"), name)
        except OSError:
            if busy is None:
                raise
            return busy

    def kill(self) -> None:
        """SIGKILL: no goodbye to the consumer group, nothing flushed."""
        proc = self._running()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL if the worker is still there after ``timeout`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Namespace:
    """A private set of coalmine topics on a shared broker: every name gets a fresh prefix
    (give it to workers as ``namespace``), and the topics are created at once.

    ``broker`` is anything with a ``bootstrap`` (``host:port``) and a ``url``, such as an
    :class:`~coalmine.broker.EmbeddedBroker`.
    """

    def __init__(
        self, broker, prefix: str | None = None, partitions: int = topics.DEFAULT_PARTITIONS
    ):
        self.broker = broker
        self.prefix = prefix or f"t{uuid.uuid4().hex[:10]}."
        self.topic = {short: self.prefix + name for short, name in topics.SHORT_NAMES.items()}
        asyncio.run(ensure_topics(broker.bootstrap, {t: partitions for t in self.topic.values()}))

    def worker(self, config: str | Path, **kwargs) -> WorkerProcess:
        """A (not yet started) worker of this namespace."""
        return WorkerProcess(self.broker.url, config, namespace=self.prefix, **kwargs)

    def publish(self, events: Iterable[tuple[str, dict | bytes]]) -> None:
        """(kind, event) pairs as the simulator yields them, to this namespace's topics, all
        acknowledged on return."""
        from coalmine.client import Publisher

        async def run() -> None:
            async with Publisher(self.broker.bootstrap) as pub:
                pending = [
                    await pub.send(
                        self.topic["predictions" if kind == "prediction" else "labels"], event
                    )
                    for kind, event in events
                ]
                await asyncio.gather(*pending)

        asyncio.run(run())

    def read(self, short: str, idle: float = 1.0) -> list[dict]:
        """Every record of one of this namespace's topics (``alerts``, ...), until ``idle``
        seconds pass without one."""
        from coalmine.client import tail

        async def run() -> list[dict]:
            return [
                r async for r in tail(self.broker.bootstrap, self.topic[short], until_idle=idle)
            ]

        return asyncio.run(run())
