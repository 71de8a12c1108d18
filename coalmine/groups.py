"""Consumers that leave their group when they stop, on the embedded broker too.

aiokafka sends LeaveGroup on stop only from generation 1, the first that Kafka numbers. The
embedded broker (Tansu) numbers a group's first generation 0, so a worker stopped there stayed
in its consumer groups until its session timed out, and the next worker's join waited for that:
a restarted worker folded its first event ~13 s later than a fresh one
(``benchmarks/worker_start.py``). :func:`install` makes every aiokafka consumer of the process,
Faust's included, leave from generation 0. LeaveGroup names the member, not the generation,
and -1 stays aiokafka's "no generation": on Kafka nothing changes.
``tests/test_recovery.py`` fails if aiokafka's internals this relies on change.
"""

from __future__ import annotations

from aiokafka.consumer.group_coordinator import GroupCoordinator

_aiokafka_leave = GroupCoordinator._maybe_leave_group


async def _leave_from_generation_0(self: GroupCoordinator) -> None:
    if self.generation == 0:  # the embedded broker's first generation, Kafka's 1
        self.generation = 1  # only the condition to send LeaveGroup reads it
    await _aiokafka_leave(self)


def install() -> None:
    """Make aiokafka's group coordinator leave from generation 0 (idempotent)."""
    GroupCoordinator._maybe_leave_group = _leave_from_generation_0  # type: ignore[method-assign]
