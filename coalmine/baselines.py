"""The one builder of a config's baselines, used by the worker, replay, validate and the
notebook front door alike: each model's reference comes from its file, or from its first
``reference_first_events`` prediction events, which the caller reads from where its events
are (a file, a topic)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache, partial

from coalmine.cache import FileCalibrationCache
from coalmine.config import Config, ModelConfig
from coalmine.reference_files import load_reference
from coalmine.streams.baseline import Baseline, CalibrationCache
from coalmine.streams.reference import ReferenceData, event_rows, reference_from_rows

#: given the models whose reference is their first events, those events per model name
FirstEvents = Callable[[list[ModelConfig]], dict[str, list[dict]]]


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
    # models sharing a reference file read it once (ReferenceData is never modified), and
    # those that also share every setting but their name share one baseline, renamed
    read = lru_cache(maxsize=None)(load_reference)
    alike: dict[ModelConfig, Baseline] = {}
    for name, m in config.models.items():
        if m.reference is None:
            continue
        if (twin := alike.get(unnamed := replace(m, name=""))) is not None:
            built[name] = twin.renamed(m)
        else:
            built[name] = alike[unnamed] = _baseline(
                m, partial(read, m.reference, m.features), cache
            )
    found = first_events(wanted) if wanted and first_events is not None else {}
    for m in wanted:
        rows = event_rows(found[m.name])
        source = f"first events of {m.name}"
        built[m.name] = _baseline(m, partial(reference_from_rows, rows, m.features, source), cache)
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
    except (ValueError, TypeError, ArithmeticError) as exc:
        # e.g. a reference with one value per feature leaves no threshold to find
        raise ValueError(f"{where}: cannot calibrate thresholds on it: {exc}") from exc
