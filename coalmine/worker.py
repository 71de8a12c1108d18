"""Start one coalmine worker: validate the config, create the topics, run the Faust app.

Start several with the same ``--app-id`` to scale out: Kafka splits the partitions between them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from coalmine import events as contract
from coalmine import health, topics
from coalmine.baselines import build_baselines
from coalmine.broker import ensure_topics, parse_broker_url
from coalmine.config import Config, ModelConfig
from coalmine.security import client_kwargs, export_options
from coalmine.signing import Signer
from coalmine.streams.reference import first_events

log = logging.getLogger("coalmine.worker")


async def reference_from_topic(
    bootstrap: str, model: ModelConfig, wait_s: float = 3600
) -> list[dict]:
    """The model's first ``reference_first_events`` predictions in event time, read from the
    start of the predictions topic: every worker picks the same ones. Waits (logging) while
    the topic holds fewer, and reads each partition until no earlier event can follow."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    n, lateness = model.reference_first_events, model.allowed_lateness_ms
    assert n is not None, f"model {model.name}: its reference is a file, not its first events"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, **client_kwargs(bootstrap)
    )
    await consumer.start()
    try:
        parts = [
            TopicPartition(topics.PREDICTIONS, p)
            for p in sorted(consumer.partitions_for_topic(topics.PREDICTIONS) or ())
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        found: list[dict] = []
        last_ts = {tp: -1 for tp in parts}
        deadline, said = time.monotonic() + wait_s, 0.0
        while time.monotonic() < deadline:
            for tp, messages in (await consumer.getmany(timeout_ms=1000)).items():
                valid, _ = contract.split_valid(
                    "prediction", [m.value for m in messages], {model.name}
                )
                found += valid
                last_ts[tp] = max([last_ts[tp]] + [e["ts"] for e in valid])
            if len(found) >= n:
                nth = first_events(found, model.name, n)[-1]["ts"]
                ends = await consumer.end_offsets(parts)
                positions = {tp: await consumer.position(tp) for tp in parts}
                if all(last_ts[tp] > nth + lateness or positions[tp] >= ends[tp] for tp in parts):
                    return first_events(found, model.name, n)
            elif time.monotonic() - said > 10:
                said = time.monotonic()
                log.warning(
                    "model %s: waiting for %d reference events on %s (%d so far)",
                    model.name,
                    n,
                    topics.PREDICTIONS,
                    len(found),
                )
        raise TimeoutError(
            f"model {model.name}: fewer than {n} events on {topics.PREDICTIONS} after {wait_s:.0f}s"
        )
    finally:
        await consumer.stop()


def _worker_class():
    import faust

    class Worker(faust.Worker):
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            # Faust replaced the handlers: filter the Kafka clients' repeated lines on its own
            health.install(logger)

    return Worker


def run_worker(
    config: Config,
    broker_url: str,
    *,
    web_port: int = 6066,
    web_host: str = "127.0.0.1",
    app_id: str = "coalmine",
    partitions: int = topics.DEFAULT_PARTITIONS,
    loglevel: str = "warning",
    publish_evaluations: bool = False,
) -> None:
    """Blocks until the worker is stopped (SIGINT/SIGTERM)."""

    from coalmine.agents.app import create_app

    logging.basicConfig(
        level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if Signer.from_env() is None:  # also checks a key that is set: a bad one stops here
        log.warning(
            "no $COALMINE_SIGNING_KEY: rollout commands and alerts are published unsigned, and "
            "routers and subscribers cannot tell them from forged ones (python -m "
            "coalmine.signing makes a key pair)"
        )
    # the URL's protocol and credentials, for clients that are given only host:port
    export_options(broker_url, {})
    bootstrap = parse_broker_url(broker_url)

    def first_events(wanted: list[ModelConfig]) -> dict[str, list[dict]]:
        asyncio.run(ensure_topics(bootstrap, topics.all_topics(partitions)))
        return {m.name: asyncio.run(reference_from_topic(bootstrap, m)) for m in wanted}

    # references and calibration before joining the group, so a slow start never stalls a
    # rebalance; reference files before the broker is contacted, so a bad file is reported
    # even when the broker is down
    baselines = build_baselines(config, first_events)
    asyncio.run(ensure_topics(bootstrap, topics.all_topics(partitions)))
    app = create_app(
        baselines,
        broker_url,
        web_port=web_port,
        web_host=web_host,
        app_id=app_id,
        partitions=partitions,
        publish_evaluations=publish_evaluations,
    )
    worker = _worker_class()(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
