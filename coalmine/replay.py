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
from coalmine.baselines import build_baselines
from coalmine.config import Config, ModelConfig
from coalmine.ingest import PartitionIngest
from coalmine.signing import Signer
from coalmine.streams.baseline import Baseline
from coalmine.streams.evaluator import Evaluator
from coalmine.streams.records import Alert, Command, Evaluation
from coalmine.streams.reference import first_events
from coalmine.streams.sketch import values_of

CHUNK = 20_000
_DUMP = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _chunks(path: Path, kind: str, decode: Callable, dead: list) -> Iterator[list[dict]]:
    """Decoded, valid events in chunks; invalid lines go to ``dead`` with their reason."""
    with open(path, "rb") as fh:
        while raw := list(islice(fh, CHUNK)):
            lines = [line for line in raw if not line.isspace()]
            valid, invalid = decode(kind, lines)
            dead += [(kind, lines[i].rstrip(b"\r\n"), reason) for i, reason in invalid]
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
        """Fold valid (decoded) events, then evaluate the buckets they closed."""
        for kind, events in (("prediction", predictions), ("label", labels)):
            for i, reason in self.ingest.fold(kind, events).rejected:
                self.dead.append((kind, orjson.dumps(events[i]), reason))
        self.counts["predictions"] += len(predictions)
        self.counts["labels"] += len(labels)
        self._drain(self.ingest.close())

    def finish(self) -> None:
        """End of input: every open bucket is complete."""
        self._drain(self.ingest.flush())

    def _drain(self, partials: list[dict]) -> None:
        for p in partials:
            out = self.evaluators[p["model"]].add(p)
            if self.on_evaluations is not None and out.evaluations:
                self.on_evaluations(out.evaluations)
            self.alerts += out.alerts
            self.commands += out.commands


def first_events_in_file(predictions: Path) -> Callable[[list[ModelConfig]], dict[str, list[dict]]]:
    """The first events of each model, read from the start of a predictions file until no
    earlier event can follow (for :func:`coalmine.baselines.build_baselines`)."""

    def read(wanted: list[ModelConfig]) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {m.name: [] for m in wanted}
        decode = partial(contract.split_valid, known_models=set(found))
        for chunk in _chunks(predictions, "prediction", decode, []):
            for e in chunk:
                found[e["model"]].append(e)
            horizon = max(e["ts"] for e in chunk) if chunk else 0
            if all(
                len(found[m.name]) >= m.reference_first_events
                and first_events(found[m.name], m.name, m.reference_first_events)[-1]["ts"]
                < horizon - m.allowed_lateness_ms
                for m in wanted
            ):
                break
        return {
            m.name: first_events(found[m.name], m.name, m.reference_first_events) for m in wanted
        }

    return read


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
    with bulk_gc():
        return _replay_files(config, predictions, labels, progress, on_evaluations)


def _replay_files(
    config: Config,
    predictions: Path,
    labels: Path | None,
    progress: bool | None,
    on_evaluations: Callable[[list[Evaluation]], object] | None,
) -> Replay:
    run = Replay(build_baselines(config, first_events_in_file(predictions)), on_evaluations)
    pending_labels: list[dict] = []
    label_chunks = _chunks(labels, "label", run.ingest.decode, run.dead) if labels else iter(())
    bar = _progress(predictions, progress)
    for chunk in _chunks(predictions, "prediction", run.ingest.decode, run.dead):
        horizon = max(values_of(chunk, "ts"), default=0)
        while not pending_labels or pending_labels[-1]["ts"] <= horizon:
            nxt = next(label_chunks, None)
            if nxt is None:
                break
            pending_labels += nxt
        due = [e for e in pending_labels if e["ts"] <= horizon]
        pending_labels = [e for e in pending_labels if e["ts"] > horizon]
        run.feed(chunk, due)
        bar.update(len(chunk))
    for rest in [pending_labels, *label_chunks]:
        run.feed([], rest)
    run.finish()
    bar.close()
    run.counts["dead_letters"] = len(run.dead)
    run.counts["alerts"] = len(run.alerts)
    run.counts["commands"] = len(run.commands)
    return run


@contextmanager
def bulk_gc():
    """Collect the young generation every 80,000 container allocations instead of CPython's
    700: the tens of thousands of event dicts in a chunk, freed by reference counting, were
    otherwise traversed by collection after collection (40% of replay time, measured).
    Cycles, e.g. from dead-lettered events' exceptions, are still collected."""
    before = gc.get_threshold()
    gc.set_threshold(4 * CHUNK, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _progress(path: Path, enabled: bool | None):
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(
        total=None,
        unit=" events",
        desc=f"replay {path.name}",
        disable=not show,
        mininterval=0.5,
        file=sys.stderr,
    )


def write_jsonl(records: Iterable[dict | Evaluation | Alert | Command], out: BinaryIO) -> None:
    """One JSON object per line (records in their ``to_json()`` form), keys sorted:
    byte-identical for identical input."""
    out.write(
        b"".join(
            orjson.dumps(r if isinstance(r, dict) else r.to_json(), option=_DUMP) + b"\n"
            for r in records
        )
    )
