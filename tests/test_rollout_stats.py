"""Shadow, canary and A/B statistics: agreement with scipy, error bounds, rollout behaviour."""

from __future__ import annotations

import hashlib
import json
from collections import deque
from functools import reduce
from operator import add
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest
from scipy import special, stats

from coalmine.streams.abtest import (AlwaysValidPValue, Moments, SampleRatioMismatch, WelchTest,
                                     ab_decision)
from coalmine.streams.canary import (CanaryHealth, LatencyHistogram, RolloutController,
                                     VariantStats, canonical_json, clopper_pearson_lower,
                                     rate_ratio_lower_bound, sign_command, verify_command)
from coalmine.streams.shadow import (McNemar, ShadowAgreement, agreement, mcnemar_exact_p,
                                     wilson_interval)

COMMAND_SCHEMA = json.loads((Path(__file__).parent.parent / "schemas" / "command.json").read_text())


# --- proportions and latency histograms -------------------------------------------------

@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (90, 100), (7, 5000), (5000, 5000)])
def test_wilson_and_clopper_pearson_equal_scipy(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n, special.ndtri(0.975)) == pytest.approx((ci.low, ci.high), abs=1e-12)
    exact = stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
    assert clopper_pearson_lower(k, n, 0.95) == pytest.approx(exact.low, abs=1e-12)  # one-sided 95%


def test_latency_quantiles_within_stated_relative_error():
    rng = np.random.default_rng(3)
    values = rng.lognormal(np.log(30.0), 1.0, 100_000)
    hist = LatencyHistogram()
    hist.add(values)
    for q in (0.01, 0.5, 0.9, 0.99, 0.999):
        exact = np.quantile(values, q, method="inverted_cdf")
        assert abs(hist.quantile(q) - exact) / exact <= hist.relative_error
    assert hist.relative_error <= 10 ** (1 / hist.bins_per_decade) - 1  # within the bin width


def test_latency_histograms_merge_exactly_and_round_trip():
    rng = np.random.default_rng(4)
    values = rng.lognormal(3.0, 1.5, 10_000)
    whole, first, second = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    whole.add(values)
    first.add(values[:3000])
    second.add(values[3000:])
    merged = first.merge(second)
    assert np.array_equal(merged.counts, whole.counts)
    back = LatencyHistogram.from_dict(orjson.loads(orjson.dumps(merged.to_dict())))
    assert np.array_equal(back.counts, whole.counts) and back.layout == whole.layout
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(LatencyHistogram(bins_per_decade=10))


def test_count_above_never_overcounts_and_is_exact_on_edges():
    rng = np.random.default_rng(5)
    values = rng.lognormal(3.0, 1.0, 5000)
    hist = LatencyHistogram()
    hist.add(values)
    for limit in (5.0, 23.7, 100.0, 333.0):
        assert hist.count_above(limit) <= (values >= limit).sum()
    edge = float(hist.edges[60])
    assert hist.count_above(edge) == (values >= edge).sum()


# --- shadow --------------------------------------------------------------------------------

def test_agreement_uses_tolerance_for_numbers_and_equality_for_classes():
    assert agreement(np.array([1, 2, 3]), np.array([1, 2, 4])).tolist() == [True, True, False]
    assert agreement(np.array([100.0, 100.0]), np.array([101.0, 103.0]), rtol=0.02).tolist() == [True, False]


def test_shadow_agreement_alerts_only_when_clearly_below_target():
    rng = np.random.default_rng(6)
    check = ShadowAgreement(target=0.95, confidence=0.99)
    at_target = [check.update(n, rng.binomial(n, 0.95)) or check.result.below_target
                 for n in rng.integers(20, 5000, 500)]
    assert sum(at_target) <= 5  # one-sided 0.5% per reading, 500 readings
    check.update(2000, rng.binomial(2000, 0.90))
    assert check.result.below_target and check.result.high < 0.95


@pytest.mark.parametrize("b,c", [(1, 0), (3, 12), (40, 41), (25, 10), (0, 7), (300, 260)])
def test_mcnemar_equals_scipy_binomtest(b, c):
    expected = stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-10)


def test_mcnemar_verdict_follows_the_discordant_pairs():
    test = McNemar(alpha=0.01)
    test.update(n=0, b=0, c=0)
    assert test.result.verdict == "undecided" and test.result.p_value == 1.0
    test.update(n=1000, b=60, c=20)
    assert test.result.verdict == "shadow_worse" and test.result.accuracy_delta == -0.04
    test.update(n=1000, b=20, c=60)
    assert test.result.verdict == "shadow_better"
    test.update(n=1000, b=20, c=30)
    assert test.result.verdict == "undecided"


# --- A/B -----------------------------------------------------------------------------------

def test_welch_equals_scipy_on_samples_and_summary_statistics():
    rng = np.random.default_rng(7)
    control, treatment = rng.normal(10.0, 2.0, 400), rng.normal(10.4, 3.0, 150)
    test = WelchTest(confidence=0.95)
    test.update(Moments.from_values(control), Moments.from_values(treatment))
    r = test.result
    ref = stats.ttest_ind(treatment, control, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert (r.t, r.p_value, r.df) == pytest.approx((ref.statistic, ref.pvalue, ref.df), rel=1e-9)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    from_stats = stats.ttest_ind_from_stats(treatment.mean(), treatment.std(ddof=1), 150,
                                            control.mean(), control.std(ddof=1), 400, equal_var=False)
    assert (r.t, r.p_value) == pytest.approx((from_stats.statistic, from_stats.pvalue), rel=1e-9)
    pooled = np.sqrt((399 * control.var(ddof=1) + 149 * treatment.var(ddof=1)) / 548)
    assert r.cohens_d == pytest.approx((treatment.mean() - control.mean()) / pooled, rel=1e-9)


def test_srm_equals_scipy_and_fires_on_a_departed_split_only():
    srm = SampleRatioMismatch(alpha=1e-3)
    srm.update([9000, 1200], [90, 10])
    ref = stats.chisquare([9000, 1200], [9180, 1020])
    assert (srm.result.chi2, srm.result.p_value) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-9)
    assert srm.result.mismatch
    rng = np.random.default_rng(8)
    fired = 0
    for observed in rng.multinomial(20_000, [0.75, 0.2, 0.05], size=300):
        srm.update(observed, [75, 20, 5])
        fired += srm.result.mismatch
    assert fired <= 3
    srm.update([1000, 3], [100, 0])  # canary traffic while its weight is 0
    assert srm.result.mismatch and srm.result.p_value == 0.0


def _batches(rng, experiments, peeks, size, shift=0.0):
    """Per experiment and peek: the moments of a batch of ``size`` N(shift, 1) outcomes."""
    return Moments.from_values(rng.standard_normal((experiments, peeks, size)) + shift)


def _peeking_experiments(rng, shift, experiments=3000, peeks=40):
    """Run many experiments (3:1 allocation), reading both tests after every batch; return
    the fraction where the always-valid and the naive t-test ever reported p <= 0.05."""
    control, treatment = _batches(rng, experiments, peeks, 60), _batches(rng, experiments, peeks, 20, shift)
    seq = AlwaysValidPValue(alpha=0.05)
    for j in range(peeks):
        seq.update(Moments(control.n, control.total[:, j], control.total_sq[:, j]),
                   Moments(treatment.n, treatment.total[:, j], treatment.total_sq[:, j]))
    cumulative = [Moments(m.n * np.arange(1, peeks + 1), m.total.cumsum(1), m.total_sq.cumsum(1))
                  for m in (control, treatment)]
    naive = WelchTest()
    naive.update(*cumulative)
    r = seq.result
    assert np.array_equal(r.p_value <= 0.05, r.decision != "undecided")
    return (r.p_value <= 0.05).mean(), (naive.result.p_value <= 0.05).any(axis=1).mean()


def test_always_valid_p_value_keeps_false_positives_under_alpha_when_peeking():
    always_valid, naive = _peeking_experiments(np.random.default_rng(9), shift=0.0)
    slack = 3 * np.sqrt(0.05 * 0.95 / 3000)
    assert always_valid <= 0.05 + slack
    assert naive > 0.05 + 4 * slack  # peeking at a fixed-sample test inflates it


def test_always_valid_p_value_detects_a_real_effect():
    always_valid, _ = _peeking_experiments(np.random.default_rng(10), shift=0.3, experiments=500)
    assert always_valid > 0.95


def test_ab_decision_is_withheld_on_sample_ratio_mismatch():
    rng = np.random.default_rng(11)
    seq, srm = AlwaysValidPValue(), SampleRatioMismatch()
    for _ in range(10):
        seq.update(Moments.from_values(rng.normal(0, 1, 900)), Moments.from_values(rng.normal(0.5, 1, 100)))
    srm.update([seq.result.n_control, seq.result.n_treatment], [90, 10])
    assert ab_decision(seq.result, srm.result) == "treatment_higher"
    srm.update([seq.result.n_control, seq.result.n_treatment], [50, 50])
    assert ab_decision(seq.result, srm.result) == "sample_ratio_mismatch"


# --- canary --------------------------------------------------------------------------------

@pytest.mark.parametrize("n1,n2,rate", [(1000, 19000, 0.002), (500, 9500, 0.05), (5000, 5000, 0.2)])
def test_rate_ratio_bound_covers_equal_rates_even_with_few_events(n1, n2, rate):
    rng = np.random.default_rng(12)
    pairs = zip(rng.binomial(n1, rate, 4000), rng.binomial(n2, rate, 4000))
    false_fails = np.mean([rate_ratio_lower_bound(k1, n1, k2, n2, 0.99) > 1 for k1, k2 in pairs])
    assert false_fails <= 0.01 + 3 * np.sqrt(0.01 * 0.99 / 4000)
    assert rate_ratio_lower_bound(4 * round(n1 * rate), n1, round(n2 * rate), n2, 0.99) > 1


def test_canary_latency_limit_fails_only_when_the_quantile_is_over_it():
    rng = np.random.default_rng(13)
    health = CanaryHealth(max_latency_ms=100.0, latency_quantile=0.99)
    for median_ms, fails in ((20.0, False), (50.0, True)):  # p99 = 2.4 x median
        latency = LatencyHistogram()
        latency.add(rng.lognormal(np.log(median_ms), 0.375, 5000))
        health.update(VariantStats(n=5000, latency=latency))
        assert health.result.checks["latency"]["failed"] is fails
        assert health.result.healthy is not fails


HEALTHY = {"error": 0.002, "label_error": 0.10, "median_ms": 20.0}


def _bucket(rng, n, error, label_error, median_ms):
    latency = LatencyHistogram()
    latency.add(rng.lognormal(np.log(median_ms), 0.5, n))
    labelled = rng.binomial(n, 0.5)
    return VariantStats(n, rng.binomial(n, error), labelled, rng.binomial(labelled, label_error), latency)


def _run_rollout(canary, seed, buckets=600, traffic=2000, window=10, key=None):
    """Event-time simulation: per 1 s bucket, traffic split by the weight in force; the health
    of the sliding window drives the controller. Returns (commands, canary events seen)."""
    rng = np.random.default_rng(seed)
    ctl = RolloutController("shuttle", "v2", steps=(5, 25, 50, 100), min_events=2000,
                            min_duration_ms=30_000, key=key)
    health = CanaryHealth(max_error_rate=0.01, max_latency_ms=200.0, max_label_error_rate=0.2)
    ring, commands, seen = deque(maxlen=window), [], 0
    for i in range(buckets):
        n_canary = rng.binomial(traffic, ctl.weight / 100)
        ring.append((_bucket(rng, n_canary, **canary), _bucket(rng, traffic - n_canary, **HEALTHY)))
        health.update(reduce(add, (c for c, _ in ring)), reduce(add, (h for _, h in ring)))
        cmd = ctl.update((i + 1) * 1000, n_canary, health.result)
        seen += n_canary if ctl.state == "running" or cmd else 0
        if cmd:
            commands.append(cmd)
    return commands, seen


@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_canary_steps_through_weights_then_promotes(seed):
    commands, _ = _run_rollout(HEALTHY, seed)
    assert [(c["action"], c.get("weight")) for c in commands] == [
        ("set_weight", 25), ("set_weight", 50), ("set_weight", 100), ("promote", None)]
    times = [0] + [c["ts"] for c in commands]
    assert min(np.diff(times)) >= 30_000
    assert all(c["evidence"]["step_events"] >= 2000 for c in commands)
    for c in commands:
        jsonschema.validate(c, COMMAND_SCHEMA)


@pytest.mark.parametrize("failure,check", [
    ({"error": 0.04}, "error_rate"),
    ({"median_ms": 60.0}, "latency_vs_champion"),
    ({"label_error": 0.2}, "label_error_rate_vs_champion"),
])
def test_failing_canary_rolls_back_within_bounded_evidence(failure, check):
    commands, seen = _run_rollout(HEALTHY | failure, seed=2)
    assert [c["action"] for c in commands] == ["rollback"]
    assert check in commands[0]["evidence"]["checks"] and check in commands[0]["reason"]
    assert commands[0]["evidence"]["checks"][check]["failed"]
    assert seen <= 2000  # before the first step's evidence could promote it


def test_commands_are_deterministic_signed_and_tamper_evident():
    key = b"rollout-secret"
    first, _ = _run_rollout(HEALTHY, seed=0, key=key)
    again, _ = _run_rollout(HEALTHY, seed=0, key=key)
    assert first == again
    for cmd in first:
        wire = orjson.loads(orjson.dumps(cmd))
        assert verify_command(wire, key)
        content = {k: v for k, v in cmd.items() if k not in ("command_id", "signature")}
        assert cmd["command_id"] == hashlib.sha256(canonical_json(content)).hexdigest()
    cmd = first[0]
    assert not verify_command(cmd | {"weight": 100}, key)
    tampered = json.loads(json.dumps(cmd))
    tampered["evidence"]["step_events"] += 1
    assert not verify_command(tampered, key)
    assert not verify_command(cmd, b"another key")
    unsigned = {k: v for k, v in cmd.items() if k != "signature"}
    assert not verify_command(unsigned, key)
    assert verify_command(sign_command(unsigned, key), key)
