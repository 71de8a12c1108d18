"""Stage 2's rollout judge: shadow, canary and A/B evaluations on the window, and the commands
they lead to. Called by :class:`~coalmine.streams.evaluator.Evaluator` after every bucket."""

from __future__ import annotations

import math

from coalmine.streams import rollout as R
from coalmine.streams.drift import rate_increase_surprise
from coalmine.streams.latency import latency_quantile
from coalmine.streams.records import Command, Evaluation, Window
from coalmine.streams.sketch import Summary

#: the canary's health checks wait for this many canary events in the window
MIN_CANARY_EVENTS = 50
MIN_LATENCY_SAMPLES = 200


def _surprise_threshold(q: float) -> float:
    return -math.log10(q)


def variants_watched(checks: tuple[str, ...]) -> tuple[str, ...]:
    """The variants whose windows the checks see: the champion, the canary (canary and A/B
    checks) and the shadow.

    >>> variants_watched(("drift", "ab"))
    ('champion', 'canary')
    """
    return (
        ("champion",)
        + (("canary",) if "canary" in checks or "ab" in checks else ())
        + (("shadow",) if "shadow" in checks else ())
    )


class RolloutJudge:
    """Shadow, canary and A/B judgement of one model, and its :class:`RolloutController`."""

    def __init__(
        self, model: str, checks: tuple[str, ...], policy: R.RolloutPolicy, bucket_ms: int
    ):
        self.checks, self.policy, self.bucket_ms = checks, policy, bucket_ms
        self.controller = R.RolloutController(model, policy)
        self.shadow_seen: dict[str, ShadowSeen] = {}
        self.best_ab_p: dict[str, float] = {}  # canary version -> running min always-valid p
        self.weight_changed_ts = -1
        self.canary_first_seen: dict[str, int] = {}
        # canary version -> its sequential tests against the champion: failures, label errors
        self.canary_cusums: dict[str, dict[str, R.BernoulliCUSUM]] = {}
        # champion version -> its counts since it was first seen: the sequential tests' null
        # is known far better from its whole history than from one window
        self.champion_seen: dict[str, Summary] = {}
        self.model = model
        # the evaluation under way: its time and windows
        self._end, self._spans = 0, dict[str, Window]()

    def _evaluation(
        self,
        variant: str,
        check: str,
        statistic: str,
        value: float,
        threshold: float | None,
        p_value: float | None = None,
        **evidence,
    ) -> Evaluation:
        return Evaluation(
            self.model,
            self._end,
            self._spans[variant],
            variant,
            check,
            None,
            statistic,
            value,
            threshold,
            p_value,
            evidence,
        )

    def evaluate(
        self,
        ring,
        end: int,
        spans: dict[str, Window],
        windows: dict[str, Summary],
        current: dict[str, Summary],
        versions: dict[str, str],
        q: float,
    ) -> tuple[list[Evaluation], dict]:
        """Evaluations for the window (``spans``: each variant's window extent), and the
        verdicts :meth:`decide` acts on."""
        self._end, self._spans = end, spans
        evs: list[Evaluation] = []
        verdicts: dict = {}
        champ = windows.get("champion")
        if "canary" in self.checks and "champion" in current:
            seen = self.champion_seen.get(versions.get("champion", ""))
            self.champion_seen[versions.get("champion", "")] = (
                current["champion"] if seen is None else seen + current["champion"]
            )
        if "canary" in self.checks and "canary" in windows and champ is not None:
            canary_evs = self._canary(windows["canary"], champ, q)
            canary_evs += self._canary_sequential(
                versions.get("canary", ""),
                current.get("canary"),
                self.champion_seen.get(versions.get("champion", ""), champ),
                q,
            )
            evs += canary_evs
            canary = windows["canary"]
            if canary.n >= MIN_CANARY_EVENTS:
                healthy = not any(e.exceeded for e in canary_evs)
                # a step needs health shown, not just bad health not yet proved: the serving
                # error rate's upper 95% bound under the limit
                confident = (
                    R.wilson_interval(canary.errors, canary.n, 0.1)[1] <= self.policy.max_error_rate
                )
                verdicts["canary"] = (
                    healthy,
                    confident,
                    current["canary"].n if "canary" in current else 0,
                    {e.statistic: e.value for e in canary_evs},
                )
        if "shadow" in self.checks and "shadow" in windows and "shadow" in versions:
            shadow_evs = self._shadow(windows["shadow"], q)
            evs += shadow_evs
            verdicts["shadow"] = self._shadow_verdict(
                end, versions["shadow"], current.get("shadow"), shadow_evs
            )
        if "ab" in self.checks and "canary" in windows and champ is not None:
            ab_evs = self._ab(ring, end, windows["canary"], champ, versions.get("canary", ""))
            evs += ab_evs
            verdicts["srm"] = any(e.check == "srm" and e.exceeded for e in ab_evs)
        return evs, verdicts

    def _canary(self, canary: Summary, champ: Summary, q: float) -> list[Evaluation]:
        p = self.policy
        limit = _surprise_threshold(q)
        low, _ = R.wilson_interval(canary.errors, max(canary.n, 1), 2 * q)
        evs = [
            self._evaluation(
                "canary",
                "canary_health",
                "error_rate_lower_bound",
                low,
                p.max_error_rate,
                error_rate=canary.errors / max(canary.n, 1),
            ),
            self._evaluation(
                "canary",
                "canary_health",
                "errors_vs_champion",
                _rate_surprise(canary.errors, canary.n, champ.errors, champ.n),
                limit,
            ),
        ]
        if canary.latency.sum() >= MIN_LATENCY_SAMPLES:
            evs.append(
                self._evaluation(
                    "canary",
                    "canary_health",
                    "p99_latency_ms",
                    latency_quantile(canary.latency, 0.99),
                    p.max_p99_latency_ms,
                    champion_p99_latency_ms=latency_quantile(champ.latency, 0.99),
                )
            )
        if canary.labelled and champ.labelled:
            evs.append(
                self._evaluation(
                    "canary",
                    "canary_health",
                    "label_errors_vs_champion",
                    _rate_surprise(
                        canary.label_errors, canary.labelled, champ.label_errors, champ.labelled
                    ),
                    limit,
                    error_rate=canary.label_errors / canary.labelled,
                    champion_error_rate=champ.label_errors / champ.labelled,
                )
            )
        return evs

    def _canary_sequential(
        self, version: str, bucket: Summary | None, champ: Summary, q: float
    ) -> list[Evaluation]:
        r"""CUSUMs of the canary's failures and labelled errors against the champion's
        (:class:`~coalmine.streams.rollout.BernoulliCUSUM`), fed every bucket: the window
        tests wait for a window's worth of evidence, these accumulate it from the first
        canary event and decide within a few tens of percent of the information bound.

        Null: the champion's rate since it was first seen, at its upper 95% bound (a null set
        too low would let a canary as good as the champion alarm); alternative:
        ``max_error_rate`` more. Threshold :math:`h = \ln(1/q)`: Wald's bound gives at least
        :math:`1/q` canary events, hence evaluations, between false alarms, within the share
        of the model's false-alarm budget every rollout check gets."""
        h = math.log(1 / q)
        cusums = self.canary_cusums.setdefault(
            version, {name: R.BernoulliCUSUM(h) for name in ("failures", "label_errors")}
        )
        counts = {
            "failures": (
                champ.errors,
                champ.n,
                bucket.errors if bucket else 0,
                bucket.n if bucket else 0,
            ),
            "label_errors": (
                champ.label_errors,
                champ.labelled,
                bucket.label_errors if bucket else 0,
                bucket.labelled if bucket else 0,
            ),
        }
        evs = []
        for name, (x0, n0, x, n) in counts.items():
            if not n0:
                continue
            p0 = R.wilson_interval(x0, n0, 0.1)[1]
            p1 = min(p0 + self.policy.max_error_rate, (1 + p0) / 2)
            cusum = cusums[name]
            cusum.threshold = h
            cusum.update(n, x, p0, p1)
            evs.append(
                self._evaluation(
                    "canary",
                    "canary_health",
                    f"cusum_{name}_vs_champion",
                    cusum.statistic,
                    h,
                    champion_rate_bound=p0,
                    rate_to_detect=p1,
                )
            )
        return evs

    def _shadow(self, shadow: Summary, q: float) -> list[Evaluation]:
        p = self.policy
        evs = []
        if shadow.paired:
            low, high = R.wilson_interval(shadow.agree, shadow.paired, 2 * q)
            evs.append(
                self._evaluation(
                    "shadow",
                    "shadow_agreement",
                    "disagreement_lower_bound",
                    1 - high,
                    1 - p.shadow_min_agreement,
                    agreement=shadow.agree / shadow.paired,
                    agreement_interval=[low, high],
                    shadow_missing=shadow.shadow_missing,
                    latency_overhead_ms=shadow.latency_overhead_sum / shadow.paired,
                )
            )
        if shadow.b + shadow.c:
            pv = R.mcnemar_exact(shadow.b, shadow.c)
            worse = -math.log10(max(pv, 1e-300)) if shadow.b > shadow.c else 0.0
            evs.append(
                self._evaluation(
                    "shadow",
                    "shadow_accuracy",
                    "mcnemar_worse",
                    worse,
                    _surprise_threshold(q),
                    pv,
                    b=shadow.b,
                    c=shadow.c,
                    paired_labelled=shadow.paired_labelled,
                    verdict="worse"
                    if worse > _surprise_threshold(q)
                    else "better"
                    if shadow.c > shadow.b and pv < q
                    else "not distinguishable yet",
                )
            )
        return evs

    def _shadow_verdict(
        self, end: int, version: str, current: Summary | None, evs: list[Evaluation]
    ) -> tuple[str | None, dict]:
        """The shadow's verdict (see :meth:`RolloutController.on_shadow`) and its evidence."""
        seen = self.shadow_seen.setdefault(version, ShadowSeen(end))
        if current is not None:
            seen.add(current)
        evidence = seen.evidence()
        if any(e.check == "shadow_accuracy" and e.exceeded for e in evs):
            return "worse", evidence
        if any(e.exceeded for e in evs):
            return "fail", evidence
        p = self.policy
        # judged only once a missing answer would have shown (the shadow timeout has passed)
        duration = max(p.shadow_min_duration_ms, p.shadow_timeout_ms + self.bucket_ms)
        if seen.paired < p.shadow_min_events or end - seen.first < duration:
            return None, evidence
        # labels are expected: agreement says the shadow answers alike, not that it is right
        # as often; it passes once its labelled pairs are enough and show no sign of it
        # being worse, not even weak evidence
        if "performance" in self.checks and (
            seen.labelled < p.shadow_min_labelled_pairs
            or R.mcnemar_worse_p(seen.b, seen.c) < R.WEAK_EVIDENCE
        ):
            return None, evidence
        return "pass", evidence

    def _ab(
        self, ring, end: int, canary: Summary, champ: Summary, version: str
    ) -> list[Evaluation]:
        p = self.policy
        evs = []
        w = R.welch(
            champ.outcome_n,
            champ.outcome_sum,
            champ.outcome_sumsq,
            canary.outcome_n,
            canary.outcome_sum,
            canary.outcome_sumsq,
            p.ab_alpha,
        )
        if w is not None:
            se2 = (w.diff / w.t) ** 2 if w.t not in (0, math.inf) else 0.0
            pooled_sd = abs(w.diff / w.cohen_d) if w.cohen_d else 0.0
            p_av = R.msprt_p_value(w.diff, se2, (p.ab_mde_sd * pooled_sd) ** 2 or 1e-12)
            best = self.best_ab_p[version] = min(self.best_ab_p.get(version, 1.0), p_av)
            evs.append(
                self._evaluation(
                    "canary",
                    "ab_test",
                    "always_valid_p",
                    -math.log10(max(best, 1e-300)),
                    -math.log10(p.ab_alpha),
                    best,
                    difference=w.diff,
                    ci=list(w.ci),
                    cohen_d=w.cohen_d,
                    welch_t=w.t,
                    welch_p=w.p_value,
                    decision_valid=best < p.ab_alpha,
                )
            )
        if version not in self.canary_first_seen:  # a new canary: its split starts after the
            # bucket it appeared in, which may still hold the previous version's traffic
            first = min(b.start for b in ring if "canary" in b.variants)
            # the ring's buckets are contiguous (a low-traffic model's span several)
            self.canary_first_seen[version] = next((b.start for b in ring if b.start > first), end)
        managed = "canary" in self.checks
        if managed and version not in self.controller.step:
            return evs  # the weight in force is unknown until the controller takes the canary on
        weight = self.controller.weight(version) if managed else p.ab_canary_weight
        since = max(self.canary_first_seen[version], self.weight_changed_ts + p.srm_grace_ms)
        observed = {"champion": 0, "canary": 0}
        for b in ring:
            if b.start >= since:
                for v in observed:
                    observed[v] += b.variants[v].n if v in b.variants else 0
        if sum(observed.values()) >= MIN_CANARY_EVENTS and 0 < weight < 100:
            pv = R.srm_p_value(observed, {"champion": 100 - weight, "canary": weight})
            evs.append(
                self._evaluation(
                    "canary",
                    "srm",
                    "srm_surprise",
                    -math.log10(max(pv, 1e-300)),
                    -math.log10(p.srm_alpha),
                    pv,
                    observed=observed,
                    weight=weight,
                )
            )
        return evs

    def decide(
        self, end: int, versions: dict[str, str], verdicts: dict, firing_ids: dict
    ) -> list[Command]:
        """Commands from this evaluation's verdicts (each decision once)."""
        commands = []
        if "shadow" in verdicts:
            ids = [i for (v, c, _), i in firing_ids.items() if v == "shadow"]
            verdict, evidence = verdicts["shadow"]
            cmd = self.controller.on_shadow(end, versions["shadow"], verdict, evidence, ids)
            commands += [cmd] if cmd else []
        if verdicts.get("srm") and "canary" in versions:
            ids = [i for (v, c, _), i in firing_ids.items() if c == "srm"]
            cmd = self.controller.on_srm(end, versions["canary"], {}, ids)
            commands += [cmd] if cmd else []
        if "canary" in verdicts and "canary" in versions:
            healthy, confident, events, evidence = verdicts["canary"]
            ids = [
                i for (v, c, _), i in firing_ids.items() if v == "canary" and c == "canary_health"
            ]
            cmd = self.controller.on_canary(
                end, versions["canary"], healthy, events, evidence, ids, confident
            )
            commands += [cmd] if cmd else []
        for cmd in commands:
            if cmd.action == "set_weight":
                self.weight_changed_ts = end
            if cmd.action == "promote":
                cmd.evidence = {**cmd.evidence, "replaces": versions.get("champion")}
        return commands


class ShadowSeen:
    """What a shadow version showed since it first appeared: paired requests, labelled pairs
    and McNemar's discordant counts (b: only the champion right; c: only the shadow)."""

    def __init__(self, first: int):
        self.first = first
        self.paired = self.labelled = self.b = self.c = 0

    def add(self, bucket: Summary) -> None:
        self.paired += bucket.paired
        self.labelled += bucket.paired_labelled
        self.b += bucket.b
        self.c += bucket.c

    def evidence(self) -> dict:
        return {
            "paired": self.paired,
            "paired_labelled": self.labelled,
            "b": self.b,
            "c": self.c,
            "mcnemar_worse_p": R.mcnemar_worse_p(self.b, self.c),
        }


def _rate_surprise(x: int, n: int, x_ref: int, n_ref: int) -> float:
    return rate_increase_surprise(x, n, x_ref, n_ref) if n and n_ref else 0.0
