"""Memory of stage 1's label join: bytes a prediction costs while it waits for its label.

Feeds N unlabelled predictions (36-character request ids, as UUIDs are; class predictions;
latencies) as raw messages through one partition's stage 1 and measures, with tracemalloc, the
memory freed when the table is then dropped, divided by N.

usage: python benchmarks/label_join_memory.py [--predictions N]
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc
import uuid

import numpy as np
import orjson

from coalmine.ingest import PartitionIngest
from coalmine.streams import Baseline, ModelSettings, ReferenceData

T0 = 1_700_000_000_000
#: bytes a waiting prediction may cost (~100 measured; a dict of tuples: ~250)
CEILING = 120


def baseline(n: int) -> Baseline:
    rng = np.random.default_rng(1)
    ref = ReferenceData(
        {"f0": rng.standard_normal(2000), "prediction": rng.integers(0, 3, 2000).astype(float)},
        rng.integers(0, 3, 2000).astype(float),
    )
    settings = ModelSettings(
        name="m", checks=("performance",), label_ttl_ms=10**9, label_join_max=2 * n
    )
    return Baseline(settings, ref)


def messages(n: int, start: int, stop: int) -> list[bytes]:
    """Prediction messages ``start`` to ``stop`` of ``n``."""
    rids = np.random.default_rng(2).integers(0, 2**63, n)[start:stop]
    return [
        orjson.dumps(
            {
                "event_id": f"e{i}",
                "request_id": str(uuid.UUID(int=int(rid))),
                "model": "m",
                "version": "1",
                "variant": "champion",
                "ts": T0 + i,
                "features": {"f0": 0.5},
                "prediction": i % 3,
                "latency_ms": 3.5 + i % 7,
                "status": "ok",
            }
        )
        for i, rid in zip(range(start, stop), rids.tolist())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions", type=int, default=100_000)
    n = parser.parse_args().predictions
    ingest = PartitionIngest({"m": baseline(n)})
    sketcher = ingest.sketcher
    tracemalloc.start()
    for start in range(0, n, 10_000):
        ingest.feed("prediction", messages(n, start, start + 10_000))
    waiting = sum(map(len, sketcher.joins.values()))
    reported = getattr(sketcher, "join_bytes", lambda: None)()
    gc.collect()
    with_table = tracemalloc.get_traced_memory()[0]
    sketcher.joins.clear()  # what only the table held is freed
    gc.collect()
    per = (with_table - tracemalloc.get_traced_memory()[0]) / waiting
    tracemalloc.stop()
    print(f"{waiting:,} unlabelled predictions waiting for their labels")
    print(f"bytes a waiting prediction holds (tracemalloc): {per:.0f} (ceiling {CEILING})")
    if reported is not None:
        print(f"coalmine_label_join_bytes: {reported:,} ({reported / waiting:.0f} a prediction)")
    if per > CEILING:
        raise SystemExit("over the ceiling")


if __name__ == "__main__":
    main()
