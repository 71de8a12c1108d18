"""Monitor configuration: a TOML file, validated at start-up with errors that name the field.

>>> cfg = parse_config({"models": [{"name": "m", "reference": "ref.jsonl"}]}, base_dir=Path("/tmp"))
>>> cfg.models["m"].bucket_ms, cfg.models["m"].window_ms, cfg.models["m"].window_step_ms
(250, 60000, 1000)
>>> parse_config({"models": [{"name": "m", "reference": "r.jsonl", "bucket": "5 parsecs"}]})
Traceback (most recent call last):
...
coalmine.config.ConfigError: models[0].bucket: expected a duration such as '500ms', '1s', '5m' or '1h', got '5 parsecs'
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coalmine.streams.rollout import RolloutPolicy
from coalmine.streams.settings import (
    ALL_CHECKS,
    DEFAULT_CHECKS,
    UNCERTAINTY_MEASURES,
    ModelSettings,
)

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


class ConfigError(ValueError):
    """A monitor configuration that cannot run; the message names the field."""


def parse_duration_ms(value: Any, where: str) -> int:
    """'1s' -> 1000. Durations are strings with a unit: ms, s, m, h.

    >>> parse_duration_ms("1.5m", "x")
    90000
    """
    m = _DURATION.match(value) if isinstance(value, str) else None
    if not m:
        raise ConfigError(
            f"{where}: expected a duration such as '500ms', '1s', '5m' or '1h', got {value!r}"
        )
    ms = float(m.group(1)) * _UNITS_MS[m.group(2)]
    if ms <= 0 or ms != int(ms):
        raise ConfigError(
            f"{where}: must be a positive whole number of milliseconds, got {value!r}"
        )
    return int(ms)


@dataclass(frozen=True)
class ModelConfig(ModelSettings):
    """A model's settings and where its reference comes from: a file, or (instead) its first
    ``reference_first_events`` prediction events in event time."""

    reference: Path | None = None
    reference_first_events: int | None = None


@dataclass(frozen=True)
class Config:
    models: dict[str, ModelConfig]
    source: Path | None = None


# key -> (type check, description used in messages, converter)
def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    """A finite int or float: not a bool, and not TOML's ``inf`` or ``nan``."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_number(v: Any) -> bool:
    return _number(v) and v > 0


def _between(low: float, high: float, bounds: str, what: str = "a number") -> tuple[Any, str]:
    """(check, description) of a finite number in an interval; ``bounds`` is how the message
    writes its ends ("[)" is low <= v < high), so the message is the range checked.

    >>> ok, expected = _between(0, 1, "(]")
    >>> expected, ok(0), ok(0.5), ok(1), ok(True)
    ('a number in (0, 1]', False, True, True, False)
    """
    low_ok = (lambda v: low <= v) if bounds[0] == "[" else (lambda v: low < v)
    high_ok = (lambda v: v <= high) if bounds[1] == "]" else (lambda v: v < high)
    return (
        lambda v: _number(v) and low_ok(v) and high_ok(v)
    ), f"{what} in {bounds[0]}{low:g}, {high:g}{bounds[1]}"


_DURATION_KEYS = {
    "bucket": "bucket_ms",
    "window": "window_ms",
    "allowed_lateness": "allowed_lateness_ms",
    "label_ttl": "label_ttl_ms",
    "max_future": "max_future_ms",
    "max_ahead": "max_ahead_ms",
}
_NUMBER_KEYS = {
    "false_alarm_every_events": (_positive_int, "a positive integer"),
    "bins": (lambda v: _positive_int(v) and 4 <= v <= 1024, "an integer from 4 to 1024"),
    "min_window_events": (_positive_int, "a positive integer"),
    "min_bucket_events": (_non_negative_int, "a non-negative integer"),
    "dedup_events": (_positive_int, "a positive integer"),
    "label_join_max": (_positive_int, "a positive integer"),
    "baseline_error_rate": _between(0, 1, "[)"),  # 0: a model that made no error on the reference
    "shift_to_detect_sd": (_positive_number, "a positive number (reference standard deviations)"),
    # 1 would keep every component: the reconstruction error would be 0 on every event
    "pca_variance": _between(0, 1, "()"),
    # 1: an accuracy drop of 100 points is never confidently exceeded: the check would be mute
    "estimated_accuracy_tolerance": _between(0, 1, "[)"),
}
_CHOICE_KEYS = {"uncertainty": UNCERTAINTY_MEASURES}
_DEFAULT_KEYS = set(_DURATION_KEYS) | set(_NUMBER_KEYS) | set(_CHOICE_KEYS)
_MODEL_KEYS = _DEFAULT_KEYS | {
    "name",
    "reference",
    "reference_first_events",
    "features",
    "checks",
    "shadow",
    "canary",
    "ab",
}


_ROLLOUT_KEYS: dict[str, dict[str, tuple]] = {
    # table -> key -> (check, expected, RolloutPolicy field)
    "canary": {
        "steps": (
            lambda v: (
                isinstance(v, list)
                and bool(v)
                and all(_positive_number(x) and x <= 100 for x in v)
                and v == sorted(set(v))
                and v[-1] == 100
            ),
            "increasing percentages in (0, 100] ending at 100, e.g. [5, 25, 50, 100]",
            "steps",
        ),
        "min_events": (_positive_int, "a positive integer", "min_events"),
        "min_duration": (None, "a duration", "min_duration_ms"),
        # 0: a step would need an error rate bound <= 0, never shown; 1: no limit at all
        "max_error_rate": (*_between(0, 1, "()"), "max_error_rate"),
        "max_p99_latency_ms": (
            _positive_number,
            "a positive number of milliseconds",
            "max_p99_latency_ms",
        ),
    },
    "shadow": {
        # 0: no agreement asked (the accuracy test still judges); 1 is refused: one disagreement would fail
        "min_agreement": (*_between(0, 1, "[)"), "shadow_min_agreement"),
        "min_events": (_positive_int, "a positive integer", "shadow_min_events"),
        "min_duration": (None, "a duration", "shadow_min_duration_ms"),
        # with the performance check on: labelled pairs a shadow needs before it may pass
        "min_labelled_pairs": (
            _positive_int,
            "a positive integer",
            "shadow_min_labelled_pairs",
        ),
        "tolerance": (
            lambda v: _number(v) and v >= 0,
            "a number >= 0 (regression)",
            "shadow_tolerance",
        ),
        "timeout": (None, "a duration", "shadow_timeout_ms"),
    },
    "ab": {
        "alpha": (*_between(0, 1, "()"), "ab_alpha"),
        "mde_sd": (
            _positive_number,
            "a positive number (outcome standard deviations)",
            "ab_mde_sd",
        ),
        "srm_alpha": (*_between(0, 1, "()"), "srm_alpha"),
        "canary_weight": (*_between(0, 100, "()", "a percentage"), "ab_canary_weight"),
    },
}


def _rollout_settings(table: dict, where: str) -> dict[str, Any]:
    """[models.canary], [models.shadow], [models.ab] -> RolloutPolicy field values."""
    out: dict[str, Any] = {}
    for name, keys in _ROLLOUT_KEYS.items():
        sub = table.get(name)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"{where}{name}: expected a table of settings, got {sub!r}")
        _check_keys(sub, set(keys), f"{where}{name}.")
        for key, value in sub.items():
            ok, expected, attr = keys[key]
            if ok is None:
                out[attr] = parse_duration_ms(value, f"{where}{name}.{key}")
            elif not ok(value):
                raise ConfigError(f"{where}{name}.{key}: expected {expected}, got {value!r}")
            else:
                out[attr] = tuple(value) if isinstance(value, list) else value
    return out


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (expected one of: {', '.join(sorted(allowed))})"
        )


def _settings(table: dict, where: str) -> dict[str, Any]:
    """Durations and numbers shared by [defaults] and [[models]], converted and checked."""
    out: dict[str, Any] = {}
    for key, attr in _DURATION_KEYS.items():
        if key in table:
            out[attr] = parse_duration_ms(table[key], f"{where}{key}")
    for key, (ok, expected) in _NUMBER_KEYS.items():
        if key in table:
            if not ok(table[key]):
                raise ConfigError(f"{where}{key}: expected {expected}, got {table[key]!r}")
            out[key] = table[key]
    for key, choices in _CHOICE_KEYS.items():
        if key in table:
            if table[key] not in choices:
                raise ConfigError(
                    f"{where}{key}: expected one of {', '.join(map(repr, choices))}, "
                    f"got {table[key]!r}"
                )
            out[key] = table[key]
    return out


def _model(table: Any, i: int, defaults: dict[str, Any], base_dir: Path) -> ModelConfig:
    where = f"models[{i}]."
    if not isinstance(table, dict):
        raise ConfigError(f"models[{i}]: expected a table ([[models]]), got {table!r}")
    _check_keys(table, _MODEL_KEYS, where)
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}name: expected a non-empty string, got {name!r}")
    ref, first = table.get("reference"), table.get("reference_first_events")
    if (ref is None) == (first is None):
        raise ConfigError(
            f"{where}reference: give exactly one of reference (a file) and "
            f"reference_first_events (the first N events of the model's traffic)"
        )
    if ref is not None and (not isinstance(ref, str) or not ref):
        raise ConfigError(
            f"{where}reference: expected a path to a JSONL, CSV or Parquet file of reference rows, got {ref!r}"
        )
    if first is not None and not (_positive_int(first) and first >= 100):
        raise ConfigError(
            f"{where}reference_first_events: expected an integer >= 100, got {first!r}"
        )
    features = table.get("features")
    if features is not None and (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) and f for f in features)
    ):
        raise ConfigError(
            f"{where}features: expected a non-empty list of feature names, got {features!r}"
        )
    checks = table.get("checks", list(DEFAULT_CHECKS))
    if not isinstance(checks, list) or not all(isinstance(c, str) for c in checks):
        raise ConfigError(f"{where}checks: expected a list of check names, got {checks!r}")
    for c in checks:
        if c not in ALL_CHECKS:
            raise ConfigError(
                f"{where}checks: unknown check {c!r} (expected any of {', '.join(ALL_CHECKS)})"
            )
    values = {**defaults, **_settings(table, where)}
    bucket, window = (
        values.get("bucket_ms", ModelConfig.bucket_ms),
        values.get("window_ms", ModelConfig.window_ms),
    )
    if window % bucket:
        raise ConfigError(
            f"{where}window: must be a whole number of buckets "
            f"({window} ms is not a multiple of {bucket} ms)"
        )
    rollout = _rollout_settings(table, where)
    return ModelConfig(
        name=name,
        reference=(base_dir / ref).resolve() if ref else None,
        reference_first_events=first,
        features=tuple(features) if features else None,
        checks=tuple(checks),
        rollout=RolloutPolicy(**rollout),
        **values,
    )


def parse_config(doc: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validate a parsed TOML document; relative paths resolve against ``base_dir``."""
    _check_keys(doc, {"defaults", "models"}, "")
    defaults_table = doc.get("defaults", {})
    if not isinstance(defaults_table, dict):
        raise ConfigError("defaults: expected a table ([defaults])")
    _check_keys(defaults_table, _DEFAULT_KEYS, "defaults.")
    defaults = _settings(defaults_table, "defaults.")
    tables = doc.get("models")
    if not isinstance(tables, list) or not tables:
        raise ConfigError("models: expected at least one [[models]] table")
    models: dict[str, ModelConfig] = {}
    for i, table in enumerate(tables):
        model = _model(table, i, defaults, base_dir)
        if model.name in models:
            raise ConfigError(f"models[{i}].name: duplicate model name {model.name!r}")
        models[model.name] = model
    return Config(models=models)


def load_config(path: str | Path) -> Config:
    """Read and validate a monitor TOML file (errors name the file and the field)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        cfg = parse_config(doc, base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for m in cfg.models.values():
        if m.reference is not None and not m.reference.exists():
            raise ConfigError(f"{path}: models.{m.name}.reference: file not found: {m.reference}")
        if m.reference is not None and m.reference.is_dir():
            raise ConfigError(
                f"{path}: models.{m.name}.reference: {m.reference} is a directory; expected a "
                "JSONL, CSV or Parquet file"
            )
    return Config(models=cfg.models, source=path)
