"""What stage 2 says: typed records of evaluations, alert state changes and rollout commands.

Each has ``to_json()``, the plain form the wire contract (``schemas/``) describes; optional
fields that are unset are left out of it, as the schemas allow.

>>> w = Window(0, 1000, 250)
>>> e = Evaluation("m", 1000, w, "champion", "drift", "f0", "ks", 0.31, 0.2, 1e-4)
>>> e.exceeded, e.key
(True, ('champion', 'drift', 'f0'))
>>> sorted(e.to_json())[:4]
['check', 'feature', 'model', 'p_value']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Window(NamedTuple):
    """The stretch of event time an evaluation covers, and its events."""

    start_ts: int
    end_ts: int
    n: int

    def to_json(self) -> dict:
        return {"start_ts": self.start_ts, "end_ts": self.end_ts, "n": self.n}


@dataclass(slots=True)
class Evaluation:
    """One statistic of one check on one variant's window, against its threshold (None: the
    statistic is reported, never alarmed on). ``evidence`` holds check-specific figures
    (error rates, intervals) that go into the JSON beside the common fields."""

    model: str
    ts: int
    window: Window
    variant: str
    check: str
    feature: str | None
    statistic: str
    value: float
    threshold: float | None
    p_value: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def exceeded(self) -> bool:
        return self.threshold is not None and self.value > self.threshold

    @property
    def key(self) -> tuple[str, str, str | None]:
        """(variant, check, feature): the alert this evaluation speaks for."""
        return self.variant, self.check, self.feature

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "ts": self.ts,
            "window": self.window.to_json(),
            "variant": self.variant,
            "check": self.check,
            "feature": self.feature,
            "statistic": self.statistic,
            "value": self.value,
            "threshold": self.threshold,
            "p_value": self.p_value,
            **self.evidence,
        }


@dataclass(slots=True)
class Alert:
    """A state change (``firing`` or ``resolved``) of one model's (variant, check, feature);
    ``signature``, when a signer is configured, covers every other field."""

    alert_id: str
    ts: int
    model: str
    variant: str
    check: str
    state: str
    statistic: str
    value: float
    threshold: float
    window: Window
    message: str
    feature: str | None = None
    p_value: float | None = None
    signature: str | None = None

    def to_json(self) -> dict:
        out = {
            "alert_id": self.alert_id,
            "ts": self.ts,
            "model": self.model,
            "variant": self.variant,
            "check": self.check,
            "state": self.state,
            "statistic": self.statistic,
            "value": self.value,
            "threshold": self.threshold,
            "window": self.window.to_json(),
            "message": self.message,
        }
        if self.feature:
            out["feature"] = self.feature
        if self.p_value is not None:
            out["p_value"] = self.p_value
        if self.signature is not None:
            out["signature"] = self.signature
        return out


@dataclass(slots=True)
class Command:
    """A rollout decision for a router: ``rollback``, ``set_weight`` (with ``weight``),
    ``promote`` (with the ``stage`` it promotes to, when not production) or ``pause``."""

    command_id: str
    ts: int
    model: str
    version: str
    action: str
    reason: str
    alert_ids: list[str]
    evidence: dict[str, Any]
    weight: float | None = None
    stage: str | None = None
    signature: str | None = None

    def to_json(self) -> dict:
        out = {
            "command_id": self.command_id,
            "ts": self.ts,
            "model": self.model,
            "version": self.version,
            "action": self.action,
            "reason": self.reason,
            "alert_ids": self.alert_ids,
            "evidence": self.evidence,
        }
        for name in ("weight", "stage", "signature"):
            if (value := getattr(self, name)) is not None:
                out[name] = value
        return out
