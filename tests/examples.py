"""Example events shared by the contract tests: each valid, each a base for one-defect variants."""

LABEL = {"event_id": "l1", "request_id": "r1", "model": "m", "ts": 1700000002000, "label": 1}
ALERT = {
    "alert_id": "a1",
    "ts": 1700000010000,
    "model": "m",
    "variant": "canary",
    "check": "drift",
    "state": "firing",
    "statistic": "ks",
    "value": 0.31,
    "threshold": 0.2,
    "window": {"start_ts": 1700000000000, "end_ts": 1700000010000, "n": 500},
    "message": "drift on f1",
}
COMMAND = {
    "command_id": "c1",
    "ts": 1700000010000,
    "model": "m",
    "version": "v2",
    "action": "rollback",
    "reason": "canary unhealthy",
    "alert_ids": ["a1"],
}
