"""The CUSUM's calibrated threshold against simulation: checked once per bucket, with a
reference whose mean is itself a sample estimate, it runs as long between false alarms as
asked (no broker)."""

import math

import numpy as np
import pytest

from coalmine.streams.sequential import CusumThresholds, cusum_threshold, joint_cusum_threshold


def simulated_run_length(
    h: float,
    k: float,
    bucket_events: int,
    reference_events: int | None,
    chains: int = 2000,
    buckets: int = 1500,
    seed: int = 0,
) -> float:
    """Events per false alarm of a two-sided CUSUM on standardized bucket sums, each chain with
    its own reference error (the reference mean off by N(0, 1/m) standard deviations)."""
    rng = np.random.default_rng(seed)
    eps = (
        rng.standard_normal(chains) / math.sqrt(reference_events)
        if reference_events
        else np.zeros(chains)
    )
    upper, lower, alarms = np.zeros(chains), np.zeros(chains), 0
    for _ in range(buckets):
        z = rng.standard_normal(chains) * math.sqrt(bucket_events) + eps * bucket_events
        upper = np.maximum(0, upper + z - k * bucket_events)
        lower = np.maximum(0, lower - z - k * bucket_events)
        hit = (upper > h) | (lower > h)
        alarms += int(hit.sum())
        upper[hit] = lower[hit] = 0
    return chains * buckets * bucket_events / max(alarms, 1)


@pytest.mark.parametrize(
    "bucket_events, reference_events", [(10, None), (75, None), (75, 1000), (10, 1000)]
)
def test_threshold_gives_the_asked_run_length(bucket_events, reference_events):
    target, k = 20_000, 0.15
    h = cusum_threshold(target, k, bucket_events, reference_events)
    assert (
        0.65 * target < simulated_run_length(h, k, bucket_events, reference_events) < 1.6 * target
    )


def test_a_per_event_threshold_checked_per_bucket_would_be_far_too_conservative():
    """Why the bucket size enters: the per-event threshold at 75-event buckets runs several
    times longer than asked, i.e. detects later than it needs to."""
    target, k = 20_000, 0.15
    assert simulated_run_length(cusum_threshold(target, k), k, 75, None) > 3 * target


def test_thresholds_follow_the_bucket_size():
    table = CusumThresholds(1e8, 0.15, reference_events=5000)
    for n in (1, 16, 75, 300, 4096):
        assert table(n) == pytest.approx(cusum_threshold(1e8, 0.15, n, 5000), rel=0.02)
    assert table(1) > table(75) > table(300)


@pytest.mark.parametrize("columns, bucket_events", [(2, 75), (10, 75), (10, 300)])
def test_joint_threshold_holds_the_run_length_without_wasting_it(columns, bucket_events):
    """Wald's bound: the joint CUSUM runs at least as long as asked between false alarms
    (simulated on chi-square increments, the reference error included). The bound is loose, 6
    to 50 times the run length asked, which costs about a tenth of the threshold; a wrong
    exponent would be off by orders of magnitude."""
    target, shift, m = 20_000, 0.3, 1000
    h = joint_cusum_threshold(target, columns, shift, bucket_events, m)
    rng = np.random.default_rng(1)
    chains, buckets = 2000, 1500  # hundreds of alarms at least: the bounds are far wider
    bias = rng.standard_normal((chains, columns)) * math.sqrt(
        bucket_events / m
    )  # z's mean, per chain
    # the sum of squares of z ~ N(bias, I), drawn as the noncentral chi-square it follows
    noncentrality = (bias**2).sum(axis=1)
    s, alarms = np.zeros(chains), 0
    for _ in range(buckets):
        squares = rng.noncentral_chisquare(columns, noncentrality)
        s = np.maximum(0, s + squares - columns - bucket_events * shift**2 / 2)
        hit = s > h
        alarms += int(hit.sum())
        s[hit] = 0
    run_length = chains * buckets * bucket_events / max(alarms, 1)
    assert target < run_length < 60 * target


def test_settings_without_a_joint_threshold_fail_at_start_up(tmp_path):
    """The threshold tables are solved lazily, by bucket size: a reference too small for the
    joint CUSUM over its four features (its own sampling noise outweighs the shift's allowance)
    is still reported at start-up, naming the model, not by stage 2 in the middle of a stream.
    100 rows, the fewest that are calibrated at all; four features, not ten: 1.5 s, not 3.5."""
    from coalmine.baselines import build_baselines
    from coalmine.config import parse_config

    rng = np.random.default_rng(0)
    names = [f"f{j}" for j in range(4)]
    rows = "".join(",".join(f"{v:.4f}" for v in row) + "\n" for row in rng.normal(size=(100, 4)))
    (tmp_path / "ref.csv").write_text(",".join(names) + "\n" + rows)
    config = parse_config({"models": [{"name": "fraud", "reference": "ref.csv"}]}, tmp_path)
    with pytest.raises(ValueError, match="^model fraud: .*cannot calibrate thresholds"):
        build_baselines(config)
