"""The one builder of a config's baselines, used by the worker, replay, validate and the
notebook front door alike: each model's reference comes from its file, or from its first
``reference_first_events`` prediction events, which the caller reads from where its events
are (a file, a topic).

On a cold calibration cache, models with reference files of their own are calibrated on a
pool of processes first (one per usable core), which store their fits in the file cache
that the build here then reads: the fits are the same (each baseline seeds its own random
numbers), the wait is divided by the cores."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import lru_cache, partial

from coalmine.cache import FileCalibrationCache
from coalmine.config import Config, ModelConfig
from coalmine.reference_files import load_reference
from coalmine.streams import calibration
from coalmine.streams.baseline import Baseline, CalibrationCache
from coalmine.streams.reference import ReferenceData, event_rows, reference_from_rows

log = logging.getLogger("coalmine.baselines")

#: given the models whose reference is their first events, those events per model name
FirstEvents = Callable[[list[ModelConfig]], dict[str, list[dict]]]

#: the least calibration work (columns of the models the cache misses) calibrated on other
#: processes. Each takes ~1 s of CPU to start (spawn, numpy, scipy, coalmine: measured) and a
#: column ~0.12 s (columns binned alike share their draws, which a pool splits), so with 2
#: idle cores a pool gains from ~20 columns on; but cores are often shared, and then the
#: start is a loss: 100 columns (~12 s of one core) bound it to 2 s of 12. Smaller configs
#: (the test suite, the demo) start no process. Measured, 8 models of 12 columns with
#: references of their own, 2 cores busy with other work: 11.8 s on one core; 11.6-14.0 s
#: wall (15.8 s CPU) on a pool of 2.
PARALLEL_MIN_COLUMNS = 100

#: what a reference that does not fit calibration raises (e.g. one value per feature leaves
#: no threshold to find)
CALIBRATION_ERRORS = (ValueError, TypeError, ArithmeticError)

#: a model's reference file read once per build (ReferenceData is never modified)
ReadReference = Callable[[ModelConfig], ReferenceData]


def build_baselines(
    config: Config, first_events: FirstEvents | None = None, cache: CalibrationCache | None = None
) -> dict[str, Baseline]:
    """A :class:`Baseline` per model of ``config``; calibrated thresholds are kept in
    ``cache`` (default: the file cache under ``$COALMINE_CACHE_DIR``).

    The models with a reference file are built first, before ``first_events`` is asked for
    anything, so that a bad file is reported even when the events' source (a broker) is down.
    Every failure is a ``ValueError`` naming the model and its reference.
    """
    cache = cache if cache is not None else FileCalibrationCache()
    wanted = [m for m in config.models.values() if m.reference is None]
    if wanted and first_events is None:
        raise ValueError(f"model {wanted[0].name}: reference_first_events needs a source of events")
    built: dict[str, Baseline] = {}
    read_file = lru_cache(maxsize=None)(load_reference)

    def read(m: ModelConfig) -> ReferenceData:
        assert m.reference is not None
        return read_file(m.reference, m.features)

    # models sharing a reference file and every setting but their name share one baseline,
    # renamed
    alike: dict[ModelConfig, ModelConfig] = {}
    for m in config.models.values():
        if m.reference is not None:
            alike.setdefault(replace(m, name=""), m)
    ready = _calibrate_in_parallel(list(alike.values()), read, cache)
    for name, m in config.models.items():
        if m.reference is None:
            continue
        first = alike[replace(m, name="")]
        if first.name not in ready:
            ready[first.name] = _baseline(m, partial(read, m), cache)
        built[name] = ready[first.name] if first is m else ready[first.name].renamed(m)
    found = first_events(wanted) if wanted and first_events is not None else {}
    for m in wanted:
        rows = event_rows(found[m.name])
        source = f"first events of {m.name}"
        built[m.name] = _baseline(m, partial(reference_from_rows, rows, m.features, source), cache)
    calibration.forget_draws()  # a worker lives on: the shared null windows are not needed
    return {name: built[name] for name in config.models}


def _baseline(
    model: ModelConfig, reference: Callable[[], ReferenceData], cache: CalibrationCache
) -> Baseline:
    where = f"model {model.name}: reference {model.reference or 'from its first events'}"
    try:
        data = reference()
    except ValueError as exc:  # the message names the file or the events already
        raise ValueError(f"model {model.name}: {exc}") from None
    try:
        return Baseline(model, data, cache=cache)
    except CALIBRATION_ERRORS as exc:
        raise ValueError(f"{where}: cannot calibrate thresholds on it: {exc}") from exc


class _Uncached(Exception):
    """A baseline's fits are not in the cache yet."""


class _CachedOnly:
    """A calibration cache that builds a baseline only from fits ``cache`` holds (else
    raises :class:`_Uncached`, before any calibration)."""

    def __init__(self, cache: CalibrationCache):
        self.cache = cache

    def load(self, key: str) -> list:
        if (fits := self.cache.load(key)) is None:
            raise _Uncached(key)
        return fits

    def store(self, key: str, fits: list) -> None:
        """Never called: a miss raises before any fit exists."""


def _calibrate_in_parallel(
    models: list[ModelConfig], read: ReadReference, cache: CalibrationCache
) -> dict[str, Baseline]:
    """Calibrate the models the file ``cache`` misses on a pool of processes, when there is
    enough work to pay for their start; returns, by model name, the baselines built here from
    the fits already in the cache on the way.

    Whatever cannot go this way (a small config, another cache, one that cannot be written,
    a reference that does not read or build, a process that fails) is left to the build in
    order, which reports any error just as it would alone.
    """
    workers = min(len(os.sched_getaffinity(0)), len(models))
    if not isinstance(cache, FileCalibrationCache) or workers < 2:
        return {}
    try:
        references = [read(m) for m in models]
    except ValueError:
        return {}
    if sum(len(data.columns) for data in references) < PARALLEL_MIN_COLUMNS:
        return {}
    ready: dict[str, Baseline] = {}
    missing: list[tuple[ModelConfig, ReferenceData]] = []
    for m, data in zip(models, references):
        try:
            ready[m.name] = Baseline(m, data, cache=_CachedOnly(cache))
        except _Uncached:
            missing.append((m, data))
        except CALIBRATION_ERRORS:
            pass  # reported by the build in order
    workers = min(workers, len(missing))
    work = sum(len(data.columns) for _, data in missing)
    if workers < 2 or work < PARALLEL_MIN_COLUMNS or not cache.writable():
        return ready
    log.warning(  # minutes for hundreds of models: a start must not look hung
        "calibrating %d models' thresholds on %d processes; cached in %s for the next start",
        len(missing),
        workers,
        cache.dir,
    )
    # spawned, not forked: the worker runs threads and asyncio afterwards
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, spawn, initializer=_exit_with_parent) as pool:
        calibrated = [pool.submit(_calibrate, m, data, cache) for m, data in missing]
    failed = [
        e
        for f in calibrated
        if (e := f.exception()) is not None and not isinstance(e, CALIBRATION_ERRORS)
    ]
    if failed:
        log.warning("calibrating in parallel failed (%r); calibrating here instead", failed[0])
    return ready


def _calibrate(model: ModelConfig, reference: ReferenceData, cache: FileCalibrationCache) -> None:
    """In a pool's process: the model's fits, stored in ``cache``."""
    Baseline(model, reference, cache=cache)


def _exit_with_parent() -> None:
    """In a pool's process: exit as soon as the parent does (killed during calibration),
    rather than wait for more work forever."""
    parent = multiprocessing.parent_process()
    assert parent is not None, "not a child process"

    def exit_after_parent() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=exit_after_parent, daemon=True).start()
