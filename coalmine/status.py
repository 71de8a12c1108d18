"""`coalmine status`: per model, what serves now, where each version stands in its rollout,
what is firing, and the lineage of versions with the commands and evidence behind them.

Built from the topics alone (commands, alerts, the latest predictions), so any machine that
reaches the broker can answer it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

import orjson

from coalmine import events as contract
from coalmine import topics
from coalmine.client import env_verifier, tail
from coalmine.security import client_kwargs
from coalmine.signing import Verifier

#: predictions read from the end of each partition to see which versions serve now
RECENT_PER_PARTITION = 300


@dataclass
class ModelStatus:
    serving: dict[str, str] = field(default_factory=dict)  # variant -> version (latest predictions)
    stages: dict[str, str] = field(default_factory=dict)  # version -> stage / weight
    firing: list[str] = field(default_factory=list)
    lineage: list[str] = field(default_factory=list)


def _stage(command: dict) -> str:
    if command["action"] == "promote" and command.get("stage", "production") != "production":
        return f"{command['stage']} (validated)"
    return {
        "set_weight": f"canary at {command.get('weight', 0):g}%",
        "promote": "production (promoted)",
        "rollback": "rolled back",
        "pause": "paused",
    }.get(command["action"], command["action"])


def summarize(
    commands: list[dict],
    alerts: list[dict],
    recent: list[dict],
    verifier: Verifier | None = None,
    notes: list[str] | None = None,
    alert_verifier: Verifier | None = None,
) -> dict[str, ModelStatus]:
    """Fold the three topics into a status per model (pure, for tests).

    Commands and alerts come in topic order. A record that is not a valid command or alert is
    left out, and so is a command ``verifier`` rejects, or an alert ``alert_verifier``
    rejects (forged, altered or replayed); each leaves a line in ``notes``.
    """
    notes = notes if notes is not None else []
    commands = _believed("command", _valid("command", commands, notes), verifier, notes)
    alerts = _believed("alert", _valid("alert", alerts, notes), alert_verifier, notes)
    out: dict[str, ModelStatus] = defaultdict(ModelStatus)
    for p in sorted(recent, key=lambda e: e.get("ts", 0)):
        out[p["model"]].serving[p["variant"]] = p["version"]
    for c in sorted(commands, key=lambda c: c["ts"]):
        st = out[c["model"]]
        if c["action"] == "pause" and st.stages.get(c["version"], "").startswith("canary"):
            st.stages[c["version"]] += ", paused"
        else:
            st.stages[c["version"]] = _stage(c)
        if c["action"] == "promote" and c.get("stage", "production") == "production":
            previous = c.get("evidence", {}).get("replaces") or "the previous champion"
            st.lineage.append(
                f"{c['version']} replaced {previous} at ts {c['ts']} "
                f"(command {c['command_id'][:12]}: {c['reason']})"
            )
        elif c["action"] == "rollback":
            st.lineage.append(
                f"{c['version']} rolled back at ts {c['ts']} (command {c['command_id'][:12]}: "
                f"{c['reason']}; evidence {orjson.dumps(c.get('evidence', {})).decode()[:200]})"
            )
    state: dict[tuple, dict] = {}
    for a in sorted(alerts, key=lambda a: a["ts"]):
        state[(a["model"], a["variant"], a["check"], a.get("feature"))] = a
    for (model, variant, check, feature), a in sorted(state.items(), key=lambda kv: str(kv[0])):
        if a["state"] == "firing":
            out[model].firing.append(
                f"{variant} {check}{' on ' + feature if feature else ''}: "
                f"{a['statistic']}={a['value']:.4g} > {a['threshold']:.4g} since ts {a['ts']}"
            )
    return dict(out)


async def _recent(bootstrap: str) -> list[dict]:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, **client_kwargs(bootstrap)
    )
    await consumer.start()
    try:
        parts = [
            TopicPartition(topics.PREDICTIONS, p)
            for p in sorted(consumer.partitions_for_topic(topics.PREDICTIONS) or ())
        ]
        if not parts:
            return []
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        for tp in parts:
            consumer.seek(tp, max(0, ends[tp] - RECENT_PER_PARTITION))
        out = []
        batch = await consumer.getmany(timeout_ms=2000)
        for messages in batch.values():
            for m in messages:
                try:
                    e = orjson.loads(m.value)
                    out.append({k: e[k] for k in ("model", "variant", "version", "ts")})
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue
        return out
    finally:
        await consumer.stop()


async def collect(bootstrap: str) -> tuple[dict[str, ModelStatus], list[str]]:
    """The status per model and notes (records left out, whether commands and alerts were
    verified).

    Commands and alerts are verified with ``$COALMINE_VERIFY_KEY`` (or
    ``$COALMINE_SIGNING_KEY``) when one is set: signature and sequence, not expiry, since
    this reads their history."""

    async def read(topic):
        # unverified here: summarize verifies, and says what it leaves out
        return [r async for r in tail(bootstrap, topic, until_idle=1.0, verifier=None)]

    commands, alerts, recent = await asyncio.gather(
        read(topics.COMMANDS), read(topics.ALERTS), _recent(bootstrap)
    )
    verifier = env_verifier(topics.COMMANDS, live=False)
    notes = []
    if verifier is None:
        notes.append(
            "commands and alerts not verified: set $COALMINE_VERIFY_KEY to leave out forged and "
            "replayed ones"
        )
    alert_verifier = env_verifier(topics.ALERTS, live=False)
    return summarize(commands, alerts, recent, verifier, notes, alert_verifier), notes


def _valid(kind: str, records: list[dict], notes: list[str]) -> list[dict]:
    """The records that follow their schema; one note for those that do not."""
    out, bad = [], []
    for r in records:
        try:
            out.append(contract.validate(kind, dict(r)))
        except contract.InvalidEvent as exc:
            bad.append(str(exc))
    if bad:
        notes.append(f"skipped {len(bad)} malformed {kind} record(s), the first: {bad[0]}")
    return out


def _believed(
    kind: str, records: list[dict], verifier: Verifier | None, notes: list[str]
) -> list[dict]:
    """The records ``verifier`` believes (all without one); a note for each it rejects."""
    if verifier is None:
        return records
    out = []
    for r in records:
        why = verifier.check(r)
        if why is None:
            out.append(r)
        else:
            notes.append(f"rejected {kind} {r[kind + '_id'][:12]} ({r['model']}): {why}")
    return out


def render(status: dict[str, ModelStatus], notes: list[str] | tuple = ()) -> str:
    lines = [f"note: {n}" for n in notes]
    if not status:
        return "\n".join(
            lines + ["no models seen yet (no predictions, commands or alerts on this broker)"]
        )
    for model, st in sorted(status.items()):
        lines.append(f"model {model}")
        serving = (
            ", ".join(f"{v}: {ver}" for v, ver in sorted(st.serving.items()))
            or "no recent predictions"
        )
        lines.append(f"  serving now   {serving}")
        for version, stage in st.stages.items():
            lines.append(f"  version {version:<6} {stage}")
        lines.append("  firing        " + ("none" if not st.firing else st.firing[0]))
        lines += [f"                {f}" for f in st.firing[1:]]
        lines.append("  lineage       " + ("none yet" if not st.lineage else st.lineage[0]))
        lines += [f"                {x}" for x in st.lineage[1:]]
    return "\n".join(lines)
