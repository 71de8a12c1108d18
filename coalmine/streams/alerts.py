"""Alert state machine: publish a check's alert only when its state changes.

>>> tracker = AlertTracker("m", resolve_after=2)
>>> ev = {"variant": "champion", "check": "drift", "feature": "f0", "statistic": "ks",
...       "value": 0.3, "threshold": 0.2, "window": {"start_ts": 0, "end_ts": 1000, "n": 500}}
>>> tracker.observe(1000, True, ev)["state"]
'firing'
>>> tracker.observe(2000, True, ev) is None          # still firing: nothing new to say
True
>>> tracker.observe(3000, False, ev) is None         # one quiet evaluation is not enough
True
>>> tracker.observe(4000, False, ev)["state"]
'resolved'
"""

from __future__ import annotations

import hashlib


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
        self.last: dict[tuple, dict] = {}  # key -> its last evaluation, while firing

    @property
    def firing(self) -> list[tuple]:
        """Keys of the firing alerts, sorted (a model-wide alert's feature is None)."""
        return sorted(self.quiet, key=lambda key: tuple(map(str, key)))

    def observe(self, ts: int, exceeded: bool, ev: dict) -> dict | None:
        """Feed one evaluation (``ev`` as produced by the evaluator); return an alert on a
        state change, else None."""
        key = (ev["variant"], ev["check"], ev.get("feature"))
        if key in self.quiet:
            self.last[key] = ev
        if key not in self.quiet:
            if not exceeded:
                return None
            self.quiet[key] = 0
            alert = self._alert(ts, "firing", ev)
            self.ids[key], self.last[key] = alert["alert_id"], ev
            return alert
        if exceeded:
            self.quiet[key] = 0
            return None
        self.quiet[key] += 1
        if self.quiet[key] < self.resolve_after:
            return None
        del self.quiet[key], self.ids[key], self.last[key]
        return self._alert(ts, "resolved", ev)

    def observe_gone(self, ts: int, variants: set[str], window: dict) -> list[dict]:
        """Firing alerts of variants with no traffic left in the window (a rolled-back canary)
        count as quiet: they resolve instead of firing forever."""
        out = []
        for key in [k for k in self.quiet if k[0] not in variants]:
            alert = self.observe(ts, False, {**self.last[key], "window": window})
            if alert:
                out.append(alert)
        return out

    def _alert(self, ts: int, state: str, ev: dict) -> dict:
        feature = ev.get("feature")
        what = f"{ev['check']} on {feature}" if feature else ev["check"]
        verb = "over" if state == "firing" else "back under"
        alert = {
            "alert_id": stable_id(self.model, ev["variant"], ev["check"], feature, state, ts),
            "ts": ts, "model": self.model, "variant": ev["variant"], "check": ev["check"],
            "state": state, "statistic": ev["statistic"], "value": ev["value"],
            "threshold": ev["threshold"], "window": ev["window"],
            "message": (f"{self.model}/{ev['variant']}: {what} {state}: {ev['statistic']} = "
                        f"{ev['value']:.4g} {verb} threshold {ev['threshold']:.4g} "
                        f"over {ev['window']['n']} events"),
        }
        if state == "resolved" and not ev["window"]["n"]:  # observe_gone: the last values are stale
            alert["message"] = f"{self.model}/{ev['variant']}: {what} resolved: no traffic left in the window"
        if feature:
            alert["feature"] = feature
        if ev.get("p_value") is not None:
            alert["p_value"] = ev["p_value"]
        return alert
