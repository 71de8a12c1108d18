"""The Faust app: topics, two agents and a timer; the logic lives in :mod:`coalmine.streams`.

* ``sketch`` (stage 1) reads predictions and labels (co-partitioned, keyed by request_id) in
  batches, one :class:`~coalmine.streams.sketcher.Sketcher` per partition, and sends closed
  bucket partials to the internal partials topic keyed by model. An event is acknowledged
  (its offset may be committed) only once the bucket it went into has been sent, so a worker
  killed mid-bucket loses nothing: the partition's new owner reads those events again.
* ``evaluate`` (stage 2) reads partials keyed by model, one
  :class:`~coalmine.streams.evaluator.Evaluator` per model, and publishes alert state changes.
  A partial is acknowledged once its buckets are evaluated; a re-sent partial is merged once.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import faust
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coalmine import events as contract
from coalmine import topics
from coalmine.agents import metrics
from coalmine.ingest import PartitionIngest
from coalmine.signing import Signer
from coalmine.streams.baseline import Baseline
from coalmine.streams.evaluator import Evaluator

log = logging.getLogger("coalmine.worker")

BATCH = 2000
BATCH_WITHIN_S = 0.2
#: a source partition that sent nothing for this long (wall clock) stops holding windows back;
#: longer than a rebalance after a crash (session timeout 10 s + catch-up), so that the
#: partials a new owner re-sends are not late
IDLE_SOURCE_S = 45.0


def create_app(
    baselines: dict[str, Baseline],
    broker_url: str,
    *,
    web_port: int = 6066,
    web_host: str = "127.0.0.1",
    app_id: str = "coalmine",
    partitions: int = topics.DEFAULT_PARTITIONS,
) -> faust.App:
    """A Faust app monitoring the models of ``baselines`` (:func:`coalmine.baselines.build_baselines`);
    run it with ``app.main()`` or a Worker."""
    # Faust keeps an app directory even with memory tables: never the working directory
    datadir = (
        Path(os.environ.get("COALMINE_DATA_DIR") or Path(tempfile.gettempdir()) / "coalmine-faust")
        / app_id
    )
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=broker_url,
        store="memory://",
        topic_partitions=partitions,
        web_port=web_port,
        web_host=web_host,
        web_enabled=True,
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        topic_allow_declare=False,
        producer_linger_ms=5,
        datadir=datadir,
    )
    models = set(baselines)
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(topics.PREDICTIONS, topics.LABELS, **raw)
    partials_topic = app.topic(topics.PARTIALS, **raw)
    alerts_topic = app.topic(topics.ALERTS, **raw)
    commands_topic = app.topic(topics.COMMANDS, **raw)
    dead_topic = app.topic(topics.DEADLETTER, **raw)

    ingests: dict[int, PartitionIngest] = {}
    # partition -> kind -> events folded, not yet acknowledged
    held: dict[int, dict[str, list[faust.EventT]]] = defaultdict(lambda: defaultdict(list))
    signer = Signer.from_env()
    evaluators = {
        name: Evaluator(b, sources=partitions, signer=signer) for name, b in baselines.items()
    }
    heard: dict[str, dict[int, float]] = defaultdict(dict)  # model -> source -> wall time
    started = time.monotonic()

    async def dead_letter(message, reason: str) -> None:
        record = contract.deadletter_record(
            message.value,
            reason,
            message.topic,
            message.partition,
            message.offset,
            int(time.time() * 1000),
        )
        await dead_topic.send(key=message.key, value=contract.encode(record))
        metrics.DEADLETTERS.labels(message.topic, metrics.reason_kind(reason)).inc()

    async def sketch_partition(partition: int, batch: list, stream) -> None:
        ingest = ingests.setdefault(partition, PartitionIngest(baselines, source=partition))
        by_kind: dict[str, list] = {"prediction": [], "label": []}
        for event in batch:
            kind = "label" if event.message.topic == topics.LABELS else "prediction"
            by_kind[kind].append(event)
        for kind, evs in by_kind.items():
            if not evs:
                continue
            fed = ingest.feed(kind, [e.message.value for e in evs], [e.message.offset for e in evs])
            for pos, reason in fed.dead:
                if reason.startswith("late event"):
                    metrics.LATE.labels(orjson.loads(evs[pos].message.value)["model"]).inc()
                await dead_letter(evs[pos].message, reason)
                await stream.ack(evs[pos])
            dead = {pos for pos, _ in fed.dead}
            held[partition][kind] += [e for i, e in enumerate(evs) if i not in dead]
            metrics.count_events(kind, fed.counts)
        for partial in ingest.close():
            await partials_topic.send(key=partial["model"].encode(), value=contract.encode(partial))
        # events in closed buckets are safe: acknowledge them so their offsets commit
        committable = ingest.committable()
        for kind, events in held[partition].items():
            upto = committable.get(kind, -1)
            for event in events:
                if event.message.offset < upto:
                    await stream.ack(event)
            held[partition][kind] = [e for e in events if e.message.offset >= upto]
        sketchers = [i.sketcher for i in ingests.values()]
        metrics.EXPIRED.set(sum(s.expired_unlabelled for s in sketchers))
        metrics.UNJOINED.set(sum(s.expired_unjoined_labels for s in sketchers))

    @app.agent(inputs)
    async def sketch(stream):
        async for batch in stream.noack_take(BATCH, within=BATCH_WITHIN_S):
            t0 = time.perf_counter()
            by_partition: dict[int, list] = defaultdict(list)
            for event in batch:
                by_partition[event.message.partition].append(event)
            for partition, events in sorted(by_partition.items()):
                try:
                    await sketch_partition(partition, events, stream)
                except Exception as exc:  # a worker never dies on one batch
                    log.exception("stage 1 failed on a batch of partition %s", partition)
                    for event in events:
                        await dead_letter(event.message, f"internal error: {exc!r}")
                        await stream.ack(event)
            metrics.PROCESSING.labels("sketch").observe(time.perf_counter() - t0)
            metrics.BATCH_EVENTS.labels("sketch").observe(len(batch))

    async def publish(model: str, out) -> None:
        for alert in out.alerts:
            await alerts_topic.send(key=model.encode(), value=contract.encode(alert.to_json()))
        for command in out.commands:
            await commands_topic.send(key=model.encode(), value=contract.encode(command.to_json()))
            metrics.COMMANDS.labels(model, command.action).inc()
        metrics.EVALUATIONS.labels(model).inc(len({e.ts for e in out.evaluations}))
        metrics.record_evaluations(
            model, out.evaluations, out.alerts, len(evaluators[model].alerts.firing)
        )

    def idle_sources(model: str) -> set[int]:
        now = time.monotonic()
        last = heard[model]
        return {s for s in range(partitions) if now - last.get(s, started) > IDLE_SOURCE_S}

    @app.agent(partials_topic)
    async def evaluate(stream):
        waiting: list[tuple[str, int, faust.EventT]] = []
        async for batch in stream.noack_take(BATCH, within=BATCH_WITHIN_S):
            t0 = time.perf_counter()
            for event in batch:
                try:
                    partial = orjson.loads(event.message.value)
                    model = partial["model"]
                    heard[model][partial["source"]] = time.monotonic()
                    await publish(model, evaluators[model].add(partial, idle_sources(model)))
                    last = max((int(b) for b in partial["buckets"]), default=-1)
                    waiting.append((model, last, event))
                except Exception as exc:
                    log.exception("stage 2 failed on a partial")
                    await dead_letter(event.message, f"internal error: {exc!r}")
                    await stream.ack(event)
            still = []
            for model, last, event in waiting:
                nxt = evaluators[model].next_bucket
                if nxt is not None and last < nxt:
                    await stream.ack(event)
                else:
                    still.append((model, last, event))
            waiting = still
            metrics.PROCESSING.labels("evaluate").observe(time.perf_counter() - t0)

    @app.timer(interval=2.0)
    async def release_idle_sources():
        """Quiet partitions must not hold the window back: evaluate without them."""
        for model, evaluator in evaluators.items():
            if heard[model]:
                try:
                    await publish(model, evaluator.poll(idle_sources(model)))
                except Exception:  # a stage-2 bug must not take the worker down with it
                    log.exception("stage 2 failed releasing idle sources of %s", model)

    @app.page("/metrics")
    async def prometheus(web, request):
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/health")
    async def health(web, request):
        return web.json(
            {
                "models": sorted(models),
                "partitions_sketched": sorted(ingests),
                "firing": {m: len(e.alerts.firing) for m, e in evaluators.items()},
            }
        )

    def forget(assigned_or_revoked):
        for tp in assigned_or_revoked:
            if tp.topic == topics.PREDICTIONS:
                ingests.pop(tp.partition, None)
                held.pop(tp.partition, None)

    @app.on_partitions_revoked.connect
    async def on_revoked(app, revoked, **kwargs):
        forget(revoked)

    return app
