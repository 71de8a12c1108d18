"""Topic names and partition counts: the one place every part of coalmine reads them from.

``$COALMINE_NAMESPACE`` (e.g. ``staging.``) prefixes every name, so that several coalmine
deployments (or test runs) can share one Kafka cluster.
"""

import os

NAMESPACE = os.environ.get("COALMINE_NAMESPACE", "")

PREDICTIONS = NAMESPACE + "coalmine.predictions"
LABELS = NAMESPACE + "coalmine.labels"
ALERTS = NAMESPACE + "coalmine.alerts"
COMMANDS = NAMESPACE + "coalmine.commands"
DEADLETTER = NAMESPACE + "coalmine.deadletter"
#: internal: stage-1 bucket partials, keyed by model, read by the evaluating stage
PARTIALS = NAMESPACE + "coalmine.partials"
#: optional (`coalmine worker --publish-evaluations`): every evaluation, one message a bucket
EVALUATIONS = NAMESPACE + "coalmine.evaluations"
#: internal, compacted: stage 2's state, each model's in its partials partition
STATE = NAMESPACE + "coalmine.state"

#: predictions and labels must be co-partitioned (same count) so joins stay local
DEFAULT_PARTITIONS = 6

#: short names accepted by the command line (`coalmine tail alerts`)
SHORT_NAMES = {
    "predictions": PREDICTIONS,
    "labels": LABELS,
    "alerts": ALERTS,
    "commands": COMMANDS,
    "deadletter": DEADLETTER,
    "partials": PARTIALS,
    "state": STATE,
    "evaluations": EVALUATIONS,
}

#: topics whose records are kept by key, the latest one each
COMPACTED = {STATE}


def resolve(name: str) -> str:
    """Full topic name for a short one; full names pass through."""
    return SHORT_NAMES.get(name, name)


def all_topics(partitions: int = DEFAULT_PARTITIONS) -> dict[str, int]:
    """Every topic coalmine uses with its partition count (create them before workers start)."""
    return {t: partitions for t in SHORT_NAMES.values()}
