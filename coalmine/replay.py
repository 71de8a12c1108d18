"""Backtests: prediction and label files through the same stage-1 and stage-2 code as a worker.

No broker and no clock: the same files and config give byte-identical alerts and evaluations.
"""

from __future__ import annotations

import gc
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import orjson

from coalmine import events as contract
from coalmine import topics
from coalmine.baselines import FirstEvents, build_baselines
from coalmine.config import Config, ModelConfig
from coalmine.ingest import PartitionIngest
from coalmine.signing import Signer
from coalmine.slices import ReceivedSlice, TopicSlice, read_slices
from coalmine.streams.baseline import Baseline
from coalmine.streams.evaluator import Emitted, Evaluator
from coalmine.streams.records import Alert, Command, Evaluation
from coalmine.streams.reference import first_events

CHUNK = 20_000
#: with many models, a chunk holds this many events a model (up to MAX_CHUNK): stage 1 folds
#: each model's events of a chunk in one call, whose fixed cost ~20 events would not repay
EVENTS_PER_MODEL = 100
MAX_CHUNK = 200_000
_DUMP = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY


def chunk_size(config: Config) -> int:
    """Events a chunk of a replay of ``config`` holds.

    >>> chunk_size(Config({})), chunk_size(Config(dict.fromkeys(map(str, range(1000)))))
    (20000, 100000)
    """
    return min(MAX_CHUNK, max(CHUNK, EVENTS_PER_MODEL * len(config.models)))


def file_chunks(path: Path, size: int = CHUNK) -> Iterator[list[bytes]]:
    """The non-blank lines of a JSONL file, raw, ``size`` at a time (what a topic slice gives
    as messages: :func:`topic_chunks`)."""
    with open(path, "rb") as fh:
        lines = (line.rstrip(b"\r\n") for line in fh if not line.isspace())
        while raw := list(islice(lines, size)):
            yield raw


def topic_chunks(source: TopicSlice | ReceivedSlice, size: int = CHUNK) -> Iterator[list[bytes]]:
    """A topic slice's messages, every partition merged in event-time order, ``size`` at a
    time: the same chunks as :func:`file_chunks` of the same events in a file."""
    held: list[bytes] = []
    for merged in source.merged():
        held += merged
        while len(held) >= size:
            yield held[:size]
            held = held[size:]
    if held:
        yield held


def _decoded(
    raw_chunks: Iterable[list[bytes]],
    decode: Callable[[list[bytes]], tuple[list[dict], list[tuple[int, str]]]],
    dead: list,
    kind: str = "label",
) -> Iterator[list[dict]]:
    """Decoded, valid events in chunks; invalid ones go to ``dead`` with their reason."""
    for raws in raw_chunks:
        valid, invalid = decode(raws)
        dead += [(kind, raws[i].rstrip(b"\r\n"), reason) for i, reason in invalid]
        yield valid


class Replay:
    """Feeds events in event-time chunks to stage 1 (one source: a
    :class:`~coalmine.ingest.PartitionIngest`, as a worker's partition) and one
    :class:`Evaluator` per model, collecting the alerts and commands they emit. Evaluations
    (one per check per bucket: far more) go to ``on_evaluations`` as they come, if given, and
    are not kept, so a long replay's memory does not grow with its length."""

    def __init__(
        self,
        baselines: dict[str, Baseline],
        on_evaluations: Callable[[list[Evaluation]], object] | None = None,
    ):
        self.baselines = baselines
        self.ingest = PartitionIngest(baselines)
        signer = Signer.from_env()
        self.evaluators = {name: Evaluator(b, signer=signer) for name, b in baselines.items()}
        self.on_evaluations = on_evaluations
        self.alerts: list[Alert] = []
        self.commands: list[Command] = []
        self.dead: list[tuple[str, bytes, str]] = []
        self.counts: Counter = Counter()

    def feed(self, predictions: list[dict], labels: list[dict]) -> None:
        """Fold valid events given as dicts, then evaluate the buckets they closed."""
        for i, reason in self.ingest.fold_predictions(predictions).dead:
            self.dead.append(("prediction", orjson.dumps(predictions[i]), reason))
        self.counts["predictions"] += len(predictions)
        self.add_labels(labels)
        self.close()

    def add_predictions(self, raws: list[bytes]) -> int | None:
        """Decode and fold a chunk of raw prediction messages (invalid and late ones go to
        :attr:`dead`); return the largest event time folded (None if none was)."""
        fed = self.ingest.feed("prediction", raws)
        self.dead += [("prediction", raws[i].rstrip(b"\r\n"), reason) for i, reason in fed.dead]
        self.counts["predictions"] += len(raws) - len(fed.dead) + fed.late
        return fed.horizon

    def add_labels(self, labels: list[dict]) -> None:
        """Fold valid label events (decoded with ``self.ingest.decode_labels``)."""
        for i, reason in self.ingest.fold_labels(labels).dead:
            self.dead.append(("label", orjson.dumps(labels[i]), reason))
        self.counts["labels"] += len(labels)

    def close(self) -> None:
        """Evaluate the buckets the watermark has passed."""
        self._drain(self.ingest.close())

    def finish(self) -> None:
        """End of input: every open bucket is complete, and evaluated (a low-traffic model's
        last, carried, too)."""
        self._drain(self.ingest.flush())
        for evaluator in self.evaluators.values():
            self._emit(evaluator.finish())

    def _drain(self, partials: list[dict]) -> None:
        for p in partials:
            self._emit(self.evaluators[p["model"]].add(p))

    def _emit(self, out: Emitted) -> None:
        if self.on_evaluations is not None and out.evaluations:
            self.on_evaluations(out.evaluations)
        self.alerts += out.alerts
        self.commands += out.commands


def first_events_in_file(predictions: Path) -> FirstEvents:
    """The first events of each model, read from the start of a predictions file until no
    earlier event can follow (for :func:`coalmine.baselines.build_baselines`)."""
    return lambda wanted: _first_events(file_chunks(predictions), wanted)


def _first_events(raw_chunks: Iterable[list[bytes]], wanted: list[ModelConfig]) -> dict:
    found: dict[str, list[dict]] = {m.name: [] for m in wanted}
    need = {m.name: m.reference_first_events or 0 for m in wanted}  # set when reference is None
    decode = partial(contract.split_valid, "prediction", known_models=set(found))
    for chunk in _decoded(raw_chunks, decode, [], "prediction"):
        for e in chunk:
            found[e["model"]].append(e)
        horizon = max(e["ts"] for e in chunk) if chunk else 0
        if all(
            len(found[m.name]) >= need[m.name]
            and first_events(found[m.name], m.name, need[m.name])[-1]["ts"]
            < horizon - m.allowed_lateness_ms
            for m in wanted
        ):
            break
    return {m.name: first_events(found[m.name], m.name, need[m.name]) for m in wanted}


class _Lookahead:
    """Raw chunks that can be read ahead for the first events (a topic is read once: the
    chunks read ahead are kept and replayed first)."""

    def __init__(self, chunks: Iterable[list[bytes]]):
        self.ahead: list[list[bytes]] = []
        self.rest = iter(chunks)

    def first_events(self, wanted: list[ModelConfig]) -> dict[str, list[dict]]:
        def read() -> Iterator[list[bytes]]:
            for chunk in self.rest:
                self.ahead.append(chunk)
                yield chunk

        return _first_events(read(), wanted)

    def __iter__(self) -> Iterator[list[bytes]]:
        while self.ahead:
            yield self.ahead.pop(0)
        yield from self.rest


def replay_files(
    config: Config,
    predictions: Path,
    labels: Path | None = None,
    *,
    progress: bool | None = None,
    on_evaluations: Callable[[list[Evaluation]], object] | None = None,
) -> Replay:
    """Run prediction (and label) JSONL files, in event-time order, through the pipeline
    (evaluations go to ``on_evaluations`` as they come: see :class:`Replay`)."""
    size = chunk_size(config)
    return replay_chunks(
        config,
        file_chunks(predictions, size),
        file_chunks(labels, size) if labels else (),
        first_events=first_events_in_file(predictions),
        progress=_progress(f"replay {predictions.name}", None, progress),
        on_evaluations=on_evaluations,
    )


def replay_topics(
    config: Config,
    bootstrap: str,
    since: int | None = None,
    until: int | None = None,
    *,
    predictions: str | None = None,
    labels: str | None = None,
    progress: bool | None = None,
    on_evaluations: Callable[[list[Evaluation]], object] | None = None,
) -> Replay:
    """Run the prediction and label topics' messages with Kafka timestamps in ``[since,
    until)`` (epoch ms; None: from the start, to the end offsets now) through the pipeline, as
    :func:`replay_files` runs files: the same events give byte-identical output. Reads with
    a consumer of its own (:class:`~coalmine.slices.TopicSlice`), in a process of its own when a
    core is free for it (:func:`~coalmine.slices.read_slices`): commits nothing."""
    topic_names = [predictions or topics.PREDICTIONS, labels or topics.LABELS]
    with read_slices(bootstrap, topic_names, since, until) as (preds, labs):
        return replay_slices(config, preds, labs, progress=progress, on_evaluations=on_evaluations)


def replay_slices(
    config: Config,
    predictions: TopicSlice | ReceivedSlice,
    labels: TopicSlice | ReceivedSlice,
    *,
    progress: bool | None = None,
    on_evaluations: Callable[[list[Evaluation]], object] | None = None,
) -> Replay:
    """:func:`replay_topics` of slices already open (:func:`~coalmine.slices.read_slices`):
    the command line opens them before it imports the pipeline, so that they are read while
    it does."""
    bar = _progress(f"replay {predictions.topic}", None, progress)
    if bar is not None:  # else a reading process starts while the baselines are built
        bar.total = predictions.total
    size = chunk_size(config)
    return replay_chunks(
        config,
        topic_chunks(predictions, size),
        topic_chunks(labels, size),
        progress=bar,
        on_evaluations=on_evaluations,
    )


def replay_chunks(
    config: Config,
    predictions: Iterable[list[bytes]],
    labels: Iterable[list[bytes]] = (),
    *,
    first_events: FirstEvents | None = None,
    progress=None,
    on_evaluations: Callable[[list[Evaluation]], object] | None = None,
) -> Replay:
    """The replay of raw prediction and label events (each in event-time order, in chunks of
    raw messages or lines, from a file or a topic): decode (invalid ones are dead-lettered),
    feed each prediction chunk with the labels up to its latest event time, then finish.

    ``first_events`` reads the models' first events where the reference is their first events
    (default: read ahead in ``predictions``); ``progress`` is a tqdm-like bar or None."""
    with bulk_gc():
        if first_events is None:
            ahead = _Lookahead(predictions)
            predictions, first_events = ahead, ahead.first_events
        run = Replay(build_baselines(config, first_events), on_evaluations)
        pending_labels: list[dict] = []
        label_chunks = _decoded(labels, run.ingest.decode_labels, run.dead)
        horizon = 0
        for raws in predictions:
            top = run.add_predictions(raws)
            horizon = max(horizon, top) if top is not None else horizon
            while not pending_labels or pending_labels[-1]["ts"] <= horizon:
                nxt = next(label_chunks, None)
                if nxt is None:
                    break
                pending_labels += nxt
            run.add_labels([e for e in pending_labels if e["ts"] <= horizon])
            pending_labels = [e for e in pending_labels if e["ts"] > horizon]
            run.close()
            if progress is not None:
                progress.update(len(raws))
        for rest in [pending_labels, *label_chunks]:
            run.feed([], rest)
        run.finish()
        if progress is not None:
            progress.close()
    run.counts["dead_letters"] = len(run.dead)
    run.counts["alerts"] = len(run.alerts)
    run.counts["commands"] = len(run.commands)
    return run


@contextmanager
def bulk_gc():
    """Collect the young generation every 80,000 container allocations instead of CPython's
    700: the tens of thousands of event dicts in a chunk, freed by reference counting, are
    otherwise traversed by collection after collection (40% of replay time, measured).
    Cycles, e.g. from dead-lettered events' exceptions, are still collected."""
    before = gc.get_threshold()
    gc.set_threshold(4 * CHUNK, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _progress(desc: str, total: int | None, enabled: bool | None):
    """A tqdm bar on stderr (by default only when stderr is a terminal), or None."""
    if not (sys.stderr.isatty() if enabled is None else enabled):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=" events", desc=desc, mininterval=0.5, file=sys.stderr)


def write_jsonl(records: Iterable[dict | Evaluation | Alert | Command], out: BinaryIO) -> None:
    """One JSON object per line (records in their ``to_json()`` form), keys sorted:
    byte-identical for identical input."""
    out.write(
        b"".join(
            orjson.dumps(r if isinstance(r, dict) else r.to_json(), option=_DUMP) + b"\n"
            for r in records
        )
    )
