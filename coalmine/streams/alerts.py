"""Alert state machine: publish a check's alert only when its state changes, with hysteresis:
an alert fires when its statistic crosses its threshold and resolves only once the statistic
is clearly back, for ``resolve_after`` evaluations in a row: one firing per incident, however
long the statistic hovers at its threshold.

>>> from coalmine.streams.records import Evaluation, Window
>>> tracker = AlertTracker("m", resolve_after=2)
>>> def ev(value, p=None):
...     return Evaluation("m", 0, Window(0, 1000, 500), "champion", "drift", "f0", "ks", value, 0.2, p)
>>> tracker.observe(1000, True, ev(0.3)).state
'firing'
>>> tracker.observe(2000, True, ev(0.3)) is None        # still firing: nothing new to say
True
>>> tracker.observe(3000, False, ev(0.19)) is None      # under the threshold, not clearly
True
>>> tracker.observe(4000, False, ev(0.04)) is None      # clearly back: one is not enough
True
>>> tracker.observe(5000, False, ev(0.15, p=0.2)).state  # no longer even weakly significant
'resolved'
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from coalmine.streams.records import Alert, Evaluation, Window
from coalmine.streams.rollout import WEAK_EVIDENCE


def stable_id(*parts: object) -> str:
    """Deterministic id from its parts: the same input always gives the same id, so replays
    and retries publish duplicates that consumers can drop."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


#: a statistic without a p-value is clearly back under this share of its threshold: for a
#: surprise -log10(p) at a threshold of 5 to 6 (the rollout checks), 1.3 to 1.5, a p-value
#: of about 0.05: no longer even weakly significant, as for statistics with a p-value
RELEASE = 0.25


def clearly_back(ev: Evaluation) -> bool:
    r"""Whether an evaluation is clearly back from its threshold :math:`h`: its p-value, when
    it has one, is no longer even weakly significant (:math:`p \ge 0.05`); otherwise its
    statistic is under :math:`h/4` (a CUSUM has then lost three quarters of the evidence
    that fired it; a surprise :math:`-\log_{10} p` is back to about :math:`p \ge 0.05`).

    A single threshold for firing and resolving makes an alert flap while its statistic
    hovers at it; two levels are the usual remedy (Montgomery, *Introduction to Statistical
    Quality Control*, on decision intervals; the "for" clause of Prometheus' alerting rules).
    """
    assert ev.threshold is not None, "only evaluations with a threshold are tracked"
    if ev.p_value is not None:
        return ev.p_value >= WEAK_EVIDENCE
    return ev.value <= RELEASE * ev.threshold


class AlertTracker:
    """Firing/resolved state per (variant, check, feature) of one model.

    An alert fires on the first evaluation over its threshold and resolves after
    ``resolve_after`` consecutive evaluations that are :func:`clearly_back` (hysteresis: an
    evaluation under the threshold but not clearly back holds the alert and starts the count
    again), so a statistic hovering at its threshold fires once.
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
        """Feed one evaluation (the worst of its group: the others are further under their
        thresholds); return an alert on a state change, else None."""
        return self._observe(ts, exceeded, not exceeded and clearly_back(ev), ev)

    def _observe(self, ts: int, exceeded: bool, clear: bool, ev: Evaluation) -> Alert | None:
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
        if not clear:
            self.quiet[key] = 0
            return None
        self.quiet[key] += 1
        if self.quiet[key] < self.resolve_after:
            return None
        del self.quiet[key], self.ids[key], self.last[key]
        return self._alert(ts, "resolved", ev)

    def observe_gone(self, ts: int, variants: set[str], window: Window) -> list[Alert]:
        """Firing alerts of variants with no traffic left in the window (a rolled-back canary)
        count as clearly back: they resolve instead of firing forever."""
        out = []
        for key in [k for k in self.quiet if k[0] not in variants]:
            alert = self._observe(ts, False, True, replace(self.last[key], window=window))
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
