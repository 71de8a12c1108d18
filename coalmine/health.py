"""What a worker's ``/health`` says, and how much it logs while the broker is away.

* :class:`BrokerWatch` checks every few seconds whether any bootstrap broker accepts a TCP
  connection, and logs one line when that changes (lost, back).
* :func:`report` is the ``/health`` answer: 503 with the reasons when stage 1 has stopped or
  the broker is unreachable, else 200.
* :class:`RepeatFilter` keeps the Kafka clients' retry loops from flooding the log: aiokafka
  logs an ERROR for every failed connection and metadata attempt (about 1,700 lines in a 30 s
  outage). The first line of each kind gets through; repeats within ``quiet_s`` are counted,
  and :class:`BrokerWatch` writes their count as one summary line every ``summary_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

log = logging.getLogger("coalmine.health")

#: the loggers of the client libraries whose retries repeat the same line many times a second
NOISY_LOGGERS = ("aiokafka", "faust", "mode", "kafka")


class RepeatFilter(logging.Filter):
    """Drops a record of a noisy logger that repeats one already let through (same logger,
    same message template) less than ``quiet_s`` ago; counts what it dropped."""

    def __init__(self, quiet_s: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.quiet_s, self.clock = quiet_s, clock
        self.last: dict[tuple[str, str], float] = {}
        self.suppressed: Counter[str] = Counter()  # logger name -> records dropped

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(NOISY_LOGGERS) or record.levelno < logging.WARNING:
            return True
        key, now = (record.name, str(record.msg)), self.clock()
        if now - self.last.get(key, -float("inf")) < self.quiet_s:
            self.suppressed[record.name] += 1
            return False
        self.last[key] = now
        return True

    def take_suppressed(self) -> Counter[str]:
        """What was dropped since the last call."""
        out, self.suppressed = self.suppressed, Counter()
        return out

    def reset(self) -> None:
        """Let every kind of line through once more (the broker's state changed)."""
        self.last.clear()


#: the worker process's filter (:func:`install` puts it on the log handlers)
REPEATS = RepeatFilter()


def install(logger: logging.Logger | None = None) -> None:
    """:data:`REPEATS` on every handler of ``logger`` (default: the root logger): a handler's
    filters see the records propagated from every child logger."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(REPEATS)


class BrokerWatch:
    """Whether any of the bootstrap brokers accepts connections; :meth:`probe` it regularly."""

    def __init__(
        self,
        bootstrap: str,
        repeat: RepeatFilter | None = None,
        summary_s: float = 30.0,
        timeout_s: float = 2.0,
        clock=time.monotonic,
    ):
        self.hosts = [h.rpartition(":") for h in bootstrap.split(",")]
        self.repeat, self.summary_s, self.timeout_s, self.clock = (
            repeat,
            summary_s,
            timeout_s,
            clock,
        )
        self.reachable, self.reason = True, ""
        self.since = self.last_summary = clock()
        self.checked = -float("inf")

    async def _connects(self) -> str:
        """'' when a broker accepted a connection, else why none did."""
        why = ""
        for host, _, port in self.hosts:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port)), self.timeout_s
                )
            except (OSError, TimeoutError) as exc:
                why = f"{host}:{port}: {getattr(exc, 'strerror', None) or type(exc).__name__}"
                continue
            writer.close()
            return ""
        return why

    async def fresh(self, max_age_s: float = 2.0) -> BrokerWatch:
        """Itself, probed unless it was less than ``max_age_s`` ago: Faust starts timers only
        once its consumer has started, and /health must be right before that too."""
        if self.clock() - self.checked >= max_age_s:
            await self.probe()
        return self

    async def probe(self) -> None:
        """Check once; log a state change, and the periodic summary of suppressed lines."""
        why = await self._connects()
        now = self.checked = self.clock()
        if bool(why) == self.reachable:  # a change
            if why:
                log.error("broker unreachable (%s); /health says 503 until it is back", why)
            else:
                log.warning("broker reachable again after %.0f s", now - self.since)
                self._summary(now, force=True)
            self.reachable, self.since = not why, now
            if self.repeat is not None:
                self.repeat.reset()
        self.reason = why
        self._summary(now)

    def _summary(self, now: float, force: bool = False) -> None:
        if self.repeat is None or not (force or now - self.last_summary >= self.summary_s):
            return
        self.last_summary = now
        dropped = self.repeat.take_suppressed()
        if dropped:
            log.warning(
                "%d repeated client log lines suppressed in the last %.0f s (%s)%s",
                sum(dropped.values()),
                self.summary_s,
                ", ".join(f"{name}: {n}" for name, n in dropped.most_common(3)),
                "" if self.reachable else f"; broker unreachable for {now - self.since:.0f} s",
            )


def report(
    body: dict[str, Any], stage1_failure: str | None, broker: BrokerWatch | None
) -> tuple[int, dict[str, Any]]:
    """The ``/health`` status code and body: ``body`` plus ``healthy`` and ``problems``.

    >>> report({"models": ["m"]}, "KeyError('x')", None)
    (503, {'models': ['m'], 'healthy': False, 'problems': ["stage 1 stopped: KeyError('x')"]})
    """
    problems = []
    if stage1_failure:
        problems.append(f"stage 1 stopped: {stage1_failure}")
    if broker is not None and not broker.reachable:
        problems.append(
            f"broker unreachable for {broker.clock() - broker.since:.0f} s ({broker.reason})"
        )
    return (503 if problems else 200), {**body, "healthy": not problems, "problems": problems}
