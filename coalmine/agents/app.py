"""The Faust app: topics, a service, an agent and a timer; the logic lives in
:mod:`coalmine.streams`.

* stage 1 (:class:`~coalmine.agents.stage1.Stage1`, a service with its own batch consumer)
  reads predictions and labels (co-partitioned, keyed by request_id), one
  :class:`~coalmine.ingest.PartitionIngest` per partition, and sends closed bucket partials to
  the internal partials topic keyed by model. An offset is committed only once the bucket its
  event went into has been sent, so a worker killed mid-bucket loses nothing: the partition's
  new owner reads those events again.
* ``evaluate`` (stage 2) reads partials keyed by model, one
  :class:`~coalmine.streams.evaluator.Evaluator` per model, and publishes alert state changes.
  A partial is acknowledged once its buckets are evaluated; a re-sent partial is merged once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
import faust.web
from aiokafka.structs import TopicPartition
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST

from coalmine import events as contract
from coalmine import groups, topics
from coalmine.agents import metrics
from coalmine.agents.stage1 import Stage1, dead_letter
from coalmine.agents.state import ModelState, StateTopic, head_record, partition_of, restore
from coalmine.broker import parse_broker_url
from coalmine.health import REPEATS, BrokerWatch, report
from coalmine.partials import decode_partials, is_heartbeat
from coalmine.security import Security
from coalmine.signing import Signer
from coalmine.streams.baseline import Baseline
from coalmine.streams.evaluator import Evaluator, Misfit
from coalmine.verdicts import verdict

log = logging.getLogger("coalmine.worker")

BATCH = 2000
BATCH_WITHIN_S = 0.2
#: stage 2's state is written (and the partials it covers acknowledged) at most this often
#: ($COALMINE_STATE_EVERY_S), at once after an alert or command, when the worker stops, and
#: before a rebalance takes partitions away: 1,000 models' heads every 250 ms bucket would
#: cost more CPU than their evaluations
SAVE_EVERY_S = 1.0
#: ... and, when a write takes long (0.6-3.7 s for 1,000 models catching up on a backlog,
#: measured), only so often that writing takes at most this share of the time, but at least
#: every SAVE_WITHIN_S: more partials wait for their acknowledgement, and a new owner
#: re-evaluates more of them after a crash
SAVE_SHARE = 0.1
SAVE_WITHIN_S = 10.0
#: a source partition that sent nothing for this long (wall clock) stops holding windows back,
#: unless its stage 1 said it has a backlog (:func:`coalmine.partials.encode_heartbeat`);
#: longer than a rebalance after a crash (session timeout 10 s + catch-up), so that the
#: partials a new owner re-sends are not late
IDLE_SOURCE_S = 45.0
#: how long a partial of a newly assigned partition waits for the partition's state to be read
RESUME_WAIT_S = 60.0
#: how long a revocation waits for the batch being evaluated, to write the state of the models
#: it hands over (longer, and their new owner evaluates again from the last write)
HAND_OVER_WAIT_S = 20.0


def save_every_s() -> float:
    """How often stage 2 writes its state at most: ``$COALMINE_STATE_EVERY_S`` seconds, or
    :data:`SAVE_EVERY_S`; ValueError naming the variable when it is not a positive number."""
    raw = os.environ.get("COALMINE_STATE_EVERY_S") or str(SAVE_EVERY_S)
    try:
        every = float(raw)
    except ValueError:
        every = math.nan
    if not 0 < every < math.inf:
        raise ValueError(f"COALMINE_STATE_EVERY_S={raw!r}: not a positive number of seconds")
    return every


class Sources:
    """What stage 2 knows of each model's source partitions: when it last heard from each, and
    whether its stage 1 last said it is behind (a backlog it has not read). A source is idle,
    and windows are evaluated without it, once it has been silent for :data:`IDLE_SOURCE_S`,
    and never while it is behind."""

    def __init__(self, partitions: int, clock: Callable[[], float] = time.monotonic):
        self.partitions, self.clock = partitions, clock
        self.started = clock()
        self.heard: dict[str, dict[int, float]] = defaultdict(dict)  # model -> source -> time
        self.behind: dict[str, dict[int, bool]] = defaultdict(dict)

    def resume(self, model: str) -> None:
        """A model evaluated here from now on: every source counts as just heard, its
        backlog as unknown (the sources' stage 1 repeats it while it lasts)."""
        self.heard[model] = dict.fromkeys(range(self.partitions), self.clock())
        self.behind[model] = {}

    def known(self, model: str) -> bool:
        return bool(self.heard[model])

    def hear(self, partial: dict) -> None:
        """A partial or a heartbeat came from its source."""
        model, source = partial["model"], partial["source"]
        self.heard[model][source] = self.clock()
        if is_heartbeat(partial):
            self.behind[model][source] = bool(partial["behind"])

    def idle(self, model: str) -> set[int]:
        now, last, behind = self.clock(), self.heard[model], self.behind[model]
        return {
            s
            for s in range(self.partitions)
            if not behind.get(s) and now - last.get(s, self.started) > IDLE_SOURCE_S
        }


class _App(faust.App):
    """Faust's app, starting :attr:`with_consumer` (services with consumers of their own)
    before its own services, not once its tables are recovered as ``@app.service`` does: stage
    1's consumer then joins its group while Faust's consumer joins the app's. One after the
    other, the two joins held a fresh worker for twice a group's join delay (the embedded
    broker's: half the session timeout, 5 s; Kafka's group.initial.rebalance.delay.ms: 3 s)."""

    with_consumer: list[type[Service]]

    def on_init_dependencies(self) -> list:
        services = list(super().on_init_dependencies())
        if self.producer_only or self.client_only:  # no consumer: no stage 1 either
            return services
        # first: Faust's table manager waits 1 s before its consumer joins
        return [s(loop=self.loop, beacon=self.beacon) for s in self.with_consumer] + services


def create_app(
    baselines: dict[str, Baseline],
    broker_url: str,
    *,
    web_port: int = 6066,
    web_host: str = "127.0.0.1",
    app_id: str = "coalmine",
    partitions: int = topics.DEFAULT_PARTITIONS,
    publish_evaluations: bool = False,
) -> faust.App:
    """A Faust app monitoring the models of ``baselines`` (:func:`coalmine.baselines.build_baselines`);
    run it with ``app.main()`` or a Worker."""
    save_every = save_every_s()
    groups.install()  # stopped, it leaves its consumer groups on the embedded broker too
    # Faust keeps an app directory even with memory tables: never the working directory
    datadir = (
        Path(os.environ.get("COALMINE_DATA_DIR") or Path(tempfile.gettempdir()) / "coalmine-faust")
        / app_id
    )
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = _App(
        app_id,
        broker=f"kafka://{parse_broker_url(broker_url)}",
        broker_credentials=Security.resolve(broker_url).faust_credentials(),
        store="memory://",
        topic_partitions=partitions,
        web_port=web_port,
        web_host=web_host,
        web_bind=web_host,  # Faust binds 0.0.0.0 unless told: web_host is only the advertised name
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
    partials_topic = app.topic(topics.PARTIALS, key_serializer="raw", value_serializer="raw")
    alerts_topic = app.topic(topics.ALERTS, key_serializer="raw", value_serializer="raw")
    commands_topic = app.topic(topics.COMMANDS, key_serializer="raw", value_serializer="raw")
    dead_topic = app.topic(topics.DEADLETTER, key_serializer="raw", value_serializer="raw")
    evaluations_topic = app.topic(topics.EVALUATIONS, key_serializer="raw", value_serializer="raw")

    signer = Signer.from_env()
    evaluators = {
        name: Evaluator(b, sources=partitions, signer=signer) for name, b in baselines.items()
    }
    sources = Sources(partitions)
    stage1: list[Stage1] = []  # the running instance, once Faust has started it
    states = {name: ModelState() for name in baselines}  # what was last written of each
    owned: set[int] = set()  # partials partitions this worker evaluates
    resumed: dict[int, asyncio.Event] = defaultdict(asyncio.Event)  # set while in owned
    # messages of the partials topic not acknowledged yet, in offset order: ((model, the
    # partial's last bucket) of each partial that waits for an evaluation, event)
    waiting: list[tuple[list[tuple[str, int]], faust.EventT]] = []
    partition = {name: partition_of(name, partitions) for name in baselines}
    state_topic = StateTopic(parse_broker_url(broker_url))
    unsaved: set[str] = set()  # models evaluated since their state was last written
    flushed = [time.monotonic(), 0.0]  # when it last was, and how long writing it took
    evaluating = asyncio.Lock()  # partials are evaluated and published whole between flushes
    the_stream: list[Any] = []  # the stage-2 agent's, to acknowledge partials on

    @app.service
    class _SaveStateOnStop(Service):
        async def on_stop(self) -> None:
            """A stopped worker (SIGTERM) first writes what it evaluated since its last write:
            its successor resumes there, and publishes no alert again."""
            async with evaluating:
                await write_now(set(unsaved), "on stop")
            await state_topic.close()

    class _Stage1(Stage1):
        def __init__(self, **kwargs):
            super().__init__(
                baselines, parse_broker_url(broker_url), group_id=f"{app_id}-stage1", **kwargs
            )
            stage1.append(self)

    app.with_consumer = [_Stage1]

    async def send_dead_letter(
        tp: TopicPartition, offset: int | None, key: bytes | None, value: bytes | None, reason: str
    ) -> None:
        key, value = dead_letter(tp, offset, key, value, reason)
        await dead_topic.send(key=key, value=value)

    async def send_dead_message(message, reason: str) -> None:
        tp = TopicPartition(message.topic, message.partition)
        await send_dead_letter(tp, message.offset, message.key, message.value, reason)

    async def publish(model: str, out) -> None:
        for alert in out.alerts:
            await alerts_topic.send(key=model.encode(), value=contract.encode(alert.to_json()))
        for command in out.commands:
            await commands_topic.send(key=model.encode(), value=contract.encode(command.to_json()))
            metrics.record_command(model, command)
        metrics.EVALUATIONS.labels(model).inc(len({e.ts for e in out.evaluations}))
        if publish_evaluations:
            by_bucket: dict[int, list[dict]] = defaultdict(list)
            for e in out.evaluations:
                by_bucket[e.ts].append(e.to_json())
            for ts, evaluated in by_bucket.items():
                bucket = {"model": model, "ts": ts, "evaluations": evaluated}
                await evaluations_topic.send(key=model.encode(), value=contract.encode(bucket))
        metrics.record_evaluations(
            model, out.evaluations, out.alerts, len(evaluators[model].alerts.firing)
        )

    async def save(models: set[str]) -> None:
        """Write the state of ``models``' evaluators, after the alerts and commands they
        published: a new owner never misses one (at worst it publishes one again, same id)."""
        models = {m for m in models if partition[m] in owned}  # never over a new owner's
        if not models:
            return
        await app.producer.flush()
        records: dict[int, list] = defaultdict(list)
        for model in sorted(models):
            records[partition[model]] += states[model].records(model, evaluators[model])
        await state_topic.write(records)

    @app.on_partitions_assigned.connect
    async def resume(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Models of newly assigned partials partitions resume from their state records (a
        fresh evaluator when they have none); their sources count as live again."""
        assigned = args[0] if args else kwargs["assigned"]
        mine = {tp.partition for tp in assigned if tp.topic == topics.PARTIALS}
        new = sorted(mine - owned)
        # each read ends with a wait for more (StateTopic.read): all at once, not one by one
        read = dict(zip(new, await asyncio.gather(*(state_topic.read(p) for p in new))))
        for p in new:
            records = read.pop(p)
            for model in [m for m in baselines if partition[m] == p]:
                restored = await restored_or_none(records, model, p)
                if restored is None:
                    restored = Evaluator(baselines[model], partitions, signer), ModelState()
                evaluators[model], states[model] = restored
                sources.resume(model)
                log.info("stage 2 of %s resumes at bucket %s", model, evaluators[model].next_bucket)
        for p in owned - mine:
            resumed[p].clear()
        owned.clear()
        owned.update(mine)
        for p in mine:
            resumed[p].set()

    async def restored_or_none(
        records: dict[bytes, bytes], model: str, p: int
    ) -> tuple[Evaluator, ModelState] | None:
        """A model's evaluator from its state records (None: it has none). Records that do not
        read (damaged, or forged) are dead-lettered with the reason and the model starts
        afresh: otherwise this worker, and every next owner of the partition, would die on
        them."""
        try:
            return restore(records, baselines[model], signer)
        except Exception as exc:
            reason = f"state of {model!r} unreadable, started afresh: {exc!r}"
            log.error("stage 2: %s", reason)
            head = head_record(records, model)
            await send_dead_letter(
                TopicPartition(topics.STATE, p), None, model.encode(), head, reason
            )
            return None

    @app.on_partitions_revoked.connect
    async def hand_over(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Revoked partitions stop being evaluated (and written) here at once, their models'
        state written first: their new owner resumes there, and publishes no alert again."""
        revoked = args[0] if args else kwargs["revoked"]
        gone = {tp.partition for tp in revoked if tp.topic == topics.PARTIALS}
        try:  # a batch being evaluated finishes first
            await asyncio.wait_for(evaluating.acquire(), HAND_OVER_WAIT_S)
        except TimeoutError:
            log.warning("stage 2: state of revoked partitions %s not written", sorted(gone))
        else:
            try:
                leaving = {m for m in unsaved if partition[m] in gone}
                await write_now(leaving, f"of revoked partitions {sorted(gone)}")
            finally:
                evaluating.release()
        for p in gone:  # no await since the release: no batch evaluates them in between
            owned.discard(p)
            resumed[p].clear()
        # Faust delivers them again, should the partitions come back here
        waiting[:] = [w for w in waiting if w[1].message.partition not in gone]

    async def write_now(models: set[str], what: str) -> None:
        """Write ``models``' state at once (holding ``evaluating``); a write that fails is
        logged, and their next owner evaluates again from the last one."""
        try:
            await save(models)
            unsaved.difference_update(models)
        except Exception:
            log.exception("stage 2: state %s not written", what)

    async def owns(partition: int) -> bool:
        """Whether this worker evaluates ``partition``; Faust may resume a newly assigned one
        before its state is read (:func:`resume`): wait for that, not for a revoked one."""
        if partition not in owned:
            try:
                await asyncio.wait_for(resumed[partition].wait(), RESUME_WAIT_S)
            except TimeoutError:
                pass
        return partition in owned

    @app.agent(partials_topic)
    async def evaluate(stream: Any) -> None:
        the_stream[:] = [stream]
        async for batch in stream.noack_take(BATCH, within=BATCH_WITHIN_S):
            t0 = time.perf_counter()
            async with evaluating:
                urgent = False
                for event in batch:
                    if not await owns(event.message.partition):
                        continue  # revoked: its new owner reads it again
                    try:
                        partials = decode_partials(event.message.value)
                    except Exception as exc:  # not ours, or damaged
                        await send_dead_message(event.message, f"not a partial: {exc!r}")
                        partials = []
                    waits: list[tuple[str, int]] = []
                    for partial in partials:
                        try:
                            urgent |= await take(partial, waits)
                        except Exception as exc:  # the message goes whole, naming whose
                            whose = partial.get("model") if isinstance(partial, dict) else None
                            if isinstance(exc, Misfit):  # forged, or of another configuration
                                reason = f"a partial of {whose!r} that does not fit: {exc}"
                            else:
                                log.exception("stage 2 failed on a partial")
                                reason = f"internal error on the partial of {whose!r}: {exc!r}"
                            await send_dead_message(event.message, reason)
                    waiting.append((waits, event))
                await flush(now=urgent)
            metrics.PROCESSING.labels("evaluate").observe(time.perf_counter() - t0)

    async def take(partial: dict, waits: list[tuple[str, int]]) -> bool:
        """Hear, merge and evaluate one partial of a message; what its message waits for (the
        model and the partial's last bucket) goes to ``waits``. Whether stage 2's state must be
        written at once (:func:`evaluated`)."""
        model = partial["model"]
        sources.hear(partial)
        if is_heartbeat(partial):
            return False
        late = evaluators[model].late_partials
        out = evaluators[model].add(partial, sources.idle(model))
        metrics.LATE_PARTIALS.labels(model).inc(evaluators[model].late_partials - late)
        waits.append((model, max((int(b) for b in partial["buckets"]), default=-1)))
        return await evaluated(model, out)

    async def evaluated(model: str, out) -> bool:
        """Publish what a model's evaluation gave; whether its state must be written at once
        (it published an alert or a command)."""
        await publish(model, out)
        if out.evaluations:
            unsaved.add(model)
        return bool(out.alerts or out.commands)

    async def flush(now: bool) -> None:
        """Write the state of the models evaluated since the last write, then acknowledge the
        partials it covers (the state first: what a new owner does not find in the state,
        Kafka delivers again); unless ``now``, as often as :func:`save_every_s`,
        :data:`SAVE_SHARE` and :data:`SAVE_WITHIN_S` say. Called holding ``evaluating``."""
        last, took = flushed
        every = min(max(save_every, took / SAVE_SHARE), max(SAVE_WITHIN_S, save_every))
        if not now and time.monotonic() - last < every:
            return
        t0 = time.monotonic()
        await save(unsaved)
        unsaved.clear()
        done = time.monotonic()
        flushed[:] = done, done - t0
        if the_stream:
            await acknowledge(the_stream[0])

    @app.timer(interval=save_every)
    async def flush_quiet_spells() -> None:
        """What was evaluated before the partials stopped coming is written too (while a batch
        is evaluated, the batch writes it)."""
        if not evaluating.locked():
            async with evaluating:
                await flush(now=False)

    async def acknowledge(stream) -> None:
        """Acknowledge, in offset order, the messages whose partials were all evaluated (and
        saved): never one after a message still waiting, for Faust then commits past that
        one too (when it is the first after the committed offset), and a new owner would not
        read its partials again."""
        still, held = [], set()
        for waits, event in waiting:
            partition = event.message.partition
            if partition not in owned:
                continue  # handed over: the new owner reads it again
            if partition not in held and all(
                (nxt := evaluators[model].next_bucket) is not None and last < nxt
                for model, last in waits
            ):
                await stream.ack(event)
            else:
                held.add(partition)
                still.append((waits, event))
        waiting[:] = still

    @app.timer(interval=2.0)
    async def release_idle_sources():
        """Quiet partitions must not hold the window back: evaluate without them."""
        async with evaluating:
            urgent = False
            for model, evaluator in evaluators.items():
                if sources.known(model) and partition[model] in owned:
                    try:
                        urgent |= await evaluated(model, evaluator.poll(sources.idle(model)))
                    except Exception:  # a stage-2 bug must not take the worker down with it
                        log.exception("stage 2 failed releasing idle sources of %s", model)
            await flush(now=urgent)

    @app.page("/verdicts/{model}/")
    class Verdicts(faust.web.View):
        """The rollout verdict of a model's canary (or shadow, or ``?version=``), for Argo
        Rollouts' web metric provider (GET) and Flagger's webhooks (POST):
        :mod:`coalmine.verdicts`."""

        async def get(self, request: Any, model: str) -> Any:
            return self.answer(request, model)

        async def post(self, request: Any, model: str) -> Any:
            return self.answer(request, model)

        def answer(self, request: Any, model: str) -> Any:
            if model not in evaluators:
                return self.json({"model": model, "error": "not monitored here"}, status=404)
            if partition[model] not in owned:  # a stale evaluator must not answer
                error = "evaluated by another worker: ask the one whose /health lists partition"
                return self.json(
                    {"model": model, "error": f"{error} {partition[model]}"}, status=503
                )
            status, body = verdict(model, evaluators[model], request.query.get("version"))
            return self.json(body, status=status)

    @app.page("/metrics")
    async def prometheus(web, request):
        names = request.query.getall("name[]", [])
        return web.bytes(metrics.exposition(names), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    broker_watch = BrokerWatch(parse_broker_url(broker_url), REPEATS)

    @app.timer(interval=2.0)
    async def watch_broker():
        await broker_watch.probe()

    @app.page("/health")
    async def health(web, request):
        status, body = report(
            {
                "models": sorted(models),
                "partitions_sketched": sorted(stage1[0].ingests) if stage1 else [],
                "partitions_evaluated": sorted(owned),
                "firing": {m: len(e.alerts.firing) for m, e in evaluators.items()},
            },
            stage1[0].failure if stage1 else None,
            await broker_watch.fresh(),
        )
        return web.json(body, status=status)

    return app
