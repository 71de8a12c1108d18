"""Issue 12 on the embedded broker: an oversized message and retried events cost nothing."""

from __future__ import annotations

import pytest

from coalmine import simulator
from coalmine.launch import wait_until

pytestmark = pytest.mark.integration
RATE = 300


def test_a_600_kb_message_is_dead_lettered_and_duplicates_count_once(
    namespace, start_worker, shuttle_config
):
    worker = start_worker(shuttle_config)
    scenario = simulator.Scenario(n_events=6_000, rate_per_s=RATE, label_fraction=0, seed=12)
    events = [e for e in simulator.generate(scenario) if e[0] == "prediction"]
    retried = events[1000:1499]  # 499 events sent twice, as a producer's retries
    stream = events[:3000] + [("prediction", b"\x00not json" + b"x" * 600_000)] + events[3000:]
    namespace.publish(stream[:4000] + retried + stream[4000:])
    valid = len(events)
    wait_until(
        lambda: worker.metric("coalmine_events_total") >= valid,
        90,
        f"{valid} events counted",
        interval=0.5,
    )
    wait_until(lambda: worker.metric("coalmine_duplicates_total") >= 499, 30, "499 duplicates", 0.5)
    dead = namespace.read("deadletter")
    assert [d["reason"][:8] for d in dead] == ["not JSON"]
    assert dead[0]["original_size"] == 600_009 and len(dead[0]["original_b64"]) < 100_000
    assert worker.metric("coalmine_events_total") == valid
    assert worker.metric("coalmine_duplicates_total") == 499
    assert worker.proc.poll() is None and worker.get("/health")
