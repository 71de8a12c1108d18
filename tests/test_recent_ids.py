"""Stage 1's memory of recent event ids: compact, and it catches the same duplicates."""

from __future__ import annotations

import tracemalloc

import numpy as np

from coalmine.streams.recent_ids import RecentIds


def kept(recent: RecentIds, ids: list[str]) -> list[str]:
    mask = recent.first_seen(ids)
    return ids if mask is None else [i for i, k in zip(ids, mask) if k]


def test_memory_per_id_is_bounded():
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        recent = RecentIds(100_000)
        for start in range(0, 100_000, 1000):
            recent.first_seen([f"event-{i}" for i in range(start, start + 1000)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(recent) == 100_000
    assert held / 100_000 < 40, f"{held / 100_000:.1f} bytes an id"


def test_duplicates_across_the_generation_boundary_are_caught():
    recent = RecentIds(100)
    assert kept(recent, [f"e{i}" for i in range(100)]) == [f"e{i}" for i in range(100)]
    # e0..e99 are now the older generation: still caught, and a batch's repeat counts once
    assert kept(recent, ["e5", "n1", "e99", "n1", "n2"]) == ["n1", "n2"]
    assert kept(recent, [f"n{i}" for i in range(100)]) == ["n0"] + [f"n{i}" for i in range(3, 100)]
    # the n generation closed: e0..e99 are forgotten, n0..n99 still remembered
    assert kept(recent, ["e5", "n50"]) == ["e5"]


def test_the_same_events_are_kept_as_by_two_generations_of_sets():
    rng = np.random.default_rng(7)
    recent, current, older = RecentIds(50), set(), set()
    for _ in range(300):
        ids = [f"e{i}" for i in rng.integers(0, 400, rng.integers(0, 20))]
        expected = []
        for i in ids:
            if i not in current and i not in older:
                current.add(i)
                expected.append(i)
        if len(current) >= 50:
            current, older = set(), current
        assert kept(recent, ids) == expected
