"""A model's rollout verdict over HTTP, for controllers that gate on a URL.

* Argo Rollouts' web metric provider reads the JSON body: ``jsonPath: "{$.healthy}"`` with
  ``successCondition: result == true`` (and ``failureCondition: result == false``).
* Flagger's webhooks (``confirm-rollout``, ``confirm-promotion``, ``rollback``) only read the
  HTTP status: 200 lets the rollout go on, anything else holds it.

So the verdict answers 200 with ``"healthy": true`` while the version has not been rolled back
and none of its variants' alerts is firing, and 409 with ``"healthy": false`` otherwise.

>>> from types import SimpleNamespace
>>> from coalmine.streams.rollout import RolloutController
>>> controller = RolloutController("m")
>>> _ = controller.on_canary(1000, "v2", healthy=False, events=60)  # rolled back
>>> evaluator = SimpleNamespace(judge=SimpleNamespace(controller=controller),
...     versions={"champion": "v1", "canary": "v2"}, alerts=SimpleNamespace(firing=[]))
>>> status, body = verdict("m", evaluator)
>>> status, body["version"], body["stage"], body["healthy"], body["decision"]
(409, 'v2', 'rolled_back', False, 'rollback')
"""

from __future__ import annotations

from typing import Any

#: what the controller's stage means for a gate
_DECISIONS = {"rolled_back": "rollback", "production": "promote"}


def verdict(model: str, evaluator: Any, version: str | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) of ``version`` (default: the canary's, else the shadow's) as
    ``evaluator`` (a :class:`~coalmine.streams.evaluator.Evaluator`) judges it now."""
    serving = evaluator.versions
    version = version or serving.get("canary") or serving.get("shadow")
    if version is None:
        return 404, {"model": model, "error": "no version is being rolled out"}
    controller = evaluator.judge.controller
    stage = controller.stages.get(
        version, "shadow" if serving.get("shadow") == version else "canary"
    )
    variants = {v for v, ver in serving.items() if ver == version}
    firing = [
        {"variant": v, "check": check, "feature": feature}
        for v, check, feature in evaluator.alerts.firing
        if v in variants
    ]
    healthy = stage != "rolled_back" and not firing
    body = {
        "model": model,
        "version": version,
        "stage": stage,
        "weight": controller.weight(version),
        "healthy": healthy,
        "decision": _DECISIONS.get(stage, "continue" if healthy else "hold"),
        "firing": firing,
    }
    return (200 if healthy else 409), body
