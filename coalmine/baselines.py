"""The one builder of a config's baselines, used by the worker, replay, validate and the
notebook front door alike: each model's reference comes from its file, or from its first
``reference_first_events`` prediction events, which the caller reads from where its events
are (a file, a topic)."""

from __future__ import annotations

from collections.abc import Callable

from coalmine.cache import FileCalibrationCache
from coalmine.config import Config, ModelConfig
from coalmine.reference_files import load_reference
from coalmine.streams.baseline import Baseline, CalibrationCache
from coalmine.streams.reference import event_rows, reference_from_rows

#: given the models whose reference is their first events, those events per model name
FirstEvents = Callable[[list[ModelConfig]], dict[str, list[dict]]]


def build_baselines(
    config: Config, first_events: FirstEvents | None = None, cache: CalibrationCache | None = None
) -> dict[str, Baseline]:
    """A :class:`Baseline` per model of ``config``; calibrated thresholds are kept in
    ``cache`` (default: the file cache under ``$COALMINE_CACHE_DIR``)."""
    cache = cache if cache is not None else FileCalibrationCache()
    wanted = [m for m in config.models.values() if m.reference is None]
    if wanted and first_events is None:
        raise ValueError(f"model {wanted[0].name}: reference_first_events needs a source of events")
    found = first_events(wanted) if wanted and first_events is not None else {}
    baselines = {}
    for name, m in config.models.items():
        if m.reference is not None:
            reference = load_reference(m.reference, m.features)
        else:
            reference = reference_from_rows(
                event_rows(found[name]), m.features, f"first events of {name}"
            )
        baselines[name] = Baseline(m, reference, cache=cache)
    return baselines
