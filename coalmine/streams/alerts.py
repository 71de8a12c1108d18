"""Alert state machine: publish a check's alert only when its state changes.

>>> from coalmine.streams.records import Evaluation, Window
>>> tracker = AlertTracker("m", resolve_after=2)
>>> ev = Evaluation("m", 1000, Window(0, 1000, 500), "champion", "drift", "f0", "ks", 0.3, 0.2)
>>> tracker.observe(1000, True, ev).state
'firing'
>>> tracker.observe(2000, True, ev) is None          # still firing: nothing new to say
True
>>> tracker.observe(3000, False, ev) is None         # one quiet evaluation is not enough
True
>>> tracker.observe(4000, False, ev).state
'resolved'
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from coalmine.streams.records import Alert, Evaluation, Window


def stable_id(*parts: object) -> str:
    """Deterministic id from its parts: the same input always gives the same id, so replays
    and retries publish duplicates that consumers can drop."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


class AlertTracker:
    """Firing/resolved state per (variant, check, feature) of one model.

    An alert fires on the first evaluation over its threshold and resolves after
    ``resolve_after`` consecutive evaluations under it (hysteresis against flapping).
    """

    def __init__(self, model: str, resolve_after: int = 3):
        self.model, self.resolve_after = model, resolve_after
        self.quiet: dict[tuple, int] = {}  # key -> consecutive quiet evaluations, while firing
        self.ids: dict[tuple, str] = {}  # key -> alert_id of the firing alert
        self.last: dict[tuple, Evaluation] = {}  # key -> its last evaluation, while firing

    @property
    def firing(self) -> list[tuple]:
        """Keys of the firing alerts, sorted (a model-wide alert's feature is None)."""
        return sorted(self.quiet, key=lambda key: tuple(map(str, key)))

    def observe(self, ts: int, exceeded: bool, ev: Evaluation) -> Alert | None:
        """Feed one evaluation (the worst of its group); return an alert on a state change,
        else None."""
        key = ev.key
        if key in self.quiet:
            self.last[key] = ev
        if key not in self.quiet:
            if not exceeded:
                return None
            self.quiet[key] = 0
            alert = self._alert(ts, "firing", ev)
            self.ids[key], self.last[key] = alert.alert_id, ev
            return alert
        if exceeded:
            self.quiet[key] = 0
            return None
        self.quiet[key] += 1
        if self.quiet[key] < self.resolve_after:
            return None
        del self.quiet[key], self.ids[key], self.last[key]
        return self._alert(ts, "resolved", ev)

    def observe_gone(self, ts: int, variants: set[str], window: Window) -> list[Alert]:
        """Firing alerts of variants with no traffic left in the window (a rolled-back canary)
        count as quiet: they resolve instead of firing forever."""
        out = []
        for key in [k for k in self.quiet if k[0] not in variants]:
            alert = self.observe(ts, False, replace(self.last[key], window=window))
            if alert:
                out.append(alert)
        return out

    def _alert(self, ts: int, state: str, ev: Evaluation) -> Alert:
        # only an exceeded evaluation fires, and exceeded needs a threshold; the same key
        # keeps its threshold until it resolves
        assert ev.threshold is not None, f"alert on {ev.key} without a threshold"
        what = f"{ev.check} on {ev.feature}" if ev.feature else ev.check
        verb = "over" if state == "firing" else "back under"
        message = (
            f"{self.model}/{ev.variant}: {what} {state}: {ev.statistic} = {ev.value:.4g} "
            f"{verb} threshold {ev.threshold:.4g} over {ev.window.n} events"
        )
        if state == "resolved" and not ev.window.n:  # observe_gone: the last values are stale
            message = f"{self.model}/{ev.variant}: {what} resolved: no traffic left in the window"
        return Alert(
            stable_id(self.model, ev.variant, ev.check, ev.feature, state, ts),
            ts,
            self.model,
            ev.variant,
            ev.check,
            state,
            ev.statistic,
            ev.value,
            ev.threshold,
            ev.window,
            message,
            ev.feature,
            ev.p_value,
        )
